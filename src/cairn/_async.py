"""Async saves: stage the state (one copy, in a buffer reused from save to save), then write it in a
background thread while training goes on.

At most one save is in flight: the next one first waits for it, so at most one staged copy of the
state exists. A failure in the thread is never swallowed: it is raised by the next ``save()``,
``wait()`` or ``close()``. The thread is not a daemon, so a process that exits normally with a save in
flight completes it first; a process that is killed leaves no trace of it (the manifest is the commit).
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from cairn._store import PreparedSave

__all__ = ["AsyncWriter"]

_WRITERS: weakref.WeakSet[AsyncWriter] = weakref.WeakSet()
_registered = False
_PIECE = 32 << 20  # staging copies are cut into pieces of this size, copied by all cores at once
_COPIERS = max(1, min(8, os.cpu_count() or 1))
_BACKGROUND_NICE = 19


def _allocate(nbytes: int) -> np.ndarray:
    """A staging buffer of ``nbytes``, every page already touched (the kernel's page faults and zeroing
    cost about as much as the copy itself, so a reservation made ahead of time halves the first save).
    (Transparent huge pages were measured too: direct compaction made the first fill take 0.5-2.5 s.)"""
    buffer = np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8)  # page-aligned: see stage()
    buffer[:: mmap.PAGESIZE] = 0
    return buffer[:nbytes]


Piece = tuple[np.ndarray, np.ndarray]  # (destination, source)


def _split(pieces: list[Piece], n: int) -> list[list[Piece]]:
    """``pieces`` cut into at most ``n`` runs of about equal bytes, in order (one per copying thread: a
    hand-off per piece would cost more than copying the many small ones)."""
    total = sum(dest.nbytes for dest, _ in pieces)
    groups: list[list[Piece]] = [[] for _ in range(max(1, n))]
    done = 0
    for piece in pieces:
        groups[min(len(groups) - 1, done * len(groups) // max(1, total))].append(piece)
        done += piece[0].nbytes
    return [group for group in groups if group]


def _copy_all(pieces: list[Piece]) -> None:
    for dest, src in pieces:
        np.copyto(dest, src)


def _page_up(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


def _lower_priority() -> None:
    """Let training's threads have the CPU first: the background save runs at the lowest priority."""
    with contextlib.suppress(OSError, AttributeError):  # (per-thread nice: Linux)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _BACKGROUND_NICE)


def _wait_at_exit() -> None:
    """At interpreter exit, finish the saves in flight (before the thread pools they use shut down)."""
    for writer in list(_WRITERS):
        try:
            writer.wait()
        except BaseException as e:  # nobody is left to raise it to: say it
            print(f"cairn: an async save in flight at exit failed: {e}", file=sys.stderr)


def _register_exit_wait() -> None:
    global _registered
    if not _registered:
        _registered = True
        # threading's exit hooks run before the interpreter joins threads and before concurrent.futures
        # stops accepting work (its hook was registered earlier; hooks run last-registered first)
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(_wait_at_exit)
        else:  # pragma: no cover - other Pythons
            atexit.register(_wait_at_exit)


class AsyncWriter:
    """Runs one background commit at a time and remembers its error for the caller."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._staging = np.empty(0, dtype=np.uint8)
        self._reserving: threading.Thread | None = None

    def reserve(self, sizes: list[int]) -> None:
        """Allocate (and fault in) a staging buffer for arrays of ``sizes`` bytes in the background, so
        that the first save only copies. Called when the state becomes known (``restore()``)."""
        nbytes = sum(_page_up(n) for n in sizes)
        if self._staging.nbytes >= nbytes or self._reserving is not None:
            return

        def allocate() -> None:
            with contextlib.suppress(MemoryError):  # then the first save allocates (and raises)
                self._staging = _allocate(nbytes)

        self._reserving = threading.Thread(target=allocate, name="cairn-reserve", daemon=True)
        self._reserving.start()

    def stage(self, prepared: PreparedSave) -> PreparedSave:
        """``prepared`` with every array copied into the staging buffer: what the tensors hold now, so a
        change after ``save()`` returns cannot leak into the checkpoint. Call only when idle."""
        assert self._thread is None, "stage() while a save is in flight"
        if self._reserving is not None:
            self._reserving.join()
        total = sum(_page_up(arr.nbytes) for _, arr in prepared.arrays)
        if self._staging.nbytes < total:
            self._staging = np.empty(0, dtype=np.uint8)  # the old buffer goes before the new one comes
            self._staging = _allocate(total)
        pos, staged, pieces = 0, [], []
        for path, arr in prepared.arrays:
            n = arr.nbytes
            dest, src = self._staging[pos : pos + n], np.frombuffer(arr.data, dtype=np.uint8)
            pieces += [(dest[i : i + _PIECE], src[i : i + _PIECE]) for i in range(0, n, _PIECE)]
            staged.append((path, replace(arr, data=dest.data)))
            pos += _page_up(n)  # every array starts on a page: its chunks go to disk without a copy
        groups = _split(pieces, _COPIERS if total >= 2 * _PIECE else 1)
        if len(groups) > 1:  # numpy copies without the GIL: every core copies its share, this thread too
            with ThreadPoolExecutor(len(groups) - 1, thread_name_prefix="cairn-stage") as pool:
                futures = [pool.submit(_copy_all, group) for group in groups[1:]]
                _copy_all(groups[0])
                for future in futures:
                    future.result()
        else:
            _copy_all(pieces)
        return replace(prepared, arrays=staged)

    def submit(self, work: Callable[[], object]) -> None:
        """Run ``work`` in the background (call only when idle)."""
        assert self._thread is None, "submit() while a save is in flight"

        def run() -> None:
            _lower_priority()  # (inherited by the writer threads this thread starts)
            try:
                work()
            except BaseException as e:  # kept for the caller: never swallowed
                self._error = e

        self._thread = threading.Thread(target=run, name="cairn-async-save", daemon=False)
        _register_exit_wait()
        _WRITERS.add(self)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """True while a save is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Wait for the save in flight, if any, and raise its error, if any (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
