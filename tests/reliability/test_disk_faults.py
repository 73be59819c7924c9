"""C9 and C3b of the reliability plan: a full disk and I/O errors during a save, sync and async.

- C9(a): a real full disk: a tmpfs of 8 MiB (``mount`` as root, else inside ``unshare -rm``), filled so that
  only ``k`` of the save's new blobs fit (``workers/faults_tmpfs.py``).
- C9(b): strace fault injection into a save (``workers/syscall_save.py``, attached once it is ready, so the
  counters start at the save): ``ENOSPC`` on every write from the N-th on, ``EIO`` on the N-th fsync (an
  fsync error must poison the handle, never be retried into success), ``EXDEV``/``ENOSPC`` on the N-th link.
- C3b: the same faults in the background commit of ``CheckpointManager(async_save=True)``: the error must
  resurface at the next ``save()``, ``wait()`` or ``close()`` (each checked), once, never swallowed.

After every trial a fresh handle checks: no manifest for the failed step, the previous ``latest()`` unchanged
and restoring bit-identically, ``verify()`` clean, temporary files removed or removed by ``gc(grace=0)``, and
the next save succeeds.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import cairn
from reliability.harness import Record, trials
from reliability.states import digest
from reliability.workers import faults_tmpfs
from reliability.workers.syscall_save import CHUNK, small_state
from reliability.workers.syscall_strace import MUTATING, STRACE, WORKERS, Run, run_attached, worker_env

TRACE = "trace=" + ",".join(f"?{s}" for s in MUTATING)
WRITES = "?write,?pwrite64,?writev,?pwritev,?pwritev2"
SYNCS = "?fsync,?fdatasync"
LINKS = "?link,?linkat,?rename,?renameat,?renameat2"
SEED = 20240901
KINDS = [
    ("write", "ENOSPC", True),
    ("fsync", "EIO", False),
    ("link", "EXDEV", False),
    ("link", "ENOSPC", False),
]
"""Fault kinds: ENOSPC on every write from the N-th on, EIO on the N-th fsync, EXDEV/ENOSPC on the N-th
link."""

needs_strace = pytest.mark.skipif(STRACE is None, reason="strace is not installed (.ci/run installs it)")


# -- C9(a): a real full disk ---------------------------------------------------------------------------


def _mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_enospc_on_tmpfs(tmp_path: Path, record: Record) -> None:
    """C9(a): k ∈ [0, n] blobs fit: a typed ENOSPC naming the path and the fix, nothing committed, the
    previous checkpoint intact, nothing left after gc, and the save succeeds once space is freed."""
    ks = list(range(faults_tmpfs.NEW_BLOBS + 1))
    mount = tmp_path / "tmpfs"
    if _mount_tmpfs(mount):
        try:
            results = faults_tmpfs.run_scenario(str(mount), ks)
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        how = "mount as root"
    else:
        mount.mkdir(exist_ok=True)
        script = 'mount -t tmpfs -o size=8m tmpfs "$1" && shift && exec "$@"'
        cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(mount)]
        cmd += [sys.executable, str(WORKERS / "faults_tmpfs.py"), str(mount), *map(str, ks)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), check=False)
        if done.returncode != 0 and not done.stdout.strip():
            pytest.skip(
                f"cannot mount a tmpfs here (not root, no user namespaces): {done.stderr.strip()[:200]}"
            )
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout)
        how = "unshare --user --mount"
    failed = [r for r in results if not r["saved"]]
    record.trials = len(results)
    record.faults = len(failed)
    record.detected = sum(1 for r in failed if not r["problems"])
    record.data_lost = sum(r["data_lost"] for r in results)
    record.notes.update(how=how, results=[{k: v for k, v in r.items() if k != "names"} for r in results])
    problems = [f"k={r['k']}: {p}" for r in results for p in r["problems"]]
    assert not problems, "\n".join(problems)
    assert record.data_lost == 0
    # fewer blobs fit than the save needs: it must fail; all fit: it must succeed
    assert [r["k"] for r in failed] == ks[:-1], [(r["k"], r["saved"]) for r in results]


# -- C9(b) and C3b: injected faults --------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One injection: the syscalls, the errno, which call (``N`` or ``N+``) and the expected errno."""

    family: str  # "write", "fsync" or "link"
    err: str
    n: int
    repeat: bool

    @property
    def errno(self) -> int:
        """The errno the save's error must carry."""
        return int(getattr(errno, self.err))

    def opts(self) -> list[str]:
        """strace's options for it."""
        calls = {"write": WRITES, "fsync": SYNCS, "link": LINKS}[self.family]
        when = f"{self.n}+" if self.repeat else str(self.n)
        return ["-e", TRACE, "-e", f"inject={calls}:error={self.err}:when={when}"]

    def __str__(self) -> str:
        return f"{self.err} on {self.family} #{self.n}{'+' if self.repeat else ''}"


