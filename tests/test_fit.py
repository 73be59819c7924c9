"""``cairn.fit``, ``evaluate`` and ``predict`` as a user relies on them, with the callbacks in ``fit``.

A small classifier on scikit-learn's digits (shipped with the package, no download) checks that training
works at all; the rest uses tiny models whose numbers can be worked out by hand: the logs each hook
receives, the order of the hooks, the data forms, and what ``ModelCheckpoint`` writes.
"""

from __future__ import annotations

import copy
import csv
import functools
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cairn
from cairn.callbacks import (
    BackupAndRestore,
    Callback,
    CallbackList,
    CSVLogger,
    EarlyStopping,
    History,
    LambdaCallback,
    ModelCheckpoint,
)

mse = nn.functional.mse_loss


# -- data and models ------------------------------------------------------------------------------------


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, scaled to [0, 1]: 1440 training and 357 validation images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1440], y[:1440], x[1440:], y[1440:]


def _digits_loaders(batch_size: int = 64) -> tuple[DataLoader[Any], DataLoader[Any]]:
    x_train, y_train, x_val, y_val = _digits()
    train = DataLoader(
        TensorDataset(x_train, y_train),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    return train, DataLoader(TensorDataset(x_val, y_val), batch_size=128)


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _regression(sizes: tuple[int, ...] = (4, 4, 2), seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``(x [n, 3], y [n, 1])``; the last one smaller, so sample weighting shows."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)) for n in sizes]


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 1)


def _scripted(weights: list[float]) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]], Callback]:
    """A model whose ``val_loss`` at epoch ``e`` is exactly ``weights[e] ** 2``.

    ``y = w * x`` with ``x = 1`` and ``y_true = 0`` under MSE; a learning rate of 0 leaves ``w`` alone
    during training, and the returned callback sets it at the start of every epoch.
    """
    model = nn.Linear(1, 1, bias=False)
    data = [(torch.ones(2, 1), torch.zeros(2, 1))]

    def set_weight(epoch: int, logs: Any) -> None:
        with torch.no_grad():
            model.weight.fill_(weights[epoch])

    return model, data, LambdaCallback(on_epoch_begin=set_weight)


def _fit(model: nn.Module, data: Any, **kwargs: Any) -> History:
    kwargs.setdefault("optimizer", torch.optim.SGD(model.parameters(), lr=0.05))
    kwargs.setdefault("loss", mse)
    kwargs.setdefault("verbose", 0)
    kwargs.setdefault("epochs", 1)
    return cairn.fit(model, data, **kwargs)


def _assert_same_history(h1: History, h2: History) -> None:
    assert h1.epoch == h2.epoch and h1.history.keys() == h2.history.keys()
    for key, values in h1.history.items():
        assert values == pytest.approx(h2.history[key]), key


def _weighted_mean(values: list[float], sizes: list[int]) -> float:
    return sum(v * n for v, n in zip(values, sizes, strict=True)) / sum(sizes)


