"""Atomic, durable replacement of one ordinary file outside a store (exports, safetensors, plots)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import IO

from cairn.errors import BackendError

__all__ = ["atomic_file"]


def _write_error(path: str, e: OSError) -> BackendError:
    return BackendError(e.errno, f"cannot write {path}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A new file that replaces ``path`` only once complete and durable: a temporary file in the same
    directory, fsynced, renamed over ``path``, then the directory fsynced. An error (raised as
    :class:`~cairn.BackendError` for I/O) leaves ``path`` as it was and no temporary file behind."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, BackendError):
            raise _write_error(path, e) from None
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise _write_error(path, e) from None
