"""C2/C9/C3b worker: one small save (three arrays), started only when the parent says ``go``.

Usage: ``syscall_save.py STORE STEP SEED [MODE] [API] [RESULT]``. It imports everything and opens the store,
prints ``ready``, waits for a line on stdin (the parent attaches strace meanwhile), then saves. Modes:

- ``sync`` (default): ``Store.save``.
- ``retry``: the same, then, after a failure, a second ``save`` on the same handle (C9: after an fsync
  error the handle must refuse: never retried into success).
- ``async``: ``CheckpointManager(async_save=True).save``, then the call named by ``API`` (``save``: the
  next save, ``wait`` or ``close``) where the background error must resurface (C3b).

Exit status 0 when the worker ran to its end, 3 on an unexpected exception. The outcome goes to the file
``RESULT`` through a shared memory map: no syscall that strace might tamper with reports it.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import traceback
from typing import Any

import numpy as np

CHUNK = 64
"""The store's chunk size in tests: the three arrays make five blobs (so pool threads write several)."""
RESULT_BYTES = 1 << 16


def small_state(seed: int) -> dict[str, Any]:
    """Three arrays (five 64-byte chunks): ``b`` is the same for every seed (deduplicated), ``a`` and ``c``
    change with it."""
    rng = np.random.default_rng(seed)
    return {
        "a": rng.standard_normal(10),
        "b": np.linspace(0.0, 1.0, 12).reshape(3, 4),
        "c": np.arange(5, dtype=np.int64) + seed,
    }


def allow_any_tracer() -> None:
    """``prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)``: lets the parent's strace attach under Yama scope 1."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(0x59616D61, ctypes.c_ulong(2**64 - 1), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def deterministic_temp_names() -> bool:
    """Give cairn's local backend temporary files named by a counter instead of ``uuid4()`` (only the
    names change), so that strace's ``-P PATH`` can aim at one temporary file of the save."""
    import itertools
    import threading
    import uuid

    from cairn.backends import local

    if not hasattr(local, "uuid"):
        return False
    counter, lock = itertools.count(1), threading.Lock()

    def uuid4() -> uuid.UUID:
        with lock:
            return uuid.UUID(int=next(counter))

    local.uuid = type("DeterministicUUID", (), {"uuid4": staticmethod(uuid4)})  # type: ignore[assignment]
    return True


def describe(e: BaseException) -> dict[str, Any]:
    """What the parent needs to know about an exception."""
    return {
        "type": type(e).__name__,
        "mro": [c.__name__ for c in type(e).__mro__],
        "errno": getattr(e, "errno", None),
        "filename": str(getattr(e, "filename", None)),
        "message": str(e),
    }


def attempt(fn: Any) -> dict[str, Any]:
    """Run ``fn``; ``{"ok": True}`` or ``{"ok": False, "error": ...}``."""
    try:
        fn()
    except Exception as e:
        return {"ok": False, "error": describe(e)}
    return {"ok": True}


def main(argv: list[str]) -> int:
    """Run the worker (see the module docstring)."""
    import cairn

    store_dir, step, seed = argv[0], int(argv[1]), int(argv[2])
    mode = argv[3] if len(argv) > 3 else "sync"
    api = argv[4] if len(argv) > 4 else ""
    out: mmap.mmap | None = None
    if len(argv) > 5:
        fd = os.open(argv[5], os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, RESULT_BYTES)
        out = mmap.mmap(fd, RESULT_BYTES)
        os.close(fd)
    state = small_state(seed)
    result: dict[str, Any] = {}
    if mode == "async":
        mgr = cairn.CheckpointManager(store_dir, async_save=True, preemption_signals=())
    else:
        store = cairn.Store(store_dir)
    named = deterministic_temp_names()
    allow_any_tracer()
    sys.stdout.write("ready named\n" if named else "ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    try:
        if mode == "async":
            result["submit"] = attempt(lambda: mgr.save(step, state, force=True))
            if api == "save":
                result["api"] = attempt(lambda: mgr.save(step + 1, small_state(seed + 1), force=True))
            elif api == "wait":
                result["api"] = attempt(mgr.wait)
            result["close"] = attempt(mgr.close)
            result["close_again"] = attempt(mgr.close)
        else:
            result["save"] = attempt(lambda: store.save(state, step=step))
            if not result["save"]["ok"] and mode == "retry":
                result["retry"] = attempt(lambda: store.save(state, step=step))
    except BaseException:
        traceback.print_exc()
        os._exit(3)
    if out is not None:
        data = json.dumps(result).encode()
        out[: len(data)] = data  # a memory store: no write syscall
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