class Recorder(Callback):
    """Records every hook as ``(name, index or None, a copy of logs)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int | None, dict[str, Any]]] = []

    def _add(self, name: str, index: int | None, logs: Any) -> None:
        self.calls.append((name, index, dict(logs) if logs is not None else {}))

    def names(self) -> list[tuple[str, int | None]]:
        return [(name, index) for name, index, _ in self.calls]

    def logs(self, name: str) -> list[dict[str, Any]]:
        return [logs for n, _, logs in self.calls if n == name]

    def on_train_begin(self, logs: Any = None) -> None:
        self._add("on_train_begin", None, logs)

    def on_train_end(self, logs: Any = None) -> None:
        self._add("on_train_end", None, logs)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._add("on_epoch_begin", epoch, logs)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._add("on_epoch_end", epoch, logs)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._add("on_train_batch_begin", batch, logs)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._add("on_train_batch_end", batch, logs)

    def on_test_begin(self, logs: Any = None) -> None:
        self._add("on_test_begin", None, logs)

    def on_test_end(self, logs: Any = None) -> None:
        self._add("on_test_end", None, logs)

    def on_test_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._add("on_test_batch_begin", batch, logs)

    def on_test_batch_end(self, batch: int, logs: Any = None) -> None:
        self._add("on_test_batch_end", batch, logs)

    def on_predict_begin(self, logs: Any = None) -> None:
        self._add("on_predict_begin", None, logs)

    def on_predict_end(self, logs: Any = None) -> None:
        self._add("on_predict_end", None, logs)

    def on_predict_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._add("on_predict_batch_begin", batch, logs)

    def on_predict_batch_end(self, batch: int, logs: Any = None) -> None:
        self._add("on_predict_batch_end", batch, logs)


# -- training works -------------------------------------------------------------------------------------


def test_a_digits_classifier_learns_and_history_has_kerass_keys() -> None:
    train, val = _digits_loaders()
    model = _classifier()
    epochs = 5
    history = cairn.fit(
        model,
        train,
        epochs=epochs,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        loss=nn.CrossEntropyLoss(),
        metrics=["accuracy"],
        validation_data=val,
        verbose=0,
    )
    assert isinstance(history, History)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"}
    assert all(len(values) == epochs for values in history.history.values())
    assert history.epoch == list(range(epochs))
    assert all(isinstance(v, float) for values in history.history.values() for v in values)
    assert history.history["val_accuracy"][-1] > 0.85
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert history.history["learning_rate"] == [1e-2] * epochs

    # evaluate and predict see the model fit left: the same numbers as the last validation
    result = cairn.evaluate(model, val, loss=nn.CrossEntropyLoss(), metrics=["accuracy"], verbose=0)
    assert result == pytest.approx(
        {"loss": history.history["val_loss"][-1], "accuracy": history.history["val_accuracy"][-1]}
    )
    scores = cairn.predict(model, val)
    x_val, y_val = _digits()[2:]
    assert scores.shape == (len(x_val), 10)
    assert (scores.argmax(1) == y_val).float().mean().item() == pytest.approx(result["accuracy"])


# -- metrics --------------------------------------------------------------------------------------------


def test_metrics_by_keras_name_and_as_functions_named_by___name__() -> None:
    model = _linear()
    data = _regression()

    def worst_error(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        return (y_pred - y_true).abs().max()

    result = cairn.evaluate(model, data, loss=mse, metrics=["mae", "mse", worst_error], verbose=0)
    assert list(result) == ["loss", "mae", "mse", "worst_error"]
    sizes = [len(x) for x, _ in data]
    with torch.no_grad():
        errors = [model(x) - y for x, y in data]
    assert result["mae"] == pytest.approx(_weighted_mean([e.abs().mean().item() for e in errors], sizes))
    assert result["mse"] == pytest.approx(_weighted_mean([e.pow(2).mean().item() for e in errors], sizes))
    assert result["loss"] == pytest.approx(result["mse"])
    assert result["worst_error"] == pytest.approx(
        _weighted_mean([e.abs().max().item() for e in errors], sizes)
    )

    history = _fit(_linear(), data, epochs=2, metrics=["mae", worst_error], validation_data=data)
    assert set(history.history) == {
        "loss",
        "mae",
        "worst_error",
        "val_loss",
        "val_mae",
        "val_worst_error",
        "learning_rate",
    }


def test_accuracy_of_class_indices_one_hot_and_binary_targets() -> None:
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([1, 0, 0, 0])  # 3 of 4 right
    identity = nn.Identity()
    assert cairn.evaluate(identity, [(scores, labels)], metrics=["accuracy"], verbose=0) == {"accuracy": 0.75}
    one_hot = nn.functional.one_hot(labels, 2).float()
    assert cairn.evaluate(identity, [(scores, one_hot)], metrics=["acc"], verbose=0) == {"acc": 0.75}
    probs, targets = torch.tensor([[0.9], [0.2], [0.6], [0.4]]), torch.tensor([[1.0], [0.0], [0.0], [1.0]])
    assert cairn.evaluate(identity, [(probs, targets)], metrics=["binary_accuracy"], verbose=0) == {
        "binary_accuracy": 0.5
    }


def test_binary_accuracy_of_one_dimensional_predictions() -> None:
    probs, targets = torch.tensor([0.9, 0.2, 0.6, 0.4]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert cairn.evaluate(nn.Identity(), [(probs, targets)], metrics=["accuracy"], verbose=0) == {
        "accuracy": 0.5
    }


def test_unknown_metric_names_and_non_metrics_are_refused() -> None:
    data = _regression()
    with pytest.raises(ValueError, match="unknown metric 'f1_macro'"):
        _fit(_linear(), data, metrics=["f1_macro"])
    with pytest.raises(ValueError, match="unknown metric"):
        cairn.evaluate(_linear(), data, metrics=["MAE"], verbose=0)

    def loss(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        return y_pred.mean()

    with pytest.raises(ValueError, match="'loss' is logged already"):
        _fit(_linear(), data, metrics=[loss])
    with pytest.raises(TypeError):
        _fit(_linear(), data, metrics=[3])


# -- the hooks ------------------------------------------------------------------------------------------


def test_the_hooks_are_called_in_kerass_order() -> None:
    rec = Recorder()
    train, val = _regression((4, 4, 2)), _regression((3, 2), seed=1)
    _fit(_linear(), train, epochs=2, validation_data=val, callbacks=[rec])
    epoch = [
        *[(hook, b) for b in range(3) for hook in ("on_train_batch_begin", "on_train_batch_end")],
        ("on_test_begin", None),
        *[(hook, b) for b in range(2) for hook in ("on_test_batch_begin", "on_test_batch_end")],
        ("on_test_end", None),
    ]
    assert rec.names() == [
        ("on_train_begin", None),
        ("on_epoch_begin", 0),
        *epoch,
        ("on_epoch_end", 0),
        ("on_epoch_begin", 1),
        *epoch,
        ("on_epoch_end", 1),
        ("on_train_end", None),
    ]
    assert rec.params["epochs"] == 2 and rec.params["steps"] == 3 and rec.params["verbose"] == 0


def test_the_logs_each_hook_receives() -> None:
    """Batch logs are the running, sample-weighted means of the epoch so far; epoch logs add ``val_``."""
    losses: list[float] = []

    def recording_mse(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        value = mse(y_pred, y_true)
        losses.append(value.item())
        return value

    rec = Recorder()
    train, val = _regression((4, 4, 2)), _regression((3, 2), seed=1)
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cairn.fit(
        model,
        train,
        epochs=1,
        optimizer=opt,
        loss=recording_mse,
        metrics=["mae"],
        validation_data=val,
        callbacks=[rec],
        verbose=0,
    )
    train_losses, val_losses = losses[:3], losses[3:]
    assert rec.logs("on_train_begin") == [{}]
    assert all(logs == {} for logs in rec.logs("on_train_batch_begin") + rec.logs("on_test_batch_begin"))
    batch_logs = rec.logs("on_train_batch_end")
    for i, logs in enumerate(batch_logs):
        assert set(logs) == {"loss", "mae"}
        assert logs["loss"] == pytest.approx(_weighted_mean(train_losses[: i + 1], [4, 4, 2][: i + 1]))
    test_logs = rec.logs("on_test_batch_end")
    assert [logs["loss"] for logs in test_logs] == pytest.approx(
        [val_losses[0], _weighted_mean(val_losses, [3, 2])]
    )
    (test_end,) = rec.logs("on_test_end")
    assert test_end == test_logs[-1]
    (epoch_logs,) = rec.logs("on_epoch_end")
    assert epoch_logs == {
        **batch_logs[-1],
        "val_loss": test_end["loss"],
        "val_mae": test_end["mae"],
        "learning_rate": 0.05,
    }
    assert rec.logs("on_train_end") == [epoch_logs]


def test_the_legacy_batch_hooks_are_the_training_batch_hooks() -> None:
    seen: list[int] = []

    class Legacy(Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            seen.append(batch)

    _fit(_linear(), _regression((4, 4, 2)), epochs=2, validation_data=_regression((3,)), callbacks=[Legacy()])
    assert seen == [0, 1, 2, 0, 1, 2]  # not called for validation batches


def test_stop_training_ends_fit_after_the_current_batch() -> None:
    rec = Recorder()
    model = _linear()

    def stop(batch: int, logs: Any) -> None:
        if batch == 1:
            model.stop_training = True

    history = _fit(
        model, _regression((4, 4, 4, 4)), epochs=5, callbacks=[LambdaCallback(on_train_batch_end=stop), rec]
    )
    assert rec.names() == [
        ("on_train_begin", None),
        ("on_epoch_begin", 0),
        ("on_train_batch_begin", 0),
        ("on_train_batch_end", 0),
        ("on_train_batch_begin", 1),
        ("on_train_batch_end", 1),
        ("on_epoch_end", 0),
        ("on_train_end", None),
    ]
    assert history.epoch == [0]
    # the next fit trains again: stop_training is reset at its start
    assert _fit(model, _regression((4,)), epochs=2).epoch == [0, 1]


def test_a_mid_epoch_stop_still_validates_as_keras_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model = _linear()

    def stop(batch: int, logs: Any) -> None:
        model.stop_training = True

    history = _fit(
        model,
        _regression((4, 4)),
        epochs=3,
        validation_data=_regression((3,), seed=1),
        callbacks=[
            LambdaCallback(on_train_batch_end=stop),
            ModelCheckpoint("ckpts/w-{epoch:02d}-{val_loss:.2f}", save_weights_only=True),
        ],
    )
    assert history.epoch == [0] and "val_loss" in history.history
    assert len(cairn.Store("ckpts").names()) == 1


def test_initial_epoch_and_steps_per_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    rec = Recorder()
    history = _fit(
        _linear(), _regression((4, 4, 4, 4, 4)), epochs=5, initial_epoch=3, steps_per_epoch=2, callbacks=[rec]
    )
    assert history.epoch == [3, 4]
    assert [i for name, i in rec.names() if name == "on_epoch_begin"] == [3, 4]
    assert [i for name, i in rec.names() if name == "on_train_batch_end"] == [0, 1, 0, 1]
    assert rec.params["steps"] == 2

    _fit(_linear(), _regression((4, 4, 4)), epochs=5, initial_epoch=3, verbose=2)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" - ")[0] for line in lines] == ["Epoch 4/5", "Epoch 5/5"]

    assert _fit(_linear(), _regression(), epochs=2, initial_epoch=2).epoch == []
    with pytest.raises(ValueError):
        _fit(_linear(), _regression(), epochs=-1)


def _counting_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream whose ``i``-th batch is filled with ``i``."""
    for i in itertools.count():
        yield torch.full((2, 3), float(i)), torch.zeros(2, 1)


