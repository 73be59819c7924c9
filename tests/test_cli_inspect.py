"""``cairn ls`` (NEW), ``show --stats``, ``diff`` and ``du``, run as a user runs them, on real stores.

The main store is a fine-tuning run: a frozen backbone (33280 bytes) and a head (1040 bytes) that changes at
every checkpoint, saved by a CheckpointManager, so what each checkpoint costs on disk, what ``diff`` must
read and what ``du`` reports are exact numbers. Commands run in a subprocess (output piped, so plain text)
where the output format matters, and in process through ``main()`` for speed elsewhere. Tests that
damage a store work on a copy.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import cairn
from cairn import _cli_inspect
from cairn._cli_inspect import new_bytes
from cairn.cli import main

BOX_CHARS = re.compile(r"[\u2500-\u257f]")
BACKBONE = {"w1": (64, 64), "b1": (64,), "w2": (64, 64), "b2": (64,)}
HEAD = {"w": (4, 64), "b": (4,)}
BACKBONE_BYTES = 2 * (64 * 64 + 64) * 4  # 33280
HEAD_BYTES = (4 * 64 + 4) * 4  # 1040
SIZE = BACKBONE_BYTES + HEAD_BYTES  # 34320, every checkpoint's logical size
METRICS = {100: {"loss": 0.9}, 200: {"loss": 0.5, "acc": 0.8}, 300: {"loss": 0.25, "acc": 0.9}}


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Output is piped in these tests: make sure the environment does not force a terminal."""
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cairn", *args], capture_output=True, text=True, timeout=60)


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def blob_file(store: Path, name: str, key: str) -> Path:
    m = cairn.Store(store).manifest(name)
    blob = next(t for t in m.tensors if t.path == key).shards[0].chunks[0].blob
    return store / "blobs" / blob[:2] / blob


def flip_bit(path: Path, byte: int = 0) -> None:
    path.chmod(path.stat().st_mode | stat.S_IWUSR)  # blobs and manifests are read-only files
    data = bytearray(path.read_bytes())
    data[byte] ^= 0x01
    path.write_bytes(bytes(data))


