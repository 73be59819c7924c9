"""CheckpointManager: schedules, retention, restore with fallback, preemption, locks and gc, for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import cairn
from cairn.backends import MemoryBackend


def _state(value: float = 0.0) -> dict[str, Any]:
    return {"w": torch.full((64, 64), value), "frozen": torch.arange(4096.0), "epoch": 0}


def test_fresh_run_schedule_and_restore(tmp_path: Path) -> None:
    state = _state()
    with cairn.CheckpointManager(tmp_path, save_every=cairn.Every(steps=3)) as mgr:
        assert mgr.restore(state) == 0 and mgr.restored is None
        saved = []
        for step in range(10):
            state["w"] += 1
            state["epoch"] = step // 4
            if mgr.save(step + 1, state, metrics={"loss": 1.0 / (step + 1)}):
                saved.append(step + 1)
        assert saved == [3, 6, 9]
        assert not mgr.save(9, state)  # nothing is saved twice for one step
        assert mgr.save(10, state, force=True)
    live = _state()
    with cairn.CheckpointManager(tmp_path, save_every=cairn.Every(steps=3)) as mgr:
        assert mgr.restore(live) == 10
        assert mgr.restored is not None and mgr.restored.checkpoint == "step-10"
        assert torch.equal(live["w"], state["w"]) and live["epoch"] == 2
        assert not mgr.save(11, live) and mgr.save(12, live)  # the schedule continues from the restored step
    reasons = [i.metadata["cairn"]["reason"] for i in cairn.Store(tmp_path).list()]
    assert reasons == ["schedule", "schedule", "schedule", "forced", "schedule"]


def test_a_restarted_run_that_forgot_to_restore_is_stopped(tmp_path: Path) -> None:
    with cairn.CheckpointManager(tmp_path, save_every=cairn.Every(steps=1)) as mgr:
        for step in range(1, 6):
            mgr.save(step, _state())
    with cairn.CheckpointManager(tmp_path, save_every=cairn.Every(steps=1)) as mgr:
        with pytest.raises(cairn.StaleStepError, match="restore first"):
            mgr.save(1, _state())
        assert [i.step for i in mgr.list()] == [1, 2, 3, 4, 5]  # nothing lost
        assert mgr.restore(_state()) == 5
        with pytest.raises(cairn.StaleStepError, match="steps must increase"):
            mgr.save(4, _state())
        assert mgr.save(6, _state())


def test_retention_keeps_last_best_and_pins(tmp_path: Path) -> None:
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.7, 5: 0.8, 6: 0.6, 7: 0.95}
    keep = cairn.KeepLast(2) | cairn.KeepBest("val_loss", mode="min", n=1)
    with cairn.CheckpointManager(tmp_path, save_every=cairn.Every(steps=1), keep=keep) as mgr:
        for step, loss in losses.items():
            mgr.save(step, _state(step), metrics={"val_loss": loss})
            if step == 3:
                mgr.pin("step-3")
        assert [i.step for i in mgr.list()] == [2, 3, 6, 7]
        reasons = mgr.reasons()
        assert reasons["step-2"] == ("best 1 by val_loss (min)",)
        assert reasons["step-3"] == ("pinned",)
        assert reasons["step-7"][0] == "newest"
        best = mgr.best()
        assert best is not None and best.name == "step-2"
        live = _state()
        assert mgr.restore(live, "best") == 2 and torch.equal(live["w"], _state(2)["w"])
        with pytest.raises(cairn.PinnedError):
            mgr.store.delete("step-3")
        mgr.unpin("step-3")
        mgr.save(8, _state(8), metrics={"val_loss": 0.99})
        assert [i.step for i in mgr.list()] == [2, 7, 8]
        report = mgr.gc(grace=0)
    assert report.blobs_deleted > 0 and report.bytes_freed > 0
    assert cairn.Store(tmp_path).verify().ok


def test_checkpoints_without_the_metric_are_kept_explicitly(tmp_path: Path) -> None:
    keep = cairn.KeepBest("val_loss", n=1, missing="keep")
    with cairn.CheckpointManager(tmp_path, save_every=cairn.Every(steps=1), keep=keep) as mgr:
        mgr.save(1, _state(), metrics={"val_loss": 0.5})
        mgr.save(2, _state(), metrics={"loss": 0.1})  # no val_loss: kept, with its reason
        mgr.save(3, _state(), metrics={"val_loss": 0.9})
        assert mgr.reasons()["step-2"] == ("no val_loss metric",)
        assert [i.step for i in mgr.list()] == [1, 2, 3]


def test_restore_falls_back_from_a_damaged_newest(tmp_path: Path) -> None:
    with cairn.CheckpointManager(tmp_path, save_every=cairn.Every(steps=1)) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    blob = cairn.Store(tmp_path).manifest("step-2").tensors[0].shards[0].chunks[0].blob
    path = tmp_path / "blobs" / blob[:2] / blob
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    live = _state()
    with cairn.CheckpointManager(tmp_path) as mgr:
        with pytest.warns(RuntimeWarning, match="'step-2' is damaged"):
            assert mgr.restore(live) == 1
        assert torch.equal(live["w"], _state(1)["w"])
        with pytest.raises(cairn.BlobCorruptError):
            mgr.restore(live, "step-2")


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    with cairn.CheckpointManager(tmp_path), pytest.raises(cairn.StoreLockedError, match=f"pid {os.getpid()}"):
        cairn.CheckpointManager(tmp_path)
    with cairn.CheckpointManager(tmp_path):  # released on exit
        pass


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import cairn, time; m = cairn.CheckpointManager({str(tmp_path)!r}); "
            "print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        with pytest.raises(cairn.StoreLockedError, match=f"pid {child.pid}"):
            cairn.CheckpointManager(tmp_path)
    finally:
        child.kill()
        child.communicate()
    with caplog.at_level("INFO", logger="cairn"), cairn.CheckpointManager(tmp_path):
        pass
    assert f"pid {child.pid}" in caplog.text and "gone" in caplog.text


def test_preemption_signal_saves_at_the_next_step(tmp_path: Path) -> None:
    state = _state()
    with cairn.CheckpointManager(tmp_path, save_every=cairn.Every(steps=100)) as mgr:
        assert not mgr.save(1, state)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mgr.preempted
        assert mgr.save(2, state)  # off schedule: saved because of the signal
    info = cairn.Store(tmp_path).info()
    assert info.step == 2 and info.metadata["cairn"]["reason"] == "preempted"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers are given back on close


def test_sigterm_in_a_real_training_process(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time, torch, cairn
        state = {{"w": torch.zeros(8)}}
        with cairn.CheckpointManager({str(tmp_path)!r}, save_every=cairn.Every(steps=1000)) as mgr:
            start = mgr.restore(state)
            for step in range(start, 10**6):
                state["w"] += 1
                if step == start + 5:
                    print("training", flush=True)
                time.sleep(0.001)
                mgr.save(step + 1, state)
                if mgr.preempted:
                    print("saved", step + 1, flush=True)
                    break
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "training"
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    step = int(out.split()[-1])
    live = {"w": torch.zeros(8)}
    assert cairn.restore(tmp_path, live).step == step
    assert torch.equal(live["w"], torch.full((8,), float(step)))


def test_save_on_exception(tmp_path: Path) -> None:
    state = _state()
    with (
        pytest.raises(ZeroDivisionError),
        cairn.CheckpointManager(tmp_path, save_every=cairn.Every(steps=10), save_on_exception=True) as mgr,
    ):
        for step in range(7):
            state["w"] += 1
            mgr.save(step + 1, state)
        1 / 0  # noqa: B018
    info = cairn.Store(tmp_path).info()
    assert info.name == "exception-7" and "ZeroDivisionError" in info.metadata["exception"]


def test_gc_never_races_an_in_flight_save() -> None:
    started, release = threading.Event(), threading.Event()

    class SlowBackend(MemoryBackend):
        def create(self, path: str, data: Any, *, replace: bool = False) -> bool:
            if path.startswith("blobs/") and not started.is_set():
                started.set()
                release.wait(10)
            return super().create(path, data, replace=replace)

    backend = SlowBackend()
    cairn.Store(backend, create=True)
    saver = threading.Thread(target=cairn.save, args=(backend, {"x": torch.ones(1000)}), kwargs={"step": 1})
    saver.start()
    assert started.wait(10)
    reports: list[cairn.GCReport] = []
    collector = threading.Thread(target=lambda: reports.append(cairn.Store(backend).gc(grace=0)))
    collector.start()
    time.sleep(0.2)
    assert collector.is_alive()  # waiting for the save's shared lock
    release.set()
    saver.join(10)
    collector.join(10)
    assert reports[0].blobs_deleted == 0 and reports[0].blobs_kept == 1
    assert torch.equal(cairn.load(backend)["x"], torch.ones(1000))


def test_gc_spares_young_blobs_and_refuses_damaged_stores(tmp_path: Path) -> None:
    store = cairn.Store(tmp_path, create=True)
    store.save(_state(1), step=1)
    store.save(_state(2), step=2)
    store.delete("step-1")
    assert store.gc().blobs_spared == 1  # default grace: the unreferenced blob is young
    dry = store.gc(grace=0, dry_run=True)
    assert dry.blobs_deleted == 1 and store.gc(grace=0).bytes_freed == dry.bytes_freed
    (tmp_path / "checkpoints" / "step-2.json").chmod(0o644)
    (tmp_path / "checkpoints" / "step-2.json").write_text("{}")
    with pytest.raises(cairn.ManifestError, match="gc stopped without deleting anything"):
        store.gc(grace=0)


def test_an_initial_save_and_exception_checkpoints_are_not_resumed_from(tmp_path: Path) -> None:
    state = _state()
    with (
        pytest.raises(KeyError),
        cairn.CheckpointManager(tmp_path, save_every=cairn.Every(steps=5), save_on_exception=True) as mgr,
    ):
        assert mgr.restore(state) == 0
        assert mgr.save(0, state, force=True)  # an initial checkpoint (Orbax's InitialSavePolicy)
        for step in range(1, 8):
            mgr.save(step, state)
        raise KeyError("boom")
    assert [i.name for i in cairn.Store(tmp_path).list()] == ["step-0", "step-5", "exception-7"]
    with cairn.CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(_state()) == 5  # the mid-step exception checkpoint is passed over
        assert mgr.restore(_state(), "exception-7") == 7
    with pytest.raises(SystemExit), cairn.CheckpointManager(tmp_path / "exit", save_on_exception=True) as mgr:
        mgr.save(1, state, force=True)
        raise SystemExit(0)
    assert [i.name for i in cairn.Store(tmp_path / "exit").list()] == ["step-1"]


class _Clock:
    """A fake monotonic clock for the manager: training steps and saves take the time the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_every_overhead_measures_saves_and_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(cairn._manager.time, "monotonic", clock.monotonic)  # type: ignore[attr-defined]
    backend = MemoryBackend()
    with cairn.CheckpointManager(backend, save_every=cairn.Every(overhead=0.1)) as mgr:
        commit = mgr.store.commit

        def slow_commit(prepared: Any) -> Any:
            clock.now += 2.0  # every save blocks training 2 s
            return commit(prepared)

        monkeypatch.setattr(mgr.store, "commit", slow_commit)
        saved = []
        for step in range(1, 101):
            clock.now += 1.0  # one training step is 1 s
            if mgr.save(step, _state(step)):
                saved.append(step)
        assert mgr.save_seconds == pytest.approx(2.0)
        assert mgr.step_seconds == pytest.approx(1.0)
    # the first call saves to measure; then 2 s * 0.9 / 0.1 = 18 s of training between saves
    assert saved == [1, 19, 37, 55, 73, 91]
    assert len(saved) * 2.0 <= 0.1 * (100 + 2.0 * len(saved)) + 2.0
