"""Learning-rate callbacks acting on a torch optimizer's ``param_groups``: ``ReduceLROnPlateau`` and
``LearningRateScheduler`` (Keras 3 semantics).

Both read and write every parameter group's ``"lr"`` of ``self.optimizer`` (given by ``fit`` or by
``CallbackList(optimizer=...)``; ``model.optimizer`` is used when no optimizer was given) and put the
first group's learning rate in ``logs["learning_rate"]`` at the end of each epoch.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cairn.callbacks.base import Callback, Logs
from cairn.callbacks.monitor import MonitorCallback

__all__ = ["LearningRateScheduler", "ReduceLROnPlateau"]


def _param_groups(cb: Callback) -> list[dict[str, Any]]:
    optimizer = cb.optimizer if cb.optimizer is not None else getattr(cb.model, "optimizer", None)
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        raise RuntimeError(
            f"{type(cb).__name__} needs a torch optimizer: pass optimizer= to fit or to CallbackList "
            "(or call set_optimizer)"
        )
    return list(groups)


def _get_lr(group: Mapping[str, Any]) -> float:
    return float(group["lr"])


def _set_lr(group: dict[str, Any], lr: float) -> None:
    if isinstance(group["lr"], torch.Tensor):  # a tensor lr (capturable optimizers) is updated in place
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


class ReduceLROnPlateau(MonitorCallback):
    """Multiply the learning rate by ``factor`` when ``monitor`` has stopped improving, as Keras 3's.

    At each epoch end: while in cooldown, the cooldown counter is decremented and ``wait`` reset to 0.
    An improvement (by more than ``min_delta``; NaN never improves) becomes ``best`` and resets ``wait``.
    Otherwise, when not in cooldown, ``wait`` is incremented, and when ``wait >= patience`` every
    parameter group whose ``lr > np.float32(min_lr)`` gets ``lr = max(lr * factor, min_lr)`` (the float32
    rounding of ``min_lr`` is Keras's tolerance); if any group was reduced, the cooldown counter is set to
    ``cooldown`` and ``wait`` to 0.

    Args:
        monitor: the logged quantity to watch.
        factor: the multiplier, in ``[0, 1)``: ``new_lr = lr * factor``.
        patience: the number of epochs without improvement after which the learning rate is reduced.
        verbose: 1 prints each reduction.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (see :class:`MonitorCallback`).
        min_delta: the smallest change that counts as an improvement.
        cooldown: epochs to wait after a reduction before counting patience again.
        min_lr: the lower bound of the learning rate: one float, or one per parameter group.
        epsilon: the legacy (Keras 2) name of ``min_delta``; any other keyword raises ``TypeError``.

    Raises:
        ValueError: ``factor >= 1.0`` or ``factor < 0``.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float | Sequence[float] = 0.0,
        **kwargs: Any,
    ) -> None:
        if "epsilon" in kwargs:
            min_delta = kwargs.pop("epsilon")
        if kwargs:
            raise TypeError(f"ReduceLROnPlateau got unexpected keyword arguments: {', '.join(kwargs)}")
        if factor >= 1.0:
            raise ValueError(f"ReduceLROnPlateau does not support a factor >= 1.0. Received factor={factor}")
        if factor < 0:
            raise ValueError(f"ReduceLROnPlateau needs a factor >= 0. Received factor={factor}")
        super().__init__(monitor=monitor, mode=mode, baseline=None, min_delta=min_delta)
        self.factor = factor
        self.patience = patience
        self.verbose = verbose
        self.cooldown = cooldown
        self.min_lr: float | list[float] = (
            [float(x) for x in min_lr] if isinstance(min_lr, Sequence) else float(min_lr)
        )
        self.cooldown_counter = 0
        self.wait = 0

    def _min_lrs(self, n_groups: int) -> list[float]:
        if isinstance(self.min_lr, list):
            if len(self.min_lr) != n_groups:
                raise ValueError(
                    f"ReduceLROnPlateau: min_lr has {len(self.min_lr)} values but the optimizer has "
                    f"{n_groups} parameter groups"
                )
            return self.min_lr
        return [self.min_lr] * n_groups

    def in_cooldown(self) -> bool:
        """Whether a reduction happened less than ``cooldown`` epochs ago."""
        return self.cooldown_counter > 0

    def on_train_begin(self, logs: Logs | None = None) -> None:
        super().on_train_begin(logs)
        groups = getattr(self.optimizer, "param_groups", None)
        if groups:
            self._min_lrs(len(groups))  # a wrong-length min_lr fails now, not epochs later
        if self._keep_loaded_state():
            return  # a resumed run: keep the loaded wait, best and cooldown
        self.best = self._initial_best()
        self.cooldown_counter = 0
        self.wait = 0

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self._restored = False
        groups = _param_groups(self)
        if logs is not None:
            logs["learning_rate"] = _get_lr(groups[0])
        current = self._get_monitor_value(logs)
        if current is None:
            return
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self._is_improvement(current, self.best):
            self.best = current
            self.wait = 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience:
                self._reduce(epoch, groups)

    def _reduce(self, epoch: int, groups: list[dict[str, Any]]) -> None:
        reduced = []
        for group, min_lr in zip(groups, self._min_lrs(len(groups)), strict=True):
            old_lr = _get_lr(group)
            if old_lr > float(np.float32(min_lr)):
                new_lr = max(old_lr * self.factor, min_lr)
                _set_lr(group, new_lr)
                reduced.append(new_lr)
        if not reduced:
            return
        if self.verbose > 0:
            shown = reduced[0] if len(groups) == 1 else [_get_lr(g) for g in groups]
            print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {shown}.")
        self.cooldown_counter = self.cooldown
        self.wait = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.wait = int(state_dict.get("wait", 0))
        self.cooldown_counter = int(state_dict.get("cooldown_counter", 0))


