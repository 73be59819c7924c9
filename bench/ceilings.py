"""What the machine itself can do: disk write (O_DIRECT, buffered + fsync), disk read (cold, warm),
memcpy and BLAKE3 hashing. Each function moves ``nbytes`` and returns its seconds (None if unsupported).
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from harness import Evictor, MiB, fsync_tree

try:
    import blake3
except ImportError:  # the hashing rows are then left out
    blake3 = None

BLOCK = 64 * MiB
ALIGN = 4096


class Ceilings:
    """Random 64 MiB blocks (four, cycled) written, read, copied and hashed ``nbytes`` at a time."""

    def __init__(self, root: Path, nbytes: int, seed: int) -> None:
        self.path = root / "ceiling.bin"
        self.nbytes = -(-nbytes // ALIGN) * ALIGN  # O_DIRECT needs whole blocks
        self.pool = []
        for i in range(min(4, -(-self.nbytes // BLOCK))):
            buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
            buf.write(np.random.default_rng(seed + i).bytes(BLOCK))
            self.pool.append(buf)
        self.buffer = memoryview(mmap.mmap(-1, BLOCK))  # the read target, allocated (and faulted in) once
        self.buffer[:] = self.pool[0]

    def _blocks(self) -> list[memoryview]:
        out, left, i = [], self.nbytes, 0
        while left:
            out.append(memoryview(self.pool[i % len(self.pool)])[: min(BLOCK, left)])
            left -= out[-1].nbytes
            i += 1
        return out

    def _write(self, flags: int) -> float:
        self.path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
        try:
            for view in self._blocks():
                while view.nbytes:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        fsync_tree(self.path)
        return time.perf_counter() - t0

    def write_direct(self) -> float | None:
        """O_DIRECT sequential write of aligned 64 MiB buffers, then fsync (bypasses the page cache)."""
        if not hasattr(os, "O_DIRECT"):
            return None
        try:
            return self._write(os.O_DIRECT)
        except OSError:  # e.g. tmpfs refuses O_DIRECT
            return None

    def write_buffered(self) -> float:
        """``os.write`` through the page cache, then fsync of the file and its directory."""
        return self._write(0)

    def read(self) -> float:
        """``os.readv`` of the file into one 64 MiB buffer allocated beforehand."""
        t0 = time.perf_counter()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            total = 0
            while n := os.readv(fd, [self.buffer]):
                total += n
        finally:
            os.close(fd)
        assert total == self.nbytes, (total, self.nbytes)
        return time.perf_counter() - t0

    def memcpy(self) -> float:
        """Copy ``nbytes`` from the pool into the (already faulted-in) buffer."""
        dst = np.frombuffer(self.buffer, dtype=np.uint8)
        t0 = time.perf_counter()
        for view in self._blocks():
            np.copyto(dst[: view.nbytes], np.frombuffer(view, dtype=np.uint8))
        return time.perf_counter() - t0

    def hash(self, threads: int) -> float | None:
        """BLAKE3 over ``nbytes`` with ``threads`` threads (``blake3.AUTO``: -1)."""
        if blake3 is None:
            return None
        t0 = time.perf_counter()
        for view in self._blocks():
            blake3.blake3(view, max_threads=threads).digest()
        return time.perf_counter() - t0

    def run(self, evict: Evictor | None) -> dict[str, float | None]:
        """Every ceiling once: name -> seconds (None: not measurable here)."""
        out: dict[str, float | None] = {"disk: write, O_DIRECT + fsync": self.write_direct()}
        out["disk: write, buffered + fsync"] = self.write_buffered()
        if evict is not None:
            evict([self.path])
            out["disk: read, cold"] = self.read()
        out["disk: read, warm"] = self.read()
        out["memcpy"] = self.memcpy()
        out["blake3, 1 thread"] = self.hash(1)
        out["blake3, all cores"] = self.hash(-1)
        self.path.unlink()
        return out


WRITE = ("disk: write, O_DIRECT + fsync", "disk: write, buffered + fsync")
READ_COLD, READ_WARM = "disk: read, cold", "disk: read, warm"

CeilingFn = Callable[[], float | None]
