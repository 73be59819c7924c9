"""MonitorCallback, EarlyStopping, ReduceLROnPlateau and LearningRateScheduler.

Every expected stop epoch and learning-rate sequence below is worked out by hand from the documented
(Keras 3) semantics, and the hooks are called as a ``CallbackList`` would call them in ``fit``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import cairn
from cairn.callbacks.base import Callback, CallbackList
from cairn.callbacks.early_stopping import EarlyStopping
from cairn.callbacks.lr import LearningRateScheduler, ReduceLROnPlateau
from cairn.callbacks.monitor import MonitorCallback

NAN = float("nan")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    model.stop_training = False  # type: ignore[assignment]
    return model


def _set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _drive(
    cb: Callback,
    values: Sequence[float | None],
    *,
    monitor: str = "val_loss",
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start: int = 0,
    train_begin: bool = True,
    train_end: bool = True,
) -> tuple[int | None, list[dict[str, Any]]]:
    """Feed one value per epoch (None: the monitor is missing); the epoch training stopped at, and logs.

    Before each epoch end the model's weights are set to the epoch number, so restored weights tell which
    epoch they came from.
    """
    model = model if model is not None else _model()
    optimizer = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=1.0)
    cbs = CallbackList([cb], model=model, optimizer=optimizer, epochs=start + len(values))
    if train_begin:
        cbs.on_train_begin()
    stopped = None
    all_logs = []
    for epoch, value in enumerate(values, start=start):
        cbs.on_epoch_begin(epoch)
        _set_weights(model, float(epoch))
        logs: dict[str, Any] = {"loss": 0.0} if value is None else {"loss": 0.0, monitor: value}
        cbs.on_epoch_end(epoch, logs)
        all_logs.append(logs)
        if model.stop_training:
            stopped = epoch
            break
    if train_end:
        cbs.on_train_end()
    return stopped, all_logs


# -- MonitorCallback ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("monitor", "direction"),
    [
        ("loss", "min"),
        ("val_loss", "min"),
        ("val_reconstruction_loss", "min"),
        ("acc", "max"),
        ("val_acc", "max"),
        ("accuracy", "max"),
        ("val_accuracy", "max"),
        ("val_sparse_categorical_accuracy", "max"),
        ("top5_acc", "max"),
        ("auc", "max"),
        ("val_precision", "max"),
        ("recall", "max"),
        ("val_f1", "max"),
        ("f1_score", "max"),
    ],
)
def test_auto_mode_infers_direction_from_the_name(monitor: str, direction: str) -> None:
    assert MonitorCallback(monitor=monitor).direction == direction
    assert EarlyStopping(monitor=monitor).direction == direction


@pytest.mark.parametrize("monitor", ["val_mse", "mae", "lossy", "learning_rate", "val_accuracy_drop"])
def test_auto_mode_raises_for_names_it_cannot_read(monitor: str) -> None:
    with pytest.raises(ValueError, match=r"mode='max'.*mode='min'"):
        EarlyStopping(monitor=monitor)
    with pytest.raises(ValueError, match="maximized or minimized"):
        ReduceLROnPlateau(monitor=monitor)
    assert EarlyStopping(monitor=monitor, mode="min").direction == "min"
    assert EarlyStopping(monitor=monitor, mode="max").direction == "max"


def test_unknown_mode_warns_and_falls_back_to_auto() -> None:
    with pytest.warns(UserWarning, match="mode 'minimum' is unknown, fallback to auto"):
        cb = EarlyStopping(monitor="val_loss", mode="minimum")
    assert cb.mode == "auto" and cb.direction == "min"
    with (
        pytest.warns(UserWarning, match="unknown"),
        pytest.raises(ValueError, match="maximized or minimized"),
    ):
        EarlyStopping(monitor="val_mse", mode="up")


def test_is_improvement_min_delta_semantics() -> None:
    low = MonitorCallback("val_loss", min_delta=0.1)
    assert low._is_improvement(0.85, 1.0)  # 0.85 + 0.1 < 1.0
    assert not low._is_improvement(0.95, 1.0)
    assert not low._is_improvement(1.0, 1.0)
    assert low._is_improvement(123.0, None)
    high = MonitorCallback("val_accuracy", min_delta=-0.1)  # the sign of min_delta is ignored
    assert high.min_delta == 0.1
    assert high._is_improvement(0.65, 0.5)  # 0.65 - 0.1 > 0.5
    assert not high._is_improvement(0.55, 0.5)
    assert not high._is_improvement(0.5, 0.5)
    for cb in (low, high):
        assert not cb._is_improvement(NAN, None)
        assert not cb._is_improvement(NAN, 1.0)


def test_initial_best_is_baseline_or_the_worst_value() -> None:
    assert MonitorCallback("val_loss").best == math.inf
    assert MonitorCallback("val_acc").best == -math.inf
    assert MonitorCallback("val_acc", baseline=0.7).best == 0.7


def test_monitor_value_accepts_tensors_and_numpy_and_rejects_vectors() -> None:
    import numpy as np

    cb = MonitorCallback("val_loss")
    assert cb._get_monitor_value({"val_loss": torch.tensor(0.5)}) == 0.5
    assert cb._get_monitor_value({"val_loss": np.float32(0.25)}) == 0.25
    with pytest.raises(ValueError, match="scalar"):
        cb._get_monitor_value({"val_loss": torch.ones(3)})


# -- EarlyStopping ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("patience", [0, 1])
def test_patience_0_and_1_stop_at_the_first_epoch_without_improvement(patience: int) -> None:
    # wait is incremented before the check, so a non-improving epoch always has wait >= 1.
    cb = EarlyStopping(patience=patience)
    stopped, _ = _drive(cb, [1.0, 0.9, 0.8, 0.85, 0.7])
    assert stopped == 3 and cb.stopped_epoch == 3
    assert cb.best == 0.8 and cb.best_epoch == 2 and cb.wait == 1


def test_patience_0_never_stops_at_epoch_0() -> None:
    cb = EarlyStopping(patience=0)
    stopped, _ = _drive(cb, [NAN, 1.0, 2.0])  # epoch 0 does not improve, but epoch 0 never stops
    assert stopped == 2


def test_patience_3_counts_consecutive_epochs_without_improvement() -> None:
    cb = EarlyStopping(patience=3)
    # improvements at 0 and 3; 4, 5, 6 don't: wait reaches 3 at epoch 6
    stopped, _ = _drive(cb, [1.0, 1.1, 1.2, 0.5, 0.6, 0.7, 0.8, 0.1])
    assert stopped == 6
    assert (cb.best, cb.best_epoch, cb.wait) == (0.5, 3, 3)


def test_runs_to_the_end_without_stopping() -> None:
    cb = EarlyStopping(patience=2)
    stopped, _ = _drive(cb, [1.0, 1.1, 0.9, 1.0, 0.8])
    assert stopped is None and cb.stopped_epoch == 0


def test_ties_are_not_improvements() -> None:
    stopped, _ = _drive(EarlyStopping(patience=1), [1.0, 1.0, 0.5])
    assert stopped == 1
    stopped, _ = _drive(EarlyStopping(monitor="val_accuracy", patience=1), [0.5, 0.5], monitor="val_accuracy")
    assert stopped == 1


def test_min_delta_in_min_mode() -> None:
    cb = EarlyStopping(min_delta=0.1, patience=2)
    # 0.95 is not 0.1 below 1.0 (wait 1); 0.8 is (best, wait 0); 0.75 and 0.72 are not below 0.7
    stopped, _ = _drive(cb, [1.0, 0.95, 0.8, 0.75, 0.72, 0.1])
    assert stopped == 4 and cb.best == 0.8 and cb.best_epoch == 2


def test_min_delta_in_max_mode() -> None:
    cb = EarlyStopping(monitor="val_accuracy", min_delta=0.05, patience=2)
    stopped, _ = _drive(cb, [0.5, 0.53, 0.6, 0.62, 0.63, 0.9], monitor="val_accuracy")
    assert stopped == 4 and cb.best == 0.6 and cb.best_epoch == 2


def test_mode_max_on_a_loss_name_is_honoured() -> None:
    stopped, _ = _drive(EarlyStopping(mode="max", patience=0), [1.0, 2.0, 1.5])
    assert stopped == 2


def test_baseline_not_reached_stops_after_patience_even_while_improving_on_best() -> None:
    # Without a baseline, patience 2 would not stop at epoch 2 (wait 1 there).
    assert _drive(EarlyStopping(patience=2), [1.0, 0.9, 0.95, 0.85])[0] is None
    cb = EarlyStopping(patience=2, baseline=0.5)
    # Every value improves on best but not on the baseline: wait is 1, 2, 3; epoch 2 does not improve.
    stopped, _ = _drive(cb, [1.0, 0.9, 0.95, 0.85])
    assert stopped == 2 and cb.best == 0.9 and cb.best_epoch == 1


def test_improving_epochs_never_stop_even_below_the_baseline() -> None:
    # An improvement returns before the patience check (Keras): wait grows but nothing stops.
    cb = EarlyStopping(patience=1, baseline=0.1)
    stopped, _ = _drive(cb, [1.0, 0.9, 0.8, 0.7])
    assert stopped is None and cb.wait == 4


def test_baseline_reached_resets_the_count() -> None:
    cb = EarlyStopping(patience=2, baseline=0.5)
    # 0.4 beats the baseline: wait resets at epoch 1; 0.45, 0.46 don't improve: wait 2 at epoch 3
    stopped, _ = _drive(cb, [1.0, 0.4, 0.45, 0.46, 0.1])
    assert stopped == 3 and cb.best == 0.4


def test_baseline_in_max_mode() -> None:
    cb = EarlyStopping(monitor="val_acc", patience=1, baseline=0.9)
    stopped, _ = _drive(cb, [0.5, 0.6, 0.55], monitor="val_acc")
    assert stopped == 2
    cb = EarlyStopping(monitor="val_acc", patience=1, baseline=0.9)
    stopped, _ = _drive(cb, [0.5, 0.95, 0.96, 0.94], monitor="val_acc")
    assert stopped == 3


def test_nan_is_never_an_improvement() -> None:
    cb = EarlyStopping(patience=2)
    stopped, _ = _drive(cb, [1.0, NAN, NAN, 0.1])
    assert stopped == 2 and cb.best == 1.0
    cb = EarlyStopping(patience=1)
    # A NaN first value does not become best (Keras would take it and never improve again).
    stopped, _ = _drive(cb, [NAN, 1.0, 0.9, 0.95])
    assert stopped == 3 and cb.best == 0.9 and cb.best_epoch == 2


def test_start_from_epoch_skips_the_warm_up() -> None:
    assert _drive(EarlyStopping(patience=0), [1.0, 2.0, 3.0, 2.5, 2.6])[0] == 1
    cb = EarlyStopping(patience=0, start_from_epoch=2)
    stopped, _ = _drive(cb, [1.0, 2.0, 3.0, 2.5, 2.6])
    assert stopped == 4 and cb.best == 2.5 and cb.best_epoch == 3


def _weights_of(model: nn.Module) -> float:
    values = {float(v) for p in model.parameters() for v in p.detach().flatten()}
    assert len(values) == 1
    return values.pop()


@pytest.mark.parametrize("restore", [True, False])
def test_restore_best_weights_after_early_stop(restore: bool) -> None:
    model = _model()
    cb = EarlyStopping(patience=2, restore_best_weights=restore)
    stopped, _ = _drive(cb, [1.0, 0.5, 0.7, 0.8, 0.1], model=model)
    assert stopped == 3
    assert _weights_of(model) == (1.0 if restore else 3.0)  # the weights were set to the epoch number


def test_restore_best_weights_without_early_stop() -> None:
    # keras#12511 (Keras 2 restored only when stopping early): cairn restores whenever it has a best.
    model = _model()
    cb = EarlyStopping(patience=5, restore_best_weights=True)
    stopped, _ = _drive(cb, [1.0, 0.2, 0.5, 0.6], model=model)
    assert stopped is None and _weights_of(model) == 1.0


def test_restore_best_weights_when_the_baseline_is_never_reached() -> None:
    model = _model()
    cb = EarlyStopping(patience=2, baseline=0.1, restore_best_weights=True)
    stopped, _ = _drive(cb, [1.0, 0.6, 0.9, 0.8], model=model)
    assert stopped == 2 and _weights_of(model) == 1.0


def test_best_weights_are_a_copy() -> None:
    model = _model()
    cb = EarlyStopping(patience=5, restore_best_weights=True)
    _drive(cb, [1.0], model=model, train_end=False)
    assert cb.best_weights is not None
    _set_weights(model, 42.0)
    assert torch.equal(cb.best_weights["weight"], torch.zeros(2, 3))
    cb.on_train_end()
    assert _weights_of(model) == 0.0


def test_verbose_messages(capsys: pytest.CaptureFixture[str]) -> None:
    cb = EarlyStopping(patience=0, verbose=1, restore_best_weights=True)
    _drive(cb, [1.0, 0.5, 0.7])
    out = capsys.readouterr().out
    assert "Epoch 3: early stopping" in out
    assert "Restoring model weights from the end of the best epoch: 2." in out
    _drive(EarlyStopping(patience=0, restore_best_weights=True), [1.0, 0.5, 0.7])
    assert capsys.readouterr().out == ""


def test_missing_monitor_warns_once_per_run_and_skips_the_epoch() -> None:
    cb = EarlyStopping(patience=0)
    with pytest.warns(
        UserWarning, match=r"`val_loss` which is not available\. Available metrics are: loss"
    ) as rec:
        stopped, _ = _drive(cb, [None, None, None])
    assert len(rec) == 1 and stopped is None and cb.wait == 0
    with pytest.warns(UserWarning, match="val_loss") as rec:  # a new run warns again
        stopped, _ = _drive(cb, [None, 1.0, None, 2.0])
    assert len(rec) == 1 and stopped == 3


def test_instances_are_reset_by_a_new_run() -> None:
    cb = EarlyStopping(patience=0)
    assert _drive(cb, [1.0, 2.0])[0] == 1
    assert _drive(cb, [5.0, 4.0, 3.0])[0] is None
    assert (cb.best, cb.best_epoch, cb.stopped_epoch, cb.wait) == (3.0, 2, 0, 0)


# -- EarlyStopping state: saved by cairn, resumed ------------------------------------------------------------


def test_state_dict_round_trip_through_cairn(tmp_path: Path) -> None:
    model = _model()
    cb = EarlyStopping(patience=3, restore_best_weights=True)
    _drive(cb, [1.0, 0.5, 0.7, 0.8], model=model, train_end=False)
    cairn.save(tmp_path / "ck", {"early": cb})
    state = cairn.load(tmp_path / "ck")["early"]
    assert state["wait"] == 2 and state["best"] == 0.5 and state["best_epoch"] == 1
    assert state["stopped_epoch"] == 0
    assert torch.equal(state["best_weights"]["weight"], torch.ones(2, 3))

    fresh = EarlyStopping(patience=3, restore_best_weights=True)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["wait"] == 2 and fresh.best == 0.5
    assert fresh.best_weights is not None
    assert set(fresh.best_weights) == {"weight", "bias"}


def test_unset_state_saves_too(tmp_path: Path) -> None:
    cb = EarlyStopping()
    cairn.save(tmp_path / "ck", {"early": cb.state_dict()})
    state = cairn.load(tmp_path / "ck")["early"]
    assert state == {"wait": 0, "best": None, "best_epoch": 0, "stopped_epoch": 0, "best_weights": None}


@pytest.mark.parametrize("load_before_train_begin", [True, False])
def test_resumed_run_continues_the_patience_count(tmp_path: Path, load_before_train_begin: bool) -> None:
    values = [1.0, 0.5, 0.7, 0.8, 0.9, 0.95]
    whole = EarlyStopping(patience=3, restore_best_weights=True)
    whole_model = _model()
    assert _drive(whole, values, model=whole_model)[0] == 4

    first = EarlyStopping(patience=3, restore_best_weights=True)
    _drive(first, values[:3], train_end=False)  # crash after epoch 2: wait is 1
    cairn.save(tmp_path / "ck", {"early": first})

    model = _model()
    second = EarlyStopping(patience=3, restore_best_weights=True)
    state = cairn.load(tmp_path / "ck")["early"]
    cbs = CallbackList([second], model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    if load_before_train_begin:
        second.load_state_dict(state)  # on_train_begin must not reset what was loaded
        cbs.on_train_begin()
    else:
        cbs.on_train_begin()
        second.load_state_dict(state)
    stopped, _ = _drive(second, values[3:], model=model, start=3, train_begin=False)
    assert stopped == 4 == whole.stopped_epoch
    assert (second.best, second.best_epoch) == (whole.best, whole.best_epoch) == (0.5, 1)
    assert _weights_of(model) == _weights_of(whole_model) == 1.0

    # the flag is used once: the next run starts from scratch
    assert _drive(second, [3.0, 4.0, 5.0, 6.0])[0] == 3 and second.best == 3.0


# -- the property -----------------------------------------------------------------------------------------


def _reference_stop(losses: Sequence[float], patience: int) -> int | None:
    """The docs' semantics: stop at the first epoch e > 0 that does not improve on the best so far and
    ends a run of at least ``patience`` consecutive epochs without improvement (NaN never improves)."""
    best, run = None, 0
    for e, x in enumerate(losses):
        if not math.isnan(x) and (best is None or x < best):
            best, run = x, 0
            continue
        run += 1
        if e > 0 and run >= patience:
            return e
    return None


@given(
    st.lists(st.one_of(st.floats(-10, 10), st.sampled_from([0.0, 1.0, NAN])), max_size=25),
    st.integers(0, 6),
)
def test_stops_where_the_reference_model_says(losses: list[float], patience: int) -> None:
    stopped, _ = _drive(EarlyStopping(monitor="loss", patience=patience), losses, monitor="loss")
    assert stopped == _reference_stop(losses, patience)


# -- ReduceLROnPlateau ---------------------------------------------------------------------------------------


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


def _plateau(
    cb: ReduceLROnPlateau, values: Sequence[float | None], lr: float = 1.0
) -> tuple[list[float], float]:
    """The learning rates logged at each epoch end, and the learning rate after the last epoch."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    _, logs = _drive(cb, values, model=model, optimizer=opt)
    return [entry["learning_rate"] for entry in logs], _lrs(opt)[0]


