"""In-process reader/writer locks, for backends whose files live in this process (the memory backend)."""

from __future__ import annotations

import os
import socket
import threading
import time

from cairn.errors import StoreLockedError

__all__ = ["ProcessLock", "RWLock", "lock_owner"]


def lock_owner(what: str) -> str:
    """Who takes a lock, for the error another process gets: ``"manager pid 12 on host since ..."``."""
    return f"{what} pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


class RWLock:
    """Many shared holders or one exclusive holder."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self.owner = ""

    def acquire(self, shared: bool, blocking: bool, owner: str, where: str) -> None:
        with self._cond:
            while self._exclusive or (not shared and self._shared):
                if not blocking:
                    raise StoreLockedError(f"{where} is locked by {self.owner or 'another user'}")
                self._cond.wait()
            if shared:
                self._shared += 1
            else:
                self._exclusive, self.owner = True, owner

    def release(self, shared: bool) -> None:
        with self._cond:
            if shared:
                self._shared -= 1
            else:
                self._exclusive, self.owner = False, ""
            self._cond.notify_all()


class ProcessLock:
    """A held :class:`RWLock`, as a :class:`~cairn.backends.base.BackendLock`."""

    stale_holder: str | None = None

    def __init__(self, lock: RWLock, shared: bool) -> None:
        self._lock: RWLock | None = lock
        self._shared = shared

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release(self._shared)
            self._lock = None

    def __enter__(self) -> ProcessLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
