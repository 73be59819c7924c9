"""Several files memory-mapped back to back into one contiguous, private, writable region (Linux, macOS).

A tensor stored in several chunk files can then be one zero-copy array, as a single-file format gets from
one ``mmap``: an anonymous region of the total size is reserved, and each file is mapped over its part
with ``MAP_FIXED`` (a single file is mapped where the kernel places it, when that place is aligned as
below). Every part but the last must be a whole number of pages. The region is unmapped when the last
array viewing it is gone.

On Linux a region of at least one huge page starts on a huge-page boundary and is advised
``MADV_HUGEPAGE`` before anything is read through it: a fault then reads the file into the page cache in
huge-page-sized folios (where the file system has large folios: ext4 since Linux 6.16, XFS) and maps
each with one page-table entry instead of 512. Measured on the development VM (Linux 6.18, ext4),
reading one byte of every page of the 40 largest chunk files of a 1.49 GB state (594 MB): 61 ms instead
of 195 ms cold, 3 ms instead of 66-84 ms warm (281 faults instead of 8,800); whole loads in
``bench/README.md``. The page cache keeps those folios, so later maps of the same files, by any
process, fault in huge pages too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from typing import Any

import numpy as np

__all__ = ["HUGE_PAGE", "PAGE", "map_files", "populate"]

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # the same value on Linux and macOS
_FAILED = ctypes.c_void_p(-1).value
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
_MADV_POPULATE_READ: int | None = 22 if sys.platform.startswith("linux") else None  # Linux 5.14+


def _huge_page_size() -> int:
    """The size of a PMD-mapped transparent huge page (2 MiB on x86-64), or 0 where there are none."""
    if _MADV_HUGEPAGE is None:
        return 0
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "rb") as f:
            size = int(f.read())
    except (OSError, ValueError):
        return 0
    return size if size > PAGE and size & (size - 1) == 0 else 0


HUGE_PAGE = _huge_page_size()


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
    libc.madvise.restype = ctypes.c_int
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()


class _Region:
    """Owns a mapped region; unmaps it when collected."""

    def __init__(self, address: int, size: int) -> None:
        self.address, self.size = address, size

    def __del__(self) -> None:
        _LIBC.munmap(self.address, self.size)


def _reserve(total: int, align: int) -> _Region | None:
    """An anonymous, private region of ``total`` bytes that starts on a multiple of ``align``, to map files
    over (the unused head and tail of a larger reservation are given back)."""
    prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    extra = align - PAGE
    address = _LIBC.mmap(None, total + extra, prot, flags, -1, 0)
    if address in (None, _FAILED):
        return None
    start = -(-address // align) * align
    if start > address:
        _LIBC.munmap(address, start - address)
    if address + extra > start:
        _LIBC.munmap(start + total, address + extra - start)
    return _Region(start, total)


def _map_one(fd: int, size: int, align: int) -> _Region | None:
    """``fd`` mapped alone where the kernel puts it, if that is on a multiple of ``align`` (Linux aligns
    large maps of files on ext4 and XFS by itself); None otherwise."""
    prot, private = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE
    address = _LIBC.mmap(None, size, prot, private, fd, 0)
    if address in (None, _FAILED):
        return None
    if address % align:
        _LIBC.munmap(address, size)
        return None
    return _Region(address, size)


def map_files(fds: list[int], sizes: list[int]) -> memoryview | None:
    """One private, writable (copy-on-write) view of the files ``fds`` (of ``sizes`` bytes) back to back,
    or None where that cannot be done (no C library, a part that is not whole pages, a failed map). A view
    of at least one huge page starts on a huge-page boundary and is advised ``MADV_HUGEPAGE``."""
    total = sum(sizes)
    if _LIBC is None or total == 0 or any(size % PAGE for size in sizes[:-1]):
        return None
    huge = bool(HUGE_PAGE) and total >= HUGE_PAGE
    align = HUGE_PAGE if huge else PAGE
    region = _map_one(fds[0], total, align) if len(fds) == 1 else None
    if region is None:
        region = _reserve(total, align)
        if region is None:
            return None
        prot, fixed = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED
        offset = 0
        for fd, size in zip(fds, sizes, strict=True):
            if _LIBC.mmap(region.address + offset, size, prot, fixed, fd, 0) != region.address + offset:
                return None  # the region (anonymous where a file did not map) is unmapped with ``region``
            offset += size
    if huge and _MADV_HUGEPAGE is not None:
        _LIBC.madvise(region.address, total, _MADV_HUGEPAGE)  # advice: a refusal changes nothing
    array = (ctypes.c_char * total).from_address(region.address)
    array._cairn_region = region  # type: ignore[attr-defined]  # the region lives as long as the array
    return memoryview(array).cast("B")


def populate(view: memoryview) -> None:
    """Read the pages of a mapped ``view`` in now (``MADV_POPULATE_READ``, Linux 5.14+), so that threads
    can fault a map in in parallel; where that is not available, nothing (the pages fault in when used)."""
    if _LIBC is None or _MADV_POPULATE_READ is None or view.nbytes == 0:
        return
    address = np.frombuffer(view, dtype=np.uint8).ctypes.data  # (a read-only view has an address too)
    start = address - address % PAGE
    _LIBC.madvise(start, address + view.nbytes - start, _MADV_POPULATE_READ)
