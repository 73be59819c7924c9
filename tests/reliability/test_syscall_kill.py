"""C2 of the reliability plan: SIGKILL at every mutating syscall of a small save.

A worker saves three arrays (five blobs with the test's 64-byte chunks, plus the manifest). strace attaches
once the worker is ready (see ``workers/syscall_strace.py``), first to count, per syscall, the most calls
any one thread of the save makes (K_s), then once for every ``(s, N)`` with ``N = 1, 2, ...`` using
``-e inject=s:signal=SIGKILL:when=N`` until the save runs to its end without being killed. strace counts
``when=N`` per thread and per syscall, so this enumerates every call of every thread that can be the first
to reach its count; the set is discovered at run time (a save path that starts using ``pwrite64``,
``ftruncate`` or ``O_DIRECT`` opens is covered without a change here).

After every kill a fresh :class:`cairn.Store` handle checks the pass criteria of row C2: the store opens,
``latest()`` is the previous checkpoint or the new one, every listed checkpoint restores bit-identically,
``verify()`` is clean, the next save and ``gc(grace=0)`` succeed (and leave no temporary file), and
``latest()`` advanced exactly in the runs where the manifest's ``link`` had run.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import cairn
from reliability.harness import Record
from reliability.states import digest
from reliability.workers.syscall_save import CHUNK, small_state
from reliability.workers.syscall_strace import MUTATING, STRACE, Run, per_thread_counts, run_attached

pytestmark = pytest.mark.skipif(STRACE is None, reason="strace is not installed (.ci/run installs it)")

TRACE = "trace=" + ",".join(f"?{s}" for s in MUTATING)
COMMITS = ("link", "linkat", "rename", "renameat", "renameat2")


@dataclass
class Scenario:
    """A store to copy before every run, what it holds, and the save the worker makes."""

    template: Path
    before: dict[str, int]  # committed name -> seed of its state
    step: int
    seed: int

    @property
    def name(self) -> str:
        """The new checkpoint's name."""
        return f"step-{self.step}"


@dataclass
class Outcome:
    """What the enumeration saw."""

    runs: int = 0
    kills: int = 0
    consistent: int = 0
    data_lost: int = 0
    advanced: list[str] = field(default_factory=list)
    committed: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    points: dict[str, int] = field(default_factory=dict)
    targeted: int = 0
    killed: list[str] = field(default_factory=list)


def make_scenario(root: Path, incremental: bool) -> Scenario:
    """An empty store (first save creates every directory) or one holding ``step-1`` (the next save shares
    the blobs of array ``b`` with it)."""
    template = root / "template"
    store = cairn.Store(template, create=True, chunk_size=CHUNK)
    if not incremental:
        return Scenario(template, {}, 1, 1)
    store.save(small_state(1), step=1)
    return Scenario(template, {"step-1": 1}, 2, 2)


def manifest_linked(run: Run, name: str) -> bool:
    """Whether the log shows the manifest's commit (its link or rename) completed."""
    target = f"checkpoints/{name}.json"
    return any(c.name in COMMITS and target in c.args and c.ok for c in run.calls)


