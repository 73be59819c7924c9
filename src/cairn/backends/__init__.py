"""Where a store's bytes live: the backend protocol and the built-in backends."""

from __future__ import annotations

import os

from cairn.backends.base import Backend, BackendProperties, check_path
from cairn.backends.local import LocalBackend
from cairn.backends.memory import MemoryBackend

__all__ = ["Backend", "BackendProperties", "LocalBackend", "MemoryBackend", "check_path", "open_backend"]


def open_backend(target: str | os.PathLike[str] | Backend) -> Backend:
    """The backend for ``target``: a backend as is, ``memory://NAME`` (a fresh in-memory store), or a path."""
    if isinstance(target, str | os.PathLike):
        path = os.fspath(target)
        if path.startswith("memory://"):
            return MemoryBackend(path.removeprefix("memory://"))
        if "://" in path:
            raise ValueError(f"{path}: no backend for this URL scheme yet; use a local directory")
        return LocalBackend(path)
    return target