class _Seen(nn.Module):
    """A linear model that records which batch (by its fill value) it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(x[0, 0]))
        return self.linear(x)  # type: ignore[no-any-return]


def test_steps_per_epoch_takes_consecutive_batches_from_a_generator() -> None:
    model = _Seen()
    _fit(
        model,
        _counting_batches(),
        epochs=2,
        steps_per_epoch=3,
        optimizer=torch.optim.SGD(model.parameters(), lr=0),
    )
    assert model.seen == [0, 1, 2, 3, 4, 5]


def test_predict_steps_reads_no_more_than_steps_batches() -> None:
    batches = _counting_batches()
    cairn.predict(_Seen(), (x for x, _ in batches), steps=2)
    assert int(next(batches)[0][0, 0]) == 2


# -- data forms -----------------------------------------------------------------------------------------


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 1)
        self.b = nn.Linear(2, 1)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return self.a(image) + self.b(extra)  # type: ignore[no-any-return]


def test_data_as_a_dataloader_or_a_list_of_pairs_gives_the_same_training() -> None:
    pairs = _regression((4, 4, 2))
    x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # the same batches, in the same order
    from_list, from_loader = _linear(), _linear()
    h1 = _fit(from_list, pairs, epochs=2, metrics=["mae"], validation_data=pairs)
    h2 = _fit(from_loader, loader, epochs=2, metrics=["mae"], validation_data=loader, device="cpu")
    _assert_same_history(h1, h2)
    for p, q in zip(from_list.parameters(), from_loader.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_x_as_a_tuple_calls_model_star_x_and_as_a_dict_model_star_star_x() -> None:
    g = torch.Generator().manual_seed(0)
    images, extras, y = torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g), torch.randn(6, 1)
    as_tuples = [((images[i : i + 3], extras[i : i + 3]), y[i : i + 3]) for i in (0, 3)]
    as_dicts = [({"extra": e, "image": im}, t) for (im, e), t in as_tuples]
    m1, m2 = _TwoInputs(), _TwoInputs()
    h1 = _fit(m1, as_tuples, epochs=2, validation_data=as_tuples, device="cpu")
    h2 = _fit(m2, as_dicts, epochs=2, validation_data=as_dicts, device="cpu")
    _assert_same_history(h1, h2)
    torch.testing.assert_close(m1.a.weight, m2.a.weight)

    result = cairn.evaluate(m1, as_dicts, loss=mse, verbose=0)
    assert result["loss"] == pytest.approx(mse(m1(images, extras), y).item())
    with torch.no_grad():
        expected = m1(images, extras)
    torch.testing.assert_close(cairn.predict(m1, as_tuples), expected)
    torch.testing.assert_close(cairn.predict(m1, [x for x, _ in as_dicts]), expected)


def test_a_batch_that_is_not_a_pair_is_refused() -> None:
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    with pytest.raises(ValueError, match="a batch must be an \\(x, y\\) pair, not tuple of 3 items"):
        _fit(_linear(), [(x, y, y)])


# -- evaluate and predict -------------------------------------------------------------------------------


def test_evaluate_returns_the_means_and_runs_the_test_hooks() -> None:
    rec = Recorder()
    data = _regression((4, 4, 2))
    model = _linear()
    model.train()
    result = cairn.evaluate(model, data, loss=mse, metrics=["mae"], callbacks=[rec], verbose=0)
    with torch.no_grad():
        losses = [mse(model(x), y).item() for x, y in data]
    assert result["loss"] == pytest.approx(_weighted_mean(losses, [4, 4, 2]))
    assert rec.names() == [
        ("on_test_begin", None),
        *[(hook, b) for b in range(3) for hook in ("on_test_batch_begin", "on_test_batch_end")],
        ("on_test_end", None),
    ]
    assert rec.logs("on_test_end") == [result]
    assert model.training  # the mode is given back
    assert cairn.evaluate(model, data, steps=1, verbose=0) == {}  # no loss, no metrics: nothing to log
    assert cairn.evaluate(model, data, loss=mse, steps=1, verbose=0)["loss"] == pytest.approx(losses[0])


def test_predict_concatenates_outputs_and_runs_the_predict_hooks() -> None:
    rec = Recorder()
    model = _linear()
    pairs = _regression((4, 4, 2))
    x = torch.cat([p[0] for p in pairs])
    with torch.no_grad():
        expected = model(x)
    out = cairn.predict(model, pairs, callbacks=[rec])
    torch.testing.assert_close(out, expected)
    assert rec.names() == [
        ("on_predict_begin", None),
        *[(hook, b) for b in range(3) for hook in ("on_predict_batch_begin", "on_predict_batch_end")],
        ("on_predict_end", None),
    ]
    outputs = [logs["outputs"] for logs in rec.logs("on_predict_batch_end")]
    torch.testing.assert_close(torch.cat(outputs), expected)

    # x-only batches: a list of tensors, or a DataLoader over a one-tensor dataset ([x] batches)
    torch.testing.assert_close(cairn.predict(model, [p[0] for p in pairs]), expected)
    torch.testing.assert_close(cairn.predict(model, DataLoader(TensorDataset(x), batch_size=3)), expected)
    torch.testing.assert_close(cairn.predict(model, pairs, steps=2), expected[:8])
    assert cairn.predict(model, []).numel() == 0


# -- verbosity ------------------------------------------------------------------------------------------


def test_verbose_0_prints_nothing_and_verbose_2_one_line_per_epoch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, val = _regression(), _regression((3,), seed=1)
    _fit(_linear(), data, epochs=3, metrics=["mae"], validation_data=val, verbose=0)
    cairn.evaluate(_linear(), val, loss=mse, verbose=0)
    cairn.predict(_linear(), val, verbose=0)
    assert capsys.readouterr() == ("", "")

    _fit(_linear(), data, epochs=3, metrics=["mae"], validation_data=val, verbose=2)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3 and err == ""
    for epoch, line in enumerate(lines, start=1):
        assert line.startswith(f"Epoch {epoch}/3 - 3/3 - ")
        for key in ("loss", "mae", "val_loss", "val_mae", "learning_rate"):
            assert f" - {key}: " in line


# -- callbacks in a hand-written loop -------------------------------------------------------------------


def test_a_callback_list_drives_early_stopping_csv_logger_and_history_in_a_hand_written_loop(
    tmp_path: Path,
) -> None:
    """The pattern of ``CallbackList``'s docstring, with a real training step."""
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = _regression()
    val_losses = [1.0, 0.5, 0.6, 0.7, 0.8]  # no improvement after epoch 1: patience 2 stops at epoch 3
    history = History()
    cbs = CallbackList(
        [EarlyStopping(patience=2), CSVLogger(tmp_path / "log.csv"), history], model=model, epochs=10
    )
    cbs.on_train_begin()
    epochs_run = []
    for epoch in range(10):
        cbs.on_epoch_begin(epoch)
        for x, y in data:
            opt.zero_grad()
            loss = mse(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        epochs_run.append(epoch)
        cbs.on_epoch_end(epoch, {"loss": loss.item(), "val_loss": val_losses[epoch]})
        if getattr(model, "stop_training", False):
            break
    cbs.on_train_end()
    assert epochs_run == [0, 1, 2, 3]
    assert history.epoch == [0, 1, 2, 3]
    assert history.history["val_loss"] == val_losses[:4]
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "loss", "val_loss"]
    assert [(r[0], float(r[2])) for r in rows[1:]] == [(str(e), v) for e, v in enumerate(val_losses[:4])]


