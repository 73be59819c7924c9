"""When to save and which checkpoints to keep: composable save triggers and retention policies.

Everything here is pure: no disk, no clock reads. Triggers get the current step, epoch and monotonic
time in a :class:`SaveContext`; retention policies get the checkpoints and ``now``.

Save triggers decide whether a ``save`` call should write a checkpoint::

    trigger = Every(steps=500) | Every(hours=1) | AtSteps([100, 250])
    trigger.should_save(SaveContext(step=1000, epoch=None, now=t, last_step=900, last_epoch=None,
                                    last_time=t0))

Retention policies say which checkpoints to keep, and why; the manager deletes the rest (it always
keeps the newest checkpoint and pinned ones itself)::

    policy = KeepLast(3) | KeepBest("val_loss", n=2) | KeepEvery(steps=10_000)
    for info, why in zip(infos, policy.reasons(infos, now)):
        print(info.name, ", ".join(why) or "delete")

Policies serialize to plain JSON with ``to_spec()`` and back with :func:`policy_from_spec`.
"""

from __future__ import annotations

import bisect
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from cairn._info import CheckpointInfo

__all__ = [
    "AnyTrigger",
    "AtSteps",
    "Every",
    "KeepAll",
    "KeepAny",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepWithin",
    "RetentionPolicy",
    "SaveContext",
    "SaveTrigger",
    "as_trigger",
    "parse_duration",
    "policy_from_spec",
]


# ----------------------------------------------------------------------------------------------------
# argument checks


def _int(value: object, what: str, *, minimum: int | None = None) -> int:
    """``value`` as an int (bools and floats refused), at least ``minimum``."""
    allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
    if isinstance(value, bool):
        raise ValueError(f"{what} must be {allowed}, not {value!r}")
    try:
        out = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be {allowed}, not {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{what} must be {allowed}, not {value!r}")
    return int(out)


def _real(value: object, what: str, *, positive: bool = False) -> float:
    """``value`` as a finite float (bools refused), > 0 when ``positive``."""
    allowed = "a finite number" + (" > 0" if positive else "")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be {allowed}, not {value!r}")
    out = float(value)
    if not math.isfinite(out) or (positive and out <= 0):
        raise ValueError(f"{what} must be {allowed}, not {value!r}")
    return out


def _choice(value: object, what: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, allowed))}, not {value!r}")
    return value


def _repr_set_fields(obj: object, fields: tuple[str, ...]) -> str:
    """``Name(a=1, c=2)``, leaving out the fields that are None."""
    shown = (f"{f}={getattr(obj, f)!r}" for f in fields if getattr(obj, f) is not None)
    return f"{type(obj).__name__}({', '.join(shown)})"


def _aware(now: object) -> datetime:
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise ValueError(f"now must be a timezone-aware datetime, not {now!r}")
    return now


# ----------------------------------------------------------------------------------------------------
# save triggers


@dataclass(frozen=True, kw_only=True)
class SaveContext:
    """What a save trigger decides on: where training is now and where the last save was.

    ``now`` and ``last_time`` are seconds on a monotonic clock (``time.monotonic()``), never wall-clock
    time. ``last_step``/``last_epoch``/``last_time`` describe the last save, or, before the first save
    of this process, the point the run started or resumed from; ``None`` when unknown.
    ``preempted`` is set when the process is about to be stopped: every trigger then saves.
    ``save_seconds`` is how long a save blocks training, as measured by the manager (a running mean
    of this process's saves; None before the first), and ``step_seconds`` the measured time of a
    training step without saves (None until two calls tell it): the inputs of ``Every(overhead=)``.

    Example::

        ctx = SaveContext(step=1000, epoch=2, now=time.monotonic(), last_step=500, last_epoch=1,
                          last_time=started)
    """

    step: int
    epoch: int | None
    now: float
    last_step: int | None
    last_epoch: int | None
    last_time: float | None
    preempted: bool = False
    save_seconds: float | None = None
    step_seconds: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "step", _int(self.step, "SaveContext step"))
        if self.epoch is not None:
            object.__setattr__(self, "epoch", _int(self.epoch, "SaveContext epoch (or None)"))
        object.__setattr__(self, "now", _real(self.now, "SaveContext now (monotonic seconds)"))
        if self.last_step is not None:
            object.__setattr__(self, "last_step", _int(self.last_step, "SaveContext last_step (or None)"))
        if self.last_epoch is not None:
            object.__setattr__(self, "last_epoch", _int(self.last_epoch, "SaveContext last_epoch (or None)"))
        if self.last_time is not None:
            object.__setattr__(
                self, "last_time", _real(self.last_time, "SaveContext last_time (monotonic seconds or None)")
            )
        if not isinstance(self.preempted, bool):
            raise ValueError(f"SaveContext preempted must be True or False, not {self.preempted!r}")
        for what in ("save_seconds", "step_seconds"):
            value = getattr(self, what)
            if value is not None and _real(value, f"SaveContext {what} (or None)") < 0:
                raise ValueError(f"SaveContext {what} must be >= 0, not {value!r}")