def table(stdout: str, first: str) -> dict[str, str]:
    """The rows of the plain table whose header starts with ``first``, by their first cell."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first + " "))
    rows = {}
    for line in lines[start + 1 :]:
        if not line:
            break
        rows[line.split()[0]] = line
    return rows


def leaf(state: Any, key: str) -> Any:
    for part in key.split("."):
        state = state[int(part)] if isinstance(state, list | tuple) else state[part]
    return state


@pytest.fixture(scope="module")
def ft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three checkpoints of a fine-tuning run: the backbone never changes, the head always does."""
    path = tmp_path_factory.mktemp("inspect") / "ft"
    g = torch.Generator().manual_seed(0)
    backbone = {k: torch.randn(shape, generator=g) for k, shape in BACKBONE.items()}
    with cairn.CheckpointManager(path) as mgr:
        for epoch, step in enumerate((100, 200, 300)):
            state = {
                "backbone": backbone,
                "head": {k: torch.randn(shape, generator=g) for k, shape in HEAD.items()},
                "lr": 0.1,
                "epoch": epoch,
                "tags": ["frozen", "v1"],
            }
            assert mgr.save(step, state, metrics=METRICS[step], force=True)
    return path


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One checkpoint of awkward tensors: NaN and infinities, complex, bool, huge ints, empty, fp8."""
    path = tmp_path_factory.mktemp("inspect") / "edge"
    nan, inf = float("nan"), float("inf")
    state = {
        "halfnan": torch.tensor([1.5, nan, inf, -inf, -2.0], dtype=torch.bfloat16),
        "cplx": torch.tensor([3 + 4j, 0j, 1j], dtype=torch.complex64),
        "mask": np.array([True, False, True, True]),
        "ids": np.array([2**62, -(2**62), 7], dtype=np.int64),
        "u16": torch.tensor([0, 65535], dtype=torch.uint16),
        "empty": torch.zeros(0, 3),
        "allnan": np.full(3, np.nan, dtype=np.float32),
        "scalar": np.float32(2.5),
        "f8": torch.tensor([0.5, 1.0, -448.0]).to(torch.float8_e4m3fn),
        "note": "not a tensor",
    }
    cairn.save(path, state, step=1)
    return path


# ------------------------------------------------------------------------------------------ NEW bytes


def test_new_bytes(ft: Path) -> None:
    store = cairn.Store(ft)
    infos = store.list()
    expected = {"step-100": SIZE, "step-200": HEAD_BYTES, "step-300": HEAD_BYTES}
    assert new_bytes(store, infos) == expected
    assert new_bytes(store, infos[::-1]) == expected  # older means older by step, not by position
    assert new_bytes(store, infos[1:]) == {"step-200": SIZE, "step-300": HEAD_BYTES}  # only those given


def test_new_bytes_counts_changed_chunks_only(tmp_path: Path) -> None:
    store = cairn.Store(tmp_path / "s", create=True, chunk_size=1024)
    x = np.arange(1024, dtype=np.float32)  # 4 KiB: four different 1 KiB chunks
    store.save({"x": x}, step=1)
    x[0] = -1  # changes one chunk
    store.save({"x": x, "copy": x.copy()}, step=2)  # the copy's chunks are the same blobs
    assert new_bytes(store, store.list()) == {"step-1": 4096, "step-2": 1024}


def test_ls_new_column(ft: Path) -> None:
    r = run("ls", str(ft))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:7] == ["NAME", "STEP", "TIME", "METRICS", "SIZE", "NEW", "TENSORS"]
    rows = table(r.stdout, "NAME")
    assert re.search(r"  33\.5 KiB  33\.5 KiB +6  ", rows["step-100"])
    for name in ("step-200", "step-300"):
        assert re.search(r"  33\.5 KiB   1\.0 KiB +6  ", rows[name]), rows[name]


def test_ls_json_new_bytes(ft: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "ls", "--json", str(ft))
    assert code == 0
    assert [r["new_bytes"] for r in json.loads(out)["checkpoints"]] == [SIZE, HEAD_BYTES, HEAD_BYTES]

    s = Path(shutil.copytree(ft, tmp_path / "s"))
    cairn.Store(s).delete("step-100")  # the backbone is now new in step-200
    flip_bit(s / "checkpoints" / "step-300.json", byte=40)  # a damaged row has no NEW
    code, out, _ = run_main(capsys, "ls", "--json", str(s))
    rows = {r["name"]: r for r in json.loads(out)["checkpoints"]}
    assert rows["step-200"]["new_bytes"] == SIZE
    assert rows["step-300"]["damaged"] is True and rows["step-300"]["new_bytes"] is None
    code, out, _ = run_main(capsys, "ls", str(s))
    assert table(out, "NAME")["step-300"].split()[1:8] == [
        "-",
        "-",
        "DAMAGED:",
        *["digest", "does", "not", "match"],
    ]


# ---------------------------------------------------------------------------------------- show --stats


def expected_stats(value: Any) -> dict[str, Any]:
    t = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    if t.is_complex():
        t = t.to(torch.complex128).abs()
    x = t.to(torch.float64).reshape(-1)
    finite = x[torch.isfinite(x)]
    integral = not t.is_floating_point()
    n = finite.numel()
    return {
        "count": x.numel(),
        "min": None if not n else (int(t.numpy().min()) if integral else finite.min().item()),
        "max": None if not n else (int(t.numpy().max()) if integral else finite.max().item()),
        "mean": None if not n else finite.mean().item(),
        "std": None if not n else finite.std(correction=0).item(),
        "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum()),
    }


def assert_stats(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for k in ("count", "min", "max", "nan", "inf"):
        assert got[k] == want[k], (k, got, want)
    for k in ("mean", "std"):
        assert (got[k] is None) == (want[k] is None), (k, got, want)
        if want[k] is not None:
            assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), (k, got, want)


def test_show_stats_json(ft: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "show", "--json", "--stats", f"{ft}@step-200")
    assert code == 0, err
    state = cairn.load(ft, "step-200")
    entries = json.loads(out)["entries"]
    assert {e["key"] for e in entries if e["type"] == "tensor"} == {
        *(f"backbone.{k}" for k in BACKBONE),
        *(f"head.{k}" for k in HEAD),
    }
    for e in entries:
        if e["type"] != "tensor":
            assert e["stats"] is None
            continue
        assert_stats(e["stats"], expected_stats(leaf(state, e["key"])))
    code, out, _ = run_main(capsys, "show", "--json", f"{ft}@step-200")  # without --stats: no stats key
    assert all("stats" not in e for e in json.loads(out)["entries"])


def test_show_stats_dtypes(edge: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "show", "--json", "--stats", str(edge))
    assert code == 0, err
    state = cairn.load(edge)
    stats = {e["key"]: e["stats"] for e in json.loads(out)["entries"]}
    assert stats["note"] is None
    for key, value in state.items():
        if key != "note":
            assert_stats(stats[key], expected_stats(value))
    # the facts behind those numbers, spelled out
    assert stats["halfnan"] == {
        "count": 5,
        "min": -2.0,
        "max": 1.5,
        "mean": -0.25,
        "std": 1.75,
        "nan": 1,
        "inf": 2,
    }
    assert (stats["cplx"]["min"], stats["cplx"]["max"], stats["cplx"]["mean"]) == (0.0, 5.0, 2.0)  # |z|
    assert (stats["ids"]["min"], stats["ids"]["max"]) == (-(2**62), 2**62)  # exact, not via float64
    assert (stats["mask"]["min"], stats["mask"]["max"], stats["mask"]["mean"]) == (0, 1, 0.75)
    assert stats["empty"] == {
        "count": 0,
        "min": None,
        "max": None,
        "mean": None,
        "std": None,
        "nan": 0,
        "inf": 0,
    }
    assert stats["allnan"]["nan"] == 3 and stats["allnan"]["mean"] is None
    assert stats["f8"]["min"] == -448.0 and stats["scalar"]["std"] == 0.0


def test_show_stats_table(edge: Path) -> None:
    r = run("show", "--stats", str(edge))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.startswith("KEY "))
    assert header.split() == [
        *("KEY", "KIND", "DTYPE", "SHAPE", "SIZE"),
        *("MIN", "MAX", "MEAN", "STD", "NAN", "INF", "VALUE"),
    ]
    rows = table(r.stdout, "KEY")
    stats = {key: row.split()[-6:] for key, row in rows.items()}  # tensors have no VALUE
    assert stats["halfnan"] == ["-2", "1.5", "-0.25", "1.75", "1", "2"]
    assert stats["ids"][:2] == [str(-(2**62)), str(2**62)]
    assert stats["empty"] == ["-", "-", "-", "-", "0", "0"]
    assert stats["allnan"] == ["-", "-", "-", "-", "3", "0"]
    assert stats["cplx"] == ["0", "5", "2", f"{math.sqrt(14 / 3):.4g}", "0", "0"]
    assert rows["note"].split()[1:] == ["str", "'not", "a", "tensor'"]
    assert not BOX_CHARS.search(r.stdout) and r.stderr == ""


def test_stats_and_diff_in_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tensors are reduced a slice at a time: the merged results equal a whole-tensor computation."""
    monkeypatch.setattr(_cli_inspect, "SLICE", 7)
    rng = np.random.default_rng(1)
    a = rng.normal(3.0, 2.0, 1000).astype(np.float32)
    a[[5, 500]] = np.nan
    a[77] = np.inf
    b = a.copy()
    b[600:700] += 0.5
    b[999] = -1e3
    s = cairn.Store(tmp_path / "s", create=True)
    s.save({"a": a}, step=1)
    s.save({"a": b}, step=2)
    code, out, _ = run_main(capsys, "show", "--json", "--stats", f"{tmp_path / 's'}@step-1")
    assert code == 0
    assert_stats(json.loads(out)["entries"][0]["stats"], expected_stats(a))
    code, out, _ = run_main(capsys, "diff", "--json", f"{tmp_path / 's'}@step-1", f"{tmp_path / 's'}@step-2")
    assert code == 1
    change = json.loads(out)["changed"][0]
    with np.errstate(invalid="ignore"):  # inf - inf
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    d[np.isnan(a) & np.isnan(b)] = 0
    d[a == b] = 0
    finite = np.isfinite(a)
    assert change["max_abs_diff"] == pytest.approx(d.max(), rel=1e-12)
    assert change["rel_l2"] == pytest.approx(
        np.linalg.norm(d) / np.linalg.norm(a[finite].astype(np.float64)), rel=1e-9
    )


