"""CheckpointManager: when to save, what to keep, and getting a crashed or preempted run back exactly.

::

    state = {"model": model, "optim": opt, "rng": cairn.RNGState(), "data": loader}
    with cairn.CheckpointManager("runs/exp1", save_every=cairn.Every(steps=500, minutes=30),
                                 keep=cairn.KeepLast(3) | cairn.KeepBest("val_loss", n=2)) as mgr:
        start = mgr.restore(state)              # the newest good checkpoint's step; 0 on a fresh run
        for step in range(start, total_steps):
            loss = train_step()
            mgr.save(step + 1, state, metrics={"loss": loss})   # saves when the policy says so
            if mgr.preempted:                   # SIGTERM / SIGUSR1 arrived: saved at this boundary
                break
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import FrameType, TracebackType
from typing import Any

from cairn._async import AsyncWriter
from cairn._info import CheckpointInfo
from cairn._restore import Rename, RestoreReport, restore_into
from cairn._store import DEFAULT_CHUNK_SIZE, PreparedSave, Store
from cairn._timing import Timing
from cairn._tree import array_sizes
from cairn.backends import Backend
from cairn.backends._locks import lock_owner
from cairn.backends.base import BackendLock
from cairn.errors import CheckpointNotFoundError, CorruptCheckpointError, StaleStepError
from cairn.policies import (
    KeepAll,
    KeepAny,
    KeepBest,
    RetentionPolicy,
    SaveContext,
    SaveTrigger,
    as_trigger,
    policy_from_spec,
)

__all__ = ["CheckpointManager", "retention_reasons"]

log = logging.getLogger("cairn")

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
"""The signals that mean "you are about to be preempted" (SLURM sends SIGTERM, or SIGUSR1 when asked)."""

MANAGER_KEY = "cairn"
"""The metadata key under which the manager records its own facts (epoch, why it saved, the policy)."""


def retention_reasons(
    infos: Sequence[CheckpointInfo], policy: RetentionPolicy | None, pins: Iterable[str], now: datetime
) -> list[tuple[str, ...]]:
    """Why each checkpoint is kept (empty: it is not): the policy's reasons, plus pins and the newest."""
    reasons = [list(r) for r in (policy or KeepAll()).reasons(infos, now)]
    pinned = set(pins)
    for info, why in zip(infos, reasons, strict=True):
        if info.name in pinned:
            why.insert(0, "pinned")
    if infos:
        newest = max(range(len(infos)), key=lambda i: (infos[i].step, infos[i].time, infos[i].name))
        reasons[newest].insert(0, "newest")
    return [tuple(r) for r in reasons]


