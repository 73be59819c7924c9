"""The ``cairn`` command, run as a user runs it: ``python -m cairn ...`` on real stores.

Most checks run the command in a subprocess (output piped, so plain text); a few call ``main()`` in
process for speed. Stores are built once per module with ``cairn.save``; tests that damage a store
work on a copy.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cairn
from cairn.cli import main, parse_ref

BOX_CHARS = re.compile(r"[\u2500-\u257f]")
ANSI = re.compile(r"\x1b\[")


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Output is piped in these tests: make sure the environment does not force a terminal."""
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cairn", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def blob_file(store: Path, name: str, key: str) -> Path:
    """The file of the (first) blob that holds tensor ``key`` of checkpoint ``name``."""
    m = cairn.Store(store).manifest(name)
    entry = next(t for t in m.tensors if t.path == key)
    blob = entry.shards[0].chunks[0].blob
    return store / "blobs" / blob[:2] / blob


def flip_bit(path: Path, byte: int = 0) -> None:
    path.chmod(path.stat().st_mode | stat.S_IWUSR)  # blobs and manifests are read-only files
    data = bytearray(path.read_bytes())
    data[byte] ^= 0x01
    path.write_bytes(bytes(data))


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two checkpoints of a small model, its optimizer, numpy arrays and nested plain values."""
    path = tmp_path_factory.mktemp("cli") / "ckpts"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step, (loss, acc) in ((100, (0.5, 0.75)), (200, (0.21, 0.9))):
        model(torch.randn(8, 3)).sum().backward()
        opt.step()
        state = {
            "model": model,
            "optim": opt,
            "epoch": step // 100,
            "rng": np.arange(6, dtype=np.int64).reshape(2, 3),
            "scale": np.float32(0.5),
            "config": {
                "name": "tiny",
                "layers": [3, 4, 2],
                "notes": "x" * 200,
                "blob": b"\x00\x01",
                "none": None,
                "empty": {},
            },
        }
        cairn.save(path, state, step=step, metrics={"val_loss": loss, "acc": acc}, metadata={"git": "abc123"})
    return path


# ------------------------------------------------------------------------------------------------- ls


def test_ls_plain_table(store: Path) -> None:
    r = run("ls", str(store))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STEP", "TIME", "METRICS", "SIZE", "NEW", "TENSORS", "KEPT", "BY"]
    assert [line.split()[0] for line in lines[1:]] == ["step-100", "step-200"]
    info = cairn.Store(store).info("step-200")
    row = lines[2]
    assert " 200 " in row
    assert info.time.astimezone().strftime("%Y-%m-%d %H:%M:%S") in row
    assert "acc=0.9 val_loss=0.21" in row
    assert f"{info.nbytes} B" in row  # small: shown in bytes
    assert row.split()[-4:] == [str(info.num_tensors), "newest,", "keep", "all"]  # no policy: keep all
    assert not BOX_CHARS.search(r.stdout) and not ANSI.search(r.stdout)
    assert r.stderr == ""


def test_ls_json(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "ls", "--json", str(store))
    assert code == 0
    doc = json.loads(out)
    assert doc["store"] == str(store)
    rows = doc["checkpoints"]
    assert [r["name"] for r in rows] == ["step-100", "step-200"]
    info = cairn.Store(store).info("step-200")
    older, newer = (cairn.Store(store).manifest(n) for n in ("step-100", "step-200"))
    new_blobs = {c.blob: c.nbytes for t in newer.tensors for s in t.shards for c in s.chunks}
    assert rows[0]["new_bytes"] == cairn.Store(store).info("step-100").nbytes  # all its blobs are new
    assert rows[1] == {
        "name": "step-200",
        "step": 200,
        "time": info.time.isoformat(),
        "metrics": {"acc": 0.9, "val_loss": 0.21},
        "metadata": {"git": "abc123"},
        "nbytes": info.nbytes,
        "new_bytes": sum(n for blob, n in new_blobs.items() if blob not in older.blobs()),
        "num_tensors": info.num_tensors,
        "num_blobs": info.num_blobs,
        "kept_by": ["newest", "keep all"],
        "damaged": False,
        "error": None,
    }


def test_ls_shows_damaged_manifest(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = copy_store(store, tmp_path / "s")
    flip_bit(s / "checkpoints" / "step-100.json", byte=40)
    code, out, err = run_main(capsys, "ls", str(s))
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "DAMAGED" in rows["step-100"]
    assert "DAMAGED" not in rows["step-200"] and "val_loss=0.21" in rows["step-200"]
    code, out, _ = run_main(capsys, "ls", "--json", str(s))
    by_name = {r["name"]: r for r in json.loads(out)["checkpoints"]}
    assert by_name["step-100"]["damaged"] is True and by_name["step-100"]["step"] is None
    assert "step-100.json" in by_name["step-100"]["error"]
    assert by_name["step-200"]["damaged"] is False


def test_ls_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cairn.Store(tmp_path / "empty", create=True)
    code, out, err = run_main(capsys, "ls", str(tmp_path / "empty"))
    assert (code, out) == (0, "") and "no checkpoints" in err
    code, out, _ = run_main(capsys, "ls", "--json", str(tmp_path / "empty"))
    assert json.loads(out)["checkpoints"] == []


def test_rich_table_on_a_terminal(
    store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich treats stdout as a terminal
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_main(capsys, "ls", str(store))
    assert code == 0
    assert BOX_CHARS.search(out) and "step-200" in out and "val_loss=0.21" in out


# ----------------------------------------------------------------------------------------------- show


def show_rows(stdout: str) -> dict[str, str]:
    """The tree rows of plain ``cairn show`` output, by key."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("KEY "))
    return {line.split()[0]: line for line in lines[start + 1 :]}


