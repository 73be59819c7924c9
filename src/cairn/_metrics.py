"""Metrics for :func:`cairn.fit` and :func:`cairn.evaluate`: Keras names, sample-weighted running means."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["MetricFn", "Tracker", "resolve_metrics"]

MetricFn = Callable[[torch.Tensor, torch.Tensor], Any]
"""``metric(y_pred, y_true)`` → a number or a 0-d tensor (the batch's mean)."""


def _accuracy(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    """Accuracy: class indices against the argmax of scores, one-hot against one-hot, or binary
    (predictions thresholded at 0.5)."""
    if y_pred.ndim == y_true.ndim + 1:  # scores [N, C] and class indices [N]
        return (y_pred.argmax(-1) == y_true).float().mean()
    if y_pred.shape == y_true.shape and y_pred.ndim >= 2 and y_pred.shape[-1] > 1:  # one-hot targets
        return (y_pred.argmax(-1) == y_true.argmax(-1)).float().mean()
    return ((y_pred > 0.5).float() == y_true.reshape(y_pred.shape).float()).float().mean()


def _mae(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    return (y_pred - y_true.reshape(y_pred.shape)).abs().mean()


def _mse(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    return (y_pred - y_true.reshape(y_pred.shape)).pow(2).mean()


_BUILTIN: dict[str, MetricFn] = {
    "accuracy": _accuracy,
    "acc": _accuracy,
    "sparse_categorical_accuracy": _accuracy,
    "categorical_accuracy": _accuracy,
    "binary_accuracy": _accuracy,
    "mae": _mae,
    "mean_absolute_error": _mae,
    "mse": _mse,
    "mean_squared_error": _mse,
}


def resolve_metrics(metrics: Iterable[str | MetricFn] | None) -> dict[str, MetricFn]:
    """Metric names to functions: Keras names (``"accuracy"``, ``"mae"``, ``"mse"``...) or callables
    ``f(y_pred, y_true)`` (logged under ``f.__name__``)."""
    out: dict[str, MetricFn] = {}
    for m in metrics or ():
        if isinstance(m, str):
            if m not in _BUILTIN:
                raise ValueError(
                    f"unknown metric {m!r}: use one of {sorted(_BUILTIN)} or a function(y_pred, y_true)"
                )
            out[m] = _BUILTIN[m]
        elif callable(m):
            out[getattr(m, "__name__", type(m).__name__)] = m
        else:
            raise TypeError(f"a metric is a name or a function(y_pred, y_true), not {m!r}")
    if "loss" in out:
        raise ValueError("'loss' is logged already; name your metric differently")
    return out


class Tracker:
    """Running, sample-weighted means of the loss and metrics over an epoch (what Keras logs per batch)."""

    def __init__(self, metrics: dict[str, MetricFn]) -> None:
        self.metrics = metrics
        self.sums: dict[str, float] = {}
        self.count = 0

    def reset(self) -> None:
        """Start a new epoch."""
        self.sums, self.count = {}, 0

    def state_dict(self) -> dict[str, Any]:
        """The sums so far (``BackupAndRestore`` saves them, so a resumed epoch logs the same means)."""
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: Any) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.sums = {str(k): float(v) for k, v in state["sums"].items()}
        self.count = int(state["count"])

    def update(self, n: int, loss: torch.Tensor | None, y_pred: torch.Tensor, y_true: Any) -> None:
        """Add a batch of ``n`` samples."""
        values: dict[str, float] = {}
        if loss is not None:
            values["loss"] = float(loss.detach())
        with torch.no_grad():
            for name, fn in self.metrics.items():
                values[name] = float(fn(y_pred.detach(), y_true))
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.count += n

    def result(self) -> dict[str, float]:
        """The means so far."""
        return {k: v / self.count for k, v in self.sums.items()} if self.count else {}