@dataclass
class Plan:
    """What a counted uninjected run says about where faults can land."""

    limits: dict[str, int]
    post_link_fsyncs: list[int] = field(default_factory=list)  # fsync numbers that land after the commit


def _family(name: str) -> str | None:
    for family, calls in (("write", WRITES), ("fsync", SYNCS), ("link", LINKS)):
        if f"?{name}" in calls.split(","):
            return family
    return None


def count_plan(tmp_path: Path, template: Path, mode: str, tries: int = 5) -> Plan:
    """Run the save under strace (no fault) and derive the ranges of N per fault family.

    strace counts a syscall per thread, so the committing thread's fsyncs after the manifest's link can be
    targeted only where they come later in its count than every other thread's fsyncs; on a busy machine
    one writer thread may take most of the blobs, so the count is run again (up to ``tries`` times) until
    such an fsync exists."""
    plan = Plan({}, [])
    for attempt in range(tries):
        plan = _count_once(tmp_path, template, mode, attempt)
        if plan.post_link_fsyncs:
            break
    return plan


def _count_once(tmp_path: Path, template: Path, mode: str, attempt: int) -> Plan:
    work = tmp_path / f"count-{mode}-{attempt}"
    shutil.copytree(template, work, symlinks=True)
    run = run_attached(
        "syscall_save.py",
        [str(work), "2", "2", mode, "wait"],
        ["-e", TRACE],
        tmp_path / f"count-{mode}-{attempt}.log",
    )
    assert run.returncode == 0, run.stderr
    per: dict[str, Counter[int]] = {}
    for c in run.calls:
        fam = _family(c.name)
        if fam:
            per.setdefault(fam, Counter())[c.tid] += 1
    limits = {fam: max(by_tid.values()) for fam, by_tid in per.items()}
    commits = [c for c in run.calls if _family(c.name) == "link" and "checkpoints/step-2.json" in c.args]
    assert commits, "no manifest commit in the strace log: is strace attaching?"
    committer = commits[0].tid
    others = max((n for tid, n in per["fsync"].items() if tid != committer), default=0)
    post, seen, linked = [], 0, False
    for c in run.calls:
        if c.tid != committer:
            continue
        if c is commits[0]:
            linked = True
        if _family(c.name) == "fsync":
            seen += 1
            if linked and seen > others:
                post.append(seen)
    return Plan(limits, post)


def random_faults(plan: Plan, rng: random.Random, count: int) -> list[Fault]:
    """``count`` random faults, each landing before the commit (a fault after it has its own test)."""
    out = []
    while len(out) < count:
        family, err, repeat = rng.choice(
            [
                ("write", "ENOSPC", True),
                ("fsync", "EIO", False),
                ("link", "EXDEV", False),
                ("link", "ENOSPC", False),
            ]
        )
        extra = 1 if rng.random() < 0.15 else 0  # sometimes one past the end: no fault at all
        n = rng.randint(1, plan.limits.get(family, 1) + extra)
        if family == "fsync" and n in plan.post_link_fsyncs:
            continue
        out.append(Fault(family, err, n, repeat))
    return out


def make_template(tmp_path: Path) -> Path:
    """A store holding ``step-1`` (the worker saves ``step-2``, which shares a blob with it)."""
    template = tmp_path / "template"
    cairn.Store(template, create=True, chunk_size=CHUNK).save(small_state(1), step=1)
    return template


def inject(
    tmp_path: Path, template: Path, label: str, fault: Fault, mode: str, api: str
) -> tuple[Run, Any, Path]:
    """Copy the template and run the worker with ``fault``; its run, its result and the store."""
    work = tmp_path / label
    shutil.copytree(template, work, symlinks=True)
    result = tmp_path / f"{label}.json"
    run = run_attached(
        "syscall_save.py",
        [str(work), "2", "2", mode, api, str(result)],
        fault.opts(),
        tmp_path / f"{label}.log",
    )
    assert run.returncode == 0, f"{fault}: worker failed ({run.returncode}):\n{run.stderr}"
    raw = result.read_bytes().rstrip(b"\0")
    return run, json.loads(raw), work


