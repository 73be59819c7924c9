"""The backend protocol: the few operations the store needs from wherever the bytes live.

Call order of a save, which every backend must make safe::

    create(blob) ... create(blob)   # write-once files; durable content before the name appears
    flush()                         # every name created so far is durable
    create(manifest)                # the commit: atomic, refuses to replace
    flush()                         # the commit is durable

``create`` of a path that exists writes nothing, returns False, and refreshes its ``modified`` time, so
that a blob a save reuses looks young to the garbage collector. Locks (``lock``) are the only mutable
files; a save holds the ``gc`` lock shared, garbage collection holds it exclusive.

Two optional methods make a backend faster, and the store uses them where present:
``identity(path)`` (something that changes whenever the file does, cheaper than reading it: lets parsed
manifests be reused) and ``map_concat(paths)`` (several files mapped back to back as one region: a
tensor stored in several chunks loads without a copy). ``LocalBackend`` has both.

Paths are relative POSIX paths built by the store (``blobs/ab/ab12...``, ``checkpoints/step-3.json``);
:func:`check_path` is the gate every backend applies before touching anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cairn.errors import BackendError

__all__ = ["Backend", "BackendLock", "BackendProperties", "Buffer", "check_path"]

Buffer = bytes | bytearray | memoryview
"""What a backend accepts to write."""

_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}"
_PATH_RE = re.compile(rf"(?:{_PART}/){{0,7}}{_PART}")  # at most 8 parts, none empty, "." or ".."


@dataclass(frozen=True, kw_only=True)
class BackendProperties:
    """What a backend can do; the store picks its strategies from these."""

    atomic_create: bool
    """``create`` is atomic and never replaces an existing file (the commit relies on it)."""
    durable: bool
    """Data survives the process (False for the in-memory backend)."""
    mmap: bool
    """``map`` can memory-map files for zero-copy reads."""


def check_path(path: str) -> str:
    """Accept only store-built relative paths: ``a/b/c`` of safe names, no ``..``, no absolute paths."""
    if _PATH_RE.fullmatch(path) is None:
        raise BackendError(f"refusing unsafe store path {path[:200]!r}")
    return path


@runtime_checkable
class BackendLock(Protocol):
    """A held lock; released by :meth:`release` or by leaving a ``with`` block (and by process death)."""

    stale_holder: str | None
    """For an exclusive lock taken over from a process that died holding it: what that process was."""

    def release(self) -> None:
        """Release the lock (idempotent)."""
        ...

    def __enter__(self) -> BackendLock: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """Where a store's files live. See the module docstring for the call order a save follows."""

    @property
    def url(self) -> str:
        """Where this backend points, for messages (a directory, ``memory://name``...)."""
        ...

    @property
    def properties(self) -> BackendProperties:
        """What this backend can do."""
        ...

    def create(self, path: str, data: Buffer, *, replace: bool = False) -> bool:
        """Atomically create ``path`` holding ``data``; False (and nothing written) if it already exists.

        With ``replace=True`` an existing file is replaced atomically instead (readers see the old or
        the new bytes, never a mix) and the result is True: only for manifests saved with overwrite."""
        ...

    def flush(self) -> None:
        """Make every ``create`` so far durable (names included). Errors here are final, never retried."""
        ...

    def size(self, path: str) -> int | None:
        """Size of the file at ``path`` in bytes, or None if there is none."""
        ...

    def read(self, path: str) -> bytes:
        """The whole file (raises ``FileNotFoundError`` if missing)."""
        ...

    def readinto(self, path: str, buffer: memoryview) -> int:
        """Read the file into ``buffer`` (its start, if it is longer); returns the number of bytes read,
        or the file's size when that is more than ``buffer`` holds."""
        ...

    def map(self, path: str) -> memoryview | None:
        """A private, writable (copy-on-write) memory map of the file, or None where unsupported."""
        ...

    def list(self, prefix: str) -> Iterator[str]:
        """Paths of all files below the directory ``prefix`` (recursively), in no particular order."""
        ...

    def delete(self, path: str) -> None:
        """Remove a file; a missing file is not an error."""
        ...

    def modified(self, path: str) -> float | None:
        """When the file was created or last reused by ``create`` (Unix time), or None if it is missing.
        Garbage collection spares files younger than its grace period."""
        ...

    def lock(self, name: str, *, shared: bool = False, blocking: bool = True, owner: str = "") -> BackendLock:
        """Take the lock ``name``: shared or exclusive, waiting for it or raising
        :class:`~cairn.errors.StoreLockedError` at once (``blocking=False``). ``owner`` describes the
        holder for that error. A lock dies with its process: there are no stale locks."""
        ...
