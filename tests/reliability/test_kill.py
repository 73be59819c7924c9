"""C1 and C3 of the reliability plan: SIGKILL of a process that is saving, at a random moment.

Every trial is a real ``SIGKILL`` of a real process. To keep trials cheap the children are forked from a
``multiprocessing`` forkserver with torch and cairn already imported (a fork costs milliseconds, an
interpreter start with torch a second). The child tells the parent over a pipe which steps it started
and which ``save()`` calls returned ("acked"); the kill lands at a uniformly random time in
``[0, 1.2 * T_save]`` after the child started a save (``T_save`` measured at the start of the test).
After the kill the parent opens a fresh :class:`cairn.Store` handle and checks the pass criteria of
``/work/shared/reference/reliability.md`` (b), rows C1 and C3.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Any

import pytest
import torch

import cairn
from cairn._gc import GCReport
from cairn._read import blob_path
from reliability.harness import Record, forkserver, on_disk_blobs, referenced_blobs, trials
from reliability.states import digest
from reliability.workers import kill_child
from reliability.workers.kill_child import state_for

HANG = 60.0
"""Seconds before a child that says nothing is declared hung (a hang guard, not a timing assertion)."""
KEEP = 2
"""``KeepLast(KEEP)`` of the async manager in C3."""
PADS = 4
"""Tiny extra checkpoints the child's retention has to delete in each C3 trial."""

_DIGESTS: dict[int, Any] = {}


def expected(step: int) -> Any:
    """The digest of ``state_for(step)`` (cached: the same steps are checked more than once)."""
    if step not in _DIGESTS:
        _DIGESTS[step] = digest(state_for(step))
    return _DIGESTS[step]


@dataclass
class Run:
    """What one child said before it died."""

    messages: list[tuple[str, int, float]] = field(default_factory=list)
    exitcode: int | None = None
    pid: int | None = None
    killed_at: float = 0.0
    late: bool = False

    def steps(self, kind: str) -> list[int]:
        """The steps of the messages of ``kind``."""
        return [s for k, s, _ in self.messages if k == kind]

    @property
    def last_kind(self) -> str:
        """The kind of the last message the child sent before the kill."""
        return self.messages[-1][0] if self.messages else "none"


def _drain(conn: Any, run: Run, until: Callable[[tuple[str, int, float]], bool] | None) -> None:
    """Read messages into ``run`` until one satisfies ``until`` (or, with None, until EOF)."""
    while True:
        if not conn.poll(HANG):
            raise AssertionError(f"the child said nothing for {HANG} s: hung (messages {run.messages[-3:]})")
        try:
            msg = conn.recv()
        except EOFError:
            return
        run.messages.append(msg)
        if until is not None and until(msg):
            return


def run_child(
    ctx: ForkServerContext,
    target: Callable[..., None],
    args: tuple[Any, ...],
    kill_window: float | None,
    rng: random.Random,
) -> Run:
    """Start ``target(*args, conn)`` in a forked child; with ``kill_window``, SIGKILL it at a uniformly random
    time in ``[0, kill_window]`` after it announced its second save (the first one warms the process up, as
    in a long training run, and gives the trial a step acked by the child), else let it finish."""
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, writer), daemon=True)
    proc.start()
    writer.close()  # the child holds the only write end: EOF once it is dead
    run = Run(pid=proc.pid)
    try:
        if kill_window is not None:
            _drain(reader, run, lambda m: m[0] == "start")
            _drain(reader, run, lambda m: m[0] == "start")
            kill_at = run.messages[-1][2] + rng.uniform(0.0, kill_window)
            delay = kill_at - time.monotonic()
            run.late = delay <= 0
            if delay > 0:
                time.sleep(delay)
            proc.kill()
            run.killed_at = time.monotonic()
        _drain(reader, run, None)
    finally:
        proc.join(HANG)
        if proc.exitcode is None:  # pragma: no cover - hang guard
            proc.kill()
            proc.join(HANG)
        reader.close()
    run.exitcode = proc.exitcode
    return run


def calibrate(
    ctx: ForkServerContext, tmp: Path, target: Callable[..., None], extra: tuple[Any, ...]
) -> float:
    """``T_save`` in a scratch store: the median seconds from a save's start to its ack (for async saves:
    to the durable commit, acked by the next ``save()`` or ``wait()``)."""
    path = tmp / "calibration"
    cairn.Store(path, create=True)
    run = run_child(ctx, target, (str(path), 0, 6, *extra), None, random.Random(0))
    assert run.exitcode == 0, f"calibration child failed ({run.exitcode}): {run.messages[-3:]}"
    starts = {s: t for k, s, t in run.messages if k == "start"}
    acks = {s: t for k, s, t in run.messages if k == "ack"}
    return statistics.median(acks[s] - starts[s] for s in starts if s in acks)


