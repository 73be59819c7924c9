"""Running a worker under strace, attached only once it is ready, and reading strace's log.

Shared by ``test_syscall_kill.py`` (C2) and ``test_disk_faults.py`` (C9, C3b).

Why attach instead of ``strace python worker.py``: strace counts ``when=N`` **per tracee (thread) and per
syscall** (verified here with strace 6.1: a thread pool where each thread makes one ``fsync`` is never hit by
``inject=fsync:...:when=2``), and an interpreter start makes hundreds of ``openat`` calls. A worker that
imports everything first, then waits, and is attached to (``strace -f -p PID``) only then, starts every
counter at its save: ``when=N`` is the N-th call of that syscall *in one thread* of the save. The worker
allows any tracer (``prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)``) so Yama's ``ptrace_scope=1`` is no
obstacle for non-root users.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

WORKERS = Path(__file__).resolve().parent
TESTS = WORKERS.parent.parent
STRACE = shutil.which("strace")
HANG = 120.0
"""Seconds before a worker is declared hung (a guard against a stuck test, not a timing assertion)."""

MUTATING = (
    "openat",
    "open",
    "creat",
    "write",
    "writev",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "fsync",
    "fdatasync",
    "sync_file_range",
    "ftruncate",
    "fallocate",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "rmdir",
)
"""Every syscall that changes files (or opens them, possibly creating), traced in every run."""


def worker_env() -> dict[str, str]:
    """The environment of a worker: ``tests`` importable, one BLAS thread, no stray writes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(
        OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1"
    )
    return env


@dataclass
class Run:
    """One worker run under strace: its exit status, stderr and parsed strace log."""

    returncode: int
    stderr: str
    calls: list[Call] = field(default_factory=list)
    pid: int = 0
    named: bool = False  # the worker's temporary file names are deterministic

    @property
    def killed(self) -> bool:
        """True when the worker died of SIGKILL."""
        return self.returncode == -9

    def injected(self) -> list[Call]:
        """The calls strace tampered with (an injected error; a SIGKILL shows no result)."""
        return [c for c in self.calls if "(INJECTED)" in c.result]


@dataclass(frozen=True)
class Call:
    """One syscall from an strace log."""

    tid: int
    name: str
    args: str
    result: str  # what follows " = " ("0", "-1 ENOSPC (...) (INJECTED)"); "" if the thread died in it

    def path(self) -> str | None:
        """The file the call is about: a link's or rename's target, else its first path or fd path."""
        quoted = re.findall(r'"((?:[^"\\]|\\.)*)"', self.args)
        if quoted and self.name in ("link", "linkat", "rename", "renameat", "renameat2", "symlinkat"):
            return quoted[-1]
        fd = re.match(r"\s*-?\d+<([^>]*)>", self.args)
        if fd and not fd.group(1).startswith(("pipe:", "socket:", "anon_inode:")):
            return fd.group(1)
        return quoted[0] if quoted else None

    @property
    def ok(self) -> bool:
        """The call ran and succeeded."""
        return bool(re.match(r"\d", self.result)) and "(INJECTED)" not in self.result


_LINE = re.compile(r"^(\d+)\s+(.*)$")
_START = re.compile(r"^([a-z_0-9]+)\((.*)$")
_RESULT = re.compile(r"^(.*)\)\s+=\s(.*)$")
_RESUMED = re.compile(r"^<\.\.\. ([a-z_0-9]+) resumed>(.*)$")


def _split(tail: str) -> tuple[str, str]:
    """``args) = result`` into its arguments and its result (after the last ``) = ``)."""
    m = _RESULT.match(tail)
    return (m.group(1), m.group(2)) if m else (tail, "")


def parse_log(text: str) -> list[Call]:
    """The syscalls of an ``strace -f`` log, an unfinished call joined with its resumption."""
    calls: list[Call] = []
    pending: dict[int, tuple[str, str]] = {}
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        tid, rest = int(m.group(1)), m.group(2)
        if rest.startswith(("+++", "---")):
            if tid in pending:  # died inside the call
                name, args = pending.pop(tid)
                calls.append(Call(tid, name, args, ""))
            continue
        r = _RESUMED.match(rest)
        if r:
            name, args = pending.pop(tid, (r.group(1), ""))
            body, result = _split(r.group(2))
            calls.append(Call(tid, name, args + body, result))
            continue
        s = _START.match(rest)
        if not s:
            continue
        name, tail = s.group(1), s.group(2)
        if tail.endswith("<unfinished ...>"):
            pending[tid] = (name, tail.removesuffix("<unfinished ...>").rstrip())
            continue
        body, result = _split(tail)
        calls.append(Call(tid, name, body, result))
    for tid, (name, args) in pending.items():
        calls.append(Call(tid, name, args, ""))
    return calls


def per_thread_counts(calls: list[Call]) -> dict[str, int]:
    """For every syscall, the most calls any one thread made (the ``when=N`` range that can hit)."""
    counts: dict[str, Counter[int]] = defaultdict(Counter)
    for c in calls:
        counts[c.name][c.tid] += 1
    return {name: max(by_tid.values()) for name, by_tid in counts.items()}


def run_attached(worker: str, args: list[str], strace_opts: list[str], log: Path) -> Run:
    """Start ``workers/<worker>`` with ``args``; once it says ``ready``, attach ``strace -f`` with
    ``strace_opts`` (log to ``log``) and tell it to go. The worker must print ``ready`` and then read a
    line from stdin before its save."""
    assert STRACE is not None, "strace is not installed"
    proc = subprocess.Popen(
        [sys.executable, str(WORKERS / worker), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=worker_env(),
    )
    tracer: subprocess.Popen[bytes] | None = None
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        if not line.startswith(b"ready"):
            proc.kill()
            _, err = proc.communicate(timeout=HANG)
            raise RuntimeError(f"worker {worker} did not start: {line!r}\n{err.decode(errors='replace')}")
        tracer = subprocess.Popen(
            [STRACE, "-f", "-p", str(proc.pid), "-o", str(log), *strace_opts],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert tracer.stderr is not None
        said = tracer.stderr.readline().decode(errors="replace")
        if "attached" not in said:
            rest = tracer.stderr.read().decode(errors="replace")
            raise RuntimeError(
                f"strace could not attach to the worker (ptrace not permitted here?): {said}{rest}"
            )
        _, err = proc.communicate(b"go\n", timeout=HANG)
        tracer.communicate(timeout=HANG)
    finally:
        for p in (proc, tracer):
            if p is not None and p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=HANG)
    text = log.read_text(errors="replace") if log.exists() else ""
    return Run(proc.returncode, err.decode(errors="replace"), parse_log(text), proc.pid, b"named" in line)
