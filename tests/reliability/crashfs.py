"""CrashFS: a power-loss simulator at the level of ``os`` calls, modelled on SQLite's ``src/test6.c``.

A module's ``os`` name is replaced by an :class:`OsProxy` (:meth:`CrashFS.patched`). The proxy runs every
call on the real file system, so the code under test sees an ordinary disk, and records every mutating
call in a log: file creation, ``write``/``pwrite``/``writev``/``pwritev``, ``ftruncate``,
``posix_fallocate``, ``fsync``/``fdatasync`` of files and directories, ``link``, ``rename``/``replace``,
``unlink``, ``mkdir``, ``rmdir``. Any other mutating ``os`` function (``makedirs``, ``truncate``,
``sendfile``, ``dup``, an ``O_TMPFILE`` open, a write to a descriptor the proxy did not open...) raises
:class:`UnmodelledOperation`: the model never silently misses an operation. :meth:`CrashFS.check_model`
also compares the model with the real directory after a run.

A *crash state* at crash point ``c`` (the first ``c`` logged operations happened, then the power went) is
built by replaying the operations onto the state before the run (which counts as durable):

* a data operation (write, truncate, allocate) not followed by an ``fsync`` of its file before ``c`` is
  applied, dropped, or *torn* (garbage over the 4 KiB sectors it touches; the file grows as if written),
  as test6.c does; ``O_DIRECT`` writes are treated like any other write (conservative);
* a directory operation (create, link, rename, unlink, mkdir, rmdir) not followed by an ``fsync`` of the
  directory of its new entry (or removed entry) is applied or dropped; ``link`` and ``rename`` stay atomic.
  With ``reorder=True`` (btrfs-like) each one is chosen independently, otherwise the applied ones form a
  prefix in log order (a metadata journal). A ``rename`` whose new name is durable but whose source
  directory was not fsynced may also leave the old name behind (the file then has both names).

Files and directories are inodes: a name whose directory entry was dropped is gone, a directory whose
``mkdir`` was dropped takes its entries with it, and data follows the inode whatever its names.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import random
import shutil
import stat
import tempfile
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SECTOR", "CrashFS", "CrashState", "Op", "OsProxy", "UnmodelledOperation", "ram_dir"]

SECTOR = 4096
"""Torn writes put garbage over whole sectors of this size."""

_real_os = os
_DATA_OPS = frozenset({"write", "trunc", "alloc"})
_DIR_OPS = frozenset({"create", "mkdir", "link", "rename", "unlink", "rmdir"})

# functions of ``os`` that change nothing on disk: passed through untouched
_SAFE = frozenset(
    """
    stat lstat fstat fstatvfs statvfs access listdir scandir walk fwalk readlink read readv pread
    preadv lseek fspath fsencode fsdecode getpid getppid getuid geteuid getgid getegid cpu_count
    process_cpu_count sched_getaffinity strerror urandom getrandom getcwd get_terminal_size isatty
    get_blocking set_blocking get_inheritable set_inheritable device_encoding getenv getenvb sysconf
    confstr pathconf fpathconf major minor makedev umask posix_fadvise getlogin uname times getloadavg
    WIFEXITED WEXITSTATUS WIFSIGNALED WTERMSIG WIFSTOPPED WSTOPSIG WCOREDUMP WIFCONTINUED
    """.split()  # noqa: SIM905
)


@contextlib.contextmanager
def ram_dir(fallback: str | os.PathLike[str]) -> Iterator[str]:
    """A scratch directory in RAM (``/dev/shm``) where there is one, else a fresh one in ``fallback``;
    crash images are written and removed by the hundred, which a busy disk makes slow (rmdir)."""
    shm = "/dev/shm"
    if _real_os.path.isdir(shm) and _real_os.access(shm, _real_os.W_OK | _real_os.X_OK):
        path = tempfile.mkdtemp(prefix="crashfs-", dir=shm)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        yield tempfile.mkdtemp(prefix="crashfs-", dir=fallback)


class UnmodelledOperation(RuntimeError):
    """The code under test made an ``os`` call that CrashFS does not model: the simulation would be wrong."""


@dataclass(frozen=True)
class Op:
    """One logged operation. ``dirs`` are the directories whose entries it changes (directory ops)."""

    kind: str
    ino: int = -1
    dirs: tuple[int, ...] = ()
    name: str = ""
    src: tuple[int, str] | None = None
    offset: int = 0
    data: bytes = b""
    size: int = 0
    label: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Tree:
    """A file system image: directory entries, kinds, modes and file contents, keyed by inode number."""

    entries: dict[int, dict[str, int]]
    kinds: dict[int, str]
    modes: dict[int, int]
    data: dict[int, bytearray]

    def copy(self) -> _Tree:
        return _Tree(
            {d: dict(e) for d, e in self.entries.items()},
            dict(self.kinds),
            dict(self.modes),
            {i: bytearray(b) for i, b in self.data.items()},
        )

    def files(self) -> dict[str, tuple[str, bytes]]:
        """Every reachable path (relative to the root) with its kind and, for files, its bytes."""
        out: dict[str, tuple[str, bytes]] = {}

        def walk(ino: int, prefix: str, seen: frozenset[int]) -> None:
            for name, child in sorted(self.entries[ino].items()):
                path = f"{prefix}{name}"
                if self.kinds[child] == "d":
                    out[path] = ("d", b"")
                    if child not in seen:
                        walk(child, path + "/", seen | {child})
                else:
                    out[path] = ("f", bytes(self.data.get(child, b"")))

        walk(0, "", frozenset({0}))
        return out


@dataclass
class CrashState:
    """One simulated post-power-loss image, and how many operations were lost or torn to get it."""

    tree: _Tree
    at: int
    unsynced: int = 0
    dropped: int = 0
    torn: int = 0
    applied: int = 0

    @property
    def faults(self) -> int:
        """Operations dropped or torn."""
        return self.dropped + self.torn

    def write_to(self, dest: str | os.PathLike[str]) -> str:
        """Materialise the image as a fresh directory ``dest`` (created; must not exist). Returns its path."""
        dest = os.fspath(dest)
        _real_os.mkdir(dest)
        placed: dict[int, str] = {}

        def walk(ino: int, path: str) -> None:
            for name, child in sorted(self.tree.entries[ino].items()):
                target = _real_os.path.join(path, name)
                if self.tree.kinds[child] == "d":
                    if child in placed:  # a directory reachable twice (a renamed dir whose old entry stayed)
                        continue
                    placed[child] = target
                    _real_os.mkdir(target)
                    walk(child, target)
                    _real_os.chmod(target, self.tree.modes.get(child, 0o755))
                elif child in placed:
                    _real_os.link(placed[child], target)
                else:
                    placed[child] = target
                    with open(target, "wb") as f:
                        f.write(self.tree.data.get(child, b""))
                    _real_os.chmod(target, self.tree.modes.get(child, 0o644))

        walk(0, dest)
        return dest


class CrashFS:
    """Records the ``os`` calls made under directory ``base`` and builds crash states from them."""

    def __init__(self, base: str | os.PathLike[str]) -> None:
        self.base = _real_os.path.realpath(os.fspath(base))
        if not stat.S_ISDIR(_real_os.lstat(self.base).st_mode):
            raise ValueError(f"{self.base} is not a directory")
        self._lock = threading.RLock()
        self.initial = _scan(self.base)
        self._next_ino = max(self.initial.kinds) + 1
        self.live = self.initial.copy()
        self.log: list[Op] = []
        self._fds: dict[int, int] = {}
        self._append: set[int] = set()
        self._syncs: dict[int, list[int]] = {}
        self.proxy = OsProxy(self)

    # -- the model of the live file system --------------------------------------------------------------

    def _new_ino(self) -> int:
        ino, self._next_ino = self._next_ino, self._next_ino + 1
        return ino

    def _split(self, path: str | os.PathLike[str] | bytes) -> list[str] | None:
        """The components of ``path`` below the base ([] for the base itself), or None if outside it."""
        p = _real_os.path.abspath(_real_os.fsdecode(_real_os.fspath(path)))
        if p == self.base:
            return []
        if not p.startswith(self.base + "/"):
            return None
        return p[len(self.base) + 1 :].split("/")

    def _lookup(self, parts: list[str]) -> int | None:
        ino = 0
        for part in parts:
            entries = self.live.entries.get(ino)
            if entries is None or part not in entries:
                return None
            ino = entries[part]
        return ino

    def _parent(self, path: str | os.PathLike[str] | bytes, what: str) -> tuple[int, str]:
        """The live directory inode and entry name of ``path``; raises for paths CrashFS cannot follow."""
        parts = self._split(path)
        if not parts:
            raise UnmodelledOperation(f"os.{what}({path!r}): outside the simulated directory {self.base}")
        parent = self._lookup(parts[:-1])
        if parent is None or self.live.kinds[parent] != "d":
            raise UnmodelledOperation(f"os.{what}({path!r}): its directory is unknown to the model")
        return parent, parts[-1]

    def _record(self, op: Op) -> None:
        """Append ``op`` and apply it to the live model (the state every process sees until a crash)."""
        if op.kind == "sync":
            self._syncs.setdefault(op.ino, []).append(len(self.log))
        self.log.append(op)
        if op.kind not in ("sync", "mark"):
            _apply(self.live, op, None, None)

    # -- the public side ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def patched(self, *modules: types.ModuleType) -> Iterator[CrashFS]:
        """Replace the ``os`` name of each module by this recorder's proxy while the block runs."""
        saved = [(m, getattr(m, "os")) for m in modules]  # noqa: B009
        for m in modules:
            setattr(m, "os", self.proxy)  # noqa: B010
        try:
            yield self
        finally:
            for m, real in saved:
                setattr(m, "os", real)  # noqa: B010

    def mark(self, label: str, **info: Any) -> int:
        """Log a marker (``"saved"``, ``name="step-1"``...) at this point of the run; returns its index."""
        with self._lock:
            self.log.append(Op("mark", label=label, info=info))
            return len(self.log) - 1

    def marks(self, until: int | None = None) -> list[Op]:
        """The markers logged before crash point ``until`` (all of them by default)."""
        ops = self.log if until is None else self.log[:until]
        return [op for op in ops if op.kind == "mark"]

    def poke(self, path: str | os.PathLike[str], offset: int, data: bytes) -> None:
        """Overwrite bytes of an existing file out of band, durably (bit rot on the disk itself)."""
        with self._lock:
            parts = self._split(path)
            ino = None if parts is None else self._lookup(parts)
            if ino is None or self.live.kinds[ino] != "f":
                raise ValueError(f"{path}: not a file of the simulated directory")
            mode = stat.S_IMODE(_real_os.lstat(path).st_mode)
            _real_os.chmod(path, mode | stat.S_IWUSR)
            try:
                fd = _real_os.open(path, _real_os.O_WRONLY)
                try:
                    _real_os.pwrite(fd, data, offset)
                    _real_os.fsync(fd)
                finally:
                    _real_os.close(fd)
            finally:
                _real_os.chmod(path, mode)
            op = Op("write", ino=ino, offset=offset, data=bytes(data))
            self._record(op)
            self._record(Op("sync", ino=ino))

    def durable(self, index: int, at: int) -> bool:
        """Whether logged operation ``index`` survives a crash at point ``at`` whatever happens."""
        op = self.log[index]
        if op.kind in _DATA_OPS:
            return self._synced(op.ino, index, at)
        if op.kind in _DIR_OPS:  # a rename is durable once its new name is; see crash() for its old name
            return self._synced(op.dirs[-1], index, at)
        return True

    def _synced(self, ino: int, index: int, at: int) -> bool:
        """Whether inode ``ino`` was fsynced after operation ``index`` and before crash point ``at``."""
        syncs = self._syncs.get(ino, [])
        j = bisect.bisect_right(syncs, index)
        return j < len(syncs) and syncs[j] < at

    def crash(
        self, at: int | None = None, rng: random.Random | None = None, *, reorder: bool = True
    ) -> CrashState:
        """A crash state at point ``at`` (default: now); unsynced operations' fates drawn from ``rng``."""
        with self._lock:
            at = len(self.log) if at is None else at
            if not 0 <= at <= len(self.log):
                raise ValueError(f"crash point {at} outside 0..{len(self.log)}")
            rng = rng or random.Random()
            ops = self.log[:at]
            pending = [i for i, op in enumerate(ops) if op.kind in _DIR_OPS and not self.durable(i, at)]
            if reorder:
                keep = {i for i in pending if rng.random() < 0.5}
            else:
                keep = set(pending[: rng.randint(0, len(pending))])
            tree = self.initial.copy()
            for ino, kind in self.live.kinds.items():  # an inode whose create was dropped may still be linked
                tree.kinds.setdefault(ino, kind)
                tree.modes.setdefault(ino, self.live.modes[ino])
            state = CrashState(tree, at)
            for i, op in enumerate(ops):
                if op.kind in ("sync", "mark"):
                    continue
                if self.durable(i, at):
                    if op.kind == "rename" and op.src and not self._synced(op.src[0], i, at):
                        # the new name is durable, the removal of the old one may not be: both names remain
                        state.unsynced += 1
                        if rng.random() < 0.5:
                            state.dropped += 1
                            _apply(tree, Op("link", ino=op.ino, dirs=op.dirs[-1:], name=op.name), None, None)
                            continue
                    _apply(tree, op, None, None)
                    continue
                state.unsynced += 1
                if op.kind in _DIR_OPS:
                    fate = "applied" if i in keep else "dropped"
                elif op.kind == "write":
                    fate = rng.choice(("applied", "dropped", "torn"))
                else:
                    fate = rng.choice(("applied", "dropped"))
                if fate == "dropped":
                    state.dropped += 1
                    continue
                if fate == "torn":
                    state.torn += 1
                else:
                    state.applied += 1
                _apply(tree, op, fate, rng)
            return state

    def check_model(self) -> None:
        """Raise AssertionError if the model of the live file system differs from the real directory."""
        with self._lock:
            actual, expected = _scan(self.base).files(), self.live.files()
        if actual != expected:
            diff = sorted(p for p in set(actual) | set(expected) if actual.get(p) != expected.get(p))
            raise AssertionError(f"CrashFS missed operations: the model differs from the disk at {diff[:10]}")

    # -- hooks of the proxy (called with the lock held) ----------------------------------------------------

    def _opened(self, path: Any, fd: int, flags: int, created: bool) -> None:
        writable = flags & (_real_os.O_WRONLY | _real_os.O_RDWR)
        parts = self._split(path)
        if parts is None:
            if created or writable:
                raise UnmodelledOperation(f"os.open({path!r}) for writing outside {self.base}")
            self._fds.pop(fd, None)
            return
        if created:
            parent, name = self._parent(path, "open")
            ino = self._new_ino()
            mode = stat.S_IMODE(_real_os.fstat(fd).st_mode)
            self._record(Op("create", ino=ino, dirs=(parent,), name=name, size=mode, info={"kind": "f"}))
        ino_or_none = self._lookup(parts)
        if ino_or_none is None:
            raise UnmodelledOperation(f"os.open({path!r}): the file is unknown to the model")
        self._fds[fd] = ino_or_none
        self._append.discard(fd)
        if flags & _real_os.O_APPEND:
            self._append.add(fd)
        if flags & _real_os.O_TRUNC and writable and not created:
            self._record(Op("trunc", ino=ino_or_none, size=0))

    def _fd(self, fd: int, what: str) -> int:
        ino = self._fds.get(fd)
        if ino is None:
            raise UnmodelledOperation(f"os.{what}({fd}): a descriptor CrashFS did not see opened")
        return ino