def test_show_stats_reads_only_the_selected_keys(ft: Path, tmp_path: Path, capsys: Any) -> None:
    s = Path(shutil.copytree(ft, tmp_path / "s"))
    for key in BACKBONE:
        blob_file(s, "step-300", f"backbone.{key}").unlink()
    code, out, err = run_main(capsys, "show", "--stats", str(s), "--key", "head")
    assert code == 0, err
    assert set(table(out, "KEY")) == {"head.w", "head.b"}
    code, out, err = run_main(capsys, "show", "--stats", str(s))
    assert (code, out) == (1, "")
    assert err.startswith("cairn: error: checkpoint 'step-300', key 'backbone.w1'") and "missing" in err
    assert run_main(capsys, "show", str(s))[0] == 0  # without --stats nothing is read


def test_show_stats_damaged_blob(ft: Path, tmp_path: Path) -> None:
    s = Path(shutil.copytree(ft, tmp_path / "s"))
    path = blob_file(s, "step-200", "head.w")
    flip_bit(path)
    r = run("show", "--stats", f"{s}@step-200")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("cairn: error:") and len(r.stderr.splitlines()) == 1
    assert "checkpoint 'step-200', key 'head.w'" in r.stderr and path.name in r.stderr
    assert "do not match their hash" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------- diff


