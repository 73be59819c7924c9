"""``fit``, ``evaluate`` and ``predict`` for PyTorch models, driving Keras-style callbacks.

::

    history = cairn.fit(model, train_loader, epochs=20, optimizer=opt, loss=torch.nn.CrossEntropyLoss(),
                        metrics=["accuracy"], validation_data=val_loader,
                        callbacks=[ModelCheckpoint("ckpts/best-model", save_best_only=True),
                                   EarlyStopping(patience=3), BackupAndRestore("backup")])
    history.history["val_accuracy"]

Data is any iterable of ``(x, y)`` batches: a ``DataLoader``, a list of tensor pairs. ``x`` may be a
tensor, a tuple of tensors (``model(*x)``) or a dict (``model(**x)``).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import torch

from cairn._metrics import MetricFn, Tracker, resolve_metrics
from cairn.callbacks.base import Callback, CallbackList, History

__all__ = ["evaluate", "fit", "predict"]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _to(value: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        f"a batch must be an (x, y) pair, not {type(batch).__name__}"
        + (f" of {len(batch)} items" if isinstance(batch, tuple | list) else "")
    )


def _forward(model: torch.nn.Module, x: Any) -> torch.Tensor:
    if isinstance(x, Mapping):
        return model(**x)  # type: ignore[no-any-return]
    if isinstance(x, tuple | list):
        return model(*x)  # type: ignore[no-any-return]
    return model(x)  # type: ignore[no-any-return]


def _size(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.ndim else 1
    if isinstance(x, Mapping):
        return _size(next(iter(x.values())))
    if isinstance(x, tuple | list) and x:
        return _size(x[0])
    return 1


def _steps(data: Iterable[Any], steps: int | None) -> int | None:
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        return steps
    return n if steps is None else min(n, steps)


def _callbacks(
    callbacks: Sequence[Callback] | CallbackList,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    verbose: int,
    **params: Any,
) -> CallbackList:
    if isinstance(callbacks, CallbackList):
        cbs = callbacks
        if cbs.history is None:  # fit returns a History: reuse the list's own, or add one
            found = [cb for cb in cbs if isinstance(cb, History)]
            cbs.history = found[0] if found else History()
            if not found:
                cbs.append(cbs.history)
        cbs.set_model(model)
        cbs.set_params({"verbose": verbose, **params})
    else:
        progbar = verbose != 0
        cbs = CallbackList(
            callbacks, add_history=True, add_progbar=progbar, model=model, verbose=verbose, **params
        )
    if optimizer is not None:
        cbs.set_optimizer(optimizer)
    return cbs


def fit(
    model: torch.nn.Module,
    train_data: Iterable[Any],
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    loss: Loss,
    metrics: Iterable[str | MetricFn] | None = None,
    validation_data: Iterable[Any] | None = None,
    callbacks: Sequence[Callback] | CallbackList = (),
    initial_epoch: int = 0,
    steps_per_epoch: int | None = None,
    verbose: int = 1,
    device: torch.device | str | None = None,
) -> History:
    """Train ``model`` for ``epochs`` epochs; returns the :class:`~cairn.callbacks.History`.

    Logs use Keras's keys: ``loss``, the metric names, ``val_loss`` and ``val_<metric>`` with
    ``validation_data``, and ``learning_rate`` (the first parameter group's). Setting
    ``model.stop_training = True`` (EarlyStopping, TerminateOnNaN do) ends training after the current
    batch. With :class:`~cairn.callbacks.BackupAndRestore`, calling ``fit`` again after a crash resumes
    where the backup was taken, mid-epoch included.
    """
    if epochs < 0 or initial_epoch < 0:
        raise ValueError("epochs and initial_epoch must be >= 0")
    if device is not None:
        model.to(device)
    tracker = Tracker(resolve_metrics(metrics))
    steps = _steps(train_data, steps_per_epoch)
    cbs = _callbacks(
        callbacks,
        model,
        optimizer,
        verbose,
        epochs=epochs,
        steps=steps,
        train_data=train_data,
        tracker=tracker,
    )
    model.stop_training = False  # type: ignore[assignment]
    with _closed_on_error(cbs):
        return _train(model, train_data, epochs, optimizer, loss, validation_data, cbs, tracker,
                      (initial_epoch, steps_per_epoch, device))  # fmt: skip


@contextlib.contextmanager
def _closed_on_error(cbs: CallbackList) -> Iterator[None]:
    """An error in training leaves no lock behind: ``close()`` callbacks that have it (BackupAndRestore
    releases its store and keeps the backup for the retry)."""
    try:
        yield
    except BaseException:
        for cb in cbs:
            close = getattr(cb, "close", None)
            if callable(close):
                close()
        raise


def _train(
    model: torch.nn.Module,
    train_data: Iterable[Any],
    epochs: int,
    optimizer: torch.optim.Optimizer,
    loss: Loss,
    validation_data: Iterable[Any] | None,
    cbs: CallbackList,
    tracker: Tracker,
    options: tuple[int, int | None, torch.device | str | None],
) -> History:
    initial_epoch, steps_per_epoch, device = options
    cbs.on_train_begin()
    epoch, skip = cbs.resume_point() or (initial_epoch, 0)
    epoch_logs: dict[str, Any] = {}
    while epoch < epochs and not model.stop_training:
        cbs.on_epoch_begin(epoch)
        model.train()
        if not skip:
            tracker.reset()  # (a resumed epoch goes on with the sums restored by BackupAndRestore)
        for batch, (x, y) in _batches(train_data, steps_per_epoch, skip):
            cbs.on_train_batch_begin(batch)
            x, y = _to(x, device), _to(y, device)
            y_pred = _forward(model, x)
            value = loss(y_pred, y)
            optimizer.zero_grad()
            value.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            tracker.update(_size(x), value, y_pred, y)
            cbs.on_train_batch_end(batch, tracker.result())
            if model.stop_training:
                break
        skip = 0
        epoch_logs = tracker.result()
        if validation_data is not None:  # also after a mid-epoch stop, as Keras does
            val = _run_evaluation(model, validation_data, loss, tracker.metrics, cbs, device)
            epoch_logs.update({f"val_{k}": v for k, v in val.items()})
        epoch_logs["learning_rate"] = float(optimizer.param_groups[0]["lr"])
        cbs.on_epoch_end(epoch, epoch_logs)
        epoch += 1
    cbs.on_train_end(epoch_logs)
    assert cbs.history is not None
    return cbs.history


def _batches(data: Iterable[Any], steps: int | None, skip: int) -> Iterator[tuple[int, tuple[Any, Any]]]:
    """``(batch index, (x, y))`` for one epoch: at most ``steps`` batches, resuming after ``skip``.

    A data loader with ``state_dict()`` (cairn's resumable loader) was restored at its position and
    continues from there; any other iterable is fast-forwarded by skipping batches, which is exact
    only if its order does not depend on the random state (see ``cairn.resumable_loader``).
    """
    if steps is None and skip and isinstance(data, Sized):
        with contextlib.suppress(TypeError):  # (a DataLoader over an IterableDataset has no length)
            steps = len(data)  # a resumed epoch ends where a whole one does (its saved position: its end)
    limit = None if steps is None else max(0, steps - skip)  # never pulls a batch it will not use
    if limit == 0:
        return  # not even iter(): a resumable loader would start (and draw the seed of) its next epoch
    it = iter(data)
    stateful = callable(getattr(data, "state_dict", None))
    if skip and not stateful:
        warnings.warn(
            f"resuming mid-epoch by skipping {skip} batches of a data source that cannot save its position; "
            "this repeats the epoch's order only if it is not shuffled. Use cairn.resumable_loader(...)",
            RuntimeWarning,
            stacklevel=3,
        )
        for _ in range(skip):
            if next(it, None) is None:
                return
    for batch, item in enumerate(itertools.islice(it, limit), start=skip):
        yield batch, _split(item)


def _run_evaluation(
    model: torch.nn.Module,
    data: Iterable[Any],
    loss: Loss | None,
    metrics: dict[str, MetricFn],
    cbs: CallbackList,
    device: torch.device | str | None,
    steps: int | None = None,
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    tracker = Tracker(metrics)
    cbs.on_test_begin()
    with torch.no_grad():
        for batch, (x, y) in _batches(data, steps, 0):
            cbs.on_test_batch_begin(batch)
            x, y = _to(x, device), _to(y, device)
            y_pred = _forward(model, x)
            tracker.update(_size(x), None if loss is None else loss(y_pred, y), y_pred, y)
            cbs.on_test_batch_end(batch, tracker.result())
    logs = tracker.result()
    cbs.on_test_end(logs)
    model.train(was_training)
    return logs


def evaluate(
    model: torch.nn.Module,
    data: Iterable[Any],
    *,
    loss: Loss | None = None,
    metrics: Iterable[str | MetricFn] | None = None,
    callbacks: Sequence[Callback] | CallbackList = (),
    steps: int | None = None,
    verbose: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """The mean loss and metrics of ``model`` over ``data`` (``(x, y)`` batches), with callbacks."""
    if device is not None:
        model.to(device)
    cbs = _callbacks(callbacks, model, None, verbose, steps=_steps(data, steps))
    return _run_evaluation(model, data, loss, resolve_metrics(metrics), cbs, device, steps)


def predict(
    model: torch.nn.Module,
    data: Iterable[Any],
    *,
    callbacks: Sequence[Callback] | CallbackList = (),
    steps: int | None = None,
    verbose: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``model``'s outputs for every batch of ``data``, concatenated (batches may be ``x`` or ``(x, y)``)."""
    if device is not None:
        model.to(device)
    cbs = _callbacks(callbacks, model, None, verbose, steps=_steps(data, steps))
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor] = []
    cbs.on_predict_begin()
    with torch.no_grad():
        for batch, item in enumerate(itertools.islice(data, steps)):
            x = item[0] if isinstance(item, tuple | list) and len(item) == 2 else item
            cbs.on_predict_batch_begin(batch)
            out = _forward(model, _to(x, device))
            outputs.append(out)
            cbs.on_predict_batch_end(batch, {"outputs": out})
    cbs.on_predict_end()
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)
