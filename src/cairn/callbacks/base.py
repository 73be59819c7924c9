"""The Callback protocol of Keras 3, for PyTorch: every hook, ``set_model``/``set_params``, a
``CallbackList`` that drives them (from :func:`cairn.fit` or from a hand-written loop), and ``History``.

cairn adds two things to Keras's hooks: every callback has ``state_dict()``/``load_state_dict()``, so
``BackupAndRestore`` can save and restore the state of the other callbacks (EarlyStopping's ``wait``
and ``best``, ReduceLROnPlateau's cooldown...), and a callback may answer ``resume_point()`` with the
``(epoch, batch)`` a resumed ``fit`` starts from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Callback", "CallbackList", "History", "Logs"]

Logs = dict[str, Any]
"""What hooks receive: ``loss``, ``val_loss``, metric names and their ``val_`` forms, ``learning_rate``."""


class Callback:
    """Base class of callbacks: override the hooks you need; every hook does nothing by default.

    ``self.model`` is the model being trained (set by ``set_model``) and ``self.optimizer`` its torch
    optimizer (set by ``set_optimizer``); set ``self.model.stop_training = True`` to stop ``fit`` after
    the current batch. ``self.params`` holds ``epochs``, ``steps`` (batches per epoch, or None when
    unknown) and ``verbose``.
    """

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self._model: Any = None
        self.optimizer: Any = None
        """The torch optimizer being stepped (set by ``set_optimizer``; None when there is none)."""

    def set_optimizer(self, optimizer: Any) -> None:
        """Receive the optimizer (cairn's addition: Keras reaches it as ``model.optimizer``)."""
        self.optimizer = optimizer

    def set_params(self, params: Mapping[str, Any]) -> None:
        """Receive the training parameters (``epochs``, ``steps``, ``verbose``)."""
        self.params = dict(params)

    def set_model(self, model: Any) -> None:
        """Receive the model being trained."""
        self._model = model

    @property
    def model(self) -> Any:
        """The model (a ``DistributedDataParallel`` wrapper is unwrapped)."""
        model = self._model
        return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model

    # -- training ---------------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        """Called at the start of training."""

    def on_train_end(self, logs: Logs | None = None) -> None:
        """Called at the end of training (also after ``stop_training``)."""

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        """Called at the start of epoch ``epoch`` (0-based)."""

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        """Called at the end of an epoch with its logs (training and validation)."""

    def on_train_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Called before training batch ``batch`` (0-based, within the epoch)."""
        self.on_batch_begin(batch, logs)

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Called after a training batch with the running averages of the epoch so far."""
        self.on_batch_end(batch, logs)

    def on_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Legacy alias of :meth:`on_train_batch_begin` (Keras)."""

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Legacy alias of :meth:`on_train_batch_end` (Keras)."""

    # -- evaluation ---------------------------------------------------------------------------------------
    def on_test_begin(self, logs: Logs | None = None) -> None:
        """Called at the start of evaluation (and of validation inside ``fit``)."""

    def on_test_end(self, logs: Logs | None = None) -> None:
        """Called at the end of evaluation with its logs."""

    def on_test_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Called before an evaluation batch."""

    def on_test_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Called after an evaluation batch with running averages."""

    # -- prediction -----------------------------------------------------------------------------------------
    def on_predict_begin(self, logs: Logs | None = None) -> None:
        """Called at the start of prediction."""

    def on_predict_end(self, logs: Logs | None = None) -> None:
        """Called at the end of prediction."""

    def on_predict_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Called before a prediction batch."""

    def on_predict_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Called after a prediction batch; ``logs["outputs"]`` holds the batch's outputs."""

    # -- cairn extensions -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The callback's own state, saved by ``BackupAndRestore`` (none by default)."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def resume_point(self) -> tuple[int, int] | None:
        """``(epoch, batch)`` where a resumed ``fit`` should start, or None (only BackupAndRestore)."""
        return None


class History(Callback):
    """Records the logs of every epoch: ``history.history["val_loss"]`` is a list, one value per epoch;
    ``history.epoch`` lists the epochs. ``fit`` returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch: list[int] = []
        self.history: dict[str, list[Any]] = {}

    def on_train_begin(self, logs: Logs | None = None) -> None:
        self.epoch = []
        self.history = {}

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": list(self.epoch), "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.epoch = list(state_dict.get("epoch", []))
        self.history = {k: list(v) for k, v in dict(state_dict.get("history", {})).items()}


_HOOKS = (
    "on_train_begin",
    "on_train_end",
    "on_test_begin",
    "on_test_end",
    "on_predict_begin",
    "on_predict_end",
)
_INDEXED_HOOKS = (
    "on_epoch_begin",
    "on_epoch_end",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_test_batch_begin",
    "on_test_batch_end",
    "on_predict_batch_begin",
    "on_predict_batch_end",
)


class CallbackList(Callback):
    """Calls every hook of its callbacks in order. Use it to drive callbacks from a hand-written loop::

        cbs = CallbackList([EarlyStopping(patience=2), CSVLogger("log.csv")], model=model, epochs=10)
        cbs.on_train_begin()
        for epoch in range(10):
            cbs.on_epoch_begin(epoch)
            ...                                   # train, then validate
            cbs.on_epoch_end(epoch, {"loss": loss, "val_loss": val_loss})
            if getattr(model, "stop_training", False):
                break
        cbs.on_train_end()

    ``add_history=True`` appends a :class:`History` (``cbs.history``) and ``add_progbar=True`` a
    ``ProgbarLogger``, as Keras's ``CallbackList`` does. ``params`` are passed to ``set_params``.
    """

    def __init__(
        self,
        callbacks: Iterable[Callback] | None = None,
        add_history: bool = False,
        add_progbar: bool = False,
        model: Any = None,
        optimizer: Any = None,
        **params: Any,
    ) -> None:
        super().__init__()
        self.callbacks: list[Callback] = list(callbacks or [])
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"{cb!r} is not a cairn.callbacks.Callback")
        self.history: History | None = None
        if add_progbar and not any(type(cb).__name__ == "ProgbarLogger" for cb in self.callbacks):
            from cairn.callbacks.progbar import ProgbarLogger

            self.callbacks.append(ProgbarLogger())
        if add_history:
            found = [cb for cb in self.callbacks if isinstance(cb, History)]
            self.history = found[0] if found else History()
            if not found:
                self.callbacks.append(self.history)
        self.callbacks.sort(
            key=lambda cb: bool(getattr(cb, "run_last", False))
        )  # stable: BackupAndRestore last
        if model is not None:
            self.set_model(model)
        if optimizer is not None:
            self.set_optimizer(optimizer)
        self.set_params(params)

    def append(self, callback: Callback) -> None:
        """Add a callback at the end."""
        self.callbacks.append(callback)

    def set_params(self, params: Mapping[str, Any]) -> None:
        params = {**params, "callbacks": self.callbacks}  # for BackupAndRestore, which saves their state
        super().set_params(params)
        for cb in self.callbacks:
            cb.set_params(params)

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        for cb in self.callbacks:
            cb.set_model(model)

    def set_optimizer(self, optimizer: Any) -> None:
        super().set_optimizer(optimizer)
        for cb in self.callbacks:
            cb.set_optimizer(optimizer)

    def resume_point(self) -> tuple[int, int] | None:
        for cb in self.callbacks:
            point = cb.resume_point()
            if point is not None:
                return point
        return None

    def __iter__(self) -> Any:
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)


def _dispatch(name: str, indexed: bool) -> Any:
    if indexed:

        def hook(self: CallbackList, index: int, logs: Logs | None = None) -> None:
            logs = logs if logs is not None else {}
            for cb in self.callbacks:
                getattr(cb, name)(index, logs)

    else:

        def hook(self: CallbackList, logs: Logs | None = None) -> None:  # type: ignore[misc]
            logs = logs if logs is not None else {}
            for cb in self.callbacks:
                getattr(cb, name)(logs)

    hook.__name__ = name
    hook.__doc__ = f"Call ``{name}`` of every callback, in order."
    return hook


for _name in _HOOKS:
    setattr(CallbackList, _name, _dispatch(_name, indexed=False))
for _name in _INDEXED_HOOKS:
    setattr(CallbackList, _name, _dispatch(_name, indexed=True))