def _scan(base: str) -> _Tree:
    """The image of the real directory ``base`` (hard links share an inode; only dirs and files allowed)."""
    tree = _Tree({0: {}}, {0: "d"}, {0: stat.S_IMODE(_real_os.lstat(base).st_mode)}, {})
    by_inode: dict[tuple[int, int], int] = {}

    def walk(path: str, ino: int) -> None:
        for name in sorted(_real_os.listdir(path)):
            full = _real_os.path.join(path, name)
            st = _real_os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                child = len(tree.kinds)
                tree.entries[child], tree.kinds[child] = {}, "d"
                walk(full, child)
            elif stat.S_ISREG(st.st_mode):
                child = by_inode.setdefault((st.st_dev, st.st_ino), len(tree.kinds))
                if child not in tree.kinds:
                    tree.kinds[child] = "f"
                    with open(full, "rb") as f:
                        tree.data[child] = bytearray(f.read())
            else:
                raise UnmodelledOperation(f"{full}: CrashFS models only directories and regular files")
            tree.modes[child] = stat.S_IMODE(st.st_mode)
            tree.entries[ino][name] = child

    walk(base, 0)
    return tree


def _apply(tree: _Tree, op: Op, fate: str | None, rng: random.Random | None) -> None:
    """Apply ``op`` to ``tree``: fully (fate None or "applied"), or torn (garbage over its sectors)."""
    k = op.kind
    if k in _DIR_OPS:
        # a directory whose own mkdir was dropped still gets entries: it is an unreachable inode
        for d in op.dirs:
            tree.entries.setdefault(d, {})
        if op.src is not None:
            tree.entries.setdefault(op.src[0], {})
    if k == "create" or k == "mkdir":
        kind = "d" if k == "mkdir" else "f"
        tree.kinds[op.ino] = kind
        tree.modes[op.ino] = op.size
        if kind == "d":
            tree.entries.setdefault(op.ino, {})
        else:
            tree.data.setdefault(op.ino, bytearray())
        tree.entries[op.dirs[0]][op.name] = op.ino
    elif k == "link":
        tree.entries[op.dirs[-1]][op.name] = op.ino
    elif k == "rename":
        assert op.src is not None
        sdir, sname = op.src
        if tree.entries[sdir].get(sname) == op.ino:
            del tree.entries[sdir][sname]
        tree.entries[op.dirs[-1]][op.name] = op.ino
    elif k == "unlink" or k == "rmdir":
        if tree.entries[op.dirs[0]].get(op.name) == op.ino:
            del tree.entries[op.dirs[0]][op.name]
    elif k == "chmod":
        tree.modes[op.ino] = op.size
    elif k in _DATA_OPS:
        buf = tree.data.setdefault(op.ino, bytearray())  # its create may have been dropped: still an inode
        if k == "trunc":
            if op.size < len(buf):
                del buf[op.size :]
            else:
                buf.extend(bytes(op.size - len(buf)))
            return
        end = op.offset + (op.size if k == "alloc" else len(op.data))
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        if k == "alloc":
            return
        buf[op.offset : end] = op.data
        if fate == "torn":
            assert rng is not None
            lo, hi = op.offset // SECTOR * SECTOR, min(len(buf), -(-end // SECTOR) * SECTOR)
            sectors = list(range(lo, hi, SECTOR))
            bad = [s for s in sectors if rng.random() < 0.5] or [rng.choice(sectors)]
            for s in bad:
                n = min(SECTOR, hi - s)
                garbage = random.Random(rng.random())  # one draw whatever ``n``: seeds replay exactly
                buf[s : s + n] = garbage.randbytes(n) if rng.random() < 0.75 else bytes(n)
    else:  # pragma: no cover - every kind is handled above
        raise AssertionError(k)