def test_fit_takes_a_callback_list_built_by_hand() -> None:
    rec = Recorder()
    cbs = CallbackList([rec], add_history=True)
    history = _fit(_linear(), _regression(), epochs=2, callbacks=cbs)
    assert history is cbs.history and history.epoch == [0, 1]
    assert rec.model is not None and rec.params["epochs"] == 2


def test_fit_given_a_callback_list_without_history_adds_one() -> None:
    history = _fit(_linear(), _regression(), epochs=2, callbacks=CallbackList([Recorder()]))
    assert history.epoch == [0, 1]


def test_fit_again_after_an_interruption_resumes_in_the_same_process(
    tmp_path: Path,
) -> None:
    """An exception ends fit; a second fit in the same process resumes from the backup (the store's
    lock was released)."""

    class Interrupt(Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            if epoch == 2:
                raise RuntimeError("interrupting")

    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    backup = BackupAndRestore(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupting"):
        cairn.fit(
            model,
            _regression(),
            epochs=4,
            optimizer=opt,
            loss=mse,
            callbacks=[Interrupt(), backup],
            verbose=0,
        )
    rec = Recorder()
    history = cairn.fit(
        model, _regression(), epochs=4, optimizer=opt, loss=mse, callbacks=[rec, backup], verbose=0
    )
    assert [i for name, i in rec.names() if name == "on_epoch_begin"] == [2, 3]
    assert history.epoch == [0, 1, 2, 3]


class _BatchCounter(Callback):
    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state_dict: Any) -> None:
        self.batches = int(state_dict["batches"])


class _LossByEpoch(Callback):
    """State whose keys appear as training goes: ``{}`` when fit starts."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: dict[str, float] = {}

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.losses[str(epoch)] = logs["loss"]

    def state_dict(self) -> dict[str, Any]:
        return dict(self.losses)

    def load_state_dict(self, state_dict: Any) -> None:
        self.losses = dict(state_dict)


def test_fit_again_with_a_kept_backup_continues_the_run(tmp_path: Path) -> None:
    def run(epochs: int) -> tuple[History, _BatchCounter, Recorder]:
        model = _linear()
        counter, rec = _BatchCounter(), Recorder()
        backup = BackupAndRestore(tmp_path / "backup", delete_checkpoint=False)
        history = _fit(model, _regression(), epochs=epochs, callbacks=[counter, rec, backup])
        return history, counter, rec

    first, _, _ = run(2)
    history, counter, rec = run(4)
    assert [i for name, i in rec.names() if name == "on_epoch_begin"] == [2, 3]
    assert history.epoch == [0, 1, 2, 3]
    assert history.history["loss"][:2] == first.history["loss"]
    assert counter.batches == 4 * 3
    assert (tmp_path / "backup").exists()


def test_backup_and_restore_restores_a_callback_whose_state_starts_empty(tmp_path: Path) -> None:
    def run(epochs: int) -> _LossByEpoch:
        by_epoch = _LossByEpoch()
        backup = BackupAndRestore(tmp_path / "backup", delete_checkpoint=False)
        _fit(_linear(), _regression(), epochs=epochs, callbacks=[by_epoch, backup])
        return by_epoch

    run(2)
    assert sorted(run(4).losses) == ["0", "1", "2", "3"]


class _Interrupt(Callback):
    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if epoch == 2:
            raise RuntimeError("interrupting")


def test_kerass_interrupt_then_fit_again_pattern(tmp_path: Path) -> None:
    """keras.callbacks.BackupAndRestore's docstring: the interrupting callback is not passed again."""
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    backup = BackupAndRestore(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupting"):
        _fit(model, _regression(), epochs=4, optimizer=opt, callbacks=[backup, _Interrupt()])
    history = _fit(model, _regression(), epochs=4, optimizer=opt, callbacks=[backup])
    assert history.epoch == [0, 1, 2, 3]


def test_a_resume_may_change_verbose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    interrupt = _Interrupt()
    backup = BackupAndRestore(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupting"):
        _fit(model, _regression(), epochs=4, optimizer=opt, callbacks=[interrupt, backup], verbose=0)
    interrupt.on_epoch_begin = lambda epoch, logs=None: None  # type: ignore[method-assign]
    history = _fit(model, _regression(), epochs=4, optimizer=opt, callbacks=[interrupt, backup], verbose=2)
    assert history.epoch == [0, 1, 2, 3]
    assert [line.split(" - ")[0] for line in capsys.readouterr().out.splitlines()] == [
        "Epoch 3/4",
        "Epoch 4/4",
    ]


# -- ModelCheckpoint in fit -----------------------------------------------------------------------------


def test_a_templated_checkpoint_path_saves_one_checkpoint_per_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    history = _fit(
        _linear(),
        _regression(),
        epochs=3,
        validation_data=_regression((3,), seed=1),
        callbacks=[ModelCheckpoint("ckpts/weights-{epoch:02d}-{val_loss:.2f}")],
    )
    expected = [f"weights-{e + 1:02d}-{v:.2f}" for e, v in enumerate(history.history["val_loss"])]
    store = cairn.Store("ckpts")
    assert store.names() == expected
    for name, val_loss in zip(expected, history.history["val_loss"], strict=True):
        assert store.info(name).metrics["val_loss"] == pytest.approx(val_loss)


def test_save_best_only_saves_only_on_improvement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    weights = [3.0, 2.0, 2.5, 1.0, 1.0, 4.0, 0.5]  # val_loss = w**2: 9, 4, 6.25, 1, 1 (equal), 16, 0.25
    model, data, scripted = _scripted(weights)
    history = _fit(
        model,
        data,
        epochs=len(weights),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        validation_data=data,
        callbacks=[scripted, ModelCheckpoint("ckpts/w-{epoch:02d}-{val_loss:.2f}", save_best_only=True)],
    )
    expected, best = [], float("inf")
    for epoch, value in enumerate(history.history["val_loss"]):
        if value < best:
            best = value
            expected.append(f"w-{epoch + 1:02d}-{value:.2f}")
    assert expected == ["w-01-9.00", "w-02-4.00", "w-04-1.00", "w-07-0.25"]
    assert cairn.Store("ckpts").names() == expected

    # mode="max" on the same run keeps the rises instead
    model, data, scripted = _scripted(weights)
    _fit(
        model,
        data,
        epochs=len(weights),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        validation_data=data,
        callbacks=[scripted, ModelCheckpoint("up/w-{epoch:02d}", save_best_only=True, mode="max")],
    )
    assert cairn.Store("up").names() == ["w-01", "w-06"]


def test_a_fixed_name_is_overwritten_and_holds_the_best_epochs_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model = _linear()
    copies: list[dict[str, torch.Tensor]] = []
    snapshot = LambdaCallback(
        on_epoch_end=lambda epoch, logs: copies.append(copy.deepcopy(model.state_dict()))
    )
    val = _regression((3, 3), seed=1)
    history = _fit(
        model,
        _regression(),
        epochs=6,
        validation_data=val,
        callbacks=[
            ModelCheckpoint("ckpts/best-model", save_best_only=True, save_weights_only=True),
            snapshot,
        ],
    )
    val_losses = history.history["val_loss"]
    best_epoch = min(range(len(val_losses)), key=val_losses.__getitem__)
    store = cairn.Store("ckpts")
    assert store.names() == ["best-model"]
    assert store.info("best-model").metrics["val_loss"] == pytest.approx(val_losses[best_epoch])

    fresh = nn.Linear(3, 1)
    cairn.restore("ckpts", fresh, "best-model")
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, copies[best_epoch][key])
    if best_epoch != len(val_losses) - 1:  # (training moved on from the best epoch)
        assert not torch.equal(fresh.weight, model.weight)


@pytest.mark.parametrize("name", ["best", "latest"])
def test_a_reserved_checkpoint_name_is_refused_when_the_callback_is_built(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not at the end of the first epoch, after the training time is spent."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        ModelCheckpoint(f"ckpts/{name}", monitor="loss", save_best_only=True)
    ModelCheckpoint(f"ckpts/{name}-model", monitor="loss", save_best_only=True)


def test_a_safetensors_path_writes_the_weights(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = _linear()
    copies: list[dict[str, torch.Tensor]] = []
    snapshot = LambdaCallback(
        on_epoch_end=lambda epoch, logs: copies.append(copy.deepcopy(model.state_dict()))
    )
    path = tmp_path / "weights" / "model-{epoch}.safetensors"
    _fit(model, _regression(), epochs=2, callbacks=[ModelCheckpoint(path, save_weights_only=True), snapshot])
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [
        "model-1.safetensors",
        "model-2.safetensors",
    ]
    for epoch in (1, 2):
        file = tmp_path / "weights" / f"model-{epoch}.safetensors"
        loaded = load_file(file)
        assert loaded.keys() == copies[epoch - 1].keys()
        for key, value in loaded.items():
            assert torch.equal(value, copies[epoch - 1][key])
        with safe_open(file, framework="pt") as f:
            assert f.metadata() == {"epoch": str(epoch)}
    for key, value in load_file(tmp_path / "weights" / "model-2.safetensors").items():
        assert torch.equal(value, model.state_dict()[key])

    with pytest.raises(ValueError, match="save_weights_only=True"):
        ModelCheckpoint(tmp_path / "model.safetensors")


def test_a_full_checkpoint_restores_model_optimizer_and_rng(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model = _linear()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    at_epoch: list[tuple[dict[str, Any], dict[str, Any], torch.Tensor]] = []

    def snapshot(epoch: int, logs: Any) -> None:
        at_epoch.append(
            (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), torch.get_rng_state())
        )

    _fit(
        model,
        _regression(),
        epochs=3,
        optimizer=opt,
        callbacks=[ModelCheckpoint("ckpts/epoch-{epoch}"), LambdaCallback(on_epoch_end=snapshot)],
    )
    torch.rand(100)  # move the generator on
    fresh = _linear()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    report = cairn.restore(
        "ckpts", {"model": fresh, "optimizer": fresh_opt, "rng": cairn.RNGState()}, "epoch-2"
    )
    assert report.unused == ["epoch"]  # the epoch number saved beside them
    weights, opt_state, rng = at_epoch[1]
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, weights[key])
    restored = fresh_opt.state_dict()
    assert restored["param_groups"][0]["lr"] == 0.01
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(restored["state"][index][key]), torch.as_tensor(value))
    assert torch.equal(torch.get_rng_state(), rng)
    assert cairn.load("ckpts", "epoch-2", keys="epoch") == {"epoch": 2}


def test_save_freq_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="validation metrics exist only at the end of an epoch"):
        ModelCheckpoint("ckpts/b", save_freq=2, save_best_only=True, monitor="val_loss")
    with pytest.raises(ValueError, match="save_freq"):
        ModelCheckpoint("ckpts/b", save_freq=0)
    _fit(
        _linear(),
        _regression((4, 4, 2)),
        epochs=2,
        callbacks=[ModelCheckpoint("ckpts/b-{epoch}-{batch}", save_freq=2, save_weights_only=True)],
    )
    # batches 2, 4 and 6 of the run: epoch 1 batch 2, epoch 2 batches 1 and 3
    assert cairn.Store("ckpts").names() == ["b-1-2", "b-2-1", "b-2-3"]
    _fit(
        _linear(),
        _regression((4, 4, 2)),
        epochs=1,
        callbacks=[ModelCheckpoint("best/b", save_freq=1, save_best_only=True, monitor="loss")],
    )
    assert cairn.Store("best").names() == ["b"]


def test_a_missing_monitor_skips_the_save_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    checkpoint = ModelCheckpoint("ckpts/best-model", monitor="val_accuracy", save_best_only=True)
    with pytest.warns(UserWarning) as record:
        _fit(_linear(), _regression(), epochs=2, callbacks=[checkpoint])  # no validation_data
    messages = [str(w.message) for w in record]
    assert messages.count("Can save best model only with val_accuracy available, skipping.") == 2
    assert not (tmp_path / "ckpts").exists()
    # without save_best_only, the monitor is not needed: every epoch is saved, silently
    _fit(
        _linear(),
        _regression(),
        epochs=2,
        callbacks=[ModelCheckpoint("all/e{epoch}", monitor="val_accuracy")],
    )
    assert cairn.Store("all").names() == ["e1", "e2"]


def test_initial_value_threshold_prevents_saves_until_beaten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    weights = [3.0, 2.0, 2.5, 1.0, 1.5]  # val_loss 9, 4, 6.25, 1, 2.25
    for threshold, store, expected in ((3.0, "a", ["w-04"]), (5.0, "b", ["w-02", "w-04"]), (0.5, "c", None)):
        model, data, scripted = _scripted(weights)
        _fit(
            model,
            data,
            epochs=len(weights),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            validation_data=data,
            callbacks=[
                scripted,
                ModelCheckpoint(
                    f"{store}/w-{{epoch:02d}}", save_best_only=True, initial_value_threshold=threshold
                ),
            ],
        )
        if expected is None:
            assert not (tmp_path / store).exists()
        else:
            assert cairn.Store(store).names() == expected
