"""``cairn forget``, ``gc``, ``pin``/``unpin`` and the KEPT BY column of ``ls``, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cairn
from cairn.cli import main


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cairn", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    keep = cairn.KeepLast(2) | cairn.KeepBest("val_loss", n=1)
    with cairn.CheckpointManager(tmp_path / "run", save_every=cairn.Every(steps=1), keep=keep) as mgr:
        for step, loss in enumerate([0.5, 0.2, 0.4, 0.6, 0.7], start=1):
            mgr.save(step, {"w": torch.full((256,), float(step))}, metrics={"val_loss": loss})
    return tmp_path / "run"


def test_ls_says_why_each_checkpoint_is_kept(store: Path) -> None:
    out = _run("ls", str(store))
    assert out.returncode == 0
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert "best 1 by val_loss (min)" in lines["step-2"]
    assert "newest, last 2" in lines["step-5"]
    rows = json.loads(_run("ls", str(store), "--json").stdout)["checkpoints"]
    assert [r["kept_by"] for r in rows] == [["best 1 by val_loss (min)"], ["last 2"], ["newest", "last 2"]]


def test_forget_dry_run_then_for_real(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["forget", str(store), "--keep-last", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete 2 of 3 checkpoints (dry run" in out
    assert len(cairn.Store(store).list()) == 3
    assert main(["forget", str(store), "--keep-last", "1", "--keep-best", "val_loss:min:1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in doc["checkpoints"] if not c["keep"]] == ["step-4"]
    assert [i.name for i in cairn.Store(store).list()] == ["step-2", "step-5"]


def test_forget_uses_the_recorded_policy_and_needs_one(store: Path, tmp_path: Path) -> None:
    assert _run("forget", str(store)).returncode == 0  # the manager's own policy: nothing to delete
    assert len(cairn.Store(store).list()) == 3
    cairn.save(tmp_path / "plain", {"a": 1})
    bad = _run("forget", str(tmp_path / "plain"))
    assert bad.returncode == 2 and "--keep-" in bad.stderr
    bad = _run("forget", str(store), "--keep-best", "val_loss:sideways")
    assert bad.returncode == 2 and "cairn: error:" in bad.stderr and "Traceback" not in bad.stderr


def test_pin_protects_and_gc_reclaims(store: Path) -> None:
    assert _run("pin", f"{store}@step-4").returncode == 0
    assert _run("forget", str(store), "--keep-last", "1").returncode == 0
    assert [i.name for i in cairn.Store(store).list()] == ["step-4", "step-5"]
    gc = _run("gc", str(store), "--grace", "0", "--json")
    report = json.loads(gc.stdout)
    assert report["blobs_deleted"] == 3 and report["bytes_freed"] == 3 * 256 * 4
    assert cairn.Store(store).verify().ok
    unpinned = _run("unpin", f"{store}@step-4", "--json")
    assert unpinned.returncode == 0 and json.loads(unpinned.stdout)["pinned"] is False
    assert "would free 0 B" in _run("gc", str(store), "--dry-run").stdout
    assert _run("pin", str(store)).returncode == 2
    assert _run("gc", str(store), "--grace", "soon").returncode == 2