def test_factor_validation() -> None:
    for factor in (1.0, 1.5):
        with pytest.raises(ValueError, match=r"factor >= 1\.0"):
            ReduceLROnPlateau(factor=factor)
    with pytest.raises(ValueError, match="factor >= 0"):
        ReduceLROnPlateau(factor=-0.5)
    ReduceLROnPlateau(factor=0.0)


def test_keyword_arguments() -> None:
    assert ReduceLROnPlateau(epsilon=0.25).min_delta == 0.25  # the Keras 2 name of min_delta
    with pytest.raises(TypeError, match="min_lrr"):
        ReduceLROnPlateau(min_lrr=0.1)


def test_reduces_after_patience_and_logs_the_learning_rate() -> None:
    cb = ReduceLROnPlateau(factor=0.5, patience=2)
    # improvement at 0; 1 (wait 1), 2 (wait 2: reduce), 3 (wait 1), 4 (wait 2: reduce), 5 improves
    logged, final = _plateau(cb, [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.6])
    assert logged == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]  # logged before the epoch's reduction
    assert final == 0.25 and cb.wait == 1 and cb.best == 0.5


def test_min_delta_decides_what_counts_as_better() -> None:
    # the default min_delta=1e-4: an improvement of 5e-5 is a plateau
    assert _plateau(ReduceLROnPlateau(factor=0.5, patience=1), [1.0, 0.99995])[1] == 0.5
    assert _plateau(ReduceLROnPlateau(factor=0.5, patience=1, min_delta=0.0), [1.0, 0.99995])[1] == 1.0
    assert _plateau(ReduceLROnPlateau(factor=0.5, patience=1, min_delta=0.01), [1.0, 0.98])[1] == 1.0


