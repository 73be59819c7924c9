"""Child processes of the concurrency tests (C10, C11 in ``tests/reliability/test_concurrency.py``).

Forked from a ``multiprocessing`` forkserver with torch and cairn preloaded; each reports over a pipe.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import blake3

import cairn
from cairn._read import blob_path
from reliability.states import make_state

BARRIER_TIMEOUT = 120.0
"""Seconds a writer waits for the others at a round's barrier (a hang guard)."""


def round_seed(mode: str, rnd: int, writer: int) -> int:
    """The seed of the state ``writer`` saves in round ``rnd``: the same for every writer in "identical"."""
    base = {"distinct": 1_000_000, "same": 2_000_000, "identical": 3_000_000}[mode]
    return base + rnd if mode == "identical" else base + rnd * 64 + writer


def small_state(seed: int) -> dict[str, Any]:
    """A ~256 KiB state of 8 tensors plus the odd ones (small: concurrency tests are about many rounds)."""
    return make_state(seed, mib=0.25, tensors=8)


def round_target(mode: str, rnd: int, writer: int, writers: int) -> tuple[int, str]:
    """The step and name ``writer`` saves in round ``rnd``: distinct, colliding, or distinct names over
    identical tensors."""
    if mode == "distinct":
        step = rnd * writers + writer
        return step, f"step-{step}"
    if mode == "same":
        return rnd, f"step-{rnd}"
    return rnd, f"r{rnd}-w{writer}"


def racing_writer(
    path: str, mode: str, writer: int, writers: int, rounds: int, barrier: Barrier, conn: Connection
) -> None:
    """Each round: wait for every writer at ``barrier``, then save at once; report the outcome."""
    store = cairn.Store(path)
    for rnd in range(rounds):
        step, name = round_target(mode, rnd, writer, writers)
        state = small_state(round_seed(mode, rnd, writer))
        barrier.wait(BARRIER_TIMEOUT)
        try:
            store.save(state, step=step, name=name)
            outcome = "ok"
        except cairn.CheckpointExistsError:
            outcome = "exists"
        except Exception as e:  # reported, and the test fails on it
            outcome = f"error: {e!r}"
        conn.send((rnd, writer, name, outcome))
    conn.close()


def lock_holder(path: str, kind: str, conn: Connection) -> None:
    """Take a lock of the store and hold it until killed: ``raw`` (``backend.lock("held")`` exclusive),
    ``manager`` (a :class:`cairn.CheckpointManager`'s writer lock) or ``shared`` (``gc`` lock shared, as a
    save in flight holds it)."""
    store = cairn.Store(path)
    held: Any
    if kind == "raw":
        held = store.backend.lock("held", owner=f"holder pid {os.getpid()}")
    elif kind == "manager":
        held = cairn.CheckpointManager(path, preemption_signals=())
    else:
        held = store.backend.lock("gc", shared=True)
    conn.send(("locked", os.getpid()))
    time.sleep(3600)
    del held  # pragma: no cover - killed before


def _bump(counter: str, pause: float) -> None:
    """Read the counter, wait ``pause`` (0: yield the CPU), write it back plus one: a lost update if two
    processes do this at once."""
    with open(counter, "r+", encoding="ascii") as f:
        value = int(f.read() or "0")
        if pause:
            time.sleep(pause)
        else:
            os.sched_yield()
        f.seek(0)
        f.truncate()
        f.write(str(value + 1))


def counter_worker(
    path: str, counter: str, iterations: int, use_lock: bool, pause: float, barrier: Barrier, conn: Connection
) -> None:
    """Increment ``counter`` ``iterations`` times, each under ``backend.lock("counter")`` (or, for the
    negative control, without it)."""
    store = cairn.Store(path)
    barrier.wait(BARRIER_TIMEOUT)
    for _ in range(iterations):
        if use_lock:
            with store.backend.lock("counter", owner=f"counter pid {os.getpid()}"):
                _bump(counter, pause)
        else:
            _bump(counter, pause)
    conn.send(("done", iterations))
    conn.close()


def gc_state(step: int) -> dict[str, Any]:
    """The state of ``step`` in the gc-vs-save test (~256 KiB in 8 tensors plus the odd ones)."""
    return make_state(step, mib=0.25, tensors=8)


def leave_orphans(store: cairn.Store, step: int, half: int) -> int:
    """Write the blobs of one ``half`` (0 or 1) of ``gc_state(step)["model"]`` as a crashed save would leave
    them: durable, named by their hash, referenced by no manifest. The later save of ``step`` finds them
    (dedup hits), unless a gc deleted them first. Holds the ``gc`` lock shared while writing, as the
    crashed save did (a gc with ``grace=0`` deletes every temporary file it sees). Returns how many were
    written."""
    written = 0
    with store.backend.lock("gc", shared=True):
        tensors = list(gc_state(step)["model"].values())
        for t in tensors[half * len(tensors) // 2 : (half + 1) * len(tensors) // 2]:
            data = t.numpy().tobytes()
            written += store.backend.create(blob_path(blake3.blake3(data).hexdigest()), data)
        store.backend.flush()
    return written


def dedup_saver(path: str, rounds: int, conn: Connection) -> None:
    """Save steps ``0..rounds-1`` while another process collects garbage. Before saving ``step`` it leaves
    half of the big tensors' blobs of ``step`` (just before the save) and the other half of ``step + 1``
    (one save earlier) behind as orphans, so every save may dedup onto blobs no checkpoint references:
    exactly what a racing gc deletes. Right after each commit it checks that every blob the manifest
    names is there, whole."""
    store = cairn.Store(path)
    for step in range(rounds):
        leave_orphans(store, step, 0)
        leave_orphans(store, step + 1, 1)
        info = store.save(gc_state(step), step=step)
        manifest = store.manifest(info.name)
        missing = 0
        for t in manifest.tensors:
            for shard in t.shards:
                for chunk in shard.chunks:
                    size = store.backend.size(blob_path(chunk.blob))
                    if size is None or size < chunk.offset + chunk.nbytes:
                        missing += 1
        conn.send(("saved", step, missing, len(manifest.blobs()) - info.blobs_written))  # dedup hits
    conn.close()


def gc_loop(path: str, stop: Event, conn: Connection) -> None:
    """Run ``gc(grace=0)`` back to back until ``stop`` is set; report how many runs and deletions."""
    store = cairn.Store(path)
    runs = deleted = 0
    while not stop.is_set():
        report = store.gc(grace=0)
        runs += 1
        deleted += report.blobs_deleted
    conn.send(("gc", runs, deleted))
    conn.close()