def check_store(path: Path, sc: Scenario, out: Outcome, where: str) -> bool | None:
    """The C2 criteria on the store at ``path`` after a run; whether ``latest()`` advanced (None: broken)."""
    problems: list[str] = []
    expected = {**sc.before, sc.name: sc.seed}

    def check(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    try:
        store = cairn.Store(path)
        names = store.names()
        check(set(names) <= set(expected), f"unexpected checkpoints {names}")
        lost = [n for n in sc.before if n not in names]
        for name in names:
            if digest(store.load(name)) != digest(small_state(expected[name])):
                check(False, f"{name} does not restore bit-identically")
                lost += [name] if name in sc.before else []
        out.data_lost += len(lost)
        check(not lost, f"acknowledged checkpoints lost: {lost}")
        latest = store.latest()
        previous = max(sc.before, default=None, key=lambda n: sc.before[n])
        check(
            (latest.name if latest else None) in {previous, sc.name},
            f"latest() is {latest}, neither {previous} nor {sc.name}",
        )
        advanced = latest is not None and latest.name == sc.name
        report = store.verify()
        check(report.ok, f"verify: {report.problems}")
        # the next save: the same state again if the step was not committed, else the next step
        step, seed = (sc.step + 1, sc.seed + 1) if advanced else (sc.step, sc.seed)
        again = cairn.Store(path)
        again.save(small_state(seed), step=step)
        gc = again.gc(grace=0)
        check(not list(again.backend.list("tmp")), f"gc left temporary files ({gc})")
        report = again.verify()
        check(report.ok, f"verify after the next save and gc: {report.problems}")
        check(digest(again.load(f"step-{step}")) == digest(small_state(seed)), "next save does not restore")
        for name in names:
            check(digest(again.load(name)) == digest(small_state(expected[name])), f"{name} lost after gc")
    except Exception as e:
        problems.append(f"{type(e).__name__}: {e}")
        advanced = None
    if problems:
        out.failures.append(f"{where}: " + "; ".join(problems))
        return None
    return advanced


def enumerate_kills(tmp_path: Path, sc: Scenario) -> Outcome:
    """Count the save's syscalls, then kill it before every one of them in turn."""
    out = Outcome()
    count_dir = tmp_path / "count"
    shutil.copytree(sc.template, count_dir, symlinks=True)
    counted = run_attached(
        "syscall_save.py",
        [str(count_dir), str(sc.step), str(sc.seed)],
        ["-y", "-e", TRACE],
        tmp_path / "count.log",
    )
    assert counted.returncode == 0, f"the uninjected save failed:\n{counted.stderr}"
    assert manifest_linked(counted, sc.name), "the strace log shows no manifest commit: is strace attaching?"
    limits = per_thread_counts(counted.calls)
    out.points = dict(sorted(limits.items()))
    out.runs += 1

    def kill_run(label: str, opts: list[str]) -> Run:
        run_dir = tmp_path / label
        shutil.copytree(sc.template, run_dir, symlinks=True)
        run = run_attached(
            "syscall_save.py", [str(run_dir), str(sc.step), str(sc.seed)], opts, tmp_path / f"{label}.log"
        )
        out.runs += 1
        if run.killed:
            out.kills += 1
            out.killed.append(label)
            advanced = check_store(run_dir, sc, out, f"kill at {label}")
            if advanced is not None:
                out.consistent += 1
                if advanced:
                    out.advanced.append(label)
            if manifest_linked(run, sc.name):
                out.committed.append(label)
            shutil.rmtree(run_dir)
        return run

    for label, syscall, rel, m in shadowed_points(counted, count_dir):
        opts = [
            "-P",
            str(tmp_path / label / rel),
            "-e",
            TRACE,
            "-e",
            f"inject={syscall}:signal=SIGKILL:when={m}",
        ]
        run = kill_run(label, opts)
        if not run.killed:
            out.failures.append(f"targeted kill at {label} did not happen (rc {run.returncode})")
        out.targeted += 1
    for syscall in sorted(limits):
        n = 0
        while True:
            n += 1
            assert n <= 3 * limits[syscall] + 10, f"{syscall}: still killed at when={n}"
            label = f"{syscall}#{n}"
            run = kill_run(label, ["-e", TRACE, "-e", f"inject={syscall}:signal=SIGKILL:when={n}"])
            where = f"kill at {label}"
            run_dir = tmp_path / label
            if not run.killed:
                if run.returncode != 0:
                    out.failures.append(f"{where}: worker failed ({run.returncode}):\n{run.stderr}")
                elif check_store(run_dir, sc, out, f"{syscall} #{n} (not killed)") is not True:
                    out.failures.append(f"{where}: a save that ran to its end did not advance latest()")
                shutil.rmtree(run_dir)
                break
    return out


def shadowed_points(counted: Run, count_dir: Path) -> list[tuple[str, str, str, int]]:
    """Kill points that ``when=N`` alone cannot reach: calls of the main thread whose per-thread number N
    some pool thread reaches first (the manifest's write, link and temp unlink, the first directory
    fsyncs), and the link of every blob (pool threads make one each). Each is ``(label, syscall, path in
    the store, M)``: aimed at with ``-P <path>``, where strace counts only the calls on that file, and
    ``when=M``."""
    if not counted.named:
        return []  # the temporary names are random: a temporary file cannot be aimed at
    others: dict[str, int] = {}
    for (tid, name), n in Counter((c.tid, c.name) for c in counted.calls).items():
        if tid != counted.pid:
            others[name] = max(others.get(name, 0), n)
    seen: Counter[str] = Counter()
    seen_on: Counter[tuple[str, str]] = Counter()
    points: list[tuple[str, str, str, int]] = []
    for c in counted.calls:
        path = c.path()
        if c.tid != counted.pid:  # a pool thread: aim at the link of every blob (its name is its hash)
            if c.name in COMMITS and path and path.startswith(f"{count_dir}/blobs/"):
                rel = path.removeprefix(f"{count_dir}/")
                points.append((f"{c.name}@{rel.replace('/', '_')}#1", c.name, rel, 1))
            continue
        seen[c.name] += 1
        if path is None or not path.startswith(f"{count_dir}/"):
            continue
        rel = path.removeprefix(f"{count_dir}/")
        seen_on[c.name, rel] += 1
        if seen[c.name] <= others.get(c.name, 0):
            m = seen_on[c.name, rel]
            points.append((f"{c.name}@{rel.replace('/', '_')}#{m}", c.name, rel, m))
    return points


def fill(record: Record, out: Outcome, scenario: str) -> None:
    """The record of one scenario."""
    record.trials, record.faults, record.detected, record.data_lost = (
        out.runs,
        out.kills,
        out.consistent,
        out.data_lost,
    )
    record.notes.update(
        scenario=scenario,
        per_thread_calls=out.points,
        targeted_points=out.targeted,
        advanced_at=out.advanced,
        failures=out.failures[:20],
    )


@pytest.mark.parametrize("incremental", [False, True], ids=["first-save", "incremental"])
def test_kill_at_every_syscall(tmp_path: Path, record: Record, incremental: bool) -> None:
    """C2: K/K kill points leave a consistent store; ``latest()`` advances only at the manifest commit."""
    sc = make_scenario(tmp_path, incremental)
    out = enumerate_kills(tmp_path, sc)
    fill(record, out, "incremental" if incremental else "first-save")
    assert not out.failures, "\n".join(out.failures)
    assert out.data_lost == 0
    assert out.consistent == out.kills
    assert out.kills >= 20, f"only {out.kills} kill points: is strace attaching? {out.points}"
    assert out.targeted, "no kill point aimed at the manifest commit (temporary names not deterministic?)"
    commit = f"link@checkpoints_{sc.name}.json#1"
    assert commit in out.killed, f"the manifest's link was not a kill point: {out.killed}"
    assert commit not in out.advanced, "latest() advanced although the manifest's link never ran"
    # latest() advances exactly at the points after the manifest's link, never at a blob-only point
    assert sorted(out.advanced) == sorted(out.committed)
    assert out.advanced, "no kill point came after the manifest commit"
    assert len(out.advanced) < out.kills, "no kill point came before the manifest commit"
