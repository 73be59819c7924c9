"""The benchmarks still run: ``bench/bench_store.py --quick`` and ``bench/bench_training.py --quick`` in a
subprocess, each writing JSON that must hold every row. No timing is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

PEER_SAVES = ["torch.save + fsync", "safetensors.save_file + fsync", "dcp.save", "dcp.save (thread_count=2)"]
LOADS = [
    "cairn.load (verify=True)",
    "cairn.load (verify=False)",
    "torch.load(weights_only=True)",
    "safetensors.load_file",
    "dcp.load (preallocated)",
]
LAZY = [
    "cairn.load(keys=key)",
    "torch.load(mmap=True)[key]",
    "safe_open().get_tensor(key)",
    "dcp.load({key})",
]
CEILINGS = [
    "disk: write, O_DIRECT + fsync",
    "disk: write, buffered + fsync",
    "disk: read, warm",
    "memcpy",
    "blake3, 1 thread",
    "blake3, all cores",
]
PAIRS = {
    "small": ["unchanged"],
    "medium": ["unchanged"],
    "finetune": ["weights only", "weights + AdamW moments (trainable params)"],
    "embedding": ["1% of rows scattered", "1% of rows contiguous"],
}


def run(script: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--dir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("# ")
    assert not (tmp_path / "work").exists()  # everything the run wrote is gone
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


@pytest.mark.slow
def test_store_bench_smoke(tmp_path: Path) -> None:
    doc = run("bench_store.py", tmp_path)
    rows = {(r["section"], r["operation"]): r for r in doc["rows"]}
    want = {("ceilings", op) for op in CEILINGS}
    if doc["cache_dropped"]:
        want.add(("ceilings", "disk: read, cold"))
    temps = ["cold", "warm"] if doc["cache_dropped"] else ["warm"]
    for name, labels in PAIRS.items():
        for label in labels:
            sec = f"{name}: save" + (f" [{label}]" if len(labels) > 1 else "")
            ops = ["cairn.save (sync), full", f"cairn.save (sync), 2nd save ({label})"]
            ops += ["cairn async, full (new store)", f"cairn async, 2nd save ({label})", *PEER_SAVES]
            ops += ["dcp.async_save"]
            if name in ("small", "medium"):
                ops.append("cairn async, full (staging buffer reused)")
            want |= {(sec, op) for op in ops}
        if name in ("small", "medium"):
            for temp in temps:
                want |= {(f"{name}: full load, {temp}", op) for op in LOADS}
                lazy = sorted({s for s, _ in rows if s.startswith(f"{name}: lazy read") and s.endswith(temp)})
                assert len(lazy) == 1, lazy
                want |= {(lazy[0], op) for op in LAZY}
    assert want <= set(rows), sorted(want - set(rows))
    for key in want:
        assert rows[key]["seconds"] > 0, key
    for r in doc["rows"]:
        if r["operation"].endswith("2nd save (unchanged)"):
            assert r["bytes_written"] < 0.05 * r["bytes"], r  # only manifests: every chunk deduplicated
    assert {t["target"] for t in doc["targets"]} >= {
        "durable sync save GB/s vs fastest peer",
        "async save caller blocking vs dcp.async_save",
        "fine-tune 2nd save time / full save",
        "fine-tune 2nd save bytes / full save",
        "verify=False warm load vs safetensors warm load",
        "lazy one-tensor read vs safe_open().get_tensor()",
    }


@pytest.mark.slow
def test_training_bench_smoke(tmp_path: Path) -> None:
    doc = run("bench_training.py", tmp_path)
    modes = {r["mode"]: r for r in doc["rows"]}
    assert set(modes) == {
        "no checkpointing",
        "torch.save + fsync",
        "cairn async (CheckpointManager)",
        "cairn sync (CheckpointManager)",
    }
    assert all(r["steps_per_s"] > 0 for r in modes.values())
    assert 16_000_000 < doc["params"] < 17_000_000
    saves = {r["mode"]: r["saves"] for r in doc["runs"]}
    assert saves["no checkpointing"] == 0
    assert all(n == 2 for m, n in saves.items() if m != "no checkpointing"), saves