def test_max_mode_on_accuracy() -> None:
    cb = ReduceLROnPlateau(monitor="val_accuracy", factor=0.5, patience=1, min_delta=0.0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    _drive(cb, [0.5, 0.6, 0.6, 0.7, 0.65], monitor="val_accuracy", model=model, optimizer=opt)
    assert _lrs(opt) == [0.25]


@pytest.mark.parametrize(
    ("cooldown", "expected"),
    [
        # In cooldown the counter is decremented before the patience check, so cooldown=1 changes
        # nothing (Keras): reductions at 2, 4, 6.
        (0, [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125]),
        (1, [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125]),
        # cooldown=2: reduce at 2; 3 is in cooldown; 4 (wait 1), 5 (wait 2: reduce)
        (2, [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]),
        # cooldown=3: reduce at 2; 3, 4 in cooldown; 5 (wait 1), 6 (wait 2: reduce)
        (3, [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25]),
    ],
)
def test_cooldown(cooldown: int, expected: list[float]) -> None:
    logged, _ = _plateau(ReduceLROnPlateau(factor=0.5, patience=2, cooldown=cooldown), [1.0] * 8)
    assert logged == expected


def test_improvement_during_cooldown_still_becomes_best() -> None:
    cb = ReduceLROnPlateau(factor=0.5, patience=1, cooldown=3)
    _plateau(cb, [1.0, 1.0, 0.5])  # reduce at 1, then 0.5 improves while in cooldown
    assert cb.best == 0.5 and cb.cooldown_counter == 2 and cb.wait == 0


def test_min_lr_clamps() -> None:
    cb = ReduceLROnPlateau(factor=0.1, patience=0, min_lr=0.05)
    logged, final = _plateau(cb, [1.0, 1.0, 1.0, 1.0, 1.0])
    assert logged == [1.0, 1.0, pytest.approx(0.1), 0.05, 0.05] and final == 0.05


def test_no_reduction_at_min_lr_keeps_counting_patience() -> None:
    # 0.05 is not above np.float32(0.05) (0.0500000007...): nothing to reduce, so wait is not reset.
    cb = ReduceLROnPlateau(factor=0.5, patience=1, cooldown=5, min_lr=0.05)
    _, final = _plateau(cb, [1.0, 1.0, 1.0], lr=0.05)
    assert final == 0.05 and cb.wait == 2 and cb.cooldown_counter == 0


def test_multiple_param_groups() -> None:
    model = _model()
    opt = torch.optim.SGD(
        [{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.1}], lr=1.0
    )
    cb = ReduceLROnPlateau(factor=0.5, patience=0, min_lr=[0.0, 0.05])
    _, logs = _drive(cb, [1.0, 1.0, 1.0, 1.0], model=model, optimizer=opt)
    assert _lrs(opt) == [0.125, 0.05]
    assert [entry["learning_rate"] for entry in logs] == [1.0, 1.0, 0.5, 0.25]  # the first group's

    opt = torch.optim.SGD(
        [{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.1}], lr=1.0
    )
    cb = ReduceLROnPlateau(factor=0.5, patience=0, min_lr=0.2)
    _drive(cb, [1.0, 1.0], model=model, optimizer=opt)
    assert _lrs(opt) == [0.5, 0.1]  # a group already below min_lr is left alone


def test_min_lr_list_must_match_the_groups() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="2 values but the optimizer has 1"):
        CallbackList([ReduceLROnPlateau(min_lr=[0.1, 0.2])], model=model, optimizer=opt).on_train_begin()