def test_show_latest(store: Path) -> None:
    r = run("show", str(store))
    assert r.returncode == 0, r.stderr
    header = dict(line.split(None, 1) for line in r.stdout.split("\n\n")[0].splitlines())
    info = cairn.Store(store).info("step-200")
    assert header["checkpoint"] == "step-200"
    assert header["step"] == "200"
    assert header["time"] == info.time.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    assert header["metrics"] == "acc=0.9 val_loss=0.21"
    assert header["metadata"] == "git=abc123"
    assert header["size"] == f"{info.nbytes} B"
    assert header["tensors"] == str(info.num_tensors)
    assert header["blobs"] == str(info.num_blobs)

    rows = show_rows(r.stdout)
    assert rows["model"].split() == ["model", "object", "torch.nn.modules.container.Sequential"]
    assert rows["optim"].split()[-1] == "torch.optim.sgd.SGD"
    assert rows["model.0.weight"].split() == ["model.0.weight", "torch", "F32", "[4,", "3]", "48", "B"]
    assert rows["optim.state.0.momentum_buffer"].split()[1:3] == ["torch", "F32"]
    assert rows["optim.param_groups.0.lr"].split()[1:] == ["float", "0.1"]
    assert rows["rng"].split()[1:4] == ["numpy", "I64", "[2,"]
    assert rows["scale"].split()[1:4] == ["numpy-scalar", "F32", "[]"]
    assert rows["epoch"].split()[1:] == ["int", "2"]
    assert rows["config.name"].split()[1:] == ["str", "'tiny'"]
    assert rows["config.layers.1"].split()[1:] == ["int", "4"]
    assert rows["config.blob"].split()[1:] == ["bytes", r"b'\x00\x01'"]
    assert rows["config.none"].split()[1:] == ["None", "None"]
    assert rows["config.empty"].split()[1:] == ["dict", "{}"]
    notes = rows["config.notes"].split()[-1]
    assert notes.startswith("'xxx") and notes.endswith("...") and len(notes) == 60
    assert not BOX_CHARS.search(r.stdout) and not ANSI.search(r.stdout)