class OsProxy:
    """Stands in for the ``os`` module: modelled calls are recorded, read-only ones pass, others raise."""

    def __init__(self, fs: CrashFS) -> None:
        self._fs = fs

    def __getattr__(self, name: str) -> Any:
        value = getattr(_real_os, name)
        if name in _SAFE or not callable(value) or isinstance(value, type | types.ModuleType):
            return value
        raise UnmodelledOperation(f"os.{name} is not modelled by CrashFS (add it, or avoid it)")

    # -- files -----------------------------------------------------------------------------------------------

    def open(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        """``os.open``; a new file is a create operation in its directory."""
        if dir_fd is not None:
            raise UnmodelledOperation("os.open with dir_fd")
        o_tmpfile = getattr(_real_os, "O_TMPFILE", 0)
        if o_tmpfile and flags & o_tmpfile == o_tmpfile:
            raise UnmodelledOperation("os.open with O_TMPFILE")
        fs = self._fs
        with fs._lock:
            created = bool(flags & _real_os.O_CREAT) and not _real_os.path.lexists(path)
            fd = _real_os.open(path, flags, mode)
            try:
                fs._opened(path, fd, flags, created)
            except BaseException:
                _real_os.close(fd)
                raise
            return fd

    def close(self, fd: int) -> None:
        """``os.close``."""
        with self._fs._lock:
            _real_os.close(fd)
            self._fs._fds.pop(fd, None)
            self._fs._append.discard(fd)

    def fdopen(self, fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        """``os.fdopen``, for reading only."""
        if any(c in mode for c in "wax+"):
            raise UnmodelledOperation(f"os.fdopen(mode={mode!r}): writes through a file object")
        return _real_os.fdopen(fd, mode, *args, **kwargs)

    def _position(self, fd: int) -> int:
        if fd in self._fs._append:
            return _real_os.fstat(fd).st_size
        return _real_os.lseek(fd, 0, _real_os.SEEK_CUR)

    def _wrote(self, ino: int, offset: int, data: Any, n: int) -> None:
        raw = bytes(memoryview(data).cast("B")[:n])
        if raw:
            self._fs._record(Op("write", ino=ino, offset=offset, data=raw))

    def write(self, fd: int, data: Any) -> int:
        """``os.write`` at the descriptor's position."""
        with self._fs._lock:
            ino = self._fs._fd(fd, "write")
            offset = self._position(fd)
            n = _real_os.write(fd, data)
            self._wrote(ino, offset, data, n)
            return n

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        """``os.pwrite``."""
        with self._fs._lock:
            ino = self._fs._fd(fd, "pwrite")
            n = _real_os.pwrite(fd, data, offset)
            self._wrote(ino, offset, data, n)
            return n

    def writev(self, fd: int, buffers: Any) -> int:
        """``os.writev`` at the descriptor's position."""
        buffers = list(buffers)
        with self._fs._lock:
            ino = self._fs._fd(fd, "writev")
            offset = self._position(fd)
            n = _real_os.writev(fd, buffers)
            self._wrote(ino, offset, b"".join(bytes(memoryview(b).cast("B")) for b in buffers), n)
            return n

    def pwritev(self, fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        """``os.pwritev``."""
        buffers = list(buffers)
        with self._fs._lock:
            ino = self._fs._fd(fd, "pwritev")
            n = _real_os.pwritev(fd, buffers, offset, flags)
            self._wrote(ino, offset, b"".join(bytes(memoryview(b).cast("B")) for b in buffers), n)
            return n

    def ftruncate(self, fd: int, length: int) -> None:
        """``os.ftruncate``."""
        with self._fs._lock:
            ino = self._fs._fd(fd, "ftruncate")
            _real_os.ftruncate(fd, length)
            self._fs._record(Op("trunc", ino=ino, size=length))

    def posix_fallocate(self, fd: int, offset: int, length: int) -> None:
        """``os.posix_fallocate``: the file grows (zeros) like an unsynced write."""
        with self._fs._lock:
            ino = self._fs._fd(fd, "posix_fallocate")
            _real_os.posix_fallocate(fd, offset, length)
            self._fs._record(Op("alloc", ino=ino, offset=offset, size=length))

    def fsync(self, fd: int) -> None:
        """``os.fsync`` of a file or directory: everything logged on that inode before it is durable."""
        with self._fs._lock:
            ino = self._fs._fds.get(fd)
            _real_os.fsync(fd)
            if ino is not None:
                self._fs._record(Op("sync", ino=ino))

    fdatasync = fsync  # the model keeps sizes with the data: fdatasync persists both as well

    def fchmod(self, fd: int, mode: int) -> None:
        """``os.fchmod`` (modes are kept, always applied)."""
        with self._fs._lock:
            ino = self._fs._fd(fd, "fchmod")
            _real_os.fchmod(fd, mode)
            self._fs._record(Op("chmod", ino=ino, size=stat.S_IMODE(mode)))

    def chmod(self, path: Any, mode: int, *, dir_fd: int | None = None, follow_symlinks: bool = True) -> None:
        """``os.chmod`` (modes are kept, always applied)."""
        if dir_fd is not None:
            raise UnmodelledOperation("os.chmod with dir_fd")
        with self._fs._lock:
            parts = self._fs._split(path)
            ino = None if parts is None else self._fs._lookup(parts)
            if ino is None:
                raise UnmodelledOperation(f"os.chmod({path!r}): unknown to the model")
            _real_os.chmod(path, mode, follow_symlinks=follow_symlinks)
            self._fs._record(Op("chmod", ino=ino, size=stat.S_IMODE(mode)))

    def utime(self, *args: Any, **kwargs: Any) -> None:
        """``os.utime``: passed through (times are not part of the model)."""
        _real_os.utime(*args, **kwargs)

    # -- directories -----------------------------------------------------------------------------------------

    def mkdir(self, path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        """``os.mkdir``: an entry in the parent directory."""
        if dir_fd is not None:
            raise UnmodelledOperation("os.mkdir with dir_fd")
        fs = self._fs
        with fs._lock:
            parent, name = fs._parent(path, "mkdir")
            _real_os.mkdir(path, mode)
            ino = fs._new_ino()
            made = stat.S_IMODE(_real_os.lstat(path).st_mode)
            fs._record(Op("mkdir", ino=ino, dirs=(parent,), name=name, size=made, info={"kind": "d"}))

    def link(
        self,
        src: Any,
        dst: Any,
        *,
        src_dir_fd: int | None = None,
        dst_dir_fd: int | None = None,
        follow_symlinks: bool = True,
    ) -> None:
        """``os.link``: atomic, durable once the destination directory is fsynced."""
        if src_dir_fd is not None or dst_dir_fd is not None:
            raise UnmodelledOperation("os.link with dir_fd")
        fs = self._fs
        with fs._lock:
            parts = fs._split(src)
            ino = None if parts is None else fs._lookup(parts)
            if ino is None:
                raise UnmodelledOperation(f"os.link({src!r}): unknown to the model")
            parent, name = fs._parent(dst, "link")
            _real_os.link(src, dst, follow_symlinks=follow_symlinks)
            fs._record(Op("link", ino=ino, dirs=(parent,), name=name))

    def rename(
        self, src: Any, dst: Any, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None
    ) -> None:
        """``os.rename``/``os.replace``: atomic, durable once both directories are fsynced."""
        if src_dir_fd is not None or dst_dir_fd is not None:
            raise UnmodelledOperation("os.rename with dir_fd")
        fs = self._fs
        with fs._lock:
            sdir, sname = fs._parent(src, "rename")
            ino = fs.live.entries[sdir].get(sname)
            if ino is None:
                raise FileNotFoundError(2, "No such file or directory", src)
            ddir, dname = fs._parent(dst, "rename")
            _real_os.rename(src, dst)
            dirs = (sdir, ddir) if sdir != ddir else (ddir,)
            fs._record(Op("rename", ino=ino, dirs=dirs, name=dname, src=(sdir, sname)))

    replace = rename

    def _remove(self, path: Any, kind: str, dir_fd: int | None) -> None:
        if dir_fd is not None:
            raise UnmodelledOperation(f"os.{kind} with dir_fd")
        fs = self._fs
        with fs._lock:
            parent, name = fs._parent(path, kind)
            ino = fs.live.entries[parent].get(name)
            (_real_os.rmdir if kind == "rmdir" else _real_os.unlink)(path)
            if ino is None:
                raise UnmodelledOperation(f"os.{kind}({path!r}) removed an entry unknown to the model")
            fs._record(Op(kind, ino=ino, dirs=(parent,), name=name))

    def unlink(self, path: Any, *, dir_fd: int | None = None) -> None:
        """``os.unlink``: an entry removed from its directory."""
        self._remove(path, "unlink", dir_fd)

    remove = unlink

    def rmdir(self, path: Any, *, dir_fd: int | None = None) -> None:
        """``os.rmdir``."""
        self._remove(path, "rmdir", dir_fd)