def test_needs_an_optimizer() -> None:
    cbs = CallbackList([ReduceLROnPlateau()], model=_model())
    cbs.on_train_begin()
    with pytest.raises(RuntimeError, match="needs a torch optimizer"):
        cbs.on_epoch_end(0, {"val_loss": 1.0})


def test_tensor_learning_rate_is_updated_in_place() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1.0))
    _drive(ReduceLROnPlateau(factor=0.5, patience=0), [1.0, 1.0], model=model, optimizer=opt)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == 0.5


def test_plateau_missing_monitor_warns_once_and_still_logs_the_learning_rate() -> None:
    with pytest.warns(UserWarning, match="ReduceLROnPlateau is conditioned on metric `val_loss`") as rec:
        logged, final = _plateau(ReduceLROnPlateau(patience=0), [None, None])
    assert len(rec) == 1 and logged == [1.0, 1.0] and final == 1.0


def test_plateau_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    _plateau(ReduceLROnPlateau(factor=0.5, patience=0, verbose=1), [1.0, 1.0])
    assert "Epoch 2: ReduceLROnPlateau reducing learning rate to 0.5." in capsys.readouterr().out


def test_plateau_state_resumes_like_an_uninterrupted_run(tmp_path: Path) -> None:
    values = [1.0, 1.0, 1.0, 1.0, 0.9, 0.95, 0.96, 0.97, 0.98]
    whole = ReduceLROnPlateau(factor=0.5, patience=2, cooldown=2)
    expected, _ = _plateau(whole, values)

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    first = ReduceLROnPlateau(factor=0.5, patience=2, cooldown=2)
    _, logs_a = _drive(first, values[:4], model=model, optimizer=opt, train_end=False)
    assert first.in_cooldown()
    cairn.save(tmp_path / "ck", {"plateau": first, "optim": opt})

    opt2 = torch.optim.SGD(model.parameters(), lr=1.0)
    second = ReduceLROnPlateau(factor=0.5, patience=2, cooldown=2)
    cairn.restore(tmp_path / "ck", {"plateau": second, "optim": opt2})
    assert second.state_dict() == first.state_dict()
    _, logs_b = _drive(second, values[4:], model=model, optimizer=opt2, start=4)
    assert [e["learning_rate"] for e in logs_a + logs_b] == expected