def check_after(work: Path, failed_steps: set[int], problems: list[str]) -> int:
    """The store after a failed (or not) save: the C9 criteria; the number of checkpoints lost."""
    store = cairn.Store(work)
    names = set(store.names())
    lost = 0
    if "step-1" not in names or digest(store.load("step-1")) != digest(small_state(1)):
        problems.append("step-1 lost or not bit-identical")
        lost += 1
    for step in (2, 3):
        name = f"step-{step}"
        if step in failed_steps and name in names:
            problems.append(f"a manifest exists for the failed {name}")
        if name in names and digest(store.load(name)) != digest(small_state(step)):
            problems.append(f"{name} does not restore bit-identically")
    latest = store.latest()
    if latest is None or latest.step in failed_steps:
        problems.append(f"latest() is {latest}: a failed step, or nothing")
    report = store.verify()
    if not report.ok:
        problems.append(f"verify: {report.problems}")
    store.gc(grace=0)
    if list(store.backend.list("tmp")):
        problems.append("temporary files left after gc(grace=0)")
    if "step-2" not in store.names():
        store.save(small_state(2), step=2)  # the next save succeeds
    if digest(cairn.Store(work).load("step-2")) != digest(small_state(2)):
        problems.append("the next save does not restore")
    shutil.rmtree(work)
    return lost


def _is_refusal(res: dict[str, Any]) -> bool:
    """The save was refused because the handle is poisoned by an fsync error (a BackendError saying so)."""
    err = res.get("error") or {}
    return not res["ok"] and "BackendError" in err.get("mro", []) and "fsync failed" in err.get("message", "")


def _is_error(res: dict[str, Any], fault: Fault) -> bool:
    err = res.get("error") or {}
    return not res["ok"] and "BackendError" in err.get("mro", []) and err.get("errno") == fault.errno


@needs_strace
def test_injected_faults_sync(tmp_path: Path, record: Record) -> None:
    """C9(b): random (fault, N): typed error with the errno, nothing committed, store clean, next save works;
    after an fsync error the same handle refuses to save (never retried into success)."""
    template = make_template(tmp_path)
    plan = count_plan(tmp_path, template, "retry")
    rng = random.Random(SEED)
    faults = random_faults(plan, rng, trials(ci=50, soak=500))
    problems: list[str] = []
    injected = detected = lost = errno_lost = 0
    for i, fault in enumerate(faults):
        mode = "retry" if fault.family == "fsync" else "sync"
        run, res, work = inject(tmp_path, template, f"sync-{i}", fault, mode, "")
        where: list[str] = []
        hit = bool(run.injected())
        injected += hit
        save = res["save"]
        if hit and fault.family == "fsync" and _is_refusal(save):
            errno_lost += 1  # another pool thread's refusal won the race (see test_fsync_error_keeps_errno)
        elif hit and not _is_error(save, fault):
            where.append(f"the save did not raise BackendError({fault.err}): {save}")
        if not hit and not save["ok"]:
            where.append(f"no fault landed but the save failed: {save}")
        if hit and fault.family == "fsync":
            retry = res.get("retry", {"ok": True})
            if retry["ok"] or "BackendError" not in retry["error"]["mro"]:
                where.append(f"a save on the handle after an fsync error did not refuse: {retry}")
        lost += check_after(work, {2} if not save["ok"] else set(), where)
        detected += hit and not where
        problems += [f"{fault}: {p}" for p in where]
    record.trials, record.faults, record.detected, record.data_lost = len(faults), injected, detected, lost
    record.notes.update(
        seed=SEED,
        limits=plan.limits,
        post_link_fsyncs=plan.post_link_fsyncs,
        fsync_errno_lost=errno_lost,
        failures=problems[:20],
    )
    assert not problems, "\n".join(problems)
    assert lost == 0
    assert injected >= len(faults) // 2, f"only {injected} of {len(faults)} faults landed"


