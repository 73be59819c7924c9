"""``cairn export`` and ``cairn copy``, run as a user runs them (a few in a subprocess, most in-process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import cairn
from cairn._cli_render import human_size
from cairn._read import blob_path
from cairn._transfer import copy_checkpoints, default_prefix, export_checkpoint
from cairn.cli import main


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cairn", *args], capture_output=True, text=True, check=False)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _state(model: nn.Module, epoch: int) -> dict[str, object]:
    return {
        "model": model,
        "extra": {
            "bf16": (torch.arange(6, dtype=torch.bfloat16) / 3).reshape(2, 3),
            "ids": torch.arange(5, dtype=torch.int64) - 2,
            "order": np.arange(7, dtype=np.int32)[::-1],
            "scale": np.float32(0.5),
        },
        "epoch": epoch,
        "note": "hello",
        "lr": float("nan"),
        "big": 2**70,
        "raw": b"\x00\x01",
        "empty": [],
    }


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A store with step-1 and step-2: the same model, trained a bit in between (every tensor changes)."""
    path = tmp_path / "src"
    model = _model(0)
    cairn.save(path, _state(model, 1), step=1, metrics={"loss": 0.5}, metadata={"git": "abc"})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    cairn.save(path, _state(model, 2), step=2, metrics={"loss": 0.25}, metadata={"git": "abc"})
    return path


def _blob_file(store: Path, name: str, key: str) -> tuple[str, Path]:
    m = cairn.Store(store).manifest(name)
    entry = next(t for t in m.tensors if t.path == key)
    blob = entry.shards[0].chunks[0].blob
    return blob, store / blob_path(blob)


def _damage(store: Path, name: str, key: str) -> str:
    blob, path = _blob_file(store, name, key)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 0x40
    path.write_bytes(bytes(data))
    return blob


# ------------------------------------------------------------------------------------------------ export


def test_export_a_subtree_to_safetensors_loads_into_a_fresh_module(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.safetensors"
    status, stdout, _ = _cli(capsys, "export", str(src), str(out), "--key", "model")
    assert status == 0
    assert "4 tensors" in stdout and "without the prefix 'model.'" in stdout
    tensors = safetensors.torch.load_file(out)
    fresh = _model(1)
    fresh.load_state_dict(tensors)  # strict: exactly the module's keys
    saved = cairn.load(src, keys="model")["model"]
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key])
    with safetensors.safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["cairn.checkpoint"] == "step-2" and meta["cairn.step"] == "2"
    assert json.loads(meta["cairn.metrics"]) == {"loss": 0.25}
    assert json.loads(meta["cairn.metadata"]) == {"git": "abc"}
    assert json.loads(meta["cairn.values"]) == {} and meta["cairn.prefix"] == "model."


def test_export_everything_keeps_dotted_keys_dtypes_and_plain_values(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "all.safetensors"
    status, stdout, _ = _cli(capsys, "export", f"{src}@step-1", str(out))
    assert status == 0 and "prefix" not in stdout and "6 plain values in the metadata" in stdout
    tensors = safetensors.torch.load_file(out)
    model_keys = ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]
    assert sorted(tensors) == sorted([*model_keys, "extra.bf16", "extra.ids", "extra.order", "extra.scale"])
    expected = _state(_model(0), 1)["extra"]
    assert isinstance(expected, dict)
    assert tensors["extra.bf16"].dtype == torch.bfloat16 and torch.equal(
        tensors["extra.bf16"], expected["bf16"]
    )
    assert tensors["extra.ids"].dtype == torch.int64 and tensors["extra.ids"].tolist() == [-2, -1, 0, 1, 2]
    assert tensors["extra.order"].dtype == torch.int32 and tensors["extra.order"].tolist() == list(
        range(6, -1, -1)
    )
    assert tensors["extra.scale"].shape == () and tensors["extra.scale"].item() == 0.5
    with safetensors.safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["cairn.checkpoint"] == "step-1"
    assert json.loads(meta["cairn.values"]) == {
        "epoch": 1,
        "note": "hello",
        "lr": {"float": "nan"},
        "big": {"int": hex(2**70)},
        "raw": {"bytes": "AAE="},
        "empty": {"list": []},
    }


