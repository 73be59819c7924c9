"""``EarlyStopping``: stop training when a monitored quantity has stopped improving (Keras 3 semantics).

The state (``wait``, ``best``, ``best_epoch``, ``stopped_epoch`` and the best weights) is saved by
``BackupAndRestore``, so a resumed ``fit`` carries on counting patience where the crashed one was.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from cairn.callbacks.base import Logs
from cairn.callbacks.monitor import MonitorCallback

__all__ = ["EarlyStopping"]


def _snapshot(model: Any) -> dict[str, Any]:
    """A copy of ``model.state_dict()`` on the CPU (as Keras's ``get_weights`` copies to the host)."""
    return {
        k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        for k, v in model.state_dict().items()
    }


class EarlyStopping(MonitorCallback):
    """Stop training when ``monitor`` has stopped improving, as Keras 3's ``EarlyStopping``.

    At the end of every epoch from ``start_from_epoch`` on, ``wait`` is incremented and then reset to 0
    when the value improves on ``best`` (by more than ``min_delta``) and, if a ``baseline`` is given,
    also improves on the baseline. An epoch that does not improve stops training
    (``model.stop_training = True``) when ``wait >= patience`` and ``epoch > 0``. Equal values and NaN
    are not improvements. An epoch whose logs lack ``monitor`` is skipped (with a warning, once per run).

    Args:
        monitor: the logged quantity to watch.
        min_delta: the smallest change that counts as an improvement.
        patience: the number of epochs without improvement after which training stops.
        verbose: 1 prints when training stops and when weights are restored.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (see :class:`MonitorCallback`).
        baseline: training stops if the model doesn't improve on it within ``patience`` epochs.
        restore_best_weights: at the end of training, load the weights of the best epoch into the model
            (whether or not training stopped early, and even when no epoch beat ``baseline``: the best
            epoch seen is restored). The copy lives on the CPU.
        start_from_epoch: epochs before this one are not monitored (a warm-up).

    Attributes: ``wait``, ``best`` (None until a value is seen), ``best_epoch`` (0-based),
    ``stopped_epoch`` (0 when training did not stop early), ``best_weights``.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ) -> None:
        super().__init__(monitor=monitor, mode=mode, baseline=baseline, min_delta=min_delta)
        self.patience = patience
        self.verbose = verbose
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.wait = 0
        self.stopped_epoch = 0
        self.best_epoch = 0
        self.best = None
        self.best_weights: dict[str, Any] | None = None

    def on_train_begin(self, logs: Logs | None = None) -> None:
        super().on_train_begin(logs)
        if self._keep_loaded_state():
            return  # a resumed run: keep counting from the loaded state
        self.wait = 0
        self.stopped_epoch = 0
        self.best = None
        self.best_epoch = 0
        self.best_weights = None

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self._restored = False
        current = self._get_monitor_value(logs)
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            # Nothing seen yet: the current weights are the best so far.
            self.best_weights = _snapshot(self.model)
            self.best_epoch = epoch
        self.wait += 1
        if self._is_improvement(current, self.best):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights:
                self.best_weights = _snapshot(self.model)
            # Only restart the count when the value beats both the previous best and the baseline.
            if self.baseline is None or self._is_improvement(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs: Logs | None = None) -> None:
        if self.stopped_epoch > 0 and self.verbose > 0:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0:
                print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            self.model.load_state_dict(self.best_weights)

    def state_dict(self) -> dict[str, Any]:
        return {
            "wait": self.wait,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.wait = int(state_dict.get("wait", 0))
        self.best_epoch = int(state_dict.get("best_epoch", 0))
        self.stopped_epoch = int(state_dict.get("stopped_epoch", 0))
        weights = state_dict.get("best_weights")
        self.best_weights = None if weights is None else dict(weights)