def test_show_named_checkpoint_and_latest(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "show", f"{store}@step-100")
    assert code == 0
    assert "checkpoint  step-100" in out and "val_loss=0.5" in out
    code, out, _ = run_main(capsys, "show", f"{store}@latest")
    assert code == 0 and "checkpoint  step-200" in out


def test_show_key_filter(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "show", str(store), "--key", "model.*.weight")
    assert code == 0
    assert sorted(show_rows(out)) == ["model", "model.0.weight", "model.2.weight"]
    code, out, _ = run_main(capsys, "show", str(store), "--key", "config", "--key", "epoch")
    assert code == 0
    keys = set(show_rows(out))
    assert "epoch" in keys and "config.layers.0" in keys and not any(k.startswith("model") for k in keys)
    code, out, err = run_main(capsys, "show", str(store), "--key", "nothing.here")
    assert code == 2 and out == ""
    assert err.startswith("cairn: error:") and "nothing.here" in err


def test_show_json(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = f"{store}@step-100"
    code, out, _ = run_main(capsys, "show", "--json", ref, "--key", "model", "--key", "config")
    assert code == 0
    doc = json.loads(out)
    info = cairn.Store(store).info("step-100")
    assert doc["name"] == "step-100" and doc["step"] == 100 and doc["time"] == info.time.isoformat()
    assert doc["metrics"] == {"acc": 0.75, "val_loss": 0.5} and doc["metadata"] == {"git": "abc123"}
    assert (doc["nbytes"], doc["num_tensors"], doc["num_blobs"]) == (
        info.nbytes,
        info.num_tensors,
        info.num_blobs,
    )
    entries = {e["key"]: e for e in doc["entries"]}
    assert entries["model"]["type"] == "object"
    assert entries["model"]["object"] == "torch.nn.modules.container.Sequential"
    weight = entries["model.0.weight"]
    assert weight["type"] == "tensor" and weight["kind"] == "torch" and weight["dtype"] == "F32"
    assert weight["shape"] == [4, 3] and weight["nbytes"] == 48
    assert entries["config.name"]["type"] == "value"
    assert (entries["config.name"]["value_type"], entries["config.name"]["repr"]) == ("str", "'tiny'")
    assert {tuple(sorted(e)) for e in doc["entries"]} == {
        ("dtype", "key", "kind", "nbytes", "object", "repr", "shape", "type", "value_type")
    }


def test_show_reads_no_blobs(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = copy_store(store, tmp_path / "s")
    for p in (s / "blobs").rglob("*"):
        if p.is_file():
            p.unlink()
    code, out, err = run_main(capsys, "show", str(s))
    assert code == 0, err
    assert "model.0.weight" in out


def test_show_missing_checkpoint(store: Path) -> None:
    r = run("show", f"{store}@step-999")
    assert r.returncode == 2
    assert r.stderr.startswith("cairn: error:") and "no checkpoint 'step-999'" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_show_damaged_manifest_is_an_error(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = copy_store(store, tmp_path / "s")
    flip_bit(s / "checkpoints" / "step-200.json", byte=40)
    code, _, err = run_main(capsys, "show", f"{s}@step-200")
    assert code == 1 and err.startswith("cairn: error:") and "step-200.json" in err
    code, out, _ = run_main(capsys, "show", str(s))  # latest skips the damaged one
    assert code == 0 and "checkpoint  step-100" in out


# --------------------------------------------------------------------------------------------- verify


def test_verify_clean(store: Path) -> None:
    r = run("verify", str(store))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checked 2 checkpoints" in r.stdout and "OK" in r.stdout
    r = run("verify", "--json", f"{store}@step-100")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["problems"] == [] and doc["checkpoints"] == ["step-100"]
    assert doc["blobs_checked"] > 0 and doc["bytes_checked"] > 0


def test_verify_finds_a_flipped_bit(store: Path, tmp_path: Path) -> None:
    s = copy_store(store, tmp_path / "s")
    path = blob_file(s, "step-200", "model.2.weight")  # changed by the optimizer step: only in step-200
    flip_bit(path)
    r = run("verify", str(s))
    assert r.returncode == 1
    assert "DAMAGED" in r.stdout
    problem = next(line for line in r.stdout.splitlines() if path.name in line)
    assert problem.split()[:3] == ["step-200", "model.2.weight", path.name]
    assert "hash" in problem
    assert "Traceback" not in r.stderr

    r = run("verify", "--json", str(s))
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["damaged"] == ["step-200"]
    assert {"checkpoint": "step-200", "key": "model.2.weight", "blob": path.name} == {
        k: doc["problems"][0][k] for k in ("checkpoint", "key", "blob")
    }
    assert run("verify", f"{s}@step-100").returncode == 0  # the older checkpoint is intact


def test_verify_damaged_manifest(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = copy_store(store, tmp_path / "s")
    flip_bit(s / "checkpoints" / "step-100.json", byte=40)
    code, out, _ = run_main(capsys, "verify", "--json", str(s))
    assert code == 1
    problems = json.loads(out)["problems"]
    assert [(p["checkpoint"], p["key"], p["blob"]) for p in problems] == [("step-100", None, None)]


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("command", ["ls", "show", "verify"])
def test_missing_path_is_a_clean_error(tmp_path: Path, command: str) -> None:
    r = run(command, str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.startswith("cairn: error:") and "not a cairn store" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_file_is_not_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04 a zip")
    code, _, err = run_main(capsys, "ls", str(tmp_path / "model.pt"))
    assert code == 2 and "torch.save" in err and err.startswith("cairn: error:")


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["ls"], ["show", "x", "--bogus"]])
def test_bad_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("cairn: error:") and len(err.splitlines()) == 1


def test_version_and_entry_points(store: Path) -> None:
    r = run("--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"cairn {cairn.__version__}")
    r = subprocess.run(
        [sys.executable, "-m", "cairn.cli", "ls", str(store)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "step-200" in r.stdout


def test_cli_does_not_import_torch(store: Path) -> None:
    code = (
        "import sys, cairn.cli\n"
        "for argv in (['ls', sys.argv[1]], ['show', sys.argv[1]], ['verify', sys.argv[1]]):\n"
        "    assert cairn.cli.main(argv) == 0\n"
        "assert 'torch' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(store)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------------------------- refs


def test_parse_ref(tmp_path: Path) -> None:
    assert parse_ref("ckpts") == ("ckpts", None)
    assert parse_ref("ckpts@step-3") == ("ckpts", "step-3")
    assert parse_ref("ckpts@latest") == ("ckpts", "latest")
    assert parse_ref("runs/a@b@step-3") == ("runs/a@b", "step-3")
    assert parse_ref("user@host/ckpts") == ("user@host/ckpts", None)  # "host/ckpts" is not a name
    assert parse_ref("ckpts@") == ("ckpts@", None)
    assert parse_ref("@step-3") == ("@step-3", None)
    assert parse_ref("ckpts@best") == ("ckpts@best", None)  # reserved, so never a checkpoint name
    store = tmp_path / "exp@2"
    cairn.Store(store, create=True)
    assert parse_ref(str(store)) == (str(store), None)  # a store whose own name has '@': taken whole
    assert parse_ref(f"{store}@2") == (str(store), "2")


def test_store_path_with_at_sign(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run@1"
    cairn.save(path, {"w": np.zeros(3, dtype=np.float32)}, step=5)
    code, out, _ = run_main(capsys, "show", str(path))
    assert code == 0 and "checkpoint  step-5" in out
    code, out, _ = run_main(capsys, "show", f"{path}@step-5", "--json")
    assert code == 0 and json.loads(out)["entries"][0]["key"] == "w"
