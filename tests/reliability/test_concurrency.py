"""C10 and C11 of the reliability plan: concurrent writers on one store, locks and stale locks, gc vs save.

Writers are real processes forked from a ``multiprocessing`` forkserver with torch and cairn preloaded
(see ``workers/concurrency_child.py``); every round starts at a barrier, so the saves really race.

cairn has no lease locks (C11 b): its locks are local ``flock``s (``LocalBackend.lock``), which the kernel
drops when the holder dies, and the memory backend's in-process locks. There is no NFS/S3 lease mode whose
early breaking could be tested.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Any

import pytest
import torch

import cairn
from reliability.harness import Record, forkserver, on_disk_blobs, referenced_blobs, trials
from reliability.states import digest
from reliability.workers import concurrency_child as child

HANG = 120.0
"""Seconds before a silent child is declared hung (a hang guard, not a timing assertion)."""


def run_all(
    ctx: ForkServerContext, target: Callable[..., None], arglists: list[tuple[Any, ...]]
) -> list[Any]:
    """Run ``target(*args, conn)`` for every ``args`` at once; every message they sent, once all ended."""
    procs, readers = [], []
    for args in arglists:
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(*args, writer), daemon=True)
        proc.start()
        writer.close()
        procs.append(proc)
        readers.append(reader)
    messages: list[Any] = []
    try:
        open_readers: list[Any] = list(readers)
        while open_readers:
            ready = wait(open_readers, timeout=HANG)
            assert ready, f"no child said anything for {HANG} s: hung"
            for r in ready:
                assert isinstance(r, Connection)
                try:
                    messages.append(r.recv())
                except EOFError:
                    open_readers.remove(r)
    finally:
        for proc in procs:
            proc.join(HANG)
            if proc.exitcode is None:  # pragma: no cover - hang guard
                proc.kill()
                proc.join()
        for r in readers:
            r.close()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * len(procs), f"children failed: exit codes {codes}"
    return messages


# -- C10: concurrent writers ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["distinct", "same", "identical"])
def test_c10_concurrent_writers(mode: str, tmp_path: Path, record: Record) -> None:
    """C10: ``writers`` processes save at once on one store, every round: (a) ``distinct`` steps, (b) the
    ``same`` step (exactly one wins, the others get ``CheckpointExistsError``, 0 silent overwrites), (c)
    ``identical`` tensors under distinct names (a dedup race on every blob). Afterwards every committed
    checkpoint restores bit-identically, ``verify()`` is clean and nothing is left in ``tmp/``."""
    ctx = forkserver()
    writers = trials(ci=4, soak=8)
    rounds = trials(ci=100, soak=2000)
    path = tmp_path / "store"
    cairn.Store(path, create=True)
    barrier = ctx.Barrier(writers)
    messages = run_all(
        ctx, child.racing_writer, [(str(path), mode, w, writers, rounds, barrier) for w in range(writers)]
    )
    store = cairn.Store(path)
    problems: list[str] = []
    errors = [m for m in messages if m[3].startswith("error")]
    if errors:
        problems.append(f"{len(errors)} saves failed with an unexpected error, e.g. {errors[:3]}")
    winners: dict[str, list[int]] = {}
    for rnd, writer, name, outcome in messages:
        if outcome == "ok":
            winners.setdefault(name, []).append(child.round_seed(mode, rnd, writer))
    exists = sum(m[3] == "exists" for m in messages)
    overwrites = sum(len(seeds) - 1 for seeds in winners.values())
    if mode == "same":
        per_round = [len(winners.get(f"step-{r}", [])) for r in range(rounds)]
        if per_round != [1] * rounds:
            bad = [(r, n) for r, n in enumerate(per_round) if n != 1]
            problems.append(f"{len(bad)} rounds without exactly one winner, e.g. (round, winners) {bad[:5]}")
        if exists != rounds * (writers - 1):
            problems.append(f"{exists} CheckpointExistsError, expected {rounds * (writers - 1)}")
    elif exists or len(winners) != rounds * writers:
        problems.append(f"{exists} saves refused, {len(winners)} of {rounds * writers} committed")
    if overwrites:
        problems.append(f"{overwrites} silent overwrites: two writers were told they committed one name")

    names = store.names()
    if sorted(names) != sorted(winners):
        problems.append(f"committed {len(names)} checkpoints, writers were told {len(winners)}")
    restored = lost = 0
    for name in names:
        seeds = winners.get(name, [])
        got = digest(store.load(name))
        if len(seeds) == 1 and got == digest(child.small_state(seeds[0])):
            restored += 1
        else:
            lost += 1
            problems.append(f"{name} does not hold the winner's state (winners {seeds})")
    report = store.verify()
    if not report.ok:
        problems.append(f"verify(): {report.problems[:3]}")
    orphans = len(on_disk_blobs(store) - referenced_blobs(store))  # the blobs of losers of a collision
    store.gc(grace=0)
    disk, live = on_disk_blobs(store), referenced_blobs(store)
    if disk != live:
        problems.append(
            f"after gc(grace=0): {len(disk - live)} unreferenced and {len(live - disk)} missing blobs"
        )
    leftovers = list(store.backend.list("tmp"))
    if leftovers:
        problems.append(f"{len(leftovers)} temporary files left by saves that did not crash")

    record.trials = rounds
    record.faults = rounds * writers  # racing saves
    record.detected = exists if mode == "same" else restored
    record.data_lost = lost
    record.notes.update(
        {
            "mode": mode,
            "writers": writers,
            "committed": len(names),
            "checkpoint_exists_errors": exists,
            "silent_overwrites": overwrites,
            "blobs": len(disk),
            "orphan_blobs_removed_by_gc": orphans,
            "blobs_checked_by_verify": report.blobs_checked,
            "problems": problems[:5],
        }
    )
    assert record.data_lost == 0, problems[:5]
    assert not problems, problems[:5]


def test_c10_manager_writer_lock_is_exclusive(tmp_path: Path, record: Record) -> None:
    """A second ``CheckpointManager`` on a directory, in another process or in this one, gets
    ``StoreLockedError`` naming the holder; a plain ``Store`` still reads; once the holder is gone, a new
    manager takes over."""
    ctx = forkserver()
    path = tmp_path / "store"
    cairn.Store(path, create=True)
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child.lock_holder, args=(str(path), "manager", writer), daemon=True)
    proc.start()
    writer.close()
    try:
        assert reader.poll(HANG), "the lock holder never said it holds the lock"
        _, pid = reader.recv()
        with pytest.raises(cairn.StoreLockedError, match=f"CheckpointManager pid {pid} "):
            cairn.CheckpointManager(path, preemption_signals=())
        assert cairn.Store(path).list() == []  # readers take no lock
    finally:
        proc.kill()
        proc.join(HANG)
        reader.close()
    with cairn.CheckpointManager(path, preemption_signals=()) as mgr:
        mgr.save(1, {"w": child.small_state(1)["model"]["w0"]}, force=True)
        with pytest.raises(cairn.StoreLockedError, match=f"CheckpointManager pid {os.getpid()} "):
            cairn.CheckpointManager(path, preemption_signals=())  # the same process: refused too
    with cairn.CheckpointManager(path, preemption_signals=()) as mgr:  # released by close()
        assert mgr.latest() is not None
    record.trials = 2
    record.faults = 1
    record.detected = 2


# -- C11: locks and stale locks ---------------------------------------------------------------------------


def test_c11a_killed_lock_holder_releases(tmp_path: Path, record: Record) -> None:
    """C11 (a): a process holding a store lock is SIGKILLed; the next acquirer gets the lock (the 30 s
    limit is a hang guard) and, for an exclusive lock, ``stale_holder`` names the dead holder. Cycles
    through a raw ``backend.lock`` (exclusive), a ``CheckpointManager``'s writer lock, and the ``gc`` lock
    held shared (as by a save in flight) against ``gc`` taking it exclusively."""
    ctx = forkserver()
    rng = random.Random(11)
    path = tmp_path / "store"
    store = cairn.Store(path, create=True)
    n = trials(ci=100, soak=1000)
    kinds = ("raw", "manager", "shared")
    lock_name = {"raw": "held", "manager": "writer", "shared": "gc"}
    problems: list[str] = []
    slowest = 0.0
    not_held = 0
    for trial in range(n):
        kind = kinds[trial % len(kinds)]
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child.lock_holder, args=(str(path), kind, writer), daemon=True)
        proc.start()
        writer.close()
        try:
            assert reader.poll(HANG), "the lock holder never said it holds the lock"
            _, pid = reader.recv()
            try:  # the lock is really held (or this test would pass vacuously)
                store.backend.lock(lock_name[kind], blocking=False).release()
                not_held += 1
            except cairn.StoreLockedError:
                pass
            time.sleep(rng.uniform(0, 0.005))
        finally:
            proc.kill()
            proc.join(HANG)
            reader.close()
        record.trials += 1
        record.faults += proc.exitcode == -9
        start = time.monotonic()
        lock = None
        while lock is None and time.monotonic() - start < 30:
            try:
                lock = store.backend.lock(lock_name[kind], blocking=False, owner="next acquirer")
            except cairn.StoreLockedError:
                time.sleep(0.01)
        took = time.monotonic() - start
        slowest = max(slowest, took)
        if lock is None:
            problems.append(f"trial {trial} ({kind}): the lock of the killed holder was never released")
            continue
        with lock:
            stale = lock.stale_holder
            if kind == "raw":
                ok = stale == f"holder pid {pid}"
            elif kind == "manager":
                ok = f"CheckpointManager pid {pid} " in (stale or "")
            else:  # shared holders leave no name behind
                ok = stale is None
            if not ok:
                problems.append(f"trial {trial} ({kind}): stale_holder is {lock.stale_holder!r}")
        if kind == "manager":  # and the manager itself takes over
            with cairn.CheckpointManager(path, preemption_signals=()):
                pass
        if ok:
            record.detected += 1
    record.notes.update(
        {
            "kinds": list(kinds),
            "slowest_acquire_after_kill_ms": round(slowest * 1000, 2),
            "lock_not_held_before_kill": not_held,
            "lease_locks": "none in cairn (local flock only): C11 (b) does not apply",
            "problems": problems[:5],
        }
    )
    assert not_held == 0
    assert not problems, problems[:5]
    assert record.faults == n


def _count(
    ctx: ForkServerContext, tmp_path: Path, workers: int, iterations: int, use_lock: bool, pause: float
) -> int:
    """Run ``workers`` processes incrementing one counter file; its final value."""
    path = tmp_path / ("store" if use_lock else "control")
    cairn.Store(path, create=True)
    counter = tmp_path / f"counter-{use_lock}"
    counter.write_text("0", encoding="ascii")
    barrier = ctx.Barrier(workers)
    run_all(
        ctx,
        child.counter_worker,
        [(str(path), str(counter), iterations, use_lock, pause, barrier) for _ in range(workers)],
    )
    return int(counter.read_text(encoding="ascii"))


def test_c11c_lock_contention_loses_no_update(tmp_path: Path, record: Record) -> None:
    """C11 (c): processes doing read-increment-write of a counter file under ``backend.lock("counter")``
    lose no update (never two holders). The negative control without the lock must lose some, or the
    harness could not see two holders."""
    ctx = forkserver()
    workers = 4
    iterations = trials(ci=500, soak=2500)
    final = _count(ctx, tmp_path, workers, iterations, use_lock=True, pause=0.0)
    control = _count(ctx, tmp_path, workers, 100, use_lock=False, pause=0.0005)
    record.trials = workers * iterations
    record.faults = workers * iterations  # contended acquisitions
    record.detected = final
    record.data_lost = workers * iterations - final
    record.notes.update(
        {"workers": workers, "final_counter": final, "control_without_lock": f"{control}/{workers * 100}"}
    )
    assert final == workers * iterations
    assert control < workers * 100, "the unlocked control lost no update: the harness cannot see a race"


def test_c11_gc_racing_save_never_deletes_referenced_blobs(tmp_path: Path, record: Record) -> None:
    """gc vs save: one process loops ``gc(grace=0)`` while another saves, about half of each save being dedup
    hits on orphan blobs (left as by a crashed save: durable, referenced by nothing), which the gc deletes
    whenever it gets to them first. Right after each commit every blob of the new manifest must be there;
    at the end ``verify()`` is clean and every checkpoint restores bit-identically."""
    ctx = forkserver()
    rounds = trials(ci=200, soak=2000)
    path = tmp_path / "store"
    cairn.Store(path, create=True)
    stop = ctx.Event()
    gc_reader, gc_writer = ctx.Pipe(duplex=False)
    gc_proc = ctx.Process(target=child.gc_loop, args=(str(path), stop, gc_writer), daemon=True)
    gc_proc.start()
    gc_writer.close()
    try:
        saved = run_all(ctx, child.dedup_saver, [(str(path), rounds)])
    finally:
        stop.set()
        gc_proc.join(HANG)
    assert gc_proc.exitcode == 0, f"the gc loop failed ({gc_proc.exitcode})"
    assert gc_reader.poll(HANG)
    _, gc_runs, gc_deleted = gc_reader.recv()
    gc_reader.close()
    violations = sum(m[2] for m in saved)
    store = cairn.Store(path)
    report = store.verify()
    kept = store.list()
    lost = sum(digest(store.load(i.name)) != digest(child.gc_state(i.step)) for i in kept)
    big = len(child.gc_state(0)["model"])
    hits = sum(m[3] for m in saved)  # blobs a save found instead of writing (orphans, or the empty blob)
    record.trials = rounds
    record.faults = gc_runs  # collections racing the saver
    record.detected = rounds - violations
    record.data_lost = lost + violations
    record.notes.update(
        {
            "gc_runs": gc_runs,
            "gc_blobs_deleted": gc_deleted,
            "dedup_hits": hits,
            "orphans_left": rounds * big,
            "missing_blobs_after_commit": violations,
        }
    )
    assert [m[1] for m in saved] == list(range(rounds))
    assert violations == 0
    assert report.ok, report.problems[:3]
    assert [i.step for i in kept] == list(range(rounds))
    assert lost == 0
    assert gc_runs > 0


def test_c11_gc_and_readers_tolerate_concurrent_retention(
    tmp_path: Path, record: Record, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint deleted by another handle (a manager's retention, ``cairn forget``) right after gc, a
    reader's ``list()`` or ``verify()`` listed the manifests must simply not be there: gc goes on without
    it, ``list()`` leaves it out. Deterministic: the deletion is injected right after ``names()``. (Found
    first by the multi-process gc-vs-retention loop: gc died with ``CheckpointNotFoundError``.)"""
    path = tmp_path / "store"
    store = cairn.Store(path, create=True)
    retention = cairn.Store(path)
    listed = store.names
    victims: list[str] = []

    def names_then_retention() -> list[str]:
        names = listed()
        if victims:
            retention.delete(victims.pop())
        return names

    monkeypatch.setattr(store, "names", names_then_retention)
    failures = []
    calls: list[tuple[str, Callable[[], object]]] = [
        ("gc", lambda: store.gc(grace=0)),
        ("list", store.list),
        ("latest", store.latest),
        ("verify", store.verify),
    ]
    for i, (what, call) in enumerate(calls):
        retention.save(child.small_state(i), step=2 * i)
        retention.save(child.small_state(i + 100), step=2 * i + 1)
        victims.append(f"step-{2 * i}")
        record.trials += 1
        record.faults += 1
        try:
            call()
            record.detected += 1
        except cairn.CheckpointNotFoundError as e:
            failures.append(f"{what}: {e}")
    record.notes["failures"] = failures
    assert not failures, failures


