"""An in-memory backend, for tests and dry runs. Thread-safe; nothing survives the process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from cairn.backends._locks import ProcessLock, RWLock
from cairn.backends.base import BackendProperties, Buffer, check_path

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """Files in a dict. ``MemoryBackend()`` starts empty; pass ``files`` to share contents between two."""

    def __init__(self, name: str = "default", files: dict[str, bytes] | None = None) -> None:
        self._name = name
        self.files: dict[str, bytes] = {} if files is None else files
        self._lock = threading.Lock()
        self.mtimes: dict[str, float] = {}
        """When each file was created or last reused (tests may set these to age files)."""

    @property
    def url(self) -> str:
        return f"memory://{self._name}"

    @property
    def properties(self) -> BackendProperties:
        return BackendProperties(atomic_create=True, durable=False, mmap=False)

    def create(self, path: str, data: Buffer, *, replace: bool = False) -> bool:
        check_path(path)
        payload = bytes(data)
        with self._lock:
            self.mtimes[path] = time.time()
            if path in self.files and not replace:
                return False
            self.files[path] = payload
            return True

    def flush(self) -> None:
        return None

    def size(self, path: str) -> int | None:
        check_path(path)
        data = self.files.get(path)
        return None if data is None else len(data)

    def read(self, path: str) -> bytes:
        check_path(path)
        try:
            return self.files[path]
        except KeyError:
            raise FileNotFoundError(f"{self.url}/{path}") from None

    def readinto(self, path: str, buffer: memoryview) -> int:
        data = self.read(path)
        n = min(len(data), buffer.nbytes)
        buffer[:n] = data[:n]
        return len(data)

    def map(self, path: str) -> memoryview | None:
        return None

    def list(self, prefix: str) -> Iterator[str]:
        check_path(prefix)
        start = prefix + "/"
        with self._lock:
            names = [p for p in self.files if p.startswith(start)]
        return iter(names)

    def delete(self, path: str) -> None:
        check_path(path)
        with self._lock:
            self.files.pop(path, None)
            self.mtimes.pop(path, None)

    def modified(self, path: str) -> float | None:
        check_path(path)
        if path not in self.files:
            return None
        return self.mtimes.get(path, 0.0)

    def lock(self, name: str, *, shared: bool = False, blocking: bool = True, owner: str = "") -> ProcessLock:
        check_path(name)
        with _REGISTRY_LOCK:
            rw = _LOCKS.setdefault((id(self.files), name), RWLock())
        rw.acquire(shared, blocking, owner, f"{self.url} (lock {name})")
        return ProcessLock(rw, shared)


_REGISTRY_LOCK = threading.Lock()
_LOCKS: dict[tuple[int, str], RWLock] = {}