@runtime_checkable
class SaveTrigger(Protocol):
    """Anything with ``should_save(ctx) -> bool``. Plain callables ``fn(ctx) -> bool`` are accepted
    wherever a trigger is (see :func:`as_trigger`).

    Example::

        class OnPlateau:
            def should_save(self, ctx: SaveContext) -> bool:
                return ctx.step % 100 == 0
    """

    def should_save(self, ctx: SaveContext) -> bool:
        """True when a checkpoint should be written now."""
        ...


def _is_trigger_like(x: object) -> bool:
    return callable(getattr(x, "should_save", None)) or callable(x)


class _TriggerOps:
    """``a | b`` for triggers: an :class:`AnyTrigger` (flattened)."""

    def __or__(self, other: SaveTrigger | Callable[[SaveContext], bool]) -> AnyTrigger:
        if not _is_trigger_like(other):
            return NotImplemented
        return AnyTrigger((self, other))  # type: ignore[arg-type]

    def __ror__(self, other: SaveTrigger | Callable[[SaveContext], bool]) -> AnyTrigger:
        if not _is_trigger_like(other):
            return NotImplemented
        return AnyTrigger((other, self))  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class _FnTrigger(_TriggerOps):
    """A plain callable ``fn(ctx) -> bool`` as a trigger (also saves when preempted)."""

    fn: Callable[[SaveContext], bool]

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.preempted or bool(self.fn(ctx))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _FnTrigger) and self.fn == other.fn

    def __hash__(self) -> int:
        return hash(self.fn)

    def __repr__(self) -> str:
        return f"as_trigger({getattr(self.fn, '__qualname__', None) or self.fn!r})"


def as_trigger(x: SaveTrigger | Callable[[SaveContext], bool] | None) -> SaveTrigger:
    """``x`` as a :class:`SaveTrigger`: triggers as they are, a callable ``fn(ctx) -> bool`` wrapped
    (the wrapper also saves when ``ctx.preempted``), ``None`` as ``AnyTrigger(())``, which saves only
    when preempted.

    Example::

        as_trigger(lambda ctx: ctx.step % 100 == 0).should_save(ctx)
    """
    if x is None:
        return AnyTrigger(())
    if callable(getattr(x, "should_save", None)):
        return x  # type: ignore[return-value]
    if callable(x):
        return _FnTrigger(x)
    raise ValueError(
        f"a save trigger must be a SaveTrigger (with should_save(ctx)), a callable fn(ctx) -> bool "
        f"or None, not {x!r}"
    )