def test_export_to_torch_save_reads_back_weights_only(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.pt"
    status, stdout, _ = _cli(capsys, "export", str(src), str(out), "--key", "model.*", "--key", "extra")
    assert status == 0 and "prefix" not in stdout  # two patterns: full keys
    state = torch.load(out, weights_only=True)
    assert type(state) is dict
    assert list(state) == [
        "model.0.weight",
        "model.0.bias",
        "model.2.weight",
        "model.2.bias",
        "extra.bf16",
        "extra.ids",
        "extra.order",
        "extra.scale",
    ]
    assert state["extra.bf16"].dtype == torch.bfloat16 and state["extra.order"].dtype == torch.int32
    saved = cairn.load(src)
    assert torch.equal(state["model.2.weight"], saved["model"]["2.weight"])
    status, stdout, _ = _cli(
        capsys, "export", str(src), str(tmp_path / "m.pth"), "--key", "model.*", "--json"
    )
    doc = json.loads(stdout)
    assert status == 0 and doc["format"] == "torch" and doc["prefix"] == "model."
    fresh = _model(5)
    fresh.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True))
    assert torch.equal(fresh[2].bias, saved["model"]["2.bias"])
    status, stdout, _ = _cli(capsys, "export", str(src), str(tmp_path / "all.bin"), "--json")
    assert status == 0 and json.loads(stdout)["values_left_out"] == [
        "epoch",
        "note",
        "lr",
        "big",
        "raw",
        "empty",
    ]


def test_prefix_stripping_rules(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert default_prefix(["model"]) == "model." and default_prefix(["model.*"]) == "model."
    assert default_prefix(["model.0"]) == "model.0."
    assert default_prefix(["model", "extra"]) is None and default_prefix(["mod*"]) is None
    assert default_prefix(None) is None
    out = tmp_path / "w.safetensors"

    def names(*args: str) -> list[str]:
        status, stdout, stderr = _cli(capsys, "export", str(src), str(out), *args, "--json")
        assert status == 0, stderr
        return list(json.loads(stdout)["tensors"])

    assert names("--key", "model", "--strip-prefix", "") == [
        "model.0.weight",
        "model.0.bias",
        "model.2.weight",
        "model.2.bias",
    ]
    assert names("--key", "model.2") == ["weight", "bias"]
    assert names("--key", "model.2.weight") == ["model.2.weight"]  # a single tensor keeps its key
    assert names("--key", "model", "--key", "epoch", "--strip-prefix", "model") == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    ]
    assert names("--key", "extra.b*", "--strip-prefix", "extra.") == ["bf16"]
    status, _, stderr = _cli(capsys, "export", str(src), str(out), "--strip-prefix", "modle")
    assert status == 2 and "'modle.'" in stderr
    status, _, stderr = _cli(capsys, "export", str(src), str(out), "--key", "optimizer")
    assert status == 2 and "no tensor of checkpoint 'step-2' matches" in stderr
    status, _, stderr = _cli(capsys, "export", str(src), str(out), "--key", "epoch")
    assert status == 2


def test_export_of_damaged_data_fails_and_writes_nothing(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "model.safetensors").write_bytes(b"old")
    blob = _damage(src, "step-2", "model.2.weight")
    for name in ("model.safetensors", "model.pt"):
        status, _, stderr = _cli(capsys, "export", str(src), str(out_dir / name), "--key", "model")
        assert status == 1
        assert "step-2" in stderr and "model.2.weight" in stderr and blob in stderr
    assert sorted(os.listdir(out_dir)) == ["model.safetensors"]  # no temporary file left, old file intact
    assert (out_dir / "model.safetensors").read_bytes() == b"old"
    status, _, _ = _cli(
        capsys, "export", f"{src}@step-1", str(out_dir / "model.safetensors"), "--key", "model"
    )
    assert status == 0 and len(safetensors.torch.load_file(out_dir / "model.safetensors")) == 4


# -------------------------------------------------------------------------------------------------- copy