def listed(store: cairn.Store) -> tuple[list[cairn.CheckpointInfo], list[str]]:
    """``store.list()``, and the names of the damaged checkpoints it skipped (there must be none)."""
    damaged: list[str] = []
    infos = store.list(on_damaged=lambda name, e: damaged.append(name))
    return infos, damaged


def check_clean_after_gc(store: cairn.Store, problems: list[str]) -> None:
    """After ``gc(grace=0)``: no temporary file, no unreferenced blob, no referenced blob gone (their bytes
    were verified just before the gc, which only deletes)."""
    tmp = list(store.backend.list("tmp"))
    if tmp:
        problems.append(f"gc(grace=0) left {len(tmp)} temporary files")
    live, disk = referenced_blobs(store), on_disk_blobs(store)
    if disk - live:
        problems.append(f"gc(grace=0) left {len(disk - live)} unreferenced blobs")
    if live - disk:
        problems.append(f"gc deleted {len(live - disk)} referenced blobs, e.g. {blob_path(min(live - disk))}")


def killed(
    run: Run, record: Record, notes: dict[str, Any], when: tuple[str, str]
) -> tuple[list[str], list[int], list[int]]:
    """Count one killed child: its problems so far, the steps it started and those it acked. ``when``
    names the note for a kill during a save and the one for a kill after it."""
    record.trials += 1
    record.faults += 1
    problems = [] if run.exitcode == -9 else [f"the child ended with {run.exitcode}, not by SIGKILL"]
    started, acked = run.steps("start"), run.steps("ack")
    notes["kills_late"] += run.late
    notes["trials_child_acked"] += bool(acked)
    notes[when[0] if run.last_kind == "start" else when[1]] += 1
    return problems, started, acked


def collect(store: cairn.Store, tmp_left: int, problems: list[str]) -> GCReport | None:
    """``gc(grace=0)`` after a trial; it must remove every temporary file the crash left."""
    try:
        gc = store.gc(grace=0)
    except cairn.CairnError as e:
        problems.append(f"gc() failed: {e!r}")
        return None
    if gc.temp_deleted < tmp_left:
        problems.append(f"gc removed {gc.temp_deleted} of {tmp_left} temporary files")
    return gc


class Restores:
    """Whether a checkpoint loads bit-identically to ``state_for(step)``; each step loaded once per trial."""

    def __init__(self, store: cairn.Store) -> None:
        self.store = store
        self.seen: dict[int, bool] = {}

    def __call__(self, step: int) -> bool:
        """True when checkpoint ``step-<step>`` restores bit-identically."""
        if step not in self.seen:
            try:
                self.seen[step] = digest(self.store.load(f"step-{step}")) == expected(step)
            except cairn.CairnError:
                self.seen[step] = False
        return self.seen[step]


# -- C1 -------------------------------------------------------------------------------------------------


