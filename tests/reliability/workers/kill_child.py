"""Child processes of the kill -9 tests (C1, C3 in ``tests/reliability/test_kill.py``).

They run in processes forked from a ``multiprocessing`` forkserver that has torch and cairn preloaded, so a
trial costs a fork, not an interpreter start. Each child reports over a pipe what it is doing: ``("start",
step, t)`` just before a save, ``("ack", step, t)`` once that step is durable by the API's contract, with
``t`` from ``time.monotonic()`` (one clock for every process of the machine). The parent kills it with
SIGKILL at a random moment and checks the store.
"""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from typing import Any

import cairn
from reliability.states import make_state

MIB = 4.0
"""Each half of a state: a fresh half (new blobs every step) and a slow half (reused for 3 steps)."""
TENSORS = 8


def state_for(step: int) -> dict[str, Any]:
    """The state saved as ``step``: ~8 MiB in 16 float32 tensors plus the odd ones; consecutive steps
    share the ``frozen`` half (same blobs, a dedup hit) for runs of three steps."""
    state = make_state(step, mib=MIB, tensors=TENSORS)
    state["frozen"] = make_state(10_000 + step // 3, mib=MIB, tensors=TENSORS)["model"]
    return state


def sync_saver(path: str, first: int, last: int | None, conn: Connection) -> None:
    """Save steps ``first, first+1, ...`` (up to ``last``, or forever) with :meth:`cairn.Store.save`."""
    store = cairn.Store(path)
    step = first
    while last is None or step <= last:
        state = state_for(step)
        conn.send(("start", step, time.monotonic()))
        store.save(state, step=step)
        conn.send(("ack", step, time.monotonic()))  # save() returned: the step is durably committed
        step += 1
    conn.send(("done", step - 1, time.monotonic()))


def _scribble(state: dict[str, Any]) -> None:
    """Change every big tensor in place, as the next training step would (must not leak into a save)."""
    for group in ("model", "frozen"):
        for t in state[group].values():
            t.mul_(-3.0).add_(1.0)


def async_saver(path: str, first: int, last: int | None, keep: int, conn: Connection) -> None:
    """Save every step with ``CheckpointManager(async_save=True, keep=KeepLast(keep))``.

    By the manager's contract, step ``k`` is durably committed (and its retention has run) once the next
    ``save()`` or ``wait()`` returns, so that is when ``k`` is acked. Every third step calls ``wait()``.
    After ``save()`` returns, the state's tensors are changed in place: the checkpoint must not see it.
    """
    mgr = cairn.CheckpointManager(
        path,
        keep=cairn.KeepLast(keep),
        async_save=True,
        preemption_signals=(),
    )
    step = first
    while last is None or step <= last:
        state = state_for(step)
        conn.send(("start", step, time.monotonic()))
        if not mgr.save(step, state, force=True):
            raise AssertionError(f"the manager did not save step {step}")
        if step > first:
            conn.send(("ack", step - 1, time.monotonic()))  # save(k) waited for k-1's durable commit
        conn.send(("submitted", step, time.monotonic()))
        _scribble(state)
        if step % 3 == 0:
            mgr.wait()
            conn.send(("ack", step, time.monotonic()))
        step += 1
    mgr.close()
    conn.send(("ack", step - 1, time.monotonic()))
    conn.send(("done", step - 1, time.monotonic()))
