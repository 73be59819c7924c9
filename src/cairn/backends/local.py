"""The local-disk backend: POSIX files with the durable write-once protocol of ``docs/format.md``.

``create``: write a temp file in ``<root>/tmp`` (``O_EXCL``, read-only mode), fsync it, ``link`` it to its
final name (atomic, never replaces), unlink the temp file, and remember the directory; ``flush`` fsyncs
every directory touched since the last flush. Files of 1 MiB and more are written with ``O_DIRECT``
where the file system takes it (through one of a few page-aligned buffers, or straight from data that
is page-aligned already): the data goes to the disk at its own speed instead of through the page
cache, and a checkpoint does not evict the training data's cached pages. An fsync error is final: the
data may be gone, so it is raised, never retried. No path leaves the root: names are checked, the final
component is opened with ``O_NOFOLLOW`` and every directory on the way is checked not to be a symlink.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cairn.backends._mapping import map_files
from cairn.backends.base import BackendProperties, Buffer, check_path
from cairn.errors import BackendError, StoreLockedError

__all__ = ["FileLock", "LocalBackend"]

_O_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # NONBLOCK: a FIFO never hangs us
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_MAX_WRITE = 1 << 30
_DIRECT_MIN = 1 << 20  # files at least this large are written with O_DIRECT, where the file system allows
_DIRECT_BUFFER = 8 << 20  # size of the page-aligned buffers that unaligned data is copied through
_ALIGN = 4096  # O_DIRECT transfers are whole multiples of this (the largest logical block size in use)


class _DirectBuffers:
    """Page-aligned buffers (anonymous maps are page-aligned) for ``O_DIRECT`` writes: at most ``count``,
    made on first use and kept for later saves; a writing thread waits when all are taken, which also
    bounds the direct writes in flight."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def take(self) -> Iterator[mmap.mmap]:
        with self._cond:
            while not self._free and self._made >= self._count:
                self._cond.wait()
            if self._free:
                buffer = self._free.pop()
            else:
                buffer, self._made = mmap.mmap(-1, _DIRECT_BUFFER), self._made + 1
        try:
            yield buffer
        finally:
            with self._cond:
                self._free.append(buffer)
                self._cond.notify()


_direct_buffers = _DirectBuffers(4)


def _write_buffered(fd: int, view: memoryview) -> None:
    while view.nbytes:
        n = os.write(fd, view[:_MAX_WRITE])
        view = view[n:]


