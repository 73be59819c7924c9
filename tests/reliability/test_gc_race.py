"""C12: garbage collection racing a save, under a deterministic scheduler; and gc killed with SIGKILL.

A saver thread (``Store.save`` of a state that reuses half the blobs of a deleted checkpoint) and a gc
thread (``Store.gc``) run on two store handles of one directory. Their backends are instrumented with
named yield points; a :class:`Scheduler` lets exactly one of them run at a time, from one point to the
next. Lock waits cannot block the scheduler: a blocking ``lock`` becomes a loop of non-blocking tries
with a ``lock_wait`` point between them, so the other thread is scheduled and releases the lock.

Schedules: every pair (saver point, gc point) in both orders (first thread runs to its point, the second
to its point, then both finish), plus random interleavings. After each run every committed manifest must
have all its blobs and load bit-identically. The negative control bypasses the saver's shared lock with
grace 0: the harness must then see the race (Gitaly MR 4416).

Kill -9: a forked child runs gc and SIGKILLs itself at its k-th backend call; rerunning gc must converge
(a third run deletes nothing), no referenced blob may be gone, and the garbage must be gone.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import cairn
import cairn._store
from cairn.errors import StoreLockedError
from reliability.crashfs import ram_dir
from reliability.harness import Record, trials
from reliability.states import digest, make_state

SAVER_POINTS = (
    "before_lock",
    "after_blob_exists_check",
    "after_blob_written",
    "before_manifest_commit",
    "after_manifest_commit",
)
GC_POINTS = ("gc_locked", "after_mark", "before_delete", "after_delete", "before_gc_flush")
ROLES = ("saver", "gc")
CHUNK = 4096
HOUR = 3600.0


class SchedulerStuck(RuntimeError):
    """A thread neither reached a yield point nor finished in time: the harness itself is broken."""


class Scheduler:
    """Runs one role at a time, each from one named yield point to the next."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.cond = threading.Condition()
        self.turn: str | None = None
        self.at: dict[str, str] = {}
        self.passed: dict[str, collections.Counter[str]] = {r: collections.Counter() for r in ROLES}
        self.trace: list[tuple[str, str]] = []
        self.errors: dict[str, BaseException] = {}
        self.timeout = timeout
        self.steps = 0
        self.reached = False  # a pair schedule got both roles to their points with the first still running

    @staticmethod
    def role() -> str | None:
        """The role of the calling thread: the saver (and its blob-writing pool thread) or the gc."""
        name = threading.current_thread().name
        if name == "saver" or name.startswith("cairn-save"):
            return "saver"
        return "gc" if name == "gc" else None

    def point(self, name: str) -> None:
        """A yield point: pause here until the scheduler lets this role run again."""
        role = self.role()
        if role is None:
            return
        with self.cond:
            if self.turn not in (role, None):
                raise SchedulerStuck(f"{role} ran at {name} during {self.turn}'s turn")
            self.at[role] = name
            self.passed[role][name] += 1
            self.trace.append((role, name))
            self.turn = None
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: self.turn == role, self.timeout):
                raise SchedulerStuck(f"{role} was never resumed after {name}")

    def _body(self, role: str, fn: Callable[[], object]) -> None:
        try:
            self.point("start")
            fn()
        except BaseException as e:
            self.errors[role] = e
        finally:
            with self.cond:
                self.at[role] = "done"
                self.turn = None
                self.cond.notify_all()

    def step(self, role: str) -> None:
        """Let ``role`` run until its next yield point (or its end)."""
        self.steps += 1
        if self.steps > 20000:
            raise SchedulerStuck("no progress after 20000 steps")
        with self.cond:
            self.turn = role
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: self.turn is None, self.timeout):
                raise SchedulerStuck(f"{role} neither reached a point nor finished: {self.trace[-5:]}")

    def done(self, role: str) -> bool:
        """Whether ``role`` has finished."""
        return self.at.get(role) == "done"

    def run(self, fns: dict[str, Callable[[], object]], drive: Callable[[Scheduler], None]) -> None:
        """Start a thread per role, let ``drive`` schedule them, then finish them in turns."""
        threads = [
            threading.Thread(target=self._body, args=(r, f), name=r, daemon=True) for r, f in fns.items()
        ]
        for t in threads:
            t.start()
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.at) == len(fns) and self.turn is None, self.timeout):
                raise SchedulerStuck("the threads did not start")
        drive(self)
        while not all(self.done(r) for r in fns):
            for r in fns:
                if not self.done(r):
                    self.step(r)
        for t in threads:
            t.join(self.timeout)