def test_diff_fine_tuning_steps(ft: Path) -> None:
    r = run("diff", f"{ft}@step-100", f"{ft}@step-200")
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["left", f"{ft}@step-100"] and "(step 100," in lines[0]
    assert lines[1].split()[:2] == ["right", f"{ft}@step-200"] and "(step 200," in lines[1]
    rows = table(r.stdout, "KEY")
    assert set(rows) == {"head.w", "head.b", "epoch"}
    old, new = cairn.load(ft, "step-100"), cairn.load(ft, "step-200")
    for key in ("head.w", "head.b"):
        a, b = leaf(old, key).double(), leaf(new, key).double()
        cells = rows[key].split()
        assert cells[1] == "values" and cells[2] == "F32"
        assert cells[-2:] == [
            f"{(a - b).abs().max().item():.4g}",
            f"{((a - b).norm() / a.norm()).item():.4g}",
        ]
    assert rows["epoch"].split() == ["epoch", "value", "0", "→", "1"]
    metrics = table(r.stdout, "METRIC")
    assert metrics["acc"].split() == ["acc", "-", "0.8", "-"]
    assert metrics["loss"].split() == ["loss", "0.9", "0.5", "-0.4"]
    assert lines[-1] == (
        "differ: 0 added, 0 removed, 3 changed, 7 unchanged "
        "(4 tensors sharing blobs, not read; 3 equal values), metrics differ"
    )


def test_diff_json(ft: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "diff", "--json", f"{ft}@step-200", str(ft))  # latest: step-300
    assert code == 1
    doc = json.loads(out)
    assert (doc["left"]["name"], doc["right"]["name"]) == ("step-200", "step-300")
    assert doc["left"]["store"] == doc["right"]["store"] == str(ft)
    assert doc["identical"] is False and doc["added"] == [] and doc["removed"] == []
    assert [(c["key"], c["changes"]) for c in doc["changed"]] == [
        ("head.w", ["values"]),
        ("head.b", ["values"]),
        ("epoch", ["value"]),
    ]
    epoch = doc["changed"][2]
    assert (epoch["left"]["repr"], epoch["right"]["repr"]) == ("1", "2")
    assert epoch["max_abs_diff"] is None and epoch["rel_l2"] is None
    a = leaf(cairn.load(ft, "step-200"), "head.b").double()
    b = leaf(cairn.load(ft, "step-300"), "head.b").double()
    assert doc["changed"][1]["max_abs_diff"] == pytest.approx((a - b).abs().max().item(), rel=1e-12)
    assert doc["changed"][1]["rel_l2"] == pytest.approx(((a - b).norm() / a.norm()).item(), rel=1e-12)
    assert doc["unchanged"] == {"tensors_shared": 4, "tensors_equal": 0, "values": 3, "total": 7}
    loss, acc = sorted(doc["metrics"], key=lambda r: r["metric"], reverse=True)
    assert (loss["left"], loss["right"], loss["delta"]) == (0.5, 0.25, -0.25)
    assert (acc["left"], acc["right"]) == (0.8, 0.9) and acc["delta"] == pytest.approx(0.1)