def test_c1_sigkill_during_sync_save(tmp_path: Path, record: Record) -> None:
    """C1: SIGKILL a child looping ``Store.save`` at a random time; the store stays consistent and clean."""
    ctx = forkserver()
    rng = random.Random(20261122)
    t_save = calibrate(ctx, tmp_path, kill_child.sync_saver, ())
    path = tmp_path / "store"
    parent = cairn.Store(path, create=True)
    parent.save(state_for(0), step=0)
    present = {0}  # what the parent knows is committed and kept
    n = trials(ci=200, soak=2000)
    failures: list[str] = []
    notes = {
        "t_save_ms": round(t_save * 1000, 2),
        "kills_mid_save": 0,
        "kills_between_saves": 0,
        "kills_late": 0,
        "trials_child_acked": 0,
        "inflight_committed": 0,
        "inflight_not_committed": 0,
        "tmp_leftovers_removed": 0,
        "orphan_blobs_removed": 0,
    }
    for trial in range(n):
        latest_before = max(present)
        run = run_child(ctx, kill_child.sync_saver, (str(path), latest_before + 1, None), 1.2 * t_save, rng)
        problems, started, acked = killed(run, record, notes, ("kills_mid_save", "kills_between_saves"))
        acked_max = max([latest_before, *acked])
        inflight = max(started)

        store = cairn.Store(path)  # a fresh handle: nothing cached from before the crash
        restores = Restores(store)
        infos, damaged = listed(store)
        steps = sorted(i.step for i in infos)
        if damaged:
            problems.append(f"damaged checkpoints listed: {damaged}")
        if not present <= set(steps):
            problems.append(f"committed checkpoints vanished: {sorted(present - set(steps))}")
        if set(steps) - present - set(started):
            problems.append(f"checkpoints nobody saved: {sorted(set(steps) - present - set(started))}")
        latest = store.latest()
        latest_step = -1 if latest is None else latest.step
        if not acked_max <= latest_step <= inflight:
            problems.append(
                f"latest() is {latest_step}, not in [last acked {acked_max}, in flight {inflight}]"
            )
        lost = [s for s in {acked_max, *acked} if s not in steps or not restores(s)]
        record.data_lost += len(lost)
        if lost:
            problems.append(f"acked steps not restored bit-identically: {lost}")
        if latest_step not in lost and latest_step >= 0 and not restores(latest_step):
            problems.append(f"latest() step {latest_step} does not restore bit-identically")
        if latest_step == inflight and inflight not in acked:
            notes["inflight_committed"] += 1
        elif latest_step < inflight:
            notes["inflight_not_committed"] += 1
        report = store.verify()
        if not report.ok:
            problems.append(f"verify(): {report.problems[:3]}")
        tmp_left = len(list(store.backend.list("tmp")))
        orphans = len(on_disk_blobs(store) - referenced_blobs(store))

        # the next save (of the step that was in flight, when it did not commit: it reuses crash leftovers)
        nxt = max(steps, default=-1) + 1
        try:
            store.save(state_for(nxt), step=nxt)
        except cairn.CairnError as e:
            problems.append(f"the next save() failed: {e!r}")
        else:
            if not restores(nxt):
                problems.append(f"the next save (step {nxt}) does not restore bit-identically")
        present = set(steps) | {nxt}
        for old in sorted(present)[:-3]:  # keep the store small: retention by hand, then gc
            store.delete(f"step-{old}")
        present = set(sorted(present)[-3:])
        gc = collect(store, tmp_left, problems)
        if gc is not None:
            notes["tmp_leftovers_removed"] += gc.temp_deleted
            notes["orphan_blobs_removed"] += orphans
        check_clean_after_gc(store, problems)
        if problems:
            failures.append(
                f"trial {trial} (kill after {run.last_kind}, messages {run.messages}): {problems}"
            )
        else:
            record.detected += 1
    record.notes.update(notes)
    record.notes["failures"] = failures[:5]
    assert record.data_lost == 0, failures[:5]
    assert not failures, f"{len(failures)}/{n} trials failed; first: {failures[:3]}"


# -- C3 -------------------------------------------------------------------------------------------------


def parent_save(path: Path, step: int, problems: list[str], child_pid: int | None) -> None:
    """The next save after a crash, by a new ``CheckpointManager`` (sync) taking the dead child's lock."""
    probe = cairn.Store(path).backend.lock("writer", blocking=False)
    try:
        if child_pid is not None and f"pid {child_pid} " not in (probe.stale_holder or ""):
            problems.append(f"the dead writer's lock does not name it: {probe.stale_holder!r}")
    finally:
        probe.release()
    with cairn.CheckpointManager(path, keep=cairn.KeepLast(KEEP), preemption_signals=()) as mgr:
        if not mgr.save(step, state_for(step), force=True):
            problems.append(f"the manager did not save step {step}")