@dataclass(frozen=True, kw_only=True)
class Every(_TriggerOps):
    """Save every N steps, every N epochs and/or every so much monotonic time (any one is enough).

    * ``steps=N``: saves when the step crosses a multiple of N since the last save
      (``step // N > last_step // N``, ``last_step`` None counting as 0). Saves at steps 500, 1000, ...
      for ``steps=500`` even when ``save()`` is called at irregular steps (the first call at or past
      the boundary saves), never twice for one window, and not at step 0 of a fresh run.
    * ``epochs=N``: the same with ``epoch``/``last_epoch``; no epoch decision when ``epoch`` is None.
    * ``seconds``/``minutes``/``hours``: saves when ``now - last_time >= interval``; they add up
      (``Every(hours=1, minutes=30)`` is 5400 s). No time decision when ``last_time`` is None.
    * ``overhead=f`` (a fraction, e.g. 0.01): an adaptive interval. With ``C`` the measured time a
      save blocks training (``ctx.save_seconds``), it saves when ``C·(1-f)/f`` seconds of training
      have passed since the last save, so saves take at most the fraction ``f`` of the run. Before
      the first save of the process ``C`` is unknown: the first call past the start saves and
      measures it.
    * ``mtbf`` (the expected time between failures: seconds, or a duration such as ``"2d"``): the
      Young/Daly optimum interval ``sqrt(2·C·mtbf)``, which minimises the expected time lost to saves
      plus the work lost to a failure. With ``overhead`` too, the interval is never shorter than the
      overhead bound allows (the larger of the two).

    Also saves when ``ctx.preempted``. At least one argument must be given, and all must be > 0.

    Example::

        Every(steps=1000) | Every(minutes=30)     # whichever comes first
        Every(overhead=0.01)                      # checkpointing costs at most 1% of training time
        Every(overhead=0.05, mtbf="12h")          # Young/Daly for a failure every 12 h, at most 5%
    """

    steps: int | None = None
    epochs: int | None = None
    seconds: float | None = None
    minutes: float | None = None
    hours: float | None = None
    overhead: float | None = None
    mtbf: float | str | None = None

    def __post_init__(self) -> None:
        given = (self.steps, self.epochs, self.seconds, self.minutes, self.hours, self.overhead, self.mtbf)
        if all(v is None for v in given):
            raise ValueError(
                "Every needs at least one of steps=, epochs=, seconds=, minutes=, hours=, overhead=, mtbf="
            )
        if self.overhead is not None:
            f = _real(self.overhead, "Every overhead", positive=True)
            if f >= 1:
                raise ValueError(f"Every overhead is a fraction of training time in (0, 1), not {f!r}")
        if isinstance(self.mtbf, str):
            object.__setattr__(self, "mtbf", parse_duration(self.mtbf))
        if self.mtbf is not None:
            _real(self.mtbf, "Every mtbf (seconds, or a duration like '12h')", positive=True)
        if self.steps is not None:
            object.__setattr__(self, "steps", _int(self.steps, "Every steps", minimum=1))
        if self.epochs is not None:
            object.__setattr__(self, "epochs", _int(self.epochs, "Every epochs", minimum=1))
        for unit in ("seconds", "minutes", "hours"):
            value = getattr(self, unit)
            if value is not None:
                _real(value, f"Every {unit}", positive=True)

    def __repr__(self) -> str:
        fields = ("steps", "epochs", "seconds", "minutes", "hours", "overhead", "mtbf")
        return _repr_set_fields(self, fields)

    @property
    def interval_seconds(self) -> float | None:
        """The time interval in seconds (seconds + 60·minutes + 3600·hours), or None if none given."""
        parts = [(self.seconds, 1.0), (self.minutes, 60.0), (self.hours, 3600.0)]
        if all(v is None for v, _ in parts):
            return None
        return sum(float(v) * k for v, k in parts if v is not None)

    def should_save(self, ctx: SaveContext) -> bool:
        """True when preempted, or when a step window, an epoch window or the interval has passed."""
        if ctx.preempted:
            return True
        if self.steps is not None:
            last = 0 if ctx.last_step is None else ctx.last_step
            if ctx.step // self.steps > last // self.steps:
                return True
        if self.epochs is not None and ctx.epoch is not None:
            last = 0 if ctx.last_epoch is None else ctx.last_epoch
            if ctx.epoch // self.epochs > last // self.epochs:
                return True
        interval = self.interval_seconds
        if interval is not None and ctx.last_time is not None and ctx.now - ctx.last_time >= interval:
            return True
        if self.overhead is None and self.mtbf is None:
            return False
        if ctx.save_seconds is None:  # the cost is not known yet: save once to measure it
            return True
        adaptive = self.adaptive_interval(ctx.save_seconds)
        return ctx.last_time is not None and ctx.now - ctx.last_time >= adaptive

    def adaptive_interval(self, save_seconds: float) -> float:
        """The seconds of training between saves that ``overhead``/``mtbf`` ask for, for saves that
        block training ``save_seconds`` each (see the class docstring); 0 when neither is set.

        Example::

            Every(overhead=0.01).adaptive_interval(0.2)   # 19.8: 0.2 s of every 20 s is 1%
        """
        cost = max(0.0, _real(save_seconds, "save_seconds"))
        bound = 0.0 if self.overhead is None else cost * (1 - self.overhead) / self.overhead
        if self.mtbf is None:
            return bound
        return max(bound, math.sqrt(2 * cost * float(self.mtbf)))


