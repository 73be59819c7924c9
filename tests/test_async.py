"""Async saves: a snapshot at the moment save() returns, one staged copy, errors never swallowed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cairn
from cairn._async import _split
from cairn.backends import MemoryBackend


class GatedBackend(MemoryBackend):
    """Blob writes wait for ``gate``; ``fail`` makes them raise (a full disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.in_flight = threading.Event()

    def create(self, path: str, data: Any, *, replace: bool = False) -> bool:
        if path.startswith("blobs/"):
            self.in_flight.set()
            assert self.gate.wait(10)
            if self.fail:
                raise cairn.BackendError(28, "No space left on device")
        return super().create(path, data, replace=replace)


def test_the_checkpoint_is_the_state_when_save_returned() -> None:
    backend = GatedBackend()
    backend.gate.clear()
    w = torch.zeros(1000)
    with cairn.CheckpointManager(backend, save_every=cairn.Every(steps=1), async_save=True) as mgr:
        assert mgr.save(1, {"w": w})  # returns while the write is held at the gate
        assert backend.in_flight.wait(10)
        w += 7  # the training goes on and changes the tensor in place
        assert mgr.list() == []  # not committed yet: nothing half-visible
        backend.gate.set()
        mgr.wait()
        assert [i.name for i in mgr.list()] == ["step-1"]
    assert torch.equal(cairn.load(backend)["w"], torch.zeros(1000))


def test_one_save_in_flight_and_one_staging_buffer() -> None:
    backend = GatedBackend()
    with cairn.CheckpointManager(backend, save_every=cairn.Every(steps=1), async_save=True) as mgr:
        mgr.save(1, {"w": torch.ones(1000)})
        mgr.wait()
        buffer = mgr._writer._staging  # type: ignore[union-attr]
        backend.gate.clear()
        mgr.save(2, {"w": torch.full((1000,), 2.0)})
        third = threading.Thread(target=mgr.save, args=(3, {"w": torch.full((1000,), 3.0)}))
        third.start()
        third.join(0.3)
        assert third.is_alive()  # the third save waits for the second: one in flight at most
        backend.gate.set()
        third.join(10)
        assert mgr._writer._staging is buffer  # type: ignore[union-attr]  # reused, not reallocated
    assert [i.step for i in cairn.Store(backend).list()] == [1, 2, 3]
    assert torch.equal(cairn.load(backend, "step-3")["w"], torch.full((1000,), 3.0))


def test_a_background_failure_is_raised_by_the_next_call() -> None:
    backend = GatedBackend()
    mgr = cairn.CheckpointManager(backend, save_every=cairn.Every(steps=1), async_save=True)
    backend.fail = True
    assert mgr.save(1, {"w": torch.ones(10)})  # accepted: the failure happens in the background
    with pytest.raises(cairn.BackendError, match="No space left"):
        mgr.save(2, {"w": torch.ones(10)})
    backend.fail = False
    assert mgr.save(3, {"w": torch.ones(10)})
    mgr.close()
    assert [i.step for i in cairn.Store(backend).list()] == [3]  # the failed save left no checkpoint
    backend.fail = True
    manager = cairn.CheckpointManager(backend, save_every=cairn.Every(steps=1), async_save=True)
    with pytest.raises(cairn.BackendError), manager as m2:
        m2.restore({"w": torch.ones(10)})
        m2.save(4, {"w": torch.ones(10)})  # ...and close() at the end of the block raises it


def test_retention_runs_only_after_the_commit() -> None:
    backend = GatedBackend()
    keep = cairn.KeepLast(1)
    with cairn.CheckpointManager(backend, save_every=cairn.Every(steps=1), keep=keep, async_save=True) as mgr:
        mgr.save(1, {"w": torch.ones(10)})
        mgr.wait()
        backend.gate.clear()
        mgr.save(2, {"w": torch.zeros(10)})
        assert backend.in_flight.wait(10)
        assert [i.step for i in mgr.list()] == [1]  # the old one stays until the new one is durable
        backend.gate.set()
    assert [i.step for i in cairn.Store(backend).list()] == [2]


def test_exit_with_a_save_in_flight_completes_it(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import torch, cairn
        mgr = cairn.CheckpointManager({str(tmp_path)!r}, save_every=cairn.Every(steps=1), async_save=True)
        mgr.save(1, {{"w": torch.arange(4_000_000.0)}})
        # no wait(), no close(): the interpreter exits with the save in flight
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    store = cairn.Store(tmp_path)
    assert [i.step for i in store.list()] == [1] and store.verify().ok
    assert torch.equal(cairn.load(tmp_path)["w"], torch.arange(4_000_000.0))


def test_a_large_state_is_staged_exactly_and_wait_raises() -> None:
    """A state large enough to be staged in pieces by several threads is copied exactly, however its
    tensors' sizes fall on the pieces; a failure of the write is raised by ``wait()``."""
    backend = GatedBackend()
    backend.gate.clear()
    g = torch.Generator().manual_seed(0)
    sizes = [3, 9_000_001, 17_000_000, 1, 5_000_000]  # 124 MB of float32, odd boundaries
    state = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    expected = {k: v.clone() for k, v in state.items()}
    with cairn.CheckpointManager(backend, save_every=cairn.Every(steps=1), async_save=True) as mgr:
        assert mgr.save(1, state)
        for t in state.values():
            t.mul_(-1)  # training goes on while the write waits
        backend.gate.set()
        mgr.wait()
        backend.fail = True
        mgr.save(2, state)
        with pytest.raises(cairn.BackendError, match="No space left"):
            mgr.wait()
        backend.fail = False
    loaded = cairn.load(backend, "step-1")
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert [i.step for i in cairn.Store(backend).list()] == [1]


def test_restore_reserves_the_staging_buffer_for_the_first_save() -> None:
    """``restore()`` learns the state's size: the staging memory is made ready in the background, and the
    first save copies into it instead of allocating (the page faults cost as much as the copy)."""
    state = {"w": torch.ones(300_000), "b": torch.zeros(7)}
    with cairn.CheckpointManager(MemoryBackend(), save_every=cairn.Every(steps=1), async_save=True) as mgr:
        assert mgr.restore(state) == 0
        writer = mgr._writer
        assert writer is not None and writer._reserving is not None
        writer._reserving.join(10)
        reserved = writer._staging
        assert reserved.nbytes >= 300_007 * 4
        assert mgr.save(1, state)
        assert writer._staging is reserved  # used, not reallocated


@given(st.lists(st.integers(1, 1 << 20), max_size=40), st.integers(1, 8))
def test_staging_pieces_are_shared_out_in_order_and_about_evenly(sizes: list[int], n: int) -> None:
    """Every piece is copied by exactly one thread, in order, and no thread gets much more than its share
    (at most one piece more)."""
    pieces = [(np.empty(size, dtype=np.uint8), np.empty(size, dtype=np.uint8)) for size in sizes]
    groups = _split(pieces, n)
    assert [id(p) for g in groups for p in g] == [id(p) for p in pieces]
    assert len(groups) <= n and all(groups)
    share, biggest = sum(sizes) / n, max(sizes, default=0)
    assert all(sum(d.nbytes for d, _ in g) <= share + biggest for g in groups)