def test_c3_sigkill_during_async_save(tmp_path: Path, record: Record) -> None:
    """C3: SIGKILL a child saving every step with ``CheckpointManager(async_save=True, keep=KeepLast(2))``.

    Before each trial the parent adds ``PADS`` tiny low-step checkpoints, so the child's first retention
    pass has several manifests to delete (each one an unlink and a directory fsync): kills land in the
    middle of retention too, not only in staging, blob writes and the commit.
    """
    ctx = forkserver()
    rng = random.Random(3)
    t_save = calibrate(ctx, tmp_path, kill_child.async_saver, (KEEP,))
    path = tmp_path / "store"
    cairn.Store(path, create=True)
    parent_save(path, 0, [], None)
    parent_save(path, 1, [], None)
    n = trials(ci=100, soak=2000)
    failures: list[str] = []
    notes = {
        "t_save_ms": round(t_save * 1000, 2),
        "kills_while_staging": 0,
        "kills_after_submitted": 0,
        "kills_late": 0,
        "trials_child_acked": 0,
        "child_committed_nothing": 0,
        "inflight_committed": 0,
        "killed_during_retention": 0,
        "stale_lock_taken_over": 0,
        "newest_complete_deleted": 0,
        "retention_before_commit": 0,
    }
    latest_before = 1
    for trial in range(n):
        pad_store = cairn.Store(path)
        for i in range(PADS):
            pad_store.save({"pad": torch.tensor(i)}, name=f"pad-{trial}-{i}", step=0)
        names_before = set(pad_store.names())
        run = run_child(
            ctx, kill_child.async_saver, (str(path), latest_before + 1, None, KEEP), 1.2 * t_save, rng
        )
        problems, started, acked = killed(
            run, record, notes, ("kills_while_staging", "kills_after_submitted")
        )
        acked_max = max([latest_before, *acked])
        inflight = max(started)

        store = cairn.Store(path)
        restores = Restores(store)
        infos, damaged = listed(store)
        if damaged:
            problems.append(f"damaged checkpoints listed: {damaged}")
        names = {i.name for i in infos}
        steps = sorted(i.step for i in infos if i.name.startswith("step-"))
        latest_step = max(steps, default=-1)
        if not acked_max <= latest_step <= inflight:
            problems.append(f"latest() is {latest_step}, not in [acked {acked_max}, in flight {inflight}]")
        if names - names_before - {f"step-{s}" for s in started}:
            problems.append(f"checkpoints nobody saved: {sorted(names - names_before)}")
        if latest_step == latest_before:
            notes["child_committed_nothing"] += 1
            if names != names_before:  # retention must wait for a durable commit
                notes["retention_before_commit"] += 1
                problems.append(f"deleted with no new commit: {sorted(names_before - names)}")
        elif len(names) > KEEP:
            notes["killed_during_retention"] += 1
        # the newest complete checkpoint, and the one before it, are never deleted (KeepLast(2))
        if latest_step - 1 not in steps:
            notes["newest_complete_deleted"] += 1
            problems.append(f"the checkpoint before the newest was deleted: {steps}")
        if steps != list(range(latest_step - len(steps) + 1, latest_step + 1)):
            problems.append(f"retention left a gap: {steps}")
        if latest_step == inflight and inflight not in acked:
            notes["inflight_committed"] += 1
        lost = [s for s in {acked_max, *acked} if s >= latest_step - 1 and not restores(s)]
        record.data_lost += len(lost)
        if lost:
            problems.append(f"acked steps not restored bit-identically: {lost}")
        for s in steps:
            if s not in lost and not restores(s):
                problems.append(f"step {s} does not restore bit-identically")
        report = store.verify()
        if not report.ok:
            problems.append(f"verify(): {report.problems[:3]}")
        tmp_left = len(list(store.backend.list("tmp")))

        nxt = latest_step + 1
        stale_before = len(problems)
        try:
            parent_save(path, nxt, problems, run.pid)  # retention (KeepLast(2)) also removes the pads
        except cairn.CairnError as e:
            problems.append(f"the next save() failed: {e!r}")
        else:
            notes["stale_lock_taken_over"] += len(problems) == stale_before
            if not restores(nxt):
                problems.append(f"the next save (step {nxt}) does not restore bit-identically")
        latest_before = nxt
        collect(store, tmp_left, problems)
        check_clean_after_gc(store, problems)
        if problems:
            failures.append(f"trial {trial} (after {run.last_kind!r}; {run.messages}): {problems}")
        else:
            record.detected += 1
    record.notes.update(notes)
    record.notes["failures"] = failures[:5]
    assert record.data_lost == 0, failures[:5]
    assert not failures, f"{len(failures)}/{n} trials failed; first: {failures[:3]}"


def test_c3_retention_runs_only_after_durable_commit(
    tmp_path: Path, record: Record, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C3 (1): commit-order instrumentation of an async manager: every manifest that retention deletes is
    deleted only after the newer checkpoint's manifest was created *and* flushed (made durable)."""
    mgr = cairn.CheckpointManager(
        tmp_path / "store",
        keep=cairn.KeepLast(1),
        async_save=True,
        preemption_signals=(),
    )
    backend = mgr.store.backend
    events: list[tuple[str, str]] = []
    create, flush, delete = backend.create, backend.flush, backend.delete

    def logged_create(path: str, data: Any, *, replace: bool = False) -> bool:
        created = create(path, data, replace=replace)
        if path.startswith("checkpoints/"):
            events.append(("create", path))
        return created

    def logged_flush() -> None:
        flush()
        events.append(("flush", ""))

    def logged_delete(path: str) -> None:
        if path.startswith("checkpoints/"):
            events.append(("delete", path))
        delete(path)

    monkeypatch.setattr(backend, "create", logged_create)
    monkeypatch.setattr(backend, "flush", logged_flush)
    monkeypatch.setattr(backend, "delete", logged_delete)
    n = trials(ci=30, soak=300)
    with mgr:
        for step in range(n):
            assert mgr.save(step, state_for(step), force=True)
    violations = []
    durable: set[str] = set()
    pending: set[str] = set()
    for kind, path in events:
        if kind == "create":
            pending.add(path)
        elif kind == "flush":
            durable |= pending
            pending.clear()
        else:
            step = int(path.removeprefix("checkpoints/step-").removesuffix(".json"))
            if f"checkpoints/step-{step + 1}.json" not in durable:
                violations.append(path)
    deletes = sum(kind == "delete" for kind, _ in events)
    record.trials = n
    record.detected = deletes - len(violations)
    record.notes.update({"retention_deletes": deletes, "deletes_before_durable_commit": len(violations)})
    assert deletes == n - 1
    assert not violations
    assert [i.step for i in cairn.Store(tmp_path / "store").list()] == [n - 1]