@dataclass(frozen=True, init=False)
class AtSteps(_TriggerOps):
    """Save at these steps: true when some listed step ``s`` has ``last_step < s <= step`` (so a step
    that ``save()`` skipped over still saves, once, at the next call). ``last_step`` None means no save
    yet: every listed step up to ``step`` counts. Also saves when ``ctx.preempted``.

    Steps are stored sorted and deduplicated; they must be integers >= 0.

    Example::

        AtSteps([100, 1000, 10_000]) | Every(steps=50_000)
    """

    steps: tuple[int, ...]

    def __init__(self, steps: Iterable[int]) -> None:
        if isinstance(steps, str | bytes) or not isinstance(steps, Iterable):
            raise ValueError(f"AtSteps takes an iterable of integers >= 0, not {steps!r}")
        clean = sorted({_int(s, "AtSteps step", minimum=0) for s in steps})
        object.__setattr__(self, "steps", tuple(clean))

    def should_save(self, ctx: SaveContext) -> bool:
        """True when preempted or when a listed step lies in ``(last_step, step]``."""
        if ctx.preempted:
            return True
        lo = 0 if ctx.last_step is None else bisect.bisect_right(self.steps, ctx.last_step)
        hi = bisect.bisect_right(self.steps, ctx.step)
        return hi > lo


@dataclass(frozen=True, init=False)
class AnyTrigger(_TriggerOps):
    """Saves when any of its triggers does (and always when ``ctx.preempted``). ``a | b`` builds one;
    nested ``AnyTrigger`` are flattened and callables wrapped. ``AnyTrigger(())`` saves only when
    preempted.

    Example::

        AnyTrigger((Every(steps=500), lambda ctx: ctx.step == 123))
    """

    triggers: tuple[SaveTrigger, ...]

    def __init__(self, triggers: Iterable[SaveTrigger | Callable[[SaveContext], bool]]) -> None:
        if isinstance(triggers, str | bytes) or not isinstance(triggers, Iterable):
            raise ValueError(f"AnyTrigger takes a tuple of triggers or callables, not {triggers!r}")
        out: list[SaveTrigger] = []
        for t in triggers:
            if t is None:
                raise ValueError("AnyTrigger takes triggers or callables fn(ctx) -> bool, not None")
            trig = as_trigger(t)
            if isinstance(trig, AnyTrigger):
                out.extend(trig.triggers)
            else:
                out.append(trig)
        object.__setattr__(self, "triggers", tuple(out))

    def should_save(self, ctx: SaveContext) -> bool:
        """True when preempted or when any trigger says so."""
        return ctx.preempted or any(t.should_save(ctx) for t in self.triggers)


# ----------------------------------------------------------------------------------------------------
# durations