def pair_schedule(first: str, p1: str, second: str, p2: str) -> Callable[[Scheduler], None]:
    """Run ``first`` to its point ``p1``, ``second`` to ``p2``, then ``first`` to its end, then ``second``
    (a phase also ends when its role waits for a lock; whatever is left then runs in turns)."""

    def drive(s: Scheduler) -> None:
        for role, target in ((first, p1), (second, p2), (first, None), (second, None)):
            while not s.done(role) and not (target and s.passed[role][target]):
                s.step(role)
                if s.at.get(role) == "lock_wait":
                    break  # it waits for the other one: go on with the next phase
            if target == p2:
                s.reached = bool(s.passed[first][p1] and s.passed[second][p2] and not s.done(first))

    return drive


def random_schedule(rng: random.Random) -> Callable[[Scheduler], None]:
    """At every point, a random role runs next."""

    def drive(s: Scheduler) -> None:
        while not all(s.done(r) for r in ROLES):
            s.step(rng.choice([r for r in ROLES if not s.done(r)]))

    return drive


class _NoLock:
    """What a saver that takes no lock holds (another host of a shared file system)."""

    stale_holder = None

    def release(self) -> None:
        pass

    def __enter__(self) -> _NoLock:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _lock_wrapper(backend: Any, s: Scheduler, locked_point: str, bypass_shared: bool) -> Callable[..., Any]:
    lock = backend.lock

    def locking(name: str, *, shared: bool = False, blocking: bool = True, owner: str = "") -> Any:
        s.point("before_lock")
        if bypass_shared and shared:
            s.point(locked_point)
            return _NoLock()
        while True:
            try:
                held = lock(name, shared=shared, blocking=False, owner=owner)
            except StoreLockedError:
                if not blocking:
                    raise
                s.point("lock_wait")
                continue
            s.point(locked_point)
            return held

    return locking


def instrument_saver(store: cairn.Store, s: Scheduler, *, bypass_lock: bool) -> None:
    """Yield points in the saver's backend (instance attributes: the other handle is untouched)."""
    b: Any = store.backend
    size, create = b.size, b.create

    def sizing(path: str) -> int | None:
        out: int | None = size(path)
        if path.startswith("blobs/"):
            s.point("after_blob_exists_check")
        return out

    def creating(path: str, data: Any, *, replace: bool = False) -> bool:
        manifest = path.startswith("checkpoints/")
        if manifest:
            s.point("before_manifest_commit")
        out: bool = create(path, data, replace=replace)
        s.point("after_manifest_commit" if manifest else "after_blob_written")
        return out

    b.size, b.create = sizing, creating
    b.lock = _lock_wrapper(b, s, "save_locked", bypass_lock)


def instrument_gc(store: cairn.Store, s: Scheduler) -> None:
    """Yield points in the gc's backend."""
    b: Any = store.backend
    listing, delete, flush = b.list, b.delete, b.flush

    def list_(prefix: str) -> Any:
        if prefix == "blobs":
            s.point("after_mark")  # every manifest read: the live set is known
        return listing(prefix)

    def deleting(path: str) -> None:
        s.point("before_delete")
        delete(path)
        s.point("after_delete")

    def flushing() -> None:
        s.point("before_gc_flush")
        flush()

    b.list, b.delete, b.flush = list_, deleting, flushing
    b.lock = _lock_wrapper(b, s, "gc_locked", False)


