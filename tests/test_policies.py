"""Save triggers and retention policies (``cairn.policies``): pure functions on in-memory checkpoint lists."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cairn import CheckpointInfo
from cairn.policies import (
    AnyTrigger,
    AtSteps,
    Every,
    KeepAll,
    KeepAny,
    KeepBest,
    KeepEvery,
    KeepLast,
    KeepWithin,
    RetentionPolicy,
    SaveContext,
    SaveTrigger,
    as_trigger,
    parse_duration,
    policy_from_spec,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)  # a whole number of days (and 6 h windows) since the epoch
NAN = float("nan")
INF = float("inf")


def info(
    step: int,
    *,
    name: str | None = None,
    seconds: float | None = None,
    metrics: dict[str, float | int] | None = None,
) -> CheckpointInfo:
    """A checkpoint at ``step``, written ``seconds`` (default: ``step``) after T0."""
    return CheckpointInfo(
        name=name if name is not None else f"step-{step}",
        step=step,
        time=T0 + timedelta(seconds=step if seconds is None else seconds),
        metrics=metrics or {},
        metadata={},
        nbytes=0,
        num_tensors=0,
        num_blobs=0,
    )


def ctx(
    step: int,
    last_step: int | None = None,
    *,
    epoch: int | None = None,
    last_epoch: int | None = None,
    now: float = 0.0,
    last_time: float | None = None,
    preempted: bool = False,
) -> SaveContext:
    return SaveContext(
        step=step,
        epoch=epoch,
        now=now,
        last_step=last_step,
        last_epoch=last_epoch,
        last_time=last_time,
        preempted=preempted,
    )


def run_steps(trigger: Any, steps: Sequence[int], start: int | None = None) -> list[int]:
    """The steps at which a manager calling ``trigger`` at each of ``steps`` would save."""
    trig = as_trigger(trigger)
    last, saved = start, []
    for s in steps:
        if trig.should_save(ctx(s, last)):
            saved.append(s)
            last = s
    return saved


def kept(policy: RetentionPolicy, infos: Sequence[CheckpointInfo], now: datetime = T0) -> list[str]:
    """Names of the checkpoints the policy keeps, in input order."""
    return [c.name for c, why in zip(infos, policy.reasons(infos, now), strict=True) if why]


def reasons_by_name(
    policy: RetentionPolicy, infos: Sequence[CheckpointInfo], now: datetime = T0
) -> dict[str, tuple[str, ...]]:
    return {c.name: why for c, why in zip(infos, policy.reasons(infos, now), strict=True)}


# ----------------------------------------------------------------------------------------------------
# Every: steps


@pytest.mark.parametrize(
    ("n", "steps", "start", "expected"),
    [
        (500, range(0, 2001, 100), None, [500, 1000, 1500, 2000]),
        (500, range(0, 2001, 100), 0, [500, 1000, 1500, 2000]),
        (500, [0, 333, 499, 501, 777, 1001, 1499, 1500, 1501, 2600], None, [501, 1001, 1500, 2600]),
        (500, [500, 500, 500, 501, 999], None, [500]),  # never twice for one window
        (500, [0, 2750, 2999, 3000], None, [2750, 3000]),  # jumping over windows saves once
        (500, [800, 999, 1000, 1001, 1499], 750, [1000]),  # resumed mid-window
        (500, [1000, 1001, 1499, 1500], 1000, [1500]),  # resumed on a boundary: no save at once
        (500, [1200, 1300], 900, [1200]),  # resumed from a step whose window already passed
        (500, [400, 450], 900, []),  # steps behind the last save never save
        (500, [499], None, []),
        (1, [0, 1, 2, 2, 3], None, [1, 2, 3]),
        (3, [1, 2, 3, 4, 5, 6, 9, 10], 0, [3, 6, 9]),
    ],
)
def test_every_steps_crossing(n: int, steps: Sequence[int], start: int | None, expected: list[int]) -> None:
    assert run_steps(Every(steps=n), list(steps), start) == expected


@given(
    n=st.integers(1, 50),
    start=st.integers(0, 200),
    deltas=st.lists(st.integers(0, 80), max_size=40),
)
def test_every_steps_saves_first_call_of_each_new_window(n: int, start: int, deltas: list[int]) -> None:
    steps, s = [], start
    for d in deltas:
        s += d
        steps.append(s)
    saved = run_steps(Every(steps=n), steps, start)
    windows = [s // n for s in saved]
    assert len(set(windows)) == len(windows), "two saves in one window"
    first_in_window: dict[int, int] = {}
    for s in steps:
        if s // n != start // n:
            first_in_window.setdefault(s // n, s)
    assert saved == sorted(first_in_window.values())


# ----------------------------------------------------------------------------------------------------
# Every: epochs and time


@pytest.mark.parametrize(
    ("every", "epoch", "last_epoch", "expected"),
    [
        (2, 1, None, False),
        (2, 2, None, True),
        (2, 2, 0, True),
        (2, 3, 2, False),
        (2, 4, 2, True),
        (2, 5, 3, True),  # crossed 4 since the last save at 3
        (1, 0, None, False),
        (1, 1, 0, True),
        (1, 1, 1, False),
        (3, None, None, False),  # no epoch known: no epoch decision
        (3, None, 0, False),
    ],
)
def test_every_epochs(every: int, epoch: int | None, last_epoch: int | None, expected: bool) -> None:
    assert Every(epochs=every).should_save(ctx(7, 7, epoch=epoch, last_epoch=last_epoch)) is expected


@pytest.mark.parametrize(
    ("kwargs", "seconds"),
    [
        ({"seconds": 10}, 10.0),
        ({"minutes": 5}, 300.0),
        ({"hours": 2}, 7200.0),
        ({"hours": 1, "minutes": 30}, 5400.0),
        ({"seconds": 10, "minutes": 1, "hours": 1}, 3670.0),
        ({"minutes": 0.5}, 30.0),
        ({"steps": 10}, None),
    ],
)
def test_every_interval_adds_up(kwargs: dict[str, float], seconds: float | None) -> None:
    assert Every(**kwargs).interval_seconds == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("now", "last_time", "expected"),
    [
        (1000.0, None, False),  # no start time known: no time decision
        (299.9, 0.0, False),
        (300.0, 0.0, True),  # inclusive
        (300.1, 0.0, True),
        (5300.0, 5000.0, True),
        (5299.0, 5000.0, False),
        (-700.0, -1000.0, True),  # monotonic clocks may be negative
    ],
)
def test_every_minutes(now: float, last_time: float | None, expected: bool) -> None:
    assert Every(minutes=5).should_save(ctx(3, 3, now=now, last_time=last_time)) is expected


def test_every_time_with_a_fake_monotonic_clock() -> None:
    trigger, last, saved = Every(seconds=300), 0.0, []
    for step, now in enumerate([0.0, 100.0, 299.0, 301.0, 400.0, 600.0, 602.0, 1500.0]):
        if trigger.should_save(ctx(step, None, now=now, last_time=last)):
            saved.append(now)
            last = now
    assert saved == [301.0, 602.0, 1500.0]


def test_every_overhead_interval_keeps_saves_under_the_fraction() -> None:
    assert Every(overhead=0.01).adaptive_interval(0.2) == pytest.approx(19.8)  # 0.2 s of every 20 s
    assert Every(overhead=0.5).adaptive_interval(3.0) == pytest.approx(3.0)
    assert Every(mtbf=3600).adaptive_interval(2.0) == pytest.approx(120.0)  # sqrt(2 * 2 * 3600)
    assert Every(mtbf="1h").adaptive_interval(2.0) == pytest.approx(120.0)
    # with both, the overhead bound is a floor under Young/Daly
    assert Every(overhead=0.001, mtbf=3600).adaptive_interval(2.0) == pytest.approx(1998.0)
    assert Every(overhead=0.5, mtbf=3600).adaptive_interval(2.0) == pytest.approx(120.0)


@given(
    cost=st.floats(1e-4, 100.0),
    fraction=st.floats(1e-4, 0.9),
    steps=st.lists(st.floats(1e-3, 10.0), min_size=1, max_size=200),
)
def test_every_overhead_bounds_the_time_spent_saving(
    cost: float, fraction: float, steps: list[float]
) -> None:
    """Simulated training: whatever the step times, saves never take more than ``fraction`` of the run
    (one save can always happen before the first interval, to measure the cost)."""
    trigger, now, last_time, measured, saving = Every(overhead=fraction), 0.0, 0.0, None, 0.0
    for step, seconds in enumerate(steps, start=1):
        now += seconds
        c = SaveContext(step=step, epoch=None, now=now, last_step=step - 1, last_epoch=None,
                        last_time=last_time, save_seconds=measured)  # fmt: skip
        if trigger.should_save(c):
            now += cost
            saving += cost
            last_time, measured = now, cost
    assert saving <= fraction * now + cost * (1 + 1e-9)


def test_every_overhead_measures_first() -> None:
    trigger = Every(overhead=0.01)
    first = SaveContext(step=1, epoch=None, now=5.0, last_step=None, last_epoch=None, last_time=0.0)
    assert trigger.should_save(first)  # no cost known: save once to measure it
    known = SaveContext(step=2, epoch=None, now=15.0, last_step=1, last_epoch=None, last_time=5.5,
                        save_seconds=0.5)  # fmt: skip
    assert not trigger.should_save(known)  # 9.5 s since, 49.5 s needed
    later = SaveContext(step=9, epoch=None, now=56.0, last_step=1, last_epoch=None, last_time=5.5,
                        save_seconds=0.5)  # fmt: skip
    assert trigger.should_save(later)
    assert (Every(steps=1000) | Every(overhead=0.01)).should_save(later)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overhead": 0}, "overhead"),
        ({"overhead": 1.0}, "fraction"),
        ({"overhead": -0.1}, "overhead"),
        ({"overhead": True}, "overhead"),
        ({"mtbf": 0}, "mtbf"),
        ({"mtbf": "soon"}, "duration"),
        ({"mtbf": float("inf")}, "mtbf"),
    ],
)
def test_every_overhead_and_mtbf_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Every(**kwargs)


def test_every_overhead_repr_and_context_check() -> None:
    assert repr(Every(overhead=0.01, mtbf="2h")) == "Every(overhead=0.01, mtbf=7200.0)"
    with pytest.raises(ValueError, match="save_seconds"):
        SaveContext(step=1, epoch=None, now=0.0, last_step=None, last_epoch=None, last_time=None,
                    save_seconds=-1.0)  # fmt: skip


@pytest.mark.parametrize(
    ("c", "expected"),
    [
        (ctx(150, 50, now=10.0, last_time=0.0), True),  # steps only
        (ctx(60, 50, now=61.0, last_time=0.0), True),  # time only
        (ctx(60, 50, now=10.0, last_time=0.0), False),
        (ctx(60, 50, now=10.0, last_time=0.0, preempted=True), True),
    ],
)
def test_every_steps_or_time(c: SaveContext, expected: bool) -> None:
    assert Every(steps=100, seconds=60).should_save(c) is expected
    assert (Every(steps=100) | Every(seconds=60)).should_save(c) is expected


# ----------------------------------------------------------------------------------------------------
# AtSteps, callables, unions, preemption


@pytest.mark.parametrize(
    ("steps", "last_step", "step", "expected"),
    [
        ([100, 250], None, 99, False),
        ([100, 250], None, 100, True),
        ([100, 250], None, 5000, True),  # nothing saved yet: a passed step still saves
        ([100, 250], 100, 100, False),
        ([100, 250], 100, 249, False),
        ([100, 250], 100, 300, True),  # skipped over 250: saves at the next call
        ([100, 250], 250, 10_000, False),
        ([0], None, 0, True),
        ([0], 0, 5, False),
        ([], None, 10, False),
    ],
)
def test_at_steps(steps: list[int], last_step: int | None, step: int, expected: bool) -> None:
    assert AtSteps(steps).should_save(ctx(step, last_step)) is expected


def test_at_steps_sorted_and_deduplicated() -> None:
    assert AtSteps([300, 100, 300, 200]).steps == (100, 200, 300)
    assert AtSteps(iter([5])) == AtSteps((5,))
    assert run_steps(AtSteps([100, 250, 260]), [0, 90, 120, 255, 300, 400], start=0) == [120, 255, 300]


def test_callables_are_triggers() -> None:
    def on_odd(c: SaveContext) -> bool:
        return c.step % 2 == 1

    t = as_trigger(on_odd)
    assert isinstance(t, SaveTrigger)
    assert [t.should_save(ctx(s)) for s in range(4)] == [False, True, False, True]
    assert t.should_save(ctx(2, preempted=True))
    assert as_trigger(on_odd) == as_trigger(on_odd)
    assert "on_odd" in repr(t)
    assert run_steps(on_odd, [1, 2, 3]) == [1, 3]
    assert run_steps(lambda c: c.step == 2, [1, 2, 3]) == [2]


def test_union_of_triggers() -> None:
    def at_7(c: SaveContext) -> bool:
        return c.step == 7

    union = Every(steps=10) | at_7 | AtSteps([3])
    assert isinstance(union, AnyTrigger)
    assert len(union.triggers) == 3  # flattened
    assert run_steps(union, list(range(25)), start=0) == [3, 7, 10, 20]
    assert run_steps(at_7 | Every(steps=10), list(range(12)), start=0) == [7, 10]  # __ror__
    nested = (Every(steps=1) | Every(epochs=1)) | (AtSteps([1]) | Every(hours=1))
    assert len(nested.triggers) == 4
    assert AnyTrigger([nested, at_7]).triggers == (*nested.triggers, as_trigger(at_7))


def test_custom_trigger_class_composes() -> None:
    class OnStep5:
        def should_save(self, c: SaveContext) -> bool:
            return c.step == 5

    custom = OnStep5()
    assert as_trigger(custom) is custom
    assert run_steps(custom | AtSteps([2]), range(8), start=0) == [2, 5]
    assert run_steps(Every(steps=4) | custom, range(9), start=0) == [4, 5, 8]


@pytest.mark.parametrize(
    "trigger",
    [
        Every(steps=10**9),
        Every(epochs=10**9),
        Every(hours=10**6),
        AtSteps([]),
        AtSteps([10**9]),
        AnyTrigger(()),
        as_trigger(None),
        as_trigger(lambda c: False),
        Every(steps=10**9) | AtSteps([]),
    ],
    ids=repr,
)
def test_preemption_always_saves(trigger: SaveTrigger) -> None:
    assert trigger.should_save(ctx(5, 4, epoch=1, last_epoch=1, now=1.0, last_time=0.0, preempted=True))
    assert not trigger.should_save(ctx(5, 4, epoch=1, last_epoch=1, now=1.0, last_time=0.0))


def test_as_trigger_none_saves_only_when_preempted() -> None:
    never = as_trigger(None)
    assert not any(never.should_save(ctx(s, None, now=1e9, last_time=0.0)) for s in range(0, 10**6, 997))
    assert never.should_save(ctx(0, preempted=True))


def test_as_trigger_returns_triggers_unchanged() -> None:
    t = Every(steps=3)
    assert as_trigger(t) is t


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Every(), "at least one"),
        (lambda: Every(steps=0), "steps must be an integer >= 1"),
        (lambda: Every(steps=-5), "steps must be an integer >= 1"),
        (lambda: Every(steps=2.5), "steps must be an integer"),
        (lambda: Every(steps=True), "steps must be an integer"),
        (lambda: Every(epochs=0), "epochs must be an integer >= 1"),
        (lambda: Every(seconds=0), "seconds must be a finite number > 0"),
        (lambda: Every(minutes=-1), "minutes must be a finite number > 0"),
        (lambda: Every(hours=INF), "hours must be a finite number > 0"),
        (lambda: Every(hours=NAN), "hours must be a finite number > 0"),
        (lambda: Every(seconds="60"), "seconds must be a finite number"),
        (lambda: AtSteps([-1]), "integer >= 0"),
        (lambda: AtSteps([1.5]), "integer >= 0"),
        (lambda: AtSteps(5), "iterable of integers"),
        (lambda: AtSteps("100"), "iterable of integers"),
        (lambda: AnyTrigger((Every(steps=1), 3)), "callable"),
        (lambda: AnyTrigger((None,)), "not None"),
        (lambda: AnyTrigger(Every(steps=1)), "tuple of triggers"),
        (lambda: as_trigger(42), "SaveTrigger"),
        (lambda: ctx(1.5), "step must be an integer"),
        (lambda: ctx(1, now=NAN), "now"),
        (lambda: ctx(1, last_time=INF), "last_time"),
        (lambda: ctx(1, epoch="1"), "epoch"),
        (
            lambda: SaveContext(
                step=1, epoch=None, now=0, last_step=None, last_epoch=None, last_time=None, preempted=1
            ),
            "preempted",
        ),
    ],
)
def test_trigger_argument_validation(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_or_with_a_non_trigger_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Every(steps=1) | 3  # type: ignore[operator]
    with pytest.raises(TypeError):
        KeepLast(1) | Every(steps=1)  # type: ignore[operator]


def test_triggers_are_frozen_and_keyword_only() -> None:
    with pytest.raises(FrozenInstanceError):
        Every(steps=1).steps = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Every(5)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        SaveContext(1, None, 0.0, None, None, None)  # type: ignore[call-arg]
    assert repr(Every(steps=5, hours=1)) == "Every(steps=5, hours=1)"


# ----------------------------------------------------------------------------------------------------
# KeepLast, KeepBest


@pytest.mark.parametrize(
    ("n", "steps", "expected"),
    [
        (1, [0, 10, 20], ["step-20"]),
        (2, [20, 0, 10], ["step-20", "step-10"]),  # input order is kept, not assumed sorted
        (3, [5, 1], ["step-5", "step-1"]),  # n larger than count keeps all
        (2, [], []),
    ],
)
def test_keep_last(n: int, steps: list[int], expected: list[str]) -> None:
    assert kept(KeepLast(n), [info(s) for s in steps]) == expected


def test_keep_last_ties_by_time_then_name() -> None:
    infos = [
        info(10, name="b", seconds=5),
        info(10, name="a", seconds=9),
        info(10, name="c", seconds=5),
        info(9, name="z", seconds=99),
    ]
    assert kept(KeepLast(1), infos) == ["a"]
    assert kept(KeepLast(2), infos) == ["a", "c"]
    assert reasons_by_name(KeepLast(2), infos) == {"b": (), "a": ("last 2",), "c": ("last 2",), "z": ()}


def losses(*values: float | None) -> list[CheckpointInfo]:
    """Checkpoints at steps 0, 1, ... with those val_loss values (None: no metric)."""
    return [info(i, metrics={} if v is None else {"val_loss": v, "acc": -i}) for i, v in enumerate(values)]


@pytest.mark.parametrize(
    ("policy", "values", "expected"),
    [
        (KeepBest("val_loss"), [0.5, 0.2, 0.9], [1]),
        (KeepBest("val_loss", n=2), [0.5, 0.2, 0.9], [0, 1]),
        (KeepBest("val_loss", mode="max"), [0.5, 0.2, 0.9], [2]),
        (KeepBest("val_loss", mode="max", n=2), [0.5, 0.2, 0.9], [0, 2]),
        (KeepBest("val_loss"), [0.3, 0.3, 0.4], [1]),  # ties: newer step first
        (KeepBest("val_loss", n=2), [0.3, 0.3, 0.3], [1, 2]),
        (KeepBest("val_loss"), [NAN, 0.9], [1]),  # NaN is never best
        (KeepBest("val_loss", mode="max"), [NAN, 0.9], [1]),
        (KeepBest("val_loss", n=5), [NAN, 0.9, NAN], [1]),
        (KeepBest("val_loss"), [NAN, NAN], []),
        (KeepBest("val_loss", n=10), [0.5, 0.2], [0, 1]),  # n larger than count
        (KeepBest("val_loss"), [1, 0.5, 2], [1]),  # ints and floats
        (KeepBest("val_loss"), [INF, -INF, 0.0], [1]),
        (KeepBest("val_loss", mode="max"), [INF, -INF, 0.0], [0]),
        (KeepBest("val_loss"), [0.5, None, 0.2], [1, 2]),  # missing="keep" keeps the one without
        (KeepBest("val_loss", missing="drop"), [0.5, None, 0.2], [2]),
        (KeepBest("val_loss", missing="drop"), [None, None], []),
        (KeepBest("val_loss"), [None, None], [0, 1]),
        (KeepBest("val_loss", n=2, missing="drop"), [NAN, None, 0.1, 0.0], [2, 3]),
        (KeepBest("acc", mode="max"), [0.5, 0.2, 0.9], [0]),
    ],
    ids=str,
)
def test_keep_best(policy: KeepBest, values: list[float | None], expected: list[int]) -> None:
    assert kept(policy, losses(*values)) == [f"step-{i}" for i in expected]


def test_keep_best_reasons() -> None:
    infos = losses(0.5, None, 0.2, NAN, 0.9)
    assert KeepBest("val_loss", n=2).reasons(infos, T0) == [
        ("best 2 by val_loss (min)",),
        ("no val_loss metric",),
        ("best 2 by val_loss (min)",),
        (),
        (),
    ]
    assert KeepBest("val_loss", mode="max", missing="drop").reasons(infos, T0) == [
        (),
        (),
        (),
        (),
        ("best 1 by val_loss (max)",),
    ]


def test_keep_best_best() -> None:
    infos = losses(0.5, None, 0.2, NAN, 0.2, 0.9)
    assert KeepBest("val_loss").best(infos) is infos[4]  # tie: newer
    assert KeepBest("val_loss", mode="max").best(infos) is infos[5]
    assert KeepBest("val_loss", n=3).best(infos) is infos[4]  # n does not matter
    assert KeepBest("val_loss").best(losses(NAN, None)) is None
    assert KeepBest("val_loss").best([]) is None
    assert KeepBest("nope").best(infos) is None


def test_keep_best_ignores_input_order_for_ties() -> None:
    infos = [info(3, metrics={"m": 1.0}), info(9, metrics={"m": 1.0}), info(5, metrics={"m": 1.0})]
    assert kept(KeepBest("m"), infos) == ["step-9"]
    assert kept(KeepBest("m"), infos[::-1]) == ["step-9"]


# ----------------------------------------------------------------------------------------------------
# KeepEvery, KeepWithin, KeepAll


@pytest.mark.parametrize(
    ("steps", "every", "expected"),
    [
        ([0, 100, 499, 500, 501, 999, 1000, 2500], 500, [0, 500, 1000, 2500]),
        ([499, 501, 999, 1001, 1499], 500, [499, 501, 1001]),  # oldest of each window
        ([999, 501, 1001, 499], 500, [501, 1001, 499]),  # input order kept
        ([7, 3, 5], 1, [7, 3, 5]),
        ([], 10, []),
    ],
)
def test_keep_every_steps(steps: list[int], every: int, expected: list[int]) -> None:
    assert kept(KeepEvery(steps=every), [info(s) for s in steps]) == [f"step-{s}" for s in expected]


def test_keep_every_steps_ties_inside_a_step() -> None:
    infos = [info(500, name="late", seconds=10), info(500, name="early", seconds=1), info(501, name="x")]
    assert kept(KeepEvery(steps=500), infos) == ["early"]


H = 3600.0


@pytest.mark.parametrize(
    ("hours", "times", "expected"),
    [
        (6, [0, H, 5 * H, 6 * H, 7 * H, 13 * H], [0, 3, 5]),
        (6, [7 * H, 6 * H + 1, 0.5], [1, 2]),  # oldest time of each window; input order kept
        (1, [0, 1800, 3599.999, 3600], [0, 3]),
        (24, [-1, 0, 86399, 86400], [0, 1, 3]),  # windows are absolute (aligned to the epoch)
        (0.5, [0, 1799, 1800, 3599], [0, 2]),
    ],
)
def test_keep_every_hours(hours: float, times: list[float], expected: list[int]) -> None:
    infos = [info(i, seconds=t) for i, t in enumerate(times)]
    assert kept(KeepEvery(hours=hours), infos) == [infos[i].name for i in expected]


def test_keep_every_hours_picks_the_oldest_time_not_the_lowest_step() -> None:
    # a run restarted from an older checkpoint writes lower steps later
    infos = [info(1000, seconds=100), info(600, seconds=200)]
    assert kept(KeepEvery(hours=1), infos) == ["step-1000"]
    assert kept(KeepEvery(steps=10_000), infos) == ["step-600"]


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        (KeepEvery(steps=500), "every 500 steps"),
        (KeepEvery(steps=1), "every 1 step"),
        (KeepEvery(hours=6), "every 6 h"),
        (KeepEvery(hours=0.5), "every 30 min"),
        (KeepEvery(hours=24), "every 1 day"),
        (KeepEvery(hours=48), "every 2 days"),
        (KeepEvery(hours=1.5), "every 90 min"),
        (KeepWithin(86400), "within 1 day"),
        (KeepWithin(timedelta(days=2)), "within 2 days"),
        (KeepWithin(timedelta(hours=36)), "within 36 h"),
        (KeepWithin(5400), "within 90 min"),
        (KeepWithin(90), "within 90 s"),
        (KeepWithin(100.5), "within 100.5 s"),
        (KeepWithin(0.25), "within 0.25 s"),
        (KeepWithin(timedelta(weeks=1)), "within 7 days"),
        (KeepLast(3), "last 3"),
        (KeepBest("val_loss", n=2), "best 2 by val_loss (min)"),
        (KeepAll(), "keep all"),
    ],
    ids=repr,
)
def test_reason_texts(policy: RetentionPolicy, reason: str) -> None:
    infos = [info(0, seconds=0, metrics={"val_loss": 1.0})]
    assert policy.reasons(infos, T0 + timedelta(seconds=0.1)) == [(reason,)]


@pytest.mark.parametrize(
    ("duration", "times", "expected"),
    [
        (3600, [-3601, -3600, -10, 0, 100], [1, 2, 3, 4]),  # inclusive; the future counts as within
        (timedelta(days=1), [-86400.5, -86399], [1]),
        (0.5, [-1, -0.5, -0.25], [1, 2]),
    ],
)
def test_keep_within(duration: timedelta | float, times: list[float], expected: list[int]) -> None:
    infos = [info(i, seconds=t) for i, t in enumerate(times)]
    assert kept(KeepWithin(duration), infos, now=T0) == [infos[i].name for i in expected]


def test_keep_within_other_time_zones_and_naive_now() -> None:
    infos = [info(0, seconds=-7200), info(1, seconds=-1800)]
    plus2 = T0.astimezone(timezone(timedelta(hours=2)))
    assert kept(KeepWithin(3600), infos, now=plus2) == ["step-1"]
    with pytest.raises(ValueError, match="timezone-aware"):
        KeepWithin(3600).reasons(infos, datetime(2026, 1, 1))


def test_keep_within_float_equals_timedelta() -> None:
    assert KeepWithin(86400) == KeepWithin(timedelta(days=1))
    assert KeepWithin(1.5).duration == timedelta(seconds=1.5)
    huge = KeepWithin(timedelta(days=999_999_999))
    assert kept(huge, [info(0)], now=T0) == ["step-0"]


def test_keep_all() -> None:
    infos = [info(s) for s in (3, 1, 2)]
    assert KeepAll().reasons(infos, T0) == [("keep all",)] * 3
    assert KeepAll().reasons([], T0) == []


# ----------------------------------------------------------------------------------------------------
# unions


def test_keep_any_union_and_reasons() -> None:
    infos = [info(s, metrics={"val_loss": 1 / (1 + s % 7)}) for s in range(0, 3000, 250)]
    policy = KeepLast(2) | KeepBest("val_loss", n=2) | KeepEvery(steps=1000)
    assert isinstance(policy, KeepAny)
    assert len(policy.policies) == 3
    got = reasons_by_name(policy, infos)
    # val_loss is lowest where step % 7 is highest: 1000 and 2750 (both 6)
    assert got["step-2750"] == ("last 2", "best 2 by val_loss (min)")
    assert got["step-2500"] == ("last 2",)
    assert got["step-1000"] == ("best 2 by val_loss (min)", "every 1000 steps")
    assert got["step-2000"] == ("every 1000 steps",)
    assert got["step-0"] == ("every 1000 steps",)
    assert [n for n, why in got.items() if why] == [
        "step-0",
        "step-1000",
        "step-2000",
        "step-2500",
        "step-2750",
    ]


def test_keep_any_deduplicates_and_flattens() -> None:
    infos = [info(1), info(2)]
    twice = KeepLast(1) | KeepLast(1)
    assert twice.reasons(infos, T0) == [(), ("last 1",)]
    nested = (KeepLast(1) | KeepAll()) | (KeepWithin(10) | KeepEvery(steps=5))
    assert [type(p).__name__ for p in nested.policies] == ["KeepLast", "KeepAll", "KeepWithin", "KeepEvery"]
    assert KeepAny([nested]).policies == nested.policies
    assert nested.reasons(infos, T0) == [
        ("keep all", "within 10 s", "every 5 steps"),
        ("last 1", "keep all", "within 10 s"),
    ]
    assert KeepAny(()).reasons(infos, T0) == [(), ()]


def test_custom_policy_composes() -> None:
    class KeepEven:
        def reasons(self, checkpoints: Sequence[CheckpointInfo], now: datetime) -> list[tuple[str, ...]]:
            return [("even",) if c.step % 2 == 0 else () for c in checkpoints]

        def to_spec(self) -> dict[str, Any]:
            return {"policy": "even"}

    infos = [info(s) for s in range(5)]
    assert isinstance(KeepEven(), RetentionPolicy)
    union = KeepEven() | KeepLast(1)  # __ror__
    assert kept(union, infos) == ["step-0", "step-2", "step-4"]
    assert reasons_by_name(KeepLast(1) | KeepEven(), infos)["step-4"] == ("last 1", "even")
    assert union.to_spec() == {"policy": "any", "policies": [{"policy": "even"}, {"policy": "last", "n": 1}]}
    with pytest.raises(ValueError, match="'policy' set to one of"):
        policy_from_spec(union.to_spec())


def test_keep_any_checks_the_length_of_reasons() -> None:
    class Broken:
        def reasons(self, checkpoints: Sequence[CheckpointInfo], now: datetime) -> list[tuple[str, ...]]:
            return []

        def to_spec(self) -> dict[str, Any]:
            return {}

    with pytest.raises(ValueError, match="returned 0 entries for 1"):
        KeepAny((Broken(),)).reasons([info(0)], T0)


# ----------------------------------------------------------------------------------------------------
# argument validation and specs


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: KeepLast(0), "n must be an integer >= 1"),
        (lambda: KeepLast(-1), "n must be an integer >= 1"),
        (lambda: KeepLast(2.0), "n must be an integer >= 1"),
        (lambda: KeepLast(True), "n must be an integer >= 1"),
        (lambda: KeepBest(""), "metric must be a non-empty string"),
        (lambda: KeepBest(3), "metric must be a non-empty string"),
        (lambda: KeepBest("x", mode="minimum"), "mode must be one of 'min', 'max'"),
        (lambda: KeepBest("x", n=0), "n must be an integer >= 1"),
        (lambda: KeepBest("x", missing="ignore"), "missing must be one of 'keep', 'drop'"),
        (lambda: KeepEvery(), "exactly one of steps="),
        (lambda: KeepEvery(steps=5, hours=1), "exactly one of steps="),
        (lambda: KeepEvery(steps=0), "steps must be an integer >= 1"),
        (lambda: KeepEvery(hours=0), "hours must be a finite number > 0"),
        (lambda: KeepEvery(hours=NAN), "hours must be a finite number > 0"),
        (lambda: KeepWithin(0), "duration .* > 0"),
        (lambda: KeepWithin(-5.0), "duration .* > 0"),
        (lambda: KeepWithin(timedelta(0)), "duration must be > 0"),
        (lambda: KeepWithin(timedelta(seconds=-1)), "duration must be > 0"),
        (lambda: KeepWithin(INF), "finite number > 0"),
        (lambda: KeepWithin(1e300), "too large"),
        (lambda: KeepWithin("2d"), "timedelta or seconds"),
        (lambda: KeepAny((KeepLast(1), 3)), "retention policies"),
        (lambda: KeepAny(KeepLast(1)), "tuple of retention policies"),
    ],
)
def test_policy_argument_validation(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_policies_are_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        KeepLast(1).n = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        KeepBest("val_loss", "max")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        KeepEvery(500)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("spec", "policy"),
    [
        ({"policy": "last", "n": 3}, KeepLast(3)),
        ({"policy": "best", "metric": "val_loss"}, KeepBest("val_loss")),
        (
            {"policy": "best", "metric": "acc", "mode": "max", "n": 2, "missing": "drop"},
            KeepBest("acc", mode="max", n=2, missing="drop"),
        ),
        ({"policy": "every", "steps": 500}, KeepEvery(steps=500)),
        ({"policy": "every", "hours": 6}, KeepEvery(hours=6)),
        ({"policy": "within", "seconds": 172800}, KeepWithin(timedelta(days=2))),
        ({"policy": "within", "seconds": 1.5}, KeepWithin(1.5)),
        (
            {"policy": "within", "seconds": 8589974400, "microseconds": 1},
            KeepWithin(timedelta(days=99421, microseconds=1)),
        ),
        ({"policy": "all"}, KeepAll()),
        ({"policy": "any", "policies": []}, KeepAny(())),
        (
            {"policy": "any", "policies": [{"policy": "last", "n": 1}, {"policy": "all"}]},
            KeepLast(1) | KeepAll(),
        ),
    ],
)
def test_spec_table(spec: dict[str, Any], policy: RetentionPolicy) -> None:
    assert policy_from_spec(spec) == policy
    if spec != {"policy": "best", "metric": "val_loss"}:  # the one spec that leaves out defaults
        assert policy.to_spec() == spec


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ([1, 2], "must be a mapping"),
        ({}, "'policy' set to one of"),
        ({"policy": "newest"}, "'policy' set to one of"),
        ({"policy": 3}, "'policy' set to one of"),
        ({"policy": "last"}, "missing n"),
        ({"policy": "last", "n": 3, "m": 1}, "unknown keys m"),
        ({"policy": "all", "n": 3}, "unknown keys n .allowed: nothing else"),
        ({"policy": "last", "n": "3"}, "n must be an integer"),
        ({"policy": "last", "n": 0}, "n must be an integer >= 1"),
        ({"policy": "best", "metric": "x", "mode": "avg"}, "mode must be one of"),
        ({"policy": "best", "n": 2}, "missing metric"),
        ({"policy": "every"}, "exactly one"),
        ({"policy": "every", "steps": 5, "hours": 1}, "exactly one"),
        ({"policy": "every", "hours": "6"}, "hours must be a finite number"),
        ({"policy": "within", "seconds": "2d"}, "seconds must be a finite number > 0"),
        ({"policy": "within", "seconds": -1}, "seconds must be a finite number > 0"),
        ({"policy": "within", "seconds": None}, "seconds must be a finite number > 0"),
        (
            {"policy": "within", "seconds": 1.5, "microseconds": 1},
            "seconds .with microseconds. must be an integer",
        ),
        ({"policy": "within", "seconds": 1, "microseconds": -1}, "microseconds must be an integer >= 0"),
        ({"policy": "within", "seconds": 10**15, "microseconds": 0}, "too large"),
        ({"policy": "any", "policies": {"policy": "all"}}, "needs a list"),
        ({"policy": "any", "policies": [{"policy": "all"}, "last"]}, "must be a mapping"),
        ({"policy": "any", "policies": [{"policy": "last", "n": -1}]}, "n must be an integer >= 1"),
    ],
)
def test_bad_specs(spec: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        policy_from_spec(spec)


# ----------------------------------------------------------------------------------------------------
# parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("30min", 1800),
        ("6h", 21600),
        ("2d", 172800),
        ("1w", 604800),
        ("3600", 3600),
        ("1.5h", 5400),
        ("0.5", 0.5),
        (".5m", 30),
        ("1h30m", 5400),
        ("1d 12h", 129600),
        (" 2 days ", 172800),
        ("10 seconds", 10),
        ("0s", 0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "abc",
        "5x",
        "-5s",
        "+5s",
        "1M",
        "2D",
        "nan",
        "inf",
        "1e3",
        "h",
        "5 s s",
        "5h h",
        "1..5h",
        "5s-",
    ],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="'90s', '30m'"):
        parse_duration(text)


def test_parse_duration_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_duration(3600)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# properties


metric_values = st.one_of(
    st.none(),
    st.just(NAN),
    st.integers(-3, 3),
    st.sampled_from([0.1, 0.5, -INF, INF]),
    st.floats(-10, 10, allow_nan=False),
)


@st.composite
def checkpoint_lists(draw: st.DrawFn) -> list[CheckpointInfo]:
    """Unique names; steps and times independent (runs restart, clocks jump), often tied."""
    count = draw(st.integers(0, 25))
    infos = []
    for i in range(count):
        value = draw(metric_values)
        infos.append(
            info(
                draw(st.one_of(st.integers(0, 40), st.integers(0, 5000))),
                name=f"ckpt-{i:02d}",
                seconds=draw(st.one_of(st.integers(-100, 100), st.floats(-40 * 86400, 40 * 86400))),
                metrics={} if value is None else {"val_loss": value},
            )
        )
    return infos


base_policies: st.SearchStrategy[RetentionPolicy] = st.one_of(
    st.builds(KeepLast, st.integers(1, 6)),
    st.builds(
        KeepBest,
        st.sampled_from(["val_loss", "other"]),
        mode=st.sampled_from(["min", "max"]),
        n=st.integers(1, 4),
        missing=st.sampled_from(["keep", "drop"]),
    ),
    st.builds(KeepEvery, steps=st.integers(1, 2000)),
    st.builds(KeepEvery, hours=st.one_of(st.integers(1, 200), st.floats(0.001, 1000))),
    st.builds(KeepWithin, st.one_of(st.integers(1, 10**7), st.floats(1e-3, 1e8))),
    st.builds(KeepWithin, st.timedeltas(min_value=timedelta(microseconds=1))),
    st.just(KeepAll()),
)
policies: st.SearchStrategy[RetentionPolicy] = st.one_of(
    base_policies,
    st.lists(base_policies, max_size=4).map(lambda ps: KeepAny(tuple(ps))),
    st.lists(st.one_of(base_policies, st.lists(base_policies, max_size=3).map(KeepAny)), min_size=1).map(
        lambda ps: KeepAny(ps)
    ),
)
nows = st.datetimes(min_value=datetime(2025, 11, 1), max_value=datetime(2026, 3, 1), timezones=st.just(UTC))


@given(policy=policies)
def test_spec_round_trip(policy: RetentionPolicy) -> None:
    spec = policy.to_spec()
    assert json.loads(json.dumps(spec, allow_nan=False)) == spec  # plain JSON
    again = policy_from_spec(json.loads(json.dumps(spec)))
    assert again == policy
    assert again.to_spec() == spec


@given(policy=policies, infos=checkpoint_lists(), now=nows, data=st.data())
def test_input_order_does_not_matter(
    policy: RetentionPolicy, infos: list[CheckpointInfo], now: datetime, data: st.DataObject
) -> None:
    got = policy.reasons(infos, now)
    assert len(got) == len(infos)
    assert all(isinstance(r, tuple) and all(isinstance(s, str) for s in r) for r in got)
    perm = data.draw(st.permutations(range(len(infos))))
    shuffled = policy.reasons([infos[i] for i in perm], now)
    assert shuffled == [got[i] for i in perm]


@given(policy=policies, infos=checkpoint_lists(), now=nows, data=st.data())
def test_deleting_an_unkept_checkpoint_changes_nothing_else(
    policy: RetentionPolicy, infos: list[CheckpointInfo], now: datetime, data: st.DataObject
) -> None:
    got = policy.reasons(infos, now)
    unkept = [i for i, why in enumerate(got) if not why]
    assume(unkept)
    gone = data.draw(st.sampled_from(unkept))
    rest = [c for i, c in enumerate(infos) if i != gone]
    assert policy.reasons(rest, now) == [why for i, why in enumerate(got) if i != gone]


@given(policy=policies, infos=checkpoint_lists(), now=nows)
def test_retention_is_a_fixed_point(
    policy: RetentionPolicy, infos: list[CheckpointInfo], now: datetime
) -> None:
    """Deleting everything not kept, then asking again, keeps everything that is left, for the same
    reasons: running retention twice never deletes more."""
    got = policy.reasons(infos, now)
    survivors = [(c, why) for c, why in zip(infos, got, strict=True) if why]
    assert policy.reasons([c for c, _ in survivors], now) == [why for _, why in survivors]


@given(infos=checkpoint_lists(), steps=st.integers(1, 2000))
def test_keep_every_steps_keeps_the_oldest_of_each_window(infos: list[CheckpointInfo], steps: int) -> None:
    keep = {c.name for c, why in zip(infos, KeepEvery(steps=steps).reasons(infos, T0), strict=True) if why}
    windows: dict[int, list[CheckpointInfo]] = {}
    for c in infos:
        windows.setdefault(c.step // steps, []).append(c)
    assert keep == {min(w, key=lambda c: (c.step, c.time, c.name)).name for w in windows.values()}


@given(infos=checkpoint_lists(), hours=st.floats(0.01, 500))
def test_keep_every_hours_keeps_the_oldest_of_each_window(infos: list[CheckpointInfo], hours: float) -> None:
    keep = {c.name for c, why in zip(infos, KeepEvery(hours=hours).reasons(infos, T0), strict=True) if why}
    windows: dict[int, list[CheckpointInfo]] = {}
    for c in infos:
        windows.setdefault(math.floor(c.time.timestamp() / (hours * 3600)), []).append(c)
    assert keep == {min(w, key=lambda c: (c.time, c.step, c.name)).name for w in windows.values()}


@given(infos=checkpoint_lists(), n=st.integers(1, 30))
def test_keep_last_keeps_the_n_newest(infos: list[CheckpointInfo], n: int) -> None:
    keep = kept(KeepLast(n), infos)
    newest = sorted(infos, key=lambda c: (c.step, c.time, c.name))[-n:]
    assert sorted(keep) == sorted(c.name for c in newest)


@given(
    infos=checkpoint_lists(),
    n=st.integers(1, 30),
    mode=st.sampled_from(["min", "max"]),
    missing=st.sampled_from(["keep", "drop"]),
)
def test_keep_best_keeps_the_n_best_and_never_nan(
    infos: list[CheckpointInfo], n: int, mode: str, missing: str
) -> None:
    policy = KeepBest("val_loss", mode=mode, n=n, missing=missing)
    got = dict(zip((c.name for c in infos), policy.reasons(infos, T0), strict=True))
    scored = [c for c in infos if "val_loss" in c.metrics and not math.isnan(c.metrics["val_loss"])]
    best = [name for name, why in got.items() if why and why[0].startswith("best")]
    assert len(best) == min(n, len(scored))
    sign = 1 if mode == "min" else -1
    in_best = [c for c in scored if c.name in best]
    out_best = [c for c in scored if c.name not in best]
    if in_best and out_best:  # every kept one is at least as good as every dropped one
        assert max(sign * c.metrics["val_loss"] for c in in_best) <= min(
            sign * c.metrics["val_loss"] for c in out_best
        )
    for c in infos:
        if "val_loss" not in c.metrics:
            assert got[c.name] == (("no val_loss metric",) if missing == "keep" else ())
        elif math.isnan(c.metrics["val_loss"]):
            assert got[c.name] == ()
    champion = policy.best(infos)
    if scored:
        assert champion is not None
        assert champion.name in best
    else:
        assert champion is None


@given(infos=checkpoint_lists(), duration=st.floats(1, 10**7), now=nows)
def test_keep_within_is_a_cutoff(infos: list[CheckpointInfo], duration: float, now: datetime) -> None:
    got = KeepWithin(duration).reasons(infos, now)
    cutoff = now - timedelta(seconds=duration)
    assert [bool(why) for why in got] == [c.time >= cutoff for c in infos]


@given(a=policies, b=policies, infos=checkpoint_lists(), now=nows)
def test_union_keeps_what_either_keeps(
    a: RetentionPolicy, b: RetentionPolicy, infos: list[CheckpointInfo], now: datetime
) -> None:
    ra, rb, both = a.reasons(infos, now), b.reasons(infos, now), KeepAny((a, b)).reasons(infos, now)
    for x, y, u in zip(ra, rb, both, strict=True):
        assert set(u) == set(x) | set(y)
        assert len(u) == len(set(u))
        assert list(dict.fromkeys((*x, *y))) == list(u)
