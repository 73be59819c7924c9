"""``MonitorCallback``: the shared base of callbacks that watch one logged quantity (``EarlyStopping``,
``ReduceLROnPlateau``, ``ModelCheckpoint``) and decide whether a new value is an improvement.

Semantics follow Keras 3's ``MonitorCallback``, with these decisions of cairn's own:

* ``mode="auto"`` infers the direction from the name alone. Names ending in ``loss`` (``loss``,
  ``val_loss``, ``*_loss``) are minimized, as in Keras 3. Accuracy-like names (``acc``, ``accuracy``,
  ``auc``, ``precision``, ``recall``, ``f1``, ``f1_score``, names ending in ``_`` plus one of those, and
  their ``val_`` forms) are maximized, as Keras 2 guessed; Keras 3 asks the compiled metric object for
  its direction, which a PyTorch loop does not have. Any other name raises ``ValueError`` when the
  callback is built (Keras 3 raises too, but only at the end of the first epoch).
* A NaN value is never an improvement (Keras would take a NaN as the first ``best`` and then never
  improve on it).
* A missing monitor warns once per run (Keras warns every epoch), listing the keys that are available.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

from cairn.callbacks.base import Callback, Logs

__all__ = ["MonitorCallback"]

_MAX_NAMES = ("acc", "accuracy", "auc", "precision", "recall", "f1", "f1_score")


def _infer_direction(monitor: str) -> Literal["min", "max"] | None:
    """``"min"`` for loss names, ``"max"`` for accuracy-like names, None when the name says nothing."""
    name = monitor.lower().removeprefix("val_")
    if name == "loss" or name.endswith("_loss"):
        return "min"
    if name in _MAX_NAMES or any(name.endswith("_" + m) for m in _MAX_NAMES):
        return "max"
    return None


def _as_float(value: Any, monitor: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"the monitored quantity `{monitor}` must be a scalar number, got {value!r}") from e


class MonitorCallback(Callback):
    """Base class of callbacks that monitor a logged quantity and judge whether it improved.

    Args:
        monitor: the key of the logs to watch (``"val_loss"``, ``"val_accuracy"``...).
        mode: ``"min"``, ``"max"`` or ``"auto"`` (inferred from the name: see the module docstring).
            An unknown mode warns and falls back to ``"auto"``, as in Keras.
        baseline: the initial reference value; None means the first value seen is the first best.
        min_delta: the smallest change that counts as an improvement (its sign is ignored): in ``min``
            mode ``current`` improves on ``reference`` when ``current + min_delta < reference``, in
            ``max`` mode when ``current - min_delta > reference``. Equal values never improve.

    Raises:
        ValueError: ``mode="auto"`` and the direction can't be inferred from ``monitor``.

    Subclasses call ``super().on_train_begin(logs)`` so the missing-monitor warning is given once per run,
    and reset their state in ``on_train_begin`` unless :meth:`_keep_loaded_state` says a resumed run
    loaded it (``BackupAndRestore`` may load the state before or after ``on_train_begin``).
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "auto",
        baseline: float | None = None,
        min_delta: float = 0,
    ) -> None:
        super().__init__()
        if mode not in ("auto", "min", "max"):
            warnings.warn(
                f"{type(self).__name__} mode {mode!r} is unknown, fallback to auto mode.", stacklevel=2
            )
            mode = "auto"
        self.monitor = monitor
        self.mode = mode
        self.baseline = baseline
        self.min_delta = abs(min_delta)
        direction = mode if mode != "auto" else _infer_direction(monitor)
        if direction is None:
            raise ValueError(
                f"{type(self).__name__} received monitor={monitor!r}, but cairn can't tell from the name "
                "whether that metric should be maximized or minimized (names ending in 'loss' are "
                "minimized; accuracy, auc, precision, recall and f1 names are maximized). Pass "
                "mode='max' to monitor the highest value, or mode='min' to monitor the lowest."
            )
        self.direction: Literal["min", "max"] = "min" if direction == "min" else "max"
        """The resolved direction: ``"min"`` or ``"max"``."""
        self.monitor_op: Callable[[float, float], bool] = operator.lt if direction == "min" else operator.gt
        """``operator.lt`` (min) or ``operator.gt`` (max), as Keras's ``monitor_op``."""
        self._signed_delta = -self.min_delta if direction == "min" else self.min_delta
        self.best: float | None = self._initial_best()
        self._warned_missing = False
        self._restored = False

    def _keep_loaded_state(self) -> bool:
        """True (once) when ``load_state_dict`` ran and no epoch ended since: a resumed run, whose
        ``on_train_begin`` must keep the loaded state instead of resetting it. Subclasses set
        ``self._restored = False`` at each epoch end."""
        kept, self._restored = self._restored, False
        return kept

    def _initial_best(self) -> float:
        """The baseline, or the worst possible value (``inf`` in min mode, ``-inf`` in max mode)."""
        if self.baseline is not None:
            return float(self.baseline)
        return math.inf if self.direction == "min" else -math.inf

    def _is_improvement(self, current: float, reference: float | None) -> bool:
        """Whether ``current`` improves on ``reference`` by more than ``min_delta``.

        A ``reference`` of None counts as an improvement; a NaN ``current`` never does.
        """
        if math.isnan(current):
            return False
        if reference is None:
            return True
        return self.monitor_op(current - self._signed_delta, reference)

    def _get_monitor_value(self, logs: Logs | None) -> float | None:
        """``logs[monitor]`` as a float, or None (with a warning once per run) when it is missing.

        Raises:
            ValueError: the value is not a scalar number.
        """
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None:
            if not self._warned_missing:
                self._warned_missing = True
                warnings.warn(
                    f"{type(self).__name__} is conditioned on metric `{self.monitor}` which is not "
                    f"available. Available metrics are: {', '.join(map(str, logs)) or '(none)'}.",
                    stacklevel=3,
                )
            return None
        return _as_float(value, self.monitor)

    def on_train_begin(self, logs: Logs | None = None) -> None:
        self._warned_missing = False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if "best" in state_dict:
            best = state_dict["best"]
            self.best = None if best is None else float(best)
        self._restored = True