_UNITS: dict[str, float] = {
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
    "w": 604800.0,
    "week": 604800.0,
    "weeks": 604800.0,
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PART = re.compile(rf"\s*({_NUMBER})\s*([a-z]+)\s*")
_PLAIN = re.compile(rf"\s*({_NUMBER})\s*")


def parse_duration(text: str) -> float:
    """A duration in seconds from text: ``"90s"``, ``"30m"``/``"30min"``, ``"6h"``, ``"2d"``, ``"1w"``,
    ``"1.5h"``, ``"1h30m"``, or plain seconds ``"3600"``. Units are lower case (``m`` is minutes;
    there are no months). Raises ValueError for anything else.

    Example::

        parse_duration("2d")   # 172800.0
    """
    if not isinstance(text, str):
        raise ValueError(f"a duration must be a string like '90s', '30m', '6h', '2d' or '1w', not {text!r}")
    plain = _PLAIN.fullmatch(text)
    if plain:
        return float(plain.group(1))
    total = 0.0
    pos = 0
    matched = False
    while pos < len(text):
        m = _PART.match(text, pos)
        if m is None or m.group(2) not in _UNITS:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
        matched = True
    if not matched or pos != len(text) or not math.isfinite(total):
        raise ValueError(
            f"cannot read duration {text!r}: use a number with a unit, like '90s', '30m' or '30min', "
            f"'6h', '2d', '1w' (or combined: '1h30m'), or plain seconds like '3600'"
        )
    return total


def _format_duration(seconds: float) -> str:
    """``seconds`` in the largest unit (day, h, min, s) that shows it as a whole number, else in
    seconds with up to 3 decimals: ``"1 day"``, ``"36 h"``, ``"90 min"``, ``"100.5 s"``."""
    for size, unit in ((86400.0, "day"), (3600.0, "h"), (60.0, "min"), (1.0, "s")):
        value = seconds / size
        if value >= 1 and value == int(value):
            if unit == "day":
                return f"{int(value)} day" + ("" if value == 1 else "s")
            return f"{int(value)} {unit}"
    if seconds < 1:
        return f"{seconds:g} s"
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + " s"


# ----------------------------------------------------------------------------------------------------
# retention


@runtime_checkable
class RetentionPolicy(Protocol):
    """Which checkpoints to keep, and why.

    ``reasons(checkpoints, now)`` returns one tuple per input checkpoint, in input order (the input
    need not be sorted), holding the human-readable reasons this policy keeps it; an empty tuple means
    this policy would not keep it. ``to_spec()`` returns plain JSON that :func:`policy_from_spec`
    turns back into an equal policy.

    Example::

        keep = [bool(r) for r in KeepLast(3).reasons(infos, datetime.now(UTC))]
    """

    def reasons(self, checkpoints: Sequence[CheckpointInfo], now: datetime) -> list[tuple[str, ...]]:
        """Per input checkpoint, in input order: why this policy keeps it (empty: it does not)."""
        ...

    def to_spec(self) -> dict[str, Any]:
        """The policy as plain JSON, for :func:`policy_from_spec`."""
        ...


def _order(checkpoints: Sequence[CheckpointInfo]) -> list[int]:
    """Input indices, oldest first by (step, time, name)."""
    return sorted(range(len(checkpoints)), key=lambda i: _age_key(checkpoints[i]))


def _age_key(c: CheckpointInfo) -> tuple[int, datetime, str]:
    return (c.step, c.time, c.name)


def _is_policy_like(x: object) -> bool:
    return callable(getattr(x, "reasons", None)) and callable(getattr(x, "to_spec", None))


class _PolicyOps:
    """``a | b`` for retention policies: a :class:`KeepAny` (flattened)."""

    def __or__(self, other: RetentionPolicy) -> KeepAny:
        if not _is_policy_like(other):
            return NotImplemented
        return KeepAny((self, other))  # type: ignore[arg-type]

    def __ror__(self, other: RetentionPolicy) -> KeepAny:
        if not _is_policy_like(other):
            return NotImplemented
        return KeepAny((other, self))  # type: ignore[arg-type]


@dataclass(frozen=True)
class KeepLast(_PolicyOps):
    """Keep the ``n`` newest checkpoints by (step, time). Reason ``"last 3"``.

    Example::

        KeepLast(3) | KeepBest("val_loss")     # resume from the latest, evaluate the best
    """

    n: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", _int(self.n, "KeepLast n", minimum=1))

    def reasons(self, checkpoints: Sequence[CheckpointInfo], now: datetime) -> list[tuple[str, ...]]:
        """``("last N",)`` for the N newest, ``()`` for the others."""
        out: list[tuple[str, ...]] = [() for _ in checkpoints]
        for i in _order(checkpoints)[-self.n :]:
            out[i] = (f"last {self.n}",)
        return out

    def to_spec(self) -> dict[str, Any]:
        """``{"policy": "last", "n": n}``."""
        return {"policy": "last", "n": self.n}


@dataclass(frozen=True)
class KeepBest(_PolicyOps):
    """Keep the ``n`` best checkpoints by a metric; ``mode="min"`` (lower is better) or ``"max"``.

    Ties go to the newer checkpoint. A NaN value counts as worst: a checkpoint whose metric is NaN is
    never kept as best (nor returned by :meth:`best`). Checkpoints *without* the metric are never
    silently treated as good or bad: ``missing="keep"`` (the default) keeps them, with the reason
    ``"no val_loss metric"``, so a typo in the metric name deletes nothing; ``missing="drop"`` says
    this policy does not keep them. Reason for the kept ones: ``"best 2 by val_loss (min)"``.

    Example::

        KeepBest("accuracy", mode="max", n=2)
    """

    metric: str
    _: KW_ONLY
    mode: str = "min"
    n: int = 1
    missing: str = "keep"

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"KeepBest metric must be a non-empty string, not {self.metric!r}")
        _choice(self.mode, "KeepBest mode", ("min", "max"))
        object.__setattr__(self, "n", _int(self.n, "KeepBest n", minimum=1))
        _choice(self.missing, "KeepBest missing", ("keep", "drop"))

    def _ranked(self, checkpoints: Sequence[CheckpointInfo]) -> list[int]:
        """Indices of checkpoints with a non-NaN value of the metric, best first (newer on ties)."""
        scored: list[tuple[float, tuple[int, datetime, str], int]] = []
        for i, c in enumerate(checkpoints):
            if self.metric not in c.metrics:
                continue
            value = float(c.metrics[self.metric])
            if math.isnan(value):
                continue
            scored.append((value if self.mode == "max" else -value, _age_key(c), i))
        scored.sort(reverse=True)  # higher score first; on ties the newer (larger age key) first
        return [i for _, _, i in scored]

    def best(self, checkpoints: Sequence[CheckpointInfo]) -> CheckpointInfo | None:
        """The single best checkpoint (newest on ties), or None when none has a non-NaN value."""
        ranked = self._ranked(checkpoints)
        return checkpoints[ranked[0]] if ranked else None

    def reasons(self, checkpoints: Sequence[CheckpointInfo], now: datetime) -> list[tuple[str, ...]]:
        """``("best N by METRIC (MODE)",)`` for the N best, ``("no METRIC metric",)`` for those
        without the metric when ``missing="keep"``, ``()`` for the others."""
        out: list[tuple[str, ...]] = [() for _ in checkpoints]
        for i in self._ranked(checkpoints)[: self.n]:
            out[i] = (f"best {self.n} by {self.metric} ({self.mode})",)
        if self.missing == "keep":
            for i, c in enumerate(checkpoints):
                if self.metric not in c.metrics:
                    out[i] = (f"no {self.metric} metric",)
        return out

    def to_spec(self) -> dict[str, Any]:
        """``{"policy": "best", "metric": ..., "mode": ..., "n": ..., "missing": ...}``."""
        return {
            "policy": "best",
            "metric": self.metric,
            "mode": self.mode,
            "n": self.n,
            "missing": self.missing,
        }