def _variant(state: dict[str, Any], seed: int, keys: list[str]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    model = {k: (torch.randn(v.shape, generator=g) if k in keys else v) for k, v in state["model"].items()}
    return {**state, "model": model}


def _age(root: Path, seconds: float) -> None:
    """Make every blob and temporary file look ``seconds`` old to the gc's grace period."""
    then = time.time() - seconds
    for sub in ("blobs", "tmp"):
        for dirpath, _, files in os.walk(root / sub):
            for f in files:
                os.utime(os.path.join(dirpath, f), (then, then))


@dataclass
class Template:
    """A store holding a kept checkpoint and the garbage of a deleted one, plus the state to save next."""

    path: Path
    expected: dict[str, Any]
    incoming: dict[str, Any]


def make_template(where: Path) -> Template:
    """``step-1`` deleted (its blobs old garbage), ``step-2`` kept; ``incoming`` reuses half of step-1."""
    a = make_state(11, mib=0.03, tensors=4)
    keys = sorted(a["model"])
    kept = _variant(a, 12, keys)
    store = cairn.Store(where, create=True, chunk_size=CHUNK)
    store.save(a, step=1)
    store.save(kept, step=2)
    store.delete("step-1")
    (where / "tmp" / "0123abcd.tmp").write_bytes(b"left by a crashed writer")
    _age(where, 2 * HOUR)
    # the first tensor (and first blob) reused from the garbage, the second half new
    incoming = _variant(a, 13, keys[len(keys) // 2 :])
    return Template(where, {"step-2": digest(kept)}, incoming)


@dataclass
class Outcome:
    """Totals over many schedules."""

    runs: int = 0
    violations: int = 0
    reached: int = 0
    deleted: int = 0
    examples: list[str] = field(default_factory=list)

    def tally(self, run: Run, where: str) -> None:
        """Count one schedule."""
        self.runs += 1
        self.reached += run.reached
        self.deleted += run.deleted
        if run.bad:
            self.violations += 1
            if len(self.examples) < 5:
                self.examples.append(f"{where}: {run.bad[:2]}")


@dataclass
class Run:
    """One schedule's result: violations, whether a pair schedule reached both points, blobs gc deleted."""

    bad: list[str]
    reached: bool
    deleted: int


def race(
    tpl: Template, work: Path, drive: Callable[[Scheduler], None], *, bypass_lock: bool, grace: float
) -> Run:
    """One saver-vs-gc run on a copy of ``tpl`` under ``drive``."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(tpl.path, work)
    saver, collector = cairn.Store(work), cairn.Store(work)
    s = Scheduler()
    instrument_saver(saver, s, bypass_lock=bypass_lock)
    instrument_gc(collector, s)
    report: list[Any] = []
    s.run(
        {
            "saver": lambda: saver.save(tpl.incoming, step=3),
            "gc": lambda: report.append(collector.gc(grace=grace)),
        },
        drive,
    )
    bad = [f"{role} raised {type(e).__name__}: {e}" for role, e in s.errors.items()]
    expected = {**tpl.expected, "step-3": digest(tpl.incoming)}
    check = cairn.Store(work)
    for name in check.names():
        m = check.manifest(name)
        missing = [b for b in m.blobs() if check.backend.size(f"blobs/{b[:2]}/{b}") is None]
        if missing:
            bad.append(f"{name} committed with {len(missing)} missing blobs")
            continue
        if repr(digest(check.load(name))) != repr(expected.get(name)):
            bad.append(f"{name} does not load as saved")
    if "step-2" not in check.names():
        bad.append("step-2 lost")
    deleted = report[0].deleted if report else []
    bad += [f"gc deleted {p}" for p in deleted if not p.startswith(("blobs/", "tmp/"))]
    return Run(bad, s.reached, sum(p.startswith("blobs/") for p in deleted))


def campaign(
    tpl: Template, work: Path, rng: random.Random, n_random: int, **kw: Any
) -> tuple[Outcome, Outcome]:
    """All point pairs in both orders, then ``n_random`` random interleavings."""
    pairs, randoms = Outcome(), Outcome()
    for sp in SAVER_POINTS:
        for gp in GC_POINTS:
            for order in (("saver", sp, "gc", gp), ("gc", gp, "saver", sp)):
                pairs.tally(race(tpl, work, pair_schedule(*order), **kw), f"{order}")
    for i in range(n_random):
        randoms.tally(race(tpl, work, random_schedule(random.Random(rng.random())), **kw), f"random #{i}")
    return pairs, randoms


def seed_for(test: str) -> int:
    """The run's seed (``CAIRN_SEED`` or a fresh one, printed)."""
    base = os.environ.get("CAIRN_SEED")
    seed = int(base) if base else random.SystemRandom().randrange(2**32)
    print(f"CAIRN_SEED={seed} ({test})")
    return seed


pytestmark = pytest.mark.usefixtures("one_thread_pools")  # repeatable file-system call order


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A RAM directory (fsync is free there; this test is about ordering, not durability)."""
    with ram_dir(tmp_path) as d:
        yield Path(d)


def test_gc_race_with_lock(scratch: Path, record: Record) -> None:
    """C12: under the shipped protocol (shared lock for saves, even with grace 0) gc never breaks a save."""
    seed = seed_for("C12")
    tpl = make_template(scratch / "template")
    pairs, randoms = campaign(
        tpl, scratch / "work", random.Random(seed), trials(ci=200, soak=10000), bypass_lock=False, grace=0.0
    )
    record.trials = pairs.runs + randoms.runs
    record.faults = record.trials  # each schedule is one forced interleaving
    record.detected = record.trials - pairs.violations - randoms.violations
    record.data_lost = pairs.violations + randoms.violations
    record.notes.update(
        seed=seed,
        pair_schedules=pairs.runs,
        pairs_reaching_both_points=pairs.reached,
        random_schedules=randoms.runs,
        blobs_gc_deleted=pairs.deleted + randoms.deleted,
    )
    assert pairs.runs == 2 * len(SAVER_POINTS) * len(GC_POINTS)
    assert record.data_lost == 0, f"seed {seed}: {pairs.examples + randoms.examples}"


def test_gc_race_negative_control(scratch: Path, record: Record, monkeypatch: pytest.MonkeyPatch) -> None:
    """C12 negative control: with the saver's lock bypassed, grace 0 and the saver's last check of the
    blobs it reused switched off, the harness must see the race."""
    monkeypatch.setattr(cairn.Store, "_rewrite_gone", lambda self, reused: None)
    seed = seed_for("C12 negative control")
    tpl = make_template(scratch / "template")
    pairs, randoms = campaign(
        tpl, scratch / "work", random.Random(seed), trials(ci=50, soak=1000), bypass_lock=True, grace=0.0
    )
    record.trials = pairs.runs + randoms.runs
    record.faults = record.trials
    record.detected = pairs.violations + randoms.violations
    record.notes.update(
        seed=seed,
        pair_violations=pairs.violations,
        pairs_reaching_both_points=pairs.reached,
        random_violations=randoms.violations,
    )
    record.notes["examples"] = (pairs.examples + randoms.examples)[:3]
    assert pairs.violations >= 1, "the pair schedules cannot see a gc deleting a blob a save reuses"
    assert randoms.violations >= 1, f"seed {seed}: no random interleaving hit the race"


def test_gc_race_grace_alone_protects_lockless_saver(scratch: Path, record: Record) -> None:
    """Section 7.4: a saver the lock cannot see is protected by the grace period (blob mtime refresh)."""
    tpl = make_template(scratch / "template")
    order = ("gc", "before_delete", "saver", "after_blob_written")
    bad = race(tpl, scratch / "work", pair_schedule(*order), bypass_lock=True, grace=HOUR).bad
    record.trials = 1
    record.faults = 1
    record.detected = 0 if bad else 1
    record.data_lost = 1 if bad else 0
    record.notes["violations"] = bad[:2]
    assert not bad, bad


# -- kill -9 of gc ----------------------------------------------------------------------------------------


def _garbage_template(where: Path) -> tuple[Path, dict[str, Any], set[str]]:
    """A store with two kept checkpoints, the old blobs of two deleted ones and old temp files."""
    store = cairn.Store(where, create=True, chunk_size=CHUNK)
    states = {f"step-{i}": make_state(20 + i, mib=0.02, tensors=3) for i in range(1, 5)}
    for name, st in states.items():
        store.save(st, step=int(name.split("-")[1]))
    for name in ("step-1", "step-3"):
        store.delete(name)
    for i in range(3):
        (where / "tmp" / f"dead{i}.tmp").write_bytes(b"x" * 100)
    _age(where, 2 * HOUR)
    kept = {n: digest(states[n]) for n in ("step-2", "step-4")}
    live = set().union(*(store.manifest(n).blobs() for n in kept))
    return where, kept, live


def _gc_killed_at(path: Path, k: int) -> int:
    """Fork a child that runs gc and SIGKILLs itself at its ``k``-th backend call; its wait status."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # fork with threads (3.12+): the child runs no torch
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            store = cairn.Store(path)
            b: Any = store.backend
            calls = [0]

            def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
                def call(*args: Any, **kwargs: Any) -> Any:
                    calls[0] += 1
                    if calls[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*args, **kwargs)

                return call

            for name in ("lock", "list", "size", "read", "modified", "delete", "flush"):
                setattr(b, name, counted(getattr(b, name)))
            store.gc(grace=60)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def _count_gc_calls(path: Path) -> int:
    """How many backend calls one full gc of a copy of the store makes."""
    store = cairn.Store(path)
    b: Any = store.backend
    calls = [0]
    for name in ("lock", "list", "size", "read", "modified", "delete", "flush"):
        fn = getattr(b, name)

        def call(*args: Any, _fn: Callable[..., Any] = fn, **kwargs: Any) -> Any:
            calls[0] += 1
            return _fn(*args, **kwargs)

        setattr(b, name, call)
    store.gc(grace=60)
    return calls[0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_gc_killed_converges(scratch: Path, record: Record) -> None:
    """C12: gc SIGKILLed at any backend call; rerunning gc converges and no referenced blob is deleted."""
    seed = seed_for("C12 kill")
    rng = random.Random(seed)
    template, kept, live = _garbage_template(scratch / "template")
    probe = scratch / "probe"
    shutil.copytree(template, probe)
    total = _count_gc_calls(probe)
    n = trials(ci=30, soak=200)
    points = list(range(1, total + 1))
    chosen = points if len(points) <= n else sorted(rng.sample(points, n))
    killed = converged = 0
    problems: list[str] = []
    for k in chosen:
        work = scratch / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(template, work)
        status = _gc_killed_at(work, k)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            killed += 1
        elif not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            problems.append(f"k={k}: the gc child failed (status {status})")
            continue
        present = {p.name for p in (work / "blobs").rglob("*") if p.is_file()}
        if live - present:
            problems.append(f"k={k}: the killed gc deleted {len(live - present)} referenced blobs")
        store = cairn.Store(work)
        store.gc(grace=60)  # must not raise: a killed gc leaves nothing that stops the next one
        again = store.gc(grace=60)
        if again.blobs_deleted or again.temp_deleted:
            problems.append(f"k={k}: gc did not converge ({again.blobs_deleted} blobs left to delete)")
            continue
        present = {p.name for p in (work / "blobs").rglob("*") if p.is_file()}
        if present != live or any((work / "tmp").iterdir()):
            problems.append(f"k={k}: after rerunning gc the garbage is not exactly gone")
        if {n: repr(digest(store.load(n))) for n in store.names()} != {n: repr(d) for n, d in kept.items()}:
            problems.append(f"k={k}: the kept checkpoints do not load as saved")
        if store.verify().problems:
            problems.append(f"k={k}: verify() finds problems")
        if not problems or not problems[-1].startswith(f"k={k}"):
            converged += 1
    record.trials = len(chosen)
    record.faults = killed
    record.detected = converged
    record.data_lost = sum("referenced" in p or "load as saved" in p for p in problems)
    record.notes.update(seed=seed, gc_backend_calls=total, kill_points=chosen[:50])
    assert killed == len(chosen), "the child must die at every chosen point"
    assert not problems, f"seed {seed}: {problems[:5]}"