# -- LearningRateScheduler ---------------------------------------------------------------------------------


def _schedule_run(schedule: Any, epochs: int = 4, lr: float = 1.0) -> tuple[list[float], list[float]]:
    """The learning rate seen during each epoch (after on_epoch_begin), and the logged ones."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    cbs = CallbackList([LearningRateScheduler(schedule)], model=model, optimizer=opt)
    cbs.on_train_begin()
    seen, logged = [], []
    for epoch in range(epochs):
        cbs.on_epoch_begin(epoch)
        seen.append(_lrs(opt)[0])
        logs: dict[str, Any] = {}
        cbs.on_epoch_end(epoch, logs)
        logged.append(logs["learning_rate"])
    return seen, logged


def test_two_argument_schedule() -> None:
    seen, logged = _schedule_run(lambda epoch, lr: lr if epoch < 2 else lr * 0.5)
    assert seen == logged == [1.0, 1.0, 0.5, 0.25]


def test_one_argument_schedule() -> None:
    seen, _ = _schedule_run(lambda epoch: 0.1 / (epoch + 1))
    assert seen == [0.1, 0.05, pytest.approx(0.1 / 3), 0.025]

    class Step:
        def __call__(self, epoch: int) -> float:
            return 0.5**epoch

    assert _schedule_run(Step())[0] == [1.0, 0.5, 0.25, 0.125]


def test_int_and_numpy_results_are_accepted() -> None:
    import numpy as np

    assert _schedule_run(lambda epoch: epoch + 1, epochs=2)[0] == [1.0, 2.0]
    assert _schedule_run(lambda epoch, lr: np.float32(0.5), epochs=1)[0] == [0.5]


def test_schedule_without_a_signature_is_tried_with_two_arguments_then_one() -> None:
    assert _schedule_run(max, epochs=3, lr=0.5)[0] == [0.5, 1.0, 2.0]  # max(epoch, lr)


@pytest.mark.parametrize("bad", ["0.1", None, torch.tensor(0.1), True, NAN, -0.1, [0.1]])
def test_bad_schedule_results(bad: Any) -> None:
    with pytest.raises(ValueError, match="should be a finite, non-negative float"):
        _schedule_run(lambda epoch, lr: bad, epochs=1)


def test_a_type_error_inside_a_two_argument_schedule_is_not_masked() -> None:
    def schedule(epoch: int, lr: float) -> float:
        return lr + "oops"  # type: ignore[operator]

    with pytest.raises(TypeError, match="unsupported operand"):
        _schedule_run(schedule, epochs=1)


def test_scheduler_sets_every_group_and_prints(capsys: pytest.CaptureFixture[str]) -> None:
    model = _model()
    opt = torch.optim.SGD(
        [{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.1}], lr=1.0
    )
    cb = LearningRateScheduler(lambda epoch, lr: lr * 0.5, verbose=1)
    CallbackList([cb], model=model, optimizer=opt).on_epoch_begin(0)
    assert _lrs(opt) == [0.5, 0.5]
    assert "Epoch 1: LearningRateScheduler setting learning rate to 0.5." in capsys.readouterr().out