def test_copy_sends_only_missing_blobs(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    first = _run("copy", str(src), str(dst), "--json")
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["ok"] and doc["copied"] == ["step-1", "step-2"] and doc["skipped"] == []
    n1 = cairn.Store(src).info("step-1").num_blobs
    assert doc["blobs_sent"] == len(
        cairn.Store(src).manifest("step-1").blobs() | cairn.Store(src).manifest("step-2").blobs()
    )
    assert doc["blobs_sent"] < 2 * n1  # the extra tensors are the same in both: sent once
    assert doc["bytes_sent"] < doc["nbytes"] == 2 * cairn.Store(src).info("step-1").nbytes
    for name in ("step-1", "step-2"):  # byte-identical manifests
        assert (dst / "checkpoints" / f"{name}.json").read_bytes() == (
            src / "checkpoints" / f"{name}.json"
        ).read_bytes()

    # a newer checkpoint where only the last layer changed: only its two tensors travel
    model = _model(0)
    model.load_state_dict(cairn.load(src, keys="model")["model"])
    with torch.no_grad():
        model[2].weight.mul_(2)
        model[2].bias.mul_(2)
    cairn.save(src, _state(model, 2), step=3)
    second = _run("copy", str(src), str(dst))
    assert second.returncode == 0, second.stderr
    lines = second.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STEP", "RESULT", "SIZE", "SENT"]
    assert lines[1].split()[:3] == ["step-1", "1", "skipped"] and lines[3].split()[:3] == [
        "step-3",
        "3",
        "copied",
    ]
    nbytes = (16 * 4 + 4) * 4
    assert second.stdout.endswith(f", 2 already there: sent 2 blobs, {nbytes} B\n")
    assert f"copied 1 checkpoint ({human_size(cairn.Store(src).info('step-3').nbytes)}) to" in second.stdout
    assert lines[3].endswith(f"{nbytes} B in 2 blobs")

    verify = _run("verify", str(dst), "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["checkpoints"] == [
        "step-1",
        "step-2",
        "step-3",
    ]
    assert cairn.Store(dst).config.chunk_size == cairn.Store(src).config.chunk_size
    assert torch.equal(cairn.load(dst, "step-3")["model"]["2.weight"], model[2].weight)
    assert not (dst / "pins").exists() or not os.listdir(dst / "pins")


def test_copy_one_checkpoint_and_name_collisions(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "dst"
    cairn.Store(src).pin("step-1")
    status, stdout, _ = _cli(capsys, "copy", f"{src}@step-1", str(dst))
    assert status == 0 and "copied 1 checkpoint (" in stdout
    assert [i.name for i in cairn.Store(dst).list()] == ["step-1"] and cairn.Store(dst).pins() == set()
    status, stdout, _ = _cli(capsys, "copy", f"{src}@step-1", str(dst), "--json")
    assert status == 0 and json.loads(stdout)["skipped"] == ["step-1"]
    status, stdout, _ = _cli(capsys, "copy", f"{src}@latest", str(dst), "--json")
    assert status == 0 and json.loads(stdout)["copied"] == ["step-2"]

    other = tmp_path / "other"  # another run with checkpoints of the same names
    cairn.save(other, {"w": torch.zeros(3)}, step=2)
    cairn.save(other, {"w": torch.ones(3)}, step=7)
    status, stdout, stderr = _cli(capsys, "copy", str(other), str(dst))
    assert status == 1
    assert "cairn: error: checkpoint 'step-2' already exists in" in stderr and "different contents" in stderr
    assert "step-2     2  FAILED" in stdout and "Traceback" not in stderr
    assert cairn.Store(dst).manifest("step-2").step == 2 and "w" not in cairn.load(dst, "step-2")
    assert cairn.load(dst, "step-7")["w"].tolist() == [1.0, 1.0, 1.0]  # the rest is still copied


def test_copy_of_a_damaged_checkpoint_commits_nothing_of_it(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    blob = _damage(src, "step-2", "model.0.weight")
    done = _run("copy", str(src), str(dst))
    assert done.returncode == 1
    assert "cairn: error: checkpoint 'step-2', key 'model.0.weight': blob" in done.stderr
    assert blob in done.stderr and "do not match their hash" in done.stderr and "Traceback" not in done.stderr
    assert not (dst / "checkpoints" / "step-2.json").exists()
    assert [i.name for i in cairn.Store(dst).list()] == ["step-1"]
    assert not (dst / blob_path(blob)).exists()
    assert cairn.Store(dst).verify().ok

    _, path = _blob_file(src, "step-2", "model.0.weight")
    path.unlink()
    report = copy_checkpoints(cairn.Store(src), cairn.Store(dst))
    assert not report.ok and report.failed == ["step-2"] and report.skipped == ["step-1"]
    (problem,) = report.problems
    assert problem.key == "model.0.weight" and problem.blob == blob and "is missing from" in problem.message

    manifest = src / "checkpoints" / "step-1.json"  # a damaged manifest: reported, the rest still copied
    manifest.chmod(0o644)
    manifest.write_bytes(manifest.read_bytes().replace(b'"epoch",1', b'"epoch",7'))
    cairn.save(src, {"w": torch.ones(2)}, step=5)
    done = _run("copy", str(src), str(tmp_path / "dst2"))
    assert done.returncode == 1 and "digest does not match" in done.stderr
    assert [line.split()[:3] for line in done.stdout.splitlines()[1:4]] == [
        ["step-2", "2", "FAILED"],
        ["step-5", "5", "copied"],
        ["step-1", "-", "FAILED"],
    ]
    assert [i.name for i in cairn.Store(tmp_path / "dst2").list()] == ["step-5"]


def test_copy_between_stores_of_different_chunk_sizes(tmp_path: Path) -> None:
    src = cairn.Store(tmp_path / "src", create=True, chunk_size=64)
    state = {"w": torch.arange(100, dtype=torch.float32), "b": np.arange(10, dtype=np.int16)}
    src.save(state, step=1)
    dst = cairn.Store(tmp_path / "dst", create=True, chunk_size=1 << 20)
    report = copy_checkpoints(src, dst)
    assert report.ok and report.copied == ["step-1"] and report.blobs_sent == src.info().num_blobs == 8
    assert report.bytes_sent == report.nbytes == 420
    loaded = dst.load("step-1")
    assert torch.equal(loaded["w"], state["w"]) and np.array_equal(loaded["b"], state["b"])
    dst.save(state, step=2)  # dst's own chunking: new blobs, and both read back
    assert dst.verify().ok
    for out in (tmp_path / "w.safetensors", tmp_path / "w.pt"):  # many chunks per tensor
        export_checkpoint(src, "step-1", out)
        back = (
            safetensors.torch.load_file(out)
            if out.suffix == ".safetensors"
            else torch.load(out, weights_only=True)
        )
        assert torch.equal(back["w"], state["w"]) and back["b"].tolist() == list(range(10))
    with pytest.raises(ValueError, match="same store"):
        copy_checkpoints(src, cairn.Store(tmp_path / "src"))


# ------------------------------------------------------------------------------------------------ errors


def test_usage_errors_exit_2_without_a_traceback(src: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [
        ("export", str(tmp_path / "nowhere"), str(tmp_path / "x.safetensors")),
        ("export", str(src), str(tmp_path / "x.txt")),
        ("export", str(src), str(tmp_path / "no" / "dir" / "x.pt")),
        ("export", f"{src}@step-9", str(tmp_path / "x.pt")),
        ("copy", str(tmp_path / "nowhere"), str(tmp_path / "dst")),
        ("copy", f"{src}@step-9", str(tmp_path / "dst")),
        ("copy", str(src), str(foreign)),
        ("copy", str(src), str(src)),
        ("copy", str(src)),
    ]
    for args in cases:
        done = _run(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("cairn: error:") and "Traceback" not in done.stderr, (args, done.stderr)
    assert not (tmp_path / "dst").exists()  # a bad source never creates the destination
    cairn.Store(tmp_path / "empty", create=True)
    done = _run("copy", str(tmp_path / "empty"), str(tmp_path / "dst"))
    assert done.returncode == 0 and "holds no checkpoints yet; nothing to copy" in done.stderr
    assert not (tmp_path / "dst").exists()
    assert os.listdir(foreign) == ["notes.txt"]
    assert not any(p.name.startswith("x.") for p in tmp_path.iterdir())


def test_copy_and_safetensors_export_never_import_torch(src: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from cairn.cli import main\n"
        f"assert main(['copy', {str(src)!r}, {str(tmp_path / 'dst')!r}]) == 0\n"
        f"assert main(['export', {str(src)!r}, {str(tmp_path / 'w.safetensors')!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert len(safetensors.torch.load_file(tmp_path / "w.safetensors")) == 8


def test_names_that_would_clash_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s"
    cairn.save(
        store, {"x": {"a.b": torch.zeros(1), "a": {"b": torch.ones(1)}}, "m": {"w": torch.ones(2)}}, step=1
    )
    cairn.save(store, {"model": {"w": torch.ones(2)}, "w": torch.zeros(2)}, step=2)
    cairn.save(tmp_path / "bare", torch.ones(3), step=1)
    out = str(tmp_path / "o.safetensors")
    status, _, stderr = _cli(capsys, "export", f"{store}@step-1", out)
    assert status == 2 and "keys 'x.a.b' and 'x.a.b' both export as 'x.a.b'" in stderr
    status, _, _ = _cli(capsys, "export", f"{store}@step-1", out, "--key", "m")
    assert status == 0 and list(safetensors.torch.load_file(out)) == ["w"]
    status, _, stderr = _cli(capsys, "export", f"{store}@step-2", out, "--strip-prefix", "model")
    assert status == 2 and "once 'model.' is stripped" in stderr
    status, _, stderr = _cli(capsys, "export", str(tmp_path / "bare"), out)
    assert status == 2 and "no key to name it by" in stderr
    assert not os.path.exists(out) or len(safetensors.torch.load_file(out)) == 1