def test_c11_gc_after_overwrite_by_another_handle_keeps_referenced_blobs(
    tmp_path: Path, record: Record
) -> None:
    """A long-lived handle (a gc in another process, a reader) read checkpoint ``top``; another writer then
    replaced ``top`` atomically (``overwrite=True``, the Keras-style "best" file). The first handle must see
    the new manifest, and its ``gc(grace=0)`` must not delete a blob the committed ``top`` references."""
    path = tmp_path / "store"
    writer = cairn.Store(path, create=True)
    collector = cairn.Store(path)
    n = trials(ci=10, soak=100)
    stale = lost = 0
    for i in range(n):
        writer.save({"w": torch.full((1000,), 2.0 * i)}, name="top", step=i, overwrite=True)
        collector.info("top")  # the collector's handle reads it (and caches it)
        writer.save({"w": torch.full((1000,), 2.0 * i + 1)}, name="top", step=i, overwrite=True)
        stale += collector.info("top").time != cairn.Store(path).info("top").time
        collector.gc(grace=0)
        record.trials += 1
        if not cairn.Store(path).verify().ok:
            lost += 1
            writer.delete("top")
            cairn.Store(path).gc(grace=0)
        else:
            record.detected += 1
    record.data_lost = lost
    record.notes.update({"stale_manifest_reads": stale, "overwritten_checkpoints_damaged_by_gc": lost})
    assert stale == 0
    assert lost == 0