def _write_direct(fd: int, view: memoryview) -> bool:
    """Write ``view`` through ``O_DIRECT`` (set on ``fd`` here); False if the file system refuses it,
    having written nothing. The last block is padded and the file truncated to the exact size."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return False
    with _direct_buffers.take() as buffer:
        return _copy_through(fd, flags, view, buffer)


def _copy_through(fd: int, flags: int, view: memoryview, buffer: mmap.mmap) -> bool:
    """The body of :func:`_write_direct`, with its aligned ``buffer``. Data that is itself page-aligned
    (an async save's staging buffer) goes to the disk straight from where it is; the rest is copied
    through ``buffer``."""
    dst = np.frombuffer(buffer, dtype=np.uint8)
    src = np.frombuffer(view, dtype=np.uint8)
    pos, total = 0, view.nbytes
    if src.ctypes.data % mmap.PAGESIZE == 0 and total >= _ALIGN:
        aligned = total - total % _ALIGN
        try:
            while pos < aligned:
                pos += os.write(fd, view[pos : min(aligned, pos + _MAX_WRITE)])
        except OSError as e:
            if e.errno != errno.EINVAL or pos:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)  # the file system took the flag but not the transfer
            return False
        if pos % _ALIGN:  # a short write (the disk filling up): finish buffered, which reports why
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            _write_buffered(fd, view[pos:])
            return True
    while pos < total:
        n = min(_DIRECT_BUFFER, total - pos)
        np.copyto(dst[:n], src[pos : pos + n])  # numpy copies without holding the GIL
        padded = -(-n // _ALIGN) * _ALIGN
        try:
            done = os.write(fd, memoryview(buffer)[:padded])
        except OSError as e:
            if e.errno != errno.EINVAL or pos:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)  # the file system took the flag but not the transfer
            return False
        if done < padded:  # a short write (the disk filling up): finish buffered, which reports why
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            _write_buffered(fd, view[pos + done :])
            break
        pos += n
    if total % _ALIGN:
        os.ftruncate(fd, total)
    return True


Stamp = tuple[int, int]
"""What identifies one file behind a name: inode number and change time (ns)."""


def _stamp(path: str) -> Stamp | None:
    """The :data:`Stamp` of ``path`` (not following a symlink), or None if there is nothing there (or it
    cannot be looked at: then the write that follows reports why)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


_FSYNC_THREADS = 16
_DURABLE: dict[str, dict[str, Stamp]] = {}
_DURABLE_LOCK = threading.Lock()
_DURABLE_MAX = 1 << 20  # names remembered per store; beyond, forgotten (they are only flushed again)


def _durable_names(root: str) -> dict[str, Stamp]:
    """The names under ``root`` this process made durable (their stamps then), shared by its handles."""
    with _DURABLE_LOCK:
        names = _DURABLE.setdefault(root, {})
        if len(names) > _DURABLE_MAX:
            names.clear()
        return names


def _fsync_dir(path: str) -> tuple[str, OSError] | None:
    """fsync directory ``path``; the error, if any (returned, so that a pool can run many)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return path, e
    return None


def _error(op: str, path: str, e: OSError) -> BackendError:
    hint = " (the disk is full: free space and save again)" if e.errno == errno.ENOSPC else ""
    err = BackendError(e.errno, f"{op} {path}: {e.strerror or e}{hint}")
    err.filename = path
    return err


class FileLock:
    """An ``flock`` on a file in ``<root>/locks/``; the kernel drops it if the process dies."""

    def __init__(self, fd: int, stale_holder: str | None, *, exclusive: bool) -> None:
        self._fd: int | None = fd
        self._exclusive = exclusive
        self.stale_holder = stale_holder

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                if self._exclusive:  # an orderly release leaves no holder behind: content means a crash
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LocalBackend:
    """Files under a local directory ``root``; ``direct_io=False`` writes every file through the page
    cache (the default uses ``O_DIRECT`` for large files where the file system supports it)."""

    def __init__(self, root: str | os.PathLike[str], *, direct_io: bool = True) -> None:
        # the root itself may be a symlink (scratch directories on clusters often are); nothing inside may
        self.root = os.path.realpath(os.fspath(root))
        self._dirty: set[str] = set()
        # name -> its stamp (inode, ctime), waiting for the next flush to become durable / made durable by
        # a flush in this process: nothing to redo while the stamp is unchanged (another process may have
        # deleted and re-created the name since, unflushed; inode numbers alone are reused)
        self._pending: dict[str, Stamp | None] = {}
        self._durable = _durable_names(self.root)  # shared by the handles of this process
        self._anchored: set[str] = set()  # directories whose whole chain of entries up to the root is durable
        self._safe_dirs: dict[str, str] = {}  # relative path -> absolute path of checked directories
        self._scanned: set[str] = set()  # checked directories whose subdirectories were all checked
        self._lock = threading.Lock()
        self._failed: tuple[int | None, str] | None = None  # (errno, what) of a failed fsync: final
        self._direct = direct_io

    @property
    def url(self) -> str:
        return self.root

    @property
    def properties(self) -> BackendProperties:
        return BackendProperties(atomic_create=True, durable=True, mmap=True)

    # -- paths ----------------------------------------------------------------------------------------

    def _dir(self, rel: str, create: bool) -> str:
        """The absolute path of directory ``rel`` (may be ""), checked to be a real directory in the root."""
        known = self._safe_dirs.get(rel)
        if known is not None:
            return known
        full = os.path.join(self.root, rel) if rel else self.root
        if rel:
            parent_rel = rel.rpartition("/")[0]
            parent = self._dir(parent_rel, create)
            if not create and parent_rel not in self._scanned:
                self._scan(parent_rel, parent)  # checks all its subdirectories in one pass
                known = self._safe_dirs.get(rel)
                if known is not None:
                    return known
            if create:
                try:
                    os.mkdir(full, 0o755)
                    with self._lock:
                        self._dirty.add(parent)
                except FileExistsError:
                    pass
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            if create and not rel:
                self._make_root()
                st = os.lstat(full)
            else:
                raise
        if not stat.S_ISDIR(st.st_mode):
            raise BackendError(f"{full} is not a directory (symlinks are not followed inside a store)")
        with self._lock:
            self._safe_dirs[rel] = full
        return full

    def _scan(self, rel: str, full: str) -> None:
        """Mark the real subdirectories of checked directory ``rel`` as checked, from one listing (a
        store's ``blobs/`` holds up to 256: one ``lstat`` each would cost more than the reads they serve).
        Symbolic links are not directories here; what the listing cannot tell is checked one by one."""
        prefix = f"{rel}/" if rel else ""
        found: dict[str, str] = {}
        with contextlib.suppress(OSError), os.scandir(full) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    found[prefix + entry.name] = entry.path
        with self._lock:
            self._safe_dirs.update(found)
            self._scanned.add(rel)

    def _make_root(self) -> None:
        """Create the root and any missing ancestors, each new entry marked for a directory fsync."""
        missing = []
        path = self.root
        while not os.path.lexists(path):
            missing.append(path)
            path = os.path.dirname(path)
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o755)
            with self._lock:
                self._dirty.add(os.path.dirname(d))

    def _mark_chain(self, directory: str, name: str | None = None, stamp: Stamp | None = None) -> None:
        """Mark ``directory`` for fsync, and its parents up to one known durable: names others created
        (a racing writer, a crashed process) are made durable before our commit relies on them."""
        with self._lock:
            if name is not None:
                self._pending[name] = stamp
            self._dirty.add(directory)
            while directory not in self._anchored and len(directory) > len(self.root):
                directory = os.path.dirname(directory)
                self._dirty.add(directory)

    def _check_usable(self) -> None:
        if self._failed is not None:
            code, what = self._failed
            raise BackendError(
                code,
                f"{self.root}: an earlier fsync failed ({what}); data written since may be lost, so "
                "this store handle refuses to write more. Check the disk, then open the store again.",
            )

    def _file(self, path: str, create_parent: bool = False) -> str:
        check_path(path)
        parent_rel, _, name = path.rpartition("/")
        parent = self._safe_dirs.get(parent_rel) or self._dir(parent_rel, create_parent)
        return f"{parent}{name}" if parent.endswith("/") else f"{parent}/{name}"  # os.path.join, faster

    # -- writing --------------------------------------------------------------------------------------

    def create(self, path: str, data: Buffer, *, replace: bool = False) -> bool:
        self._check_usable()
        try:
            final = self._file(path, create_parent=True)
        except BackendError:
            raise
        except OSError as e:
            raise _error("create directory for", path, e) from None
        existing = _stamp(final)
        if existing is not None and not replace:
            with contextlib.suppress(OSError):  # refresh its age for the garbage collector (git's trick)
                os.utime(final, follow_symlinks=False)
            refreshed = _stamp(final)  # (the refresh changed its ctime)
            with self._lock:
                durable = self._durable.get(final) == existing
                if durable and refreshed is not None:
                    self._durable[final] = refreshed
            if not durable:
                self._mark_chain(os.path.dirname(final), final, refreshed)
            return False
        try:
            tmp_dir = self._dir("tmp", create=True)
        except OSError as e:
            raise _error("create", "tmp", e) from None
        tmp = os.path.join(tmp_dir, f"{uuid.uuid4().hex}.tmp")
        try:
            fd = os.open(tmp, _O_CREATE, 0o444)
        except OSError as e:
            raise _error("create", tmp, e) from None
        try:
            try:
                view = memoryview(data).cast("B")
                if not (view.nbytes >= _DIRECT_MIN and self._direct and _write_direct(fd, view)):
                    if view.nbytes >= _DIRECT_MIN:
                        self._direct = False  # refused once: this file system does not do O_DIRECT
                    _write_buffered(fd, view)
                try:
                    os.fsync(fd)
                except OSError as e:
                    self._failed = (e.errno, f"fsync {path}: {e.strerror or e}")
                    raise
            finally:
                os.close(fd)
            try:
                if replace:
                    os.replace(tmp, final)  # atomic: readers see the old file or the new one
                else:
                    os.link(tmp, final)  # atomic and never replaces: the commit of a new name
                created = True
            except FileExistsError:
                created = False
        except OSError as e:
            raise _error("write", path, e) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._mark_chain(os.path.dirname(final), final, _stamp(final))  # also when a racer linked it first
        return created

    def flush(self) -> None:
        self._check_usable()
        with self._lock:
            dirs, self._dirty = self._dirty, set()
            names, self._pending = self._pending, {}
        # deepest first, so a new directory's entry is synced after its contents; one depth at a time, the
        # directories of a depth all at once (a save touches up to 256 blob directories)
        levels = sorted({d.count(os.sep) for d in dirs}, reverse=True)
        for depth in levels:
            level = [d for d in dirs if d.count(os.sep) == depth]
            if len(level) > 1:
                with ThreadPoolExecutor(
                    min(len(level), _FSYNC_THREADS), thread_name_prefix="cairn-fsync"
                ) as pool:
                    errors = [e for e in pool.map(_fsync_dir, level) if e is not None]
            else:
                errors = [e for e in map(_fsync_dir, level) if e is not None]
            if errors:
                d, e = errors[0]
                with self._lock:
                    self._dirty.update(x for x in dirs if x.count(os.sep) <= depth)
                    self._pending.update(names)
                    self._failed = (e.errno, f"fsync {d}: {e.strerror or e}")  # final: never retried
                raise _error("fsync directory", d, e) from None
        with self._lock:  # every flushed directory's chain up to the root was in this flush, or anchored
            self._anchored.update(dirs)
            self._durable.update((n, i) for n, i in names.items() if i is not None)

    # -- reading --------------------------------------------------------------------------------------

    def _open(self, path: str) -> int:
        return self._open_stat(path)[0]

    def _open_stat(self, path: str) -> tuple[int, os.stat_result]:
        """An open descriptor of regular file ``path`` and its ``fstat``."""
        try:
            fd = os.open(self._file(path), _O_READ)
        except BackendError:
            raise
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file", os.path.join(self.root, path)) from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise BackendError(errno.ELOOP, f"{path} is a symlink; a store never follows links") from None
            raise _error("open", path, e) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise BackendError(f"{path} is not a regular file; a store holds only regular files")
        return fd, st

    def _lstat(self, path: str) -> os.stat_result | None:
        """``lstat`` of store path ``path``; None when nothing is there."""
        try:
            return os.lstat(self._file(path))
        except BackendError:
            raise
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _error("stat", path, e) from None

    def size(self, path: str) -> int | None:
        st = self._lstat(path)
        if st is None:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise BackendError(f"{path} is not a regular file (symlinks are not followed inside a store)")
        return st.st_size

    def identity(self, path: str) -> tuple[int, int, int] | None:
        """(size, modification time in ns, inode) of a file, or None: changes whenever the file does."""
        st = self._lstat(path)
        return None if st is None else (st.st_size, st.st_mtime_ns, st.st_ino)

    def read(self, path: str) -> bytes:
        fd = self._open(path)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read()
        except OSError as e:
            raise _error("read", path, e) from None
        finally:
            os.close(fd)

    def readinto(self, path: str, buffer: memoryview) -> int:
        fd, st = self._open_stat(path)
        try:
            view, total = buffer.cast("B"), 0
            while total < view.nbytes:
                n = os.readv(fd, [view[total : total + _MAX_WRITE]])
                if n == 0:
                    break
                total += n
            return total if total < view.nbytes else max(total, st.st_size)
        except OSError as e:
            raise _error("read", path, e) from None
        finally:
            os.close(fd)

    def map(self, path: str) -> memoryview | None:
        fd, st = self._open_stat(path)
        try:
            if st.st_size == 0:
                return None
            return map_files([fd], [st.st_size]) or memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_COPY))
        except OSError as e:
            raise _error("map", path, e) from None
        finally:
            os.close(fd)

    def map_concat(self, paths: list[str]) -> memoryview | None:
        """Like :meth:`map`, for several files mapped back to back as one contiguous region (each file
        but the last a whole number of pages); None where that cannot be done."""
        fds: list[int] = []
        try:
            for path in paths:
                fds.append(self._open(path))
            return map_files(fds, [os.fstat(fd).st_size for fd in fds])
        except (BackendError, FileNotFoundError):
            raise
        except OSError as e:
            raise _error("map", paths[min(len(fds), len(paths) - 1)], e) from None
        finally:
            for fd in fds:
                os.close(fd)

    def list(self, prefix: str) -> Iterator[str]:
        check_path(prefix)
        top = os.path.join(self.root, prefix)
        try:
            if not stat.S_ISDIR(os.lstat(top).st_mode):
                return
        except FileNotFoundError:
            return
        except OSError as e:
            raise _error("list", prefix, e) from None
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            dirnames.sort()
            for name in sorted(filenames):
                yield f"{rel}/{name}"

    def modified(self, path: str) -> float | None:
        st = self._lstat(path)
        return None if st is None else st.st_mtime

    def lock(self, name: str, *, shared: bool = False, blocking: bool = True, owner: str = "") -> FileLock:
        check_path(name)
        self._check_usable()
        try:
            path = os.path.join(self._dir("locks", create=True), f"{name}.lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except BackendError:
            raise
        except OSError as e:
            raise _error("open lock", name, e) from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise StoreLockedError(
                f"{self.root} is locked ({name}) by {holder or 'another process'}; only one writer at a "
                "time. Stop the other one, or use another directory."
            ) from None
        except OSError as e:
            os.close(fd)
            raise _error("lock", name, e) from None
        stale = None
        if not shared:
            previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            stale = previous or None  # we hold it exclusively, so whoever wrote this is gone
            os.ftruncate(fd, 0)
            os.pwrite(fd, owner.encode("utf-8"), 0)
        return FileLock(fd, stale, exclusive=not shared)

    def delete(self, path: str) -> None:
        try:
            os.unlink(self._file(path))
        except FileNotFoundError:
            return
        except OSError as e:
            raise _error("delete", path, e) from None
        full = os.path.join(self.root, path)
        with self._lock:
            self._durable.pop(full, None)
        self._mark_chain(os.path.dirname(full))