def _takes_lr(schedule: Callable[..., Any]) -> bool | None:
    """Whether ``schedule`` accepts ``(epoch, lr)``; None when its signature can't be read."""
    try:
        sig = inspect.signature(schedule)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(0, 0.0)
    except TypeError:
        return False
    return True


class LearningRateScheduler(Callback):
    """Set the learning rate at the start of every epoch to ``schedule(epoch, lr)``, as Keras 3's.

    ``schedule`` receives the 0-based epoch and the current learning rate (the first parameter group's)
    and returns the new one, which every parameter group gets. A schedule that takes only the epoch is
    called as ``schedule(epoch)``.

    Args:
        schedule: ``(epoch, lr) -> lr`` or ``(epoch) -> lr``; it must return a finite, non-negative
            float or int.
        verbose: 1 prints each update.

    Raises:
        ValueError: (at the start of an epoch) the schedule returned something else.
    """

    def __init__(self, schedule: Callable[..., Any], verbose: int = 0) -> None:
        super().__init__()
        self.schedule = schedule
        self.verbose = verbose

    def _call_schedule(self, epoch: int, lr: float) -> Any:
        takes_lr = _takes_lr(self.schedule)
        if takes_lr is None:  # no readable signature (some builtins): Keras's try-then-fall-back
            try:
                return self.schedule(epoch, lr)
            except TypeError:
                return self.schedule(epoch)
        return self.schedule(epoch, lr) if takes_lr else self.schedule(epoch)

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        groups = _param_groups(self)
        lr = self._call_schedule(epoch, _get_lr(groups[0]))
        if (
            isinstance(lr, bool)
            or not isinstance(lr, numbers.Real)
            or not math.isfinite(float(lr))
            or float(lr) < 0
        ):
            raise ValueError(
                f"The output of the `schedule` function should be a finite, non-negative float. Got: {lr!r}"
            )
        for group in groups:
            _set_lr(group, float(lr))
        if self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: LearningRateScheduler setting learning rate to {float(lr)}.")

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = _get_lr(_param_groups(self)[0])