def test_diff_identical_reads_nothing(ft: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = run("diff", f"{ft}@step-200", f"{ft}@step-200")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "KEY " not in r.stdout  # nothing added, removed or changed
    assert table(r.stdout, "METRIC")["loss"].split() == ["loss", "0.5", "0.5", "0"]
    assert (
        r.stdout.splitlines()[-1]
        == "identical: 10 unchanged (6 tensors sharing blobs, not read; 4 equal values)"
    )
    code, out, _ = run_main(capsys, "diff", "--json", str(ft), f"{ft}@latest", "--key", "head")
    assert code == 0
    doc = json.loads(out)
    assert doc["identical"] is True and doc["changed"] == [] and doc["metrics"][0]["delta"] == 0
    assert doc["unchanged"] == {"tensors_shared": 2, "tensors_equal": 0, "values": 0, "total": 2}


def test_diff_across_stores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two stores, different chunk sizes: same values in different blobs are read and found equal."""
    a = cairn.Store(tmp_path / "a", create=True, chunk_size=64)
    b = cairn.Store(tmp_path / "b", create=True)
    a.save(
        {
            "same": np.arange(100, dtype=np.float32),  # 7 blobs in a, 1 in b
            "grow": np.zeros((2, 3), np.float32),
            "cast": np.ones(4, np.float32),
            "kind": np.ones(3, np.float32),
            "retyped": np.ones(1),
            "gone": np.ones(2),
            "name": "run-a",
            "nested": {"k": [1, 2]},
            "flag": 1,
        },
        step=1,
        metrics={"loss": 1.0},
    )
    b.save(
        {
            "same": np.arange(100, dtype=np.float32),
            "grow": np.zeros((2, 4), np.float32),
            "cast": np.ones(4, np.float16),
            "kind": torch.ones(3),
            "retyped": 1.0,
            "name": "run-b",
            "nested": {"k": [1, 2]},
            "flag": True,  # 1 == True in Python, not in a checkpoint
            "added": np.zeros(2),
        },
        step=1,
        metrics={"loss": 1.0},
    )
    code, out, err = run_main(capsys, "diff", "--json", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 1, err
    doc = json.loads(out)
    assert {c["key"]: c["changes"] for c in doc["changed"]} == {
        "grow": ["shape"],
        "cast": ["dtype"],
        "kind": ["kind"],
        "retyped": ["type"],
        "name": ["value"],
        "flag": ["value"],
    }
    assert [e["key"] for e in doc["added"]] == ["added"] and [e["key"] for e in doc["removed"]] == ["gone"]
    assert doc["unchanged"] == {"tensors_shared": 0, "tensors_equal": 1, "values": 2, "total": 3}

    code, out, _ = run_main(capsys, "diff", str(tmp_path / "a"), str(tmp_path / "b"))
    rows = table(out, "KEY")
    assert rows["name"].split()[1:] == ["value", "'run-a'", "→", "'run-b'"]
    assert rows["grow"].split()[1:] == [
        "shape",
        "F32",
        "[2,",
        "3]",
        "(numpy)",
        "→",
        "F32",
        "[2,",
        "4]",
        "(numpy)",
    ]
    assert rows["retyped"].split()[1:] == ["type", "F64", "[1]", "(numpy)", "→", "1.0"]
    assert rows["added"].split()[1] == "added" and rows["gone"].split()[1] == "removed"
    assert out.splitlines()[-1] == (
        "differ: 1 added, 1 removed, 6 changed, 3 unchanged (1 tensor read and equal; 2 equal values)"
    )


def test_diff_nan_and_inf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = cairn.Store(tmp_path / "s", create=True)
    nan, inf = np.nan, np.inf
    s.save(
        {
            "x": np.array([nan, 1.0, 2.0]),
            "y": np.array([1.0, nan]),
            "z": np.zeros(2),
            "w": np.array([inf, 1.0]),
        }
    )
    s.save(
        {
            "x": np.array([nan, 1.5, 2.0]),
            "y": np.array([1.0, 2.0]),
            "z": np.array([0, 3.0]),
            "w": np.array([inf, 3.0]),
        }
    )
    code, out, _ = run_main(capsys, "diff", "--json", f"{tmp_path / 's'}@step-0", f"{tmp_path / 's'}@step-1")
    assert code == 1
    got = {c["key"]: (c["max_abs_diff"], c["rel_l2"]) for c in json.loads(out)["changed"]}
    assert got["x"] == (0.5, pytest.approx(0.5 / math.sqrt(5)))  # NaN on both sides: equal
    assert got["y"] == ("nan", "nan")  # NaN on one side
    assert got["z"] == (3.0, "inf")  # all zeros before
    assert got["w"] == (2.0, 2.0)  # inf on both sides: equal


def test_diff_damaged_blob(ft: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = Path(shutil.copytree(ft, tmp_path / "s"))
    path = blob_file(s, "step-200", "head.w")
    flip_bit(path)
    r = run("diff", f"{s}@step-100", f"{s}@step-200")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("cairn: error:") and len(r.stderr.splitlines()) == 1
    assert "checkpoint 'step-200', key 'head.w'" in r.stderr and path.name in r.stderr
    assert "Traceback" not in r.stderr
    code, out, err = run_main(capsys, "diff", "--json", f"{s}@step-200", f"{ft}@step-100")  # across stores
    assert (code, out) == (1, "") and path.name in err
    # identical blob names are equal without a read: diff does not verify (cairn verify does)
    assert run_main(capsys, "diff", f"{s}@step-200", f"{ft}@step-200")[0] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["diff", "{ft}@step-100", "{ft}@step-999"], "no checkpoint 'step-999'"),
        (["diff", "{ft}", "{tmp}/nowhere"], "not a cairn store"),
        (["diff", "{ft}@step-100", "{ft}", "--key", "decoder"], "matches --key 'decoder'"),
        (["diff", "{ft}"], "the following arguments are required"),
        (["du", "{tmp}/nowhere"], "not a cairn store"),
        (["show", "--stats", "{ft}", "--key", "decoder"], "matches --key 'decoder'"),
    ],
)
def test_usage_errors(
    ft: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run_main(capsys, *(a.format(ft=ft, tmp=tmp_path) for a in argv))
    assert (code, out) == (2, "")
    assert err.startswith("cairn: error:") and message in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------- du


def test_du_json(ft: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "du", "--json", str(ft))
    assert code == 0
    doc = json.loads(out)
    manifests = sum(p.stat().st_size for p in (ft / "checkpoints").glob("*.json"))
    blobs = SIZE + 2 * HEAD_BYTES
    assert doc == {
        "store": str(ft),
        "checkpoints": [
            {"name": "step-100", "step": 100, "nbytes": SIZE, "new_bytes": SIZE},
            {"name": "step-200", "step": 200, "nbytes": SIZE, "new_bytes": HEAD_BYTES},
            {"name": "step-300", "step": 300, "nbytes": SIZE, "new_bytes": HEAD_BYTES},
        ],
        "damaged": [],
        "logical_bytes": 3 * SIZE,
        "blob_bytes": blobs,
        "num_blobs": 6 + 2 * 2,
        "manifest_bytes": manifests,
        "num_manifests": 3,
        "unreferenced_bytes": 0,
        "unreferenced_blobs": 0,
        "missing_blobs": 0,
        "missing_bytes": 0,
        "stored_bytes": blobs + manifests,
        "saved_bytes": 3 * SIZE - blobs - manifests,
        "ratio": 3 * SIZE / (blobs + manifests),
        "disk_bytes": blobs + manifests,
    }


def test_du_plain(ft: Path) -> None:
    r = run("du", str(ft))
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout, "NAME")
    assert rows["step-100"].split() == ["step-100", "100", "33.5", "KiB", "33.5", "KiB"]
    assert rows["step-300"].split() == ["step-300", "300", "33.5", "KiB", "1.0", "KiB"]
    fields = dict(line.split(None, 1) for line in r.stdout.split("\n\n")[1].splitlines())
    stored = SIZE + 2 * HEAD_BYTES + sum(p.stat().st_size for p in (ft / "checkpoints").glob("*.json"))
    assert fields["checkpoints"] == "3"
    assert fields["logical"].startswith("100.5 KiB ")
    assert fields["stored"].startswith(f"{stored / 1024:.1f} KiB (10 blobs 35.5 KiB + 3 manifests ")
    assert fields["saved"].endswith(f"({3 * SIZE / stored:.1f}× smaller)")
    assert fields["unreferenced"] == "0 B in 0 blobs"
    assert "missing" not in fields and "damaged" not in fields


def test_du_garbage_missing_and_damaged(ft: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = Path(shutil.copytree(ft, tmp_path / "s"))
    store = cairn.Store(s)
    store.delete("step-200")  # its head's two blobs become garbage
    code, out, _ = run_main(capsys, "du", "--json", str(s))
    assert code == 0
    doc = json.loads(out)
    assert (doc["unreferenced_bytes"], doc["unreferenced_blobs"]) == (HEAD_BYTES, 2)
    assert [c["new_bytes"] for c in doc["checkpoints"]] == [SIZE, HEAD_BYTES]
    assert doc["disk_bytes"] == doc["stored_bytes"] + HEAD_BYTES
    out = run_main(capsys, "du", str(s))[1]
    assert "unreferenced  1.0 KiB in 2 blobs (`cairn gc` reclaims them" in out
    assert store.gc(grace=0).bytes_freed == HEAD_BYTES  # what gc reclaims is what du said
    assert json.loads(run_main(capsys, "du", "--json", str(s))[1])["unreferenced_bytes"] == 0

    blob_file(s, "step-300", "head.b").unlink()
    flip_bit(s / "checkpoints" / "step-100.json", byte=40)
    doc = json.loads(run_main(capsys, "du", "--json", str(s))[1])
    assert (doc["missing_blobs"], doc["missing_bytes"]) == (1, 16)
    assert doc["damaged"] == ["step-100"] and [c["name"] for c in doc["checkpoints"]] == ["step-300"]
    assert doc["unreferenced_bytes"] == HEAD_BYTES  # step-100's head: nothing readable uses it
    out = run_main(capsys, "du", str(s))[1]
    assert "missing       1 blob (16 B): run `cairn verify`" in out
    assert "damaged       step-100" in out


def test_du_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cairn.Store(tmp_path / "e", create=True)
    code, out, _ = run_main(capsys, "du", str(tmp_path / "e"))
    assert code == 0 and "NAME" not in out
    assert "saved         -" in out and "logical       0 B" in out
    doc = json.loads(run_main(capsys, "du", "--json", str(tmp_path / "e"))[1])
    assert doc["checkpoints"] == [] and doc["ratio"] is None and doc["stored_bytes"] == 0


# ------------------------------------------------------------------------------------- torch, terminal


def test_torch_is_imported_only_for_stats(ft: Path) -> None:
    code = (
        "import sys, cairn.cli\n"
        "p = sys.argv[1]\n"
        "for argv in (['ls', p], ['show', p], ['verify', p], ['du', p], ['show', p, '--key', 'head']):\n"
        "    assert cairn.cli.main(argv) in (0, 1), argv\n"
        "assert cairn.cli.main(['diff', p, p]) == 0\n"
        "assert 'torch' not in sys.modules\n"
        "assert cairn.cli.main(['show', '--stats', p]) == 0\n"
        "assert 'torch' in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(ft)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_diff_that_reads_numpy_only_needs_no_torch(tmp_path: Path) -> None:
    s = tmp_path / "s"
    cairn.save(s, {"x": np.zeros(3)}, step=1)
    cairn.save(s, {"x": np.ones(3)}, step=2)
    code = (
        "import sys, cairn.cli\n"
        "assert cairn.cli.main(['diff', sys.argv[1] + '@step-1', sys.argv[1]]) == 1\n"
        "assert cairn.cli.main(['show', '--stats', sys.argv[1]]) == 0\n"
        "assert 'torch' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(s)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_rich_tables_on_a_terminal(
    ft: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "200")
    for argv in (["show", "--stats", str(ft)], ["diff", f"{ft}@step-100", str(ft)], ["du", str(ft)]):
        code, out, _ = run_main(capsys, *argv)
        assert code in (0, 1) and BOX_CHARS.search(out), argv


def test_progress_bar_when_reading_takes_time(
    ft: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[int, int]] = []

    @contextmanager
    def fake_bar(what: str) -> Iterator[Callable[[int, int], None]]:
        yield lambda done, total: calls.append((done, total))

    monkeypatch.setattr(_cli_inspect, "progress_bar", fake_bar)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert run_main(capsys, "show", "--stats", str(ft))[0] == 0
    assert calls == []  # 34 KiB: too quick to be worth a bar
    monkeypatch.setattr(_cli_inspect, "PROGRESS_MIN_BYTES", 1)
    assert run_main(capsys, "show", "--stats", str(ft))[0] == 0
    assert calls[0] == (0, SIZE) and calls[-1] == (SIZE, SIZE)
    calls.clear()
    assert run_main(capsys, "diff", f"{ft}@step-100", str(ft))[0] == 1
    assert calls[0] == (0, 2 * HEAD_BYTES) and calls[-1] == (2 * HEAD_BYTES, 2 * HEAD_BYTES)