@needs_strace
@pytest.mark.parametrize("api", ["save", "wait", "close"])
def test_injected_faults_async(tmp_path: Path, record: Record, api: str) -> None:
    """C3b: a fault in the background commit resurfaces at the next ``save()``/``wait()``/``close()``,
    exactly once, and nothing is committed for that step."""
    template = make_template(tmp_path)
    plan = count_plan(tmp_path, template, "async")
    rng = random.Random(SEED + {"save": 1, "wait": 2, "close": 3}[api])
    faults = random_faults(plan, rng, max(1, trials(ci=50, soak=500) // 3))
    problems: list[str] = []
    injected = detected = lost = 0
    for i, fault in enumerate(faults):
        run, res, work = inject(tmp_path, template, f"async-{api}-{i}", fault, "async", api)
        where: list[str] = []
        hit = bool(run.injected())
        injected += hit
        if not res["submit"]["ok"]:
            where.append(f"save() of the async step raised at once: {res['submit']}")
        names = cairn.Store(work).names()
        step_failed = "step-2" not in names
        failed: set[int] = set()
        if not hit:
            if not all(r["ok"] for k, r in res.items() if k != "submit"):
                where.append(f"no fault landed but an error surfaced: {res}")
        elif step_failed:
            failed = {2, 3} if api == "save" else {2}
            first = res["api"] if api in ("save", "wait") else res["close"]
            if not _is_error(first, fault):
                where.append(f"the background error did not resurface at {api}(): {first}")
            rest = [res["close"], res["close_again"]] if api != "close" else [res["close_again"]]
            if not all(r["ok"] for r in rest):
                where.append(f"the error was raised more than once: {res}")
        elif api == "save":  # step-2 committed; the fault landed in step-3's commit: close() raises it
            failed = {3}
            if not _is_error(res["close"], fault):
                where.append(f"step-3's background error did not resurface at close(): {res['close']}")
        else:
            where.append(f"a fault landed but step-2 was committed and nothing raised: {res}")
        lost += check_after(work, failed, where)
        detected += hit and not where
        problems += [f"{fault}: {p}" for p in where]
    record.trials, record.faults, record.detected, record.data_lost = len(faults), injected, detected, lost
    record.notes.update(seed=SEED, api=api, limits=plan.limits, failures=problems[:20])
    assert not problems, "\n".join(problems)
    assert lost == 0
    assert injected >= len(faults) // 2, f"only {injected} of {len(faults)} faults landed"


@needs_strace
def test_fsync_error_keeps_errno(tmp_path: Path, record: Record) -> None:
    """C9(b): the errors of a handle poisoned by an fsync EIO carry errno EIO (``errno preserved``)."""
    template = make_template(tmp_path)
    fault = Fault("fsync", "EIO", 1, False)
    run, res, work = inject(tmp_path, template, "errno", fault, "retry", "")
    record.trials, record.faults = 1, len(run.injected())
    problems: list[str] = []
    record.data_lost = check_after(work, {2}, problems)
    assert not problems, problems
    assert not res["save"]["ok"] and not res["retry"]["ok"], res
    record.detected = 1
    record.notes.update(save=res["save"], retry=res["retry"])
    assert res["retry"]["error"]["errno"] == errno.EIO, res["retry"]


@needs_strace
@pytest.mark.parametrize("mode", ["retry", "async"])
def test_fsync_error_after_commit_link(tmp_path: Path, record: Record, mode: str) -> None:
    """C9(b)/C3b: EIO on each fsync after the manifest's link (the commit's directory flush): the save must
    fail, and then no manifest may be visible for that step (``latest()`` unchanged)."""
    template = make_template(tmp_path)
    plan = count_plan(tmp_path, template, mode)
    assert plan.post_link_fsyncs, "no fsync after the manifest's link: the commit is not flushed?"
    problems: list[str] = []
    injected = detected = lost = 0
    for n in plan.post_link_fsyncs:
        fault = Fault("fsync", "EIO", n, False)
        run, res, work = inject(tmp_path, template, f"post-{mode}-{n}", fault, mode, "wait")
        hit = bool(run.injected())
        injected += hit
        where: list[str] = []
        raised = res["save"] if mode == "retry" else res["api"]
        if not hit or not (_is_error(raised, fault) or _is_refusal(raised)):
            where.append(f"the save did not fail: {res}")
        lost += check_after(work, {2}, where)
        detected += hit and not where
        problems += [f"{fault}: {p}" for p in where]
    record.trials, record.faults, record.detected, record.data_lost = (
        len(plan.post_link_fsyncs),
        injected,
        detected,
        lost,
    )
    record.notes.update(post_link_fsyncs=plan.post_link_fsyncs, failures=problems[:10])
    assert lost == 0
    assert not problems, "\n".join(problems)