class CheckpointManager:
    """Saves a training state on a schedule, keeps what a retention policy says, restores the newest good.

    - ``save_every``: when :meth:`save` really saves (:class:`~cairn.Every`, :class:`~cairn.AtSteps`, any
      ``SaveContext -> bool`` callable, or ``|`` of them). None: only forced and preemption saves.
    - ``keep``: which checkpoints to keep (:class:`~cairn.KeepLast`, :class:`~cairn.KeepBest`, ``|`` of
      them...). None keeps all. The newest checkpoint and pinned ones are always kept.
    - ``preemption_signals``: on any of these, :attr:`preempted` becomes True and the next :meth:`save`
      saves whatever the schedule says (never from inside the signal handler). ``()`` installs nothing.
    - ``async_save``: :meth:`save` copies the state into a staging buffer (reused from save to save) and
      returns; a background thread writes it. One save is in flight at most (the next waits for it);
      its error is raised by the next :meth:`save`, :meth:`wait` or :meth:`close`; retention runs only
      after the commit is durable; :meth:`close` (the end of the ``with`` block) waits for it.
    - ``save_on_exception``: an exception (Ctrl-C included, ``sys.exit`` not) escaping the ``with``
      block first saves the last state given to :meth:`save`, as ``exception-<step>``. It may hold
      objects as they were in the middle of a step, so ``restore()`` of the latest passes it over;
      restore it by name.

    One manager writes a directory at a time: a second one gets :class:`~cairn.StoreLockedError`. A
    lock left by a killed process is released by the kernel and taken over (and logged).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | Backend,
        *,
        save_every: SaveTrigger | Callable[[SaveContext], bool] | None = None,
        keep: RetentionPolicy | None = None,
        preemption_signals: Iterable[int] = DEFAULT_SIGNALS,
        save_on_exception: bool = False,
        async_save: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.trigger = as_trigger(save_every)
        self.keep = keep
        self.save_on_exception = save_on_exception
        self.store = Store(directory, create=True, chunk_size=chunk_size)
        self._lock: BackendLock | None = self.store.backend.lock(
            "writer", blocking=False, owner=lock_owner("CheckpointManager")
        )
        if self._lock.stale_holder:
            log.info(
                "%s: took over the lock of a writer that is gone (%s)",
                self.store.url,
                self._lock.stale_holder,
            )
        self.restored: RestoreReport | None = None
        """What the last :meth:`restore` loaded (None before, or on a fresh run)."""
        self._preempted: int | None = None
        self._last_step: int | None = None
        self._last_epoch: int | None = None
        self._last_time = time.monotonic()
        self._timing = Timing()
        self._last_state: tuple[int, Any, int | None] | None = None
        self._handlers: dict[int, Any] = {}
        self._writer = AsyncWriter() if async_save else None
        self._install_signals(preemption_signals)

    # -- lifecycle ------------------------------------------------------------------------------------

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if (
                exc is not None
                and not isinstance(exc, SystemExit)
                and self.save_on_exception
                and self._last_state is not None
            ):
                self._save_on_exception(exc)
        finally:
            if exc is None:
                self.close()
            else:  # the exception in flight matters more than a failed background save
                with contextlib.suppress(Exception):
                    self.close()

    def wait(self) -> None:
        """Wait until the async save in flight (if any) is durably committed; raise its error if it failed."""
        if self._writer is not None:
            self._writer.wait()

    def close(self) -> None:
        """Wait for an async save in flight, then release the store's lock and the signal handlers.
        Idempotent; raises the background save's error, if any (after releasing everything)."""
        try:
            self.wait()
        finally:
            self._release()

    def _release(self) -> None:
        for signum, previous in self._handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous)
        self._handlers.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _install_signals(self, signals: Iterable[int]) -> None:
        wanted = list(signals)
        if not wanted:
            return
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "CheckpointManager created outside the main thread: preemption signals are not handled "
                "(Python only delivers signals to the main thread); pass preemption_signals=() to silence",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        for signum in wanted:
            self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._preempted = signum  # only a flag: the save happens at the next step boundary

    @property
    def preempted(self) -> bool:
        """True once a preemption signal arrived: save (the next :meth:`save` does) and leave the loop."""
        return self._preempted is not None

    @property
    def save_seconds(self) -> float | None:
        """How long a save blocks training in this process (a running mean; None before the first).
        For async saves this is the staging copy, not the write; ``Every(overhead=)`` decides on it."""
        return self._timing.save_seconds

    @property
    def step_seconds(self) -> float | None:
        """Measured seconds per training step between ``save()`` calls, saves excluded (running mean)."""
        return self._timing.step_seconds

    # -- discovery ------------------------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint, oldest step first."""
        return self.store.list()

    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint, or None."""
        return self.store.latest()

    def best(self, metric: str | None = None, mode: str | None = None) -> CheckpointInfo | None:
        """The best checkpoint by ``metric`` (default: the ``KeepBest`` of ``keep``); None if none has it."""
        policy = self._best_policy(metric, mode)
        return policy.best(self.list())

    def _best_policy(self, metric: str | None, mode: str | None) -> KeepBest:
        if metric is None:
            found = _find_keep_best(self.keep)
            if found is None:
                raise ValueError(
                    "best() needs a metric: pass best('val_loss', 'min') or use keep=KeepBest(...)"
                )
            if mode is None or mode == found.mode:
                return found
            metric = found.metric
        return KeepBest(metric, mode=mode or "min")

    def reasons(self) -> dict[str, tuple[str, ...]]:
        """For every checkpoint, why it is kept (an empty tuple: the next retention pass deletes it)."""
        infos = self.list()
        why = retention_reasons(infos, self.keep, self.store.pins(), datetime.now(UTC))
        return {info.name: r for info, r in zip(infos, why, strict=True)}

    def pin(self, name: str) -> None:
        """Keep checkpoint ``name`` forever, whatever ``keep`` says."""
        self.store.pin(name)

    def unpin(self, name: str) -> None:
        """Let retention decide about checkpoint ``name`` again."""
        self.store.unpin(name)

    # -- restore --------------------------------------------------------------------------------------

    def restore(
        self,
        state: Any,
        name: str = "latest",
        *,
        strict: bool = True,
        include: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str | None = None,
        rename: Rename | None = None,
    ) -> int:
        """Load a checkpoint into the live objects of ``state``; returns its step (0 on a fresh run).

        ``name`` is a checkpoint name, ``"latest"`` or ``"best"``. With ``"latest"``, a checkpoint that
        fails verification is skipped with a warning naming it, and the newest good one is restored.
        """
        self.wait()  # an async save in flight may be the newest checkpoint
        if self._writer is not None:  # the size of what will be saved is known now: stage into ready memory
            self._writer.reserve(array_sizes(state))
        if name == "best":
            best = self.best()
            if best is None:
                raise CheckpointNotFoundError(
                    f"no checkpoint of {self.store.url} has the metric to pick the best"
                )
            candidates = [best]
        elif name == "latest":
            candidates = sorted(self.list(), key=lambda i: (i.step, i.time, i.name), reverse=True)
            candidates = [c for c in candidates if _reason_of(c) != "exception"] or candidates
            if not candidates:
                return 0
        else:
            candidates = [self.store.info(name)]
        for i, info in enumerate(candidates):
            try:
                saved = self.store.load(info.name)
            except CorruptCheckpointError as e:
                if name != "latest" or i == len(candidates) - 1:
                    raise
                warnings.warn(
                    f"checkpoint {info.name!r} is damaged and was skipped; restoring an older one ({e})",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            report = RestoreReport(checkpoint=info.name, step=info.step)
            self.restored = restore_into(
                state, saved, strict=strict, include=include, exclude=exclude, rename=rename, report=report
            )
            self._last_step = info.step
            self._last_epoch = _epoch_of(info)
            self._last_time = time.monotonic()
            return info.step
        raise AssertionError("unreachable")  # pragma: no cover

    # -- save -----------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        *,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` as checkpoint ``step-<step>`` if the schedule says so; True when it saved.

        Saves regardless of the schedule with ``force=True`` or after a preemption signal. A step that
        was already saved is never saved again (False). A step behind the store's newest checkpoint
        raises :class:`~cairn.StaleStepError`: a restarted run that forgot :meth:`restore`.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, not {step!r}")
        self._last_state = (step, state, epoch)
        if self._last_step is not None and step <= self._last_step:
            if step == self._last_step:
                return False
            raise StaleStepError(
                f"save(step={step}) but step {self._last_step} was already saved or restored in this run; "
                "steps must increase"
            )
        if self._last_step is None:
            self._check_not_behind(step)
        now = time.monotonic()
        self._timing.call(step, now)
        ctx = SaveContext(
            step=step,
            epoch=epoch,
            now=now,
            last_step=self._last_step,
            last_epoch=self._last_epoch,
            last_time=self._last_time,
            preempted=self.preempted,
            save_seconds=self._timing.save_seconds,
            step_seconds=self._timing.step_seconds,
        )
        why = "forced" if force else ("preempted" if self.preempted else None)
        if why is None and not self.trigger.should_save(ctx):
            return False
        self._write(step, state, metrics, metadata, epoch, why or "schedule", name=f"step-{step}")
        return True

    def _check_not_behind(self, step: int) -> None:
        latest = self.latest()
        if latest is not None and step < latest.step:
            raise StaleStepError(
                f"save(step={step}) but {self.store.url} already holds step {latest.step} "
                f"({latest.name}): restore first (start = mgr.restore(state)), or use a new directory"
            )

    def _write(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        epoch: int | None,
        reason: str,
        *,
        name: str,
    ) -> None:
        facts: dict[str, Any] = {"epoch": epoch, "reason": reason}
        if self.keep is not None:
            facts["keep"] = self.keep.to_spec()
        meta = {**(metadata or {}), MANAGER_KEY: facts}
        started = time.monotonic()
        if self._writer is not None:
            self._writer.wait()  # one save in flight at most; a failure of the last one surfaces here
        prepared = self.store.prepare(state, step=step, name=name, metrics=metrics, metadata=meta)
        if self._writer is not None:
            staged = self._writer.stage(prepared)  # the state as it is now: later changes cannot leak in
            self._writer.submit(lambda: self._commit(staged))
        else:
            self._commit(prepared)
        self._last_step, self._last_epoch, self._last_time = step, epoch, time.monotonic()
        self._timing.saved(self._last_time - started)

    def _commit(self, prepared: PreparedSave) -> None:
        info = self.store.commit(prepared)
        self._apply_retention(keep_also=info.name)  # only once the commit is durable

    def _apply_retention(self, keep_also: str) -> builtins.list[str]:
        if self.keep is None:
            return []
        infos = self.list()
        reasons = retention_reasons(infos, self.keep, self.store.pins(), datetime.now(UTC))
        deleted = []
        for info, why in zip(infos, reasons, strict=True):
            if not why and info.name != keep_also:
                self.store.delete(info.name)
                deleted.append(info.name)
        return deleted

    def _save_on_exception(self, exc: BaseException) -> None:
        assert self._last_state is not None
        step, state, epoch = self._last_state
        name = f"exception-{step}"
        if self.store.backend.size(f"checkpoints/{name}.json") is not None:
            return
        meta = {"exception": f"{type(exc).__name__}: {exc}"[:2000]}
        try:
            self._write(step, state, None, meta, epoch, "exception", name=name)
        except Exception as e:  # the original exception matters more; say why this failed
            warnings.warn(f"could not save the on-exception checkpoint: {e}", RuntimeWarning, stacklevel=3)

    def gc(self, **kwargs: Any) -> Any:
        """Delete blobs no checkpoint references (see :meth:`Store.gc`)."""
        return self.store.gc(**kwargs)


def _reason_of(info: CheckpointInfo) -> str | None:
    facts = info.metadata.get(MANAGER_KEY)
    reason = facts.get("reason") if isinstance(facts, dict) else None
    return reason if isinstance(reason, str) else None


def _epoch_of(info: CheckpointInfo) -> int | None:
    facts = info.metadata.get(MANAGER_KEY)
    epoch = facts.get("epoch") if isinstance(facts, dict) else None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def _find_keep_best(policy: RetentionPolicy | None) -> KeepBest | None:
    if isinstance(policy, KeepBest):
        return policy
    if isinstance(policy, KeepAny):
        for p in policy.policies:
            found = _find_keep_best(p)
            if found is not None:
                return found
    return None


def stored_policy(infos: Sequence[CheckpointInfo]) -> RetentionPolicy | None:
    """The retention policy recorded by the manager in the newest checkpoint that has one."""
    for info in sorted(infos, key=lambda i: (i.step, i.time, i.name), reverse=True):
        facts = info.metadata.get(MANAGER_KEY)
        if isinstance(facts, dict) and isinstance(facts.get("keep"), dict):
            try:
                return policy_from_spec(facts["keep"])
            except ValueError:
                return None
    return None
