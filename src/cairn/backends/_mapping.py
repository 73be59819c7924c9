"""Several files memory-mapped back to back into one contiguous, private, writable region (Linux, macOS).

A tensor stored in several chunk files can then be one zero-copy array, as a single-file format gets from
one ``mmap``: an anonymous region of the total size is reserved, and each file is mapped over its part
with ``MAP_FIXED``. Every part but the last must be a whole number of pages. The region is unmapped when
the last array viewing it is gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from typing import Any

__all__ = ["PAGE", "map_files"]

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # the same value on Linux and macOS
_FAILED = ctypes.c_void_p(-1).value


def _libc() -> Any:
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:  # pragma: no cover - no C library to load
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_LIBC = _libc()


class _Region:
    """Owns a mapped region; unmaps it when collected."""

    def __init__(self, address: int, size: int) -> None:
        self.address, self.size = address, size

    def __del__(self) -> None:
        _LIBC.munmap(self.address, self.size)


def map_files(fds: list[int], sizes: list[int]) -> memoryview | None:
    """One private, writable (copy-on-write) view of the files ``fds`` (of ``sizes`` bytes) back to back,
    or None where that cannot be done (no C library, a part that is not whole pages, a failed map)."""
    total = sum(sizes)
    if _LIBC is None or total == 0 or any(size % PAGE for size in sizes[:-1]):
        return None
    prot, private = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE
    if len(fds) == 1:  # one file: no region to reserve first
        address = _LIBC.mmap(None, total, prot, private, fds[0], 0)
        if address in (None, _FAILED):
            return None
        region = _Region(address, total)
    else:
        address = _LIBC.mmap(None, total, prot, private | mmap.MAP_ANONYMOUS, -1, 0)
        if address in (None, _FAILED):
            return None
        region = _Region(address, total)
        offset = 0
        for fd, size in zip(fds, sizes, strict=True):
            if _LIBC.mmap(address + offset, size, prot, private | _MAP_FIXED, fd, 0) != address + offset:
                return None  # the region (anonymous where a file did not map) is unmapped with ``region``
            offset += size
    array = (ctypes.c_char * total).from_address(address)
    array._cairn_region = region  # type: ignore[attr-defined]  # the region lives as long as the array
    return memoryview(array).cast("B")