@dataclass(frozen=True, kw_only=True)
class KeepEvery(_PolicyOps):
    """Keep one checkpoint per window of ``steps`` steps or of ``hours`` hours (exactly one of them).

    Windows are absolute, ``step // steps`` or ``floor(time.timestamp() / (hours * 3600))``, and the
    oldest checkpoint of each window is kept (by (step, time, name) for step windows, by (time, step,
    name) for time windows), so what is kept is stable as checkpoints come and go: deleting one this
    policy does not keep never changes which others it keeps. Reason ``"every 500 steps"`` /
    ``"every 6 h"``.

    Example::

        KeepLast(3) | KeepEvery(steps=10_000)   # recent ones, plus a sparse history
    """

    steps: int | None = None
    hours: float | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.hours is None):
            raise ValueError("KeepEvery needs exactly one of steps= (an integer >= 1) or hours= (> 0)")
        if self.steps is not None:
            object.__setattr__(self, "steps", _int(self.steps, "KeepEvery steps", minimum=1))
        if self.hours is not None:
            _real(self.hours, "KeepEvery hours", positive=True)

    def __repr__(self) -> str:
        return _repr_set_fields(self, ("steps", "hours"))

    def _label(self) -> str:
        if self.steps is not None:
            return f"every {self.steps} step" + ("" if self.steps == 1 else "s")
        assert self.hours is not None
        return f"every {_format_duration(float(self.hours) * 3600.0)}"

    def reasons(self, checkpoints: Sequence[CheckpointInfo], now: datetime) -> list[tuple[str, ...]]:
        """``("every ...",)`` for the oldest checkpoint of each window, ``()`` for the others."""
        out: list[tuple[str, ...]] = [() for _ in checkpoints]
        first: dict[int, int] = {}
        if self.steps is not None:
            steps = self.steps
            for i in _order(checkpoints):
                first.setdefault(checkpoints[i].step // steps, i)
        else:
            assert self.hours is not None
            period = float(self.hours) * 3600.0
            order = sorted(range(len(checkpoints)), key=lambda i: _time_key(checkpoints[i]))
            for i in order:
                first.setdefault(math.floor(checkpoints[i].time.timestamp() / period), i)
        label = self._label()
        for i in first.values():
            out[i] = (label,)
        return out

    def to_spec(self) -> dict[str, Any]:
        """``{"policy": "every", "steps": N}`` or ``{"policy": "every", "hours": H}``."""
        if self.steps is not None:
            return {"policy": "every", "steps": self.steps}
        return {"policy": "every", "hours": self.hours}


def _time_key(c: CheckpointInfo) -> tuple[datetime, int, str]:
    return (c.time, c.step, c.name)


@dataclass(frozen=True, init=False)
class KeepWithin(_PolicyOps):
    """Keep the checkpoints written within ``duration`` before ``now`` (``time >= now - duration``).
    ``duration`` is a ``timedelta`` or seconds (> 0); it is stored as a ``timedelta``. Reason
    ``"within 1 day"``.

    Example::

        KeepWithin(timedelta(days=2))   # or KeepWithin(parse_duration("2d"))
    """

    duration: timedelta

    def __init__(self, duration: timedelta | float) -> None:
        if isinstance(duration, timedelta):
            td = duration
        else:
            seconds = _real(duration, "KeepWithin duration (a timedelta or seconds)", positive=True)
            try:
                td = timedelta(seconds=seconds)
            except OverflowError:
                raise ValueError(f"KeepWithin duration {duration!r} s is too large for a timedelta") from None
        if td <= timedelta(0):
            raise ValueError(f"KeepWithin duration must be > 0, not {duration!r}")
        object.__setattr__(self, "duration", td)

    def reasons(self, checkpoints: Sequence[CheckpointInfo], now: datetime) -> list[tuple[str, ...]]:
        """``("within D",)`` for checkpoints at or after ``now - duration``, ``()`` for older ones."""
        now = _aware(now)
        try:
            cutoff = now - self.duration
        except OverflowError:
            cutoff = datetime.min.replace(tzinfo=now.tzinfo)
        label = f"within {_format_duration(self.duration.total_seconds())}"
        return [(label,) if c.time >= cutoff else () for c in checkpoints]

    def to_spec(self) -> dict[str, Any]:
        """``{"policy": "within", "seconds": S}``: an int for whole seconds, else a float; in the rare case
        a float cannot hold the duration exactly (over about a century with microseconds), whole
        seconds plus ``"microseconds"``."""
        td = self.duration
        whole = td.days * 86400 + td.seconds
        if td.microseconds == 0:
            return {"policy": "within", "seconds": whole}
        seconds = td.total_seconds()
        if timedelta(seconds=seconds) == td:
            return {"policy": "within", "seconds": seconds}
        return {"policy": "within", "seconds": whole, "microseconds": td.microseconds}


@dataclass(frozen=True)
class KeepAll(_PolicyOps):
    """Keep every checkpoint. Reason ``"keep all"``.

    Example::

        KeepAll()   # never delete anything (explicitly, instead of a magic -1)
    """

    def reasons(self, checkpoints: Sequence[CheckpointInfo], now: datetime) -> list[tuple[str, ...]]:
        """``("keep all",)`` for every checkpoint."""
        return [("keep all",) for _ in checkpoints]

    def to_spec(self) -> dict[str, Any]:
        """``{"policy": "all"}``."""
        return {"policy": "all"}


@dataclass(frozen=True, init=False)
class KeepAny(_PolicyOps):
    """Keep a checkpoint when any of its policies does; its reasons are the union, in policy order,
    without duplicates. ``a | b`` builds one; nested ``KeepAny`` are flattened. ``KeepAny(())`` keeps
    nothing.

    Example::

        KeepAny((KeepLast(3), KeepBest("val_loss", n=2)))   # same as KeepLast(3) | KeepBest(...)
    """

    policies: tuple[RetentionPolicy, ...]

    def __init__(self, policies: Iterable[RetentionPolicy]) -> None:
        if isinstance(policies, str | bytes) or not isinstance(policies, Iterable):
            raise ValueError(f"KeepAny takes a tuple of retention policies, not {policies!r}")
        out: list[RetentionPolicy] = []
        for p in policies:
            if not _is_policy_like(p):
                raise ValueError(
                    f"KeepAny takes retention policies (with reasons() and to_spec()), not {p!r}"
                )
            if isinstance(p, KeepAny):
                out.extend(p.policies)
            else:
                out.append(p)
        object.__setattr__(self, "policies", tuple(out))

    def reasons(self, checkpoints: Sequence[CheckpointInfo], now: datetime) -> list[tuple[str, ...]]:
        """Per checkpoint, the reasons of all policies, in policy order, deduplicated."""
        merged: list[dict[str, None]] = [{} for _ in checkpoints]
        for p in self.policies:
            got = p.reasons(checkpoints, now)
            if len(got) != len(checkpoints):
                raise ValueError(
                    f"{p!r}.reasons() returned {len(got)} entries for {len(checkpoints)} checkpoints"
                )
            for seen, why in zip(merged, got, strict=True):
                seen.update(dict.fromkeys(why))
        return [tuple(seen) for seen in merged]

    def to_spec(self) -> dict[str, Any]:
        """``{"policy": "any", "policies": [spec, ...]}``."""
        return {"policy": "any", "policies": [p.to_spec() for p in self.policies]}


# ----------------------------------------------------------------------------------------------------
# specs

_SPEC_KEYS: dict[str, tuple[set[str], set[str]]] = {  # kind -> (required keys, optional keys)
    "last": ({"n"}, set()),
    "best": ({"metric"}, {"mode", "n", "missing"}),
    "every": (set(), {"steps", "hours"}),
    "within": ({"seconds"}, {"microseconds"}),
    "all": (set(), set()),
    "any": ({"policies"}, set()),
}


def policy_from_spec(spec: Mapping[str, Any]) -> RetentionPolicy:
    """The policy a ``to_spec()`` result describes: ``policy_from_spec(p.to_spec()) == p``.

    Specs are ``{"policy": KIND, ...}`` with KIND one of ``last``, ``best``, ``every``, ``within``,
    ``all``, ``any``; optional fields of ``best`` may be left out. Raises ValueError for anything else.

    Example::

        policy_from_spec({"policy": "any", "policies": [{"policy": "last", "n": 3},
                                                        {"policy": "best", "metric": "val_loss"}]})
    """
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"a retention policy spec must be a mapping like {{'policy': 'last', 'n': 3}}, not {spec!r}"
        )
    kind = spec.get("policy")
    if not isinstance(kind, str) or kind not in _SPEC_KEYS:
        raise ValueError(
            f"retention policy spec needs 'policy' set to one of {', '.join(map(repr, _SPEC_KEYS))}, "
            f"not {kind!r}"
        )
    required, optional = _SPEC_KEYS[kind]
    keys = set(spec) - {"policy"}
    if required - keys:
        raise ValueError(f"retention policy spec {kind!r} is missing {', '.join(sorted(required - keys))}")
    if keys - required - optional:
        extra = ", ".join(sorted(map(str, keys - required - optional)))
        allowed = ", ".join(sorted(required | optional)) or "nothing else"
        raise ValueError(f"retention policy spec {kind!r} has unknown keys {extra} (allowed: {allowed})")
    if kind == "last":
        return KeepLast(spec["n"])
    if kind == "best":
        return KeepBest(
            spec["metric"],
            mode=spec.get("mode", "min"),
            n=spec.get("n", 1),
            missing=spec.get("missing", "keep"),
        )
    if kind == "every":
        return KeepEvery(steps=spec.get("steps"), hours=spec.get("hours"))
    if kind == "within":
        seconds = _real(spec["seconds"], "retention policy spec 'within' seconds", positive=True)
        if "microseconds" not in spec:
            return KeepWithin(seconds)
        micro = _int(spec["microseconds"], "retention policy spec 'within' microseconds", minimum=0)
        whole = _int(spec["seconds"], "retention policy spec 'within' seconds (with microseconds)", minimum=0)
        try:
            return KeepWithin(timedelta(seconds=whole, microseconds=micro))
        except OverflowError:
            raise ValueError(
                f"retention policy spec 'within' duration is too large: {dict(spec)!r}"
            ) from None
    if kind == "all":
        return KeepAll()
    policies = spec["policies"]
    if not isinstance(policies, list | tuple):
        raise ValueError(f"retention policy spec 'any' needs a list of policy specs, not {policies!r}")
    return KeepAny(tuple(policy_from_spec(p) for p in policies))
