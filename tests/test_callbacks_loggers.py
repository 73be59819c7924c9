"""CSVLogger, RemoteMonitor, LambdaCallback, TerminateOnNaN, ProgbarLogger and TensorBoard, driven
through a CallbackList the way ``fit`` drives them."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cairn.callbacks.base import Callback, CallbackList
from cairn.callbacks.loggers import CSVLogger, LambdaCallback, RemoteMonitor, TerminateOnNaN
from cairn.callbacks.progbar import ProgbarLogger, _Bar, format_duration, format_logs
from cairn.callbacks.tensorboard import TensorBoard, _crc32c, _masked_crc32c

# -- a fit-like driver -------------------------------------------------------------------------------------


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def batch_logs(epoch: int, batch: int) -> dict[str, Any]:
    return {"loss": 1.0 / (epoch + 1) + 0.5 / (batch + 1), "accuracy": 0.25 * (batch % 4)}


def epoch_logs(epoch: int) -> dict[str, Any]:
    return {"loss": 1.0 / (epoch + 1), "accuracy": 0.5, "val_loss": 2.0 / (epoch + 1), "val_accuracy": 0.25}


def train_logs(epoch: int) -> dict[str, Any]:
    return {k: v for k, v in epoch_logs(epoch).items() if not k.startswith("val_")}


def run(
    callbacks: list[Callback],
    *,
    epochs: int = 2,
    steps: int | None = 3,
    verbose: int | str = 0,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    initial_epoch: int = 0,
    logs_at: Callable[[int], dict[str, Any]] = epoch_logs,
    validation: bool = True,
    batches: int | None = None,
) -> CallbackList:
    """Call the hooks in fit's order: batches with running logs, a silent validation, then the epoch's
    logs."""
    model = model if model is not None else tiny_model()
    model.stop_training = False  # type: ignore[assignment]
    cbs = CallbackList(
        callbacks, model=model, optimizer=optimizer, epochs=epochs, steps=steps, verbose=verbose
    )
    n = batches if batches is not None else (steps or 4)
    cbs.on_train_begin()
    epoch = initial_epoch
    while epoch < epochs and not model.stop_training:
        cbs.on_epoch_begin(epoch)
        for batch in range(n):
            cbs.on_train_batch_begin(batch)
            cbs.on_train_batch_end(batch, batch_logs(epoch, batch))
            if model.stop_training:
                break
        logs = logs_at(epoch)
        if validation:
            cbs.on_test_begin()
            for batch in range(2):
                cbs.on_test_batch_begin(batch)
                cbs.on_test_batch_end(batch, {"loss": logs.get("val_loss", 0.0)})
            cbs.on_test_end({k.removeprefix("val_"): v for k, v in logs.items() if k.startswith("val_")})
        cbs.on_epoch_end(epoch, logs)
        epoch += 1
    cbs.on_train_end(logs_at(epoch - 1) if epoch > initial_epoch else {})
    return cbs


def read_csv(path: Path, sep: str = ",") -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f, delimiter=sep))


# -- CSVLogger ------------------------------------------------------------------------------------------


def test_csv_logger_writes_sorted_columns_and_a_row_per_epoch(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    run([CSVLogger(path)], epochs=3)
    rows = read_csv(path)
    assert rows[0] == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2"]
    assert [float(r[2]) for r in rows[1:]] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert path.read_text().endswith("\n") and "\r" not in path.read_text()


def test_csv_logger_separator_values_and_na(tmp_path: Path) -> None:
    path = tmp_path / "log.tsv"
    logger = CSVLogger(path, separator="\t")
    cbs = CallbackList([logger], model=tiny_model(), epochs=3, steps=1, verbose=0)
    cbs.on_train_begin()
    cbs.on_epoch_end(0, {"loss": torch.tensor(0.5), "lr": np.float32(0.125), "vec": torch.tensor([1.0, 2.0])})
    cbs.on_epoch_end(1, {"loss": 0.25, "vec": [3, 4]})  # lr missing
    with pytest.warns(RuntimeWarning, match=r"\['extra'\] were not in the logs"):
        cbs.on_epoch_end(2, {"loss": 0.125, "lr": 0.1, "vec": "x", "extra": 1.0})
    cbs.on_epoch_end(3, {"loss": 0.0625, "lr": 0.1, "vec": "x", "extra": 2.0})  # warned once only
    cbs.on_train_end()
    rows = read_csv(path, "\t")
    assert rows[0] == ["epoch", "loss", "lr", "vec"]
    assert rows[1] == ["0", "0.5", "0.125", "[1.0, 2.0]"]
    assert rows[2] == ["1", "0.25", "NA", "[3, 4]"]
    assert rows[3] == ["2", "0.125", "0.1", "x"]
    assert len(rows) == 5


def test_csv_logger_rows_are_on_disk_after_each_epoch(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    cbs = CallbackList([CSVLogger(path)], model=tiny_model(), epochs=2, steps=1, verbose=0)
    cbs.on_train_begin()
    cbs.on_epoch_end(0, {"loss": 1.0})
    assert read_csv(path) == [["epoch", "loss"], ["0", "1.0"]]  # no on_train_end yet: a crash loses nothing


def test_csv_logger_append_across_runs_writes_one_header(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    run([CSVLogger(path, append=True)], epochs=2)
    run([CSVLogger(path, append=True)], epochs=4, initial_epoch=2)
    rows = read_csv(path)
    assert rows[0][0] == "epoch" and [r[0] for r in rows] == ["epoch", "0", "1", "2", "3"]
    # append=False starts over
    run([CSVLogger(path)], epochs=1)
    assert [r[0] for r in read_csv(path)] == ["epoch", "0"]


def test_csv_logger_append_to_empty_file_writes_header(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("")
    run([CSVLogger(path, append=True)], epochs=1)
    assert read_csv(path)[0][0] == "epoch"


def test_csv_logger_append_keeps_the_existing_columns(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    run([CSVLogger(path)], epochs=1, validation=False, logs_at=lambda e: {"loss": 1.0, "mae": 2.0})
    with pytest.warns(RuntimeWarning, match="acc"):
        run(
            [CSVLogger(path, append=True)],
            epochs=2,
            initial_epoch=1,
            validation=False,
            logs_at=lambda e: {"acc": 0.5, "loss": 0.5},
        )
    assert read_csv(path) == [["epoch", "loss", "mae"], ["0", "1.0", "2.0"], ["1", "0.5", "NA"]]


def test_csv_logger_drops_a_row_cut_by_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\n0,1.0\n1,0.")
    run(
        [CSVLogger(path, append=True)],
        epochs=2,
        initial_epoch=1,
        validation=False,
        logs_at=lambda e: {"loss": 0.5},
    )
    assert read_csv(path) == [["epoch", "loss"], ["0", "1.0"], ["1", "0.5"]]


@pytest.mark.parametrize("append", [True, False])
def test_csv_logger_resumed_run_replaces_the_redone_epochs(tmp_path: Path, append: bool) -> None:
    path = tmp_path / "log.csv"
    first = CSVLogger(path, append=append)
    run([first], epochs=4, validation=False, logs_at=lambda e: {"loss": float(e)})  # rows 0..3
    state = first.state_dict()
    assert state == {"last_epoch": 3}
    path.chmod(0o644)
    # the backup was taken after epoch 1; the crash came after epoch 3's row: resume at epoch 2
    resumed = CSVLogger(path, append=append)
    resumed.load_state_dict({"last_epoch": 1})
    run([resumed], epochs=4, initial_epoch=2, validation=False, logs_at=lambda e: {"loss": 10.0 + e})
    assert read_csv(path) == [["epoch", "loss"], ["0", "0.0"], ["1", "1.0"], ["2", "12.0"], ["3", "13.0"]]
    assert path.stat().st_mode & 0o777 == 0o644  # rewritten in place of the old file, same mode


def test_csv_logger_creates_the_file_even_without_epochs(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("old\n")
    run([CSVLogger(path)], epochs=0)
    assert path.read_text() == ""


def test_csv_logger_rejects_a_long_separator(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="single character"):
        CSVLogger(tmp_path / "x.csv", separator="::")


# -- RemoteMonitor --------------------------------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    requests: list[dict[str, Any]]
    status = 200
    location: str | None = None

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        self.server.received.append(  # type: ignore[attr-defined]
            {"path": self.path, "headers": dict(self.headers), "body": body}
        )
        status = self.server.status  # type: ignore[attr-defined]
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def server(no_proxy: None) -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    httpd.received = []  # type: ignore[attr-defined]
    httpd.status = 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _root(httpd: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{httpd.server_port}"


def test_remote_monitor_posts_a_form_at_each_epoch_end(server: ThreadingHTTPServer) -> None:
    monitor = RemoteMonitor(root=_root(server))
    run([monitor], epochs=2)
    assert len(server.received) == 2  # type: ignore[attr-defined]
    first = server.received[0]  # type: ignore[attr-defined]
    assert first["path"] == "/publish/epoch/end/"
    assert first["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    form = urllib.parse.parse_qs(first["body"].decode())
    assert list(form) == ["data"]
    assert json.loads(form["data"][0]) == {"epoch": 0, **epoch_logs(0)}


def test_remote_monitor_sends_json_with_plain_numbers_and_headers(server: ThreadingHTTPServer) -> None:
    monitor = RemoteMonitor(
        root=_root(server), path="/hook", headers={"X-Token": "s3cret"}, send_as_json=True
    )
    logs = {
        "loss": torch.tensor(0.5),
        "acc": np.float64(0.25),
        "steps": np.int64(3),
        "vec": torch.tensor([1.0, 2.0]),
        "nan": float("nan"),
        "inf": torch.tensor(float("inf")),
        "name": "adam",
    }
    run([monitor], epochs=1, logs_at=lambda e: logs, validation=False)
    (got,) = server.received  # type: ignore[attr-defined]
    assert got["path"] == "/hook"
    assert got["headers"]["Content-Type"] == "application/json"
    assert got["headers"]["X-Token"] == "s3cret"
    assert json.loads(got["body"]) == {
        "epoch": 0,
        "loss": 0.5,
        "acc": 0.25,
        "steps": 3,
        "vec": [1.0, 2.0],
        "nan": None,
        "inf": None,
        "name": "adam",
    }


def test_remote_monitor_custom_form_field(server: ThreadingHTTPServer) -> None:
    run([RemoteMonitor(root=_root(server), field="payload")], epochs=1, validation=False)
    form = urllib.parse.parse_qs(server.received[0]["body"].decode())  # type: ignore[attr-defined]
    assert json.loads(form["payload"][0])["loss"] == 1.0


@pytest.mark.parametrize("status", [500, 404, 302])
def test_remote_monitor_warns_on_http_errors_and_redirects(server: ThreadingHTTPServer, status: int) -> None:
    server.status = status  # type: ignore[attr-defined]
    model = tiny_model()
    with pytest.warns(RuntimeWarning, match=rf"{_root(server)}/publish/epoch/end/: HTTP {status}"):
        run([RemoteMonitor(root=_root(server))], epochs=2, model=model)
    assert not model.stop_training
    assert len(server.received) == 2  # type: ignore[attr-defined]  # the redirect was not followed


def test_remote_monitor_unreachable_server_warns_promptly(no_proxy: None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = f"http://127.0.0.1:{port}"  # nothing listens there any more
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match=rf"{root}/publish/epoch/end/: .*(refused|Errno)") as record:
        run([RemoteMonitor(root=root)], epochs=2)
    assert time.monotonic() - start < 4
    assert len(record) == 2


def test_remote_monitor_times_out_on_a_silent_server(no_proxy: None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # accepts connections into the backlog and never answers
        root = f"http://127.0.0.1:{s.getsockname()[1]}"
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match=rf"{root}.*timed out"):
            run([RemoteMonitor(root=root, timeout=0.3)], epochs=1, validation=False)
        assert time.monotonic() - start < 3


@pytest.mark.parametrize(
    ("root", "path", "match"),
    [
        ("ftp://localhost", "/x", "http"),
        ("http://localhost:9000", "@evil.example/x", "changes the host"),
        ("http://169.254.169.254", "/latest", "link-local"),
        ("http://", "/x", "no host"),
    ],
)
def test_remote_monitor_rejects_bad_urls(root: str, path: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RemoteMonitor(root=root, path=path)


def test_remote_monitor_defaults() -> None:
    monitor = RemoteMonitor()
    assert monitor.url == "http://localhost:9000/publish/epoch/end/"
    assert (monitor.field, monitor.headers, monitor.send_as_json) == ("data", {}, False)


# -- LambdaCallback -------------------------------------------------------------------------------------

_ALL_HOOKS = [
    ("on_train_begin", False),
    ("on_train_end", False),
    ("on_epoch_begin", True),
    ("on_epoch_end", True),
    ("on_train_batch_begin", True),
    ("on_train_batch_end", True),
    ("on_test_begin", False),
    ("on_test_end", False),
    ("on_test_batch_begin", True),
    ("on_test_batch_end", True),
    ("on_predict_begin", False),
    ("on_predict_end", False),
    ("on_predict_batch_begin", True),
    ("on_predict_batch_end", True),
]


def test_lambda_callback_calls_every_hook_with_its_arguments() -> None:
    calls: list[tuple[Any, ...]] = []

    def indexed(name: str) -> Callable[[int, dict[str, Any]], None]:
        return lambda i, logs: calls.append((name, i, dict(logs)))

    def plain(name: str) -> Callable[[dict[str, Any]], None]:
        return lambda logs: calls.append((name, dict(logs)))

    hooks = {name: indexed(name) if idx else plain(name) for name, idx in _ALL_HOOKS}
    cbs = CallbackList([LambdaCallback(**hooks)], model=tiny_model(), epochs=1, steps=1, verbose=0)
    for n, (name, idx) in enumerate(_ALL_HOOKS):
        if idx:
            getattr(cbs, name)(n, {"k": n})
        else:
            getattr(cbs, name)({"k": n})
    expected = [(name, n, {"k": n}) if idx else (name, {"k": n}) for n, (name, idx) in enumerate(_ALL_HOOKS)]
    assert calls == expected


def test_lambda_callback_named_arguments_and_legacy_batch_hooks() -> None:
    seen: list[Any] = []
    cb = LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(("epoch", epoch, logs["loss"])),
        on_batch_end=lambda batch, logs: seen.append(("batch", batch)),  # the legacy alias
    )
    run([cb], epochs=1, steps=2, validation=False)
    assert seen == [("batch", 0), ("batch", 1), ("epoch", 0, 1.0)]
    # hooks that were not given stay the base class's no-ops
    LambdaCallback().on_epoch_end(0, {})


def test_lambda_callback_rejects_unknown_names_and_non_callables() -> None:
    with pytest.raises(ValueError, match="on_epoch_finish"):
        LambdaCallback(on_epoch_finish=lambda e, logs: None)
    with pytest.raises(ValueError, match="set_model"):
        LambdaCallback(set_model=lambda m: None)
    with pytest.raises(TypeError, match="callable"):
        LambdaCallback(on_train_end=42)  # type: ignore[arg-type]


# -- TerminateOnNaN -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), torch.tensor(float("-inf")), np.float32("nan")])
def test_terminate_on_nan_stops_training(bad: Any, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model()
    seen: list[int] = []
    cbs = CallbackList(
        [TerminateOnNaN(), LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(b))],
        model=model,
        epochs=3,
        steps=5,
        verbose=0,
    )
    model.stop_training = False  # type: ignore[assignment]
    cbs.on_train_begin()
    for epoch in range(3):
        cbs.on_epoch_begin(epoch)
        for batch in range(5):
            cbs.on_train_batch_end(batch, {"loss": bad if (epoch, batch) == (1, 2) else 0.5})
            if model.stop_training:
                break
        cbs.on_epoch_end(epoch, {"loss": 0.5})
        if model.stop_training:
            break
    cbs.on_train_end()
    assert model.stop_training is True
    assert seen == [0, 1, 2, 3, 4, 0, 1, 2]
    assert "Batch 2: Invalid loss, terminating training" in capsys.readouterr().out


def test_terminate_on_nan_raises_with_raise_error() -> None:
    model = tiny_model()
    ended: list[bool] = []
    with pytest.raises(RuntimeError, match="NaN or Inf loss encountered at batch 1"):
        _nan_at_batch_1(model, ended)
    assert ended == []  # on_train_end did not run
    assert not model.stop_training


def _nan_at_batch_1(model: torch.nn.Module, ended: list[bool]) -> None:
    cbs = CallbackList(
        [TerminateOnNaN(raise_error=True), LambdaCallback(on_train_end=lambda logs: ended.append(True))],
        model=model,
        epochs=1,
        steps=3,
        verbose=0,
    )
    model.stop_training = False  # type: ignore[assignment]
    cbs.on_train_begin()
    cbs.on_epoch_begin(0)
    for batch in range(3):
        cbs.on_train_batch_end(batch, {"loss": torch.tensor(float("nan")) if batch == 1 else 0.3})
    cbs.on_train_end()


def test_terminate_on_nan_ignores_finite_and_missing_losses() -> None:
    model = tiny_model()
    run([TerminateOnNaN(raise_error=True)], model=model, epochs=2)
    cb = TerminateOnNaN()
    cb.set_model(model)
    cb.on_train_batch_end(0, {"accuracy": float("nan")})
    cb.on_train_batch_end(0, None)
    assert not model.stop_training


# -- ProgbarLogger --------------------------------------------------------------------------------------


@pytest.fixture
def plain_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Output that is not a terminal, whatever the environment running the tests says."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS"):
        monkeypatch.delenv(name, raising=False)


def test_progbar_verbose_0_is_silent(plain_stdout: None, capsys: pytest.CaptureFixture[str]) -> None:
    run([ProgbarLogger()], verbose=0, epochs=2)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("verbose", [1, 2, "auto"])
def test_progbar_plain_lines_when_not_a_terminal(
    plain_stdout: None, capsys: pytest.CaptureFixture[str], verbose: int | str
) -> None:
    run([ProgbarLogger()], verbose=verbose, epochs=2, steps=3)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2  # one per epoch; validation inside fit is silent
    assert lines[0].startswith("Epoch 1/2 - 3/3 - 0s - ")
    assert lines[0].endswith(
        "/step - loss: 1.0000 - accuracy: 0.5000 - val_loss: 2.0000 - val_accuracy: 0.2500"
    )
    assert lines[1].startswith("Epoch 2/2 - 3/3 - ") and "loss: 0.5000" in lines[1]
    assert "\x1b" not in "".join(lines)


def test_progbar_unknown_steps_counts(plain_stdout: None, capsys: pytest.CaptureFixture[str]) -> None:
    run([ProgbarLogger()], verbose=2, epochs=1, steps=None, batches=4, validation=False)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("Epoch 1/1 - 4/4 - ")


def test_progbar_stopped_epoch_shows_where_it_stopped(
    plain_stdout: None, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_model()

    def stop(batch: int, logs: dict[str, Any]) -> None:
        if batch == 3:
            model.stop_training = True  # type: ignore[assignment]

    run([LambdaCallback(on_train_batch_end=stop), ProgbarLogger()], verbose=2, epochs=3, steps=10,
        model=model, logs_at=lambda e: {"loss": float("nan")}, validation=False)  # fmt: skip
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("Epoch 1/3 - 4/10 - ") and line.endswith("/step - loss: nan")


def test_progbar_prints_progress_lines_in_long_epochs(
    plain_stdout: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_Bar, "PLAIN_INTERVAL", 0.0)  # as if every batch came 30 s after the last line
    run([ProgbarLogger()], verbose=1, epochs=1, steps=3, validation=False, logs_at=train_logs)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" - ETA")[0] for line in lines[:3]] == [
        "Epoch 1/1 - 1/3",
        "Epoch 1/1 - 2/3",
        "Epoch 1/1 - 3/3",
    ]
    assert lines[0].endswith("loss: 1.5000 - accuracy: 0.0000e+00")
    assert len(lines) == 4 and "/step" in lines[3]
    # verbose 2 prints no progress lines
    run([ProgbarLogger()], verbose=2, epochs=1, steps=3, validation=False, logs_at=train_logs)
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_progbar_evaluate_and_predict_outside_fit(
    plain_stdout: None, capsys: pytest.CaptureFixture[str]
) -> None:
    cbs = CallbackList([ProgbarLogger()], model=tiny_model(), steps=3, verbose=1)
    cbs.on_test_begin()
    for b in range(3):
        cbs.on_test_batch_begin(b)
        cbs.on_test_batch_end(b, {"loss": 0.5})
    cbs.on_test_end({"loss": 0.5, "accuracy": 0.0001})
    cbs.on_predict_begin()
    for b in range(2):
        cbs.on_predict_batch_end(b, {"outputs": torch.zeros(2)})
    cbs.on_predict_end()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Evaluate - 3/3 - ") and lines[0].endswith(
        "loss: 0.5000 - accuracy: 1.0000e-04"
    )
    assert lines[1].startswith("Predict - 2/3 - ")
    assert "outputs" not in lines[1]


def test_progbar_live_bar_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("NO_COLOR", raising=False)
    user = LambdaCallback(on_train_batch_end=lambda b, logs: print(f"user says {b}") if b == 1 else None)
    run([user, ProgbarLogger()], verbose=1, epochs=2, steps=3)
    out = capsys.readouterr().out
    assert "\x1b[" in out  # drawn with terminal control codes
    assert "━" in out
    assert "user says 1" in out  # printed above the bar
    finished = [line for line in out.split("\n") if "/step - " in line]
    assert len(finished) == 2
    assert "Epoch 1/2" in finished[0] and "3/3" in finished[0] and "val_loss: 2.0000" in finished[0]
    assert sys_stdout_restored()


def sys_stdout_restored() -> bool:
    import sys

    return type(sys.stdout).__name__ != "FileProxy"


def test_progbar_formatting() -> None:
    assert format_logs({"loss": 0.12345, "tiny": 1e-5, "t": torch.tensor(2.0), "vec": [1, 2], "s": "x"}) == (
        "loss: 0.1235 - tiny: 1.0000e-05 - t: 2.0000 - s: x"
    )
    assert format_logs({"n": float("nan"), "b": True}) == "n: nan - b: True"
    assert [format_duration(s) for s in (0.4, 59, 61, 3725)] == ["0s", "59s", "1:01", "1:02:05"]


# -- TensorBoard ----------------------------------------------------------------------------------------


def accumulate(folder: Path) -> Any:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(
        str(folder), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0}
    )
    acc.Reload()
    return acc


def scalars(acc: Any, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_crc32c_matches_the_reference() -> None:
    assert _crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert _crc32c(b"") == 0
    pywrap = pytest.importorskip("tensorboard.compat.tensorflow_stub.pywrap_tensorflow")
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 100, 1000):
        data = rng.bytes(n)
        assert _masked_crc32c(data) == pywrap.masked_crc32c(data)


def test_tensorboard_epoch_scalars_histograms_and_layout(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.125)
    tb = TensorBoard(tmp_path / "logs", histogram_freq=2, write_steps_per_second=True)
    # no learning_rate in the logs: taken from the optimizer
    run([tb], model=model, optimizer=optimizer, epochs=3, steps=2)
    assert sorted(os.listdir(tmp_path / "logs")) == ["train", "validation"]
    train = accumulate(tmp_path / "logs" / "train")
    assert set(train.Tags()["scalars"]) == {
        "epoch_loss",
        "epoch_accuracy",
        "epoch_learning_rate",
        "epoch_steps_per_second",
    }
    assert scalars(train, "epoch_loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert scalars(train, "epoch_learning_rate") == [(0, 0.125), (1, 0.125), (2, 0.125)]
    assert all(v > 0 for _, v in scalars(train, "epoch_steps_per_second"))
    # histograms at epochs 0 and 2 (histogram_freq=2), of every parameter
    assert set(train.Tags()["histograms"]) == {"weight/histogram", "bias/histogram"}
    events = train.Histograms("weight/histogram")
    assert [e.step for e in events] == [0, 2]
    histo = events[0].histogram_value
    weight = model.weight.detach().double()
    assert histo.num == 6 and sum(histo.bucket) == 6
    assert histo.min == pytest.approx(weight.min().item()) and histo.max == pytest.approx(weight.max().item())
    assert histo.sum == pytest.approx(weight.sum().item())
    assert histo.sum_squares == pytest.approx((weight**2).sum().item())
    assert list(histo.bucket_limit) == sorted(histo.bucket_limit)
    assert histo.bucket_limit[-1] == pytest.approx(histo.max)

    val = accumulate(tmp_path / "logs" / "validation")
    assert set(val.Tags()["scalars"]) == {
        "epoch_loss",
        "epoch_accuracy",
        "evaluation_loss_vs_iterations",
        "evaluation_accuracy_vs_iterations",
    }
    assert scalars(val, "epoch_loss") == [(0, 2.0), (1, 1.0), (2, pytest.approx(2 / 3))]
    assert scalars(val, "epoch_accuracy") == [(0, 0.25), (1, 0.25), (2, 0.25)]
    # evaluation logs against the number of training batches so far
    assert [s for s, _ in scalars(val, "evaluation_loss_vs_iterations")] == [2, 4, 6]


def test_tensorboard_batch_frequency(tmp_path: Path) -> None:
    tb = TensorBoard(tmp_path, update_freq=2, write_steps_per_second=True)
    run([tb], epochs=3, steps=3, validation=False, logs_at=train_logs)
    train = accumulate(tmp_path / "train")
    # 9 training batches, numbered 1..9 over the run: every second one is written
    assert [s for s, _ in scalars(train, "batch_loss")] == [2, 4, 6, 8]
    assert scalars(train, "batch_loss")[0] == (2, 1.0 + 0.5 / 2)
    assert [s for s, _ in scalars(train, "batch_steps_per_second")] == [2, 4, 6, 8]
    assert [s for s, _ in scalars(train, "epoch_loss")] == [0, 1, 2]
    assert not (tmp_path / "validation").exists()  # nothing to write there: no file

    every = TensorBoard(tmp_path / "b", update_freq="batch")
    run([every], epochs=2, steps=2, validation=False)
    assert [s for s, _ in scalars(accumulate(tmp_path / "b" / "train"), "batch_accuracy")] == [1, 2, 3, 4]


def test_tensorboard_resumed_run_continues_the_batch_steps(tmp_path: Path) -> None:
    first = TensorBoard(tmp_path, update_freq="batch")
    run([first], epochs=1, steps=3, validation=False)
    state = first.state_dict()
    assert state == {"global_batch": 3}
    second = TensorBoard(tmp_path, update_freq="batch")
    second.load_state_dict(state)
    run([second], epochs=2, initial_epoch=1, steps=3, validation=False)
    train = accumulate(tmp_path / "train")
    assert [s for s, _ in scalars(train, "batch_loss")] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in scalars(train, "epoch_loss")] == [0, 1]


def test_tensorboard_event_file_records(tmp_path: Path) -> None:
    event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    tb = TensorBoard(tmp_path)
    logs = {
        "loss": torch.tensor(0.5),
        "n": np.int64(3),
        "flag": True,
        "name": "skipped",
        "vec": torch.ones(2),
        "big_step": 1e30,
    }
    cbs = CallbackList([tb], model=tiny_model(), epochs=1, steps=1, verbose=0)
    cbs.on_train_begin()
    cbs.on_epoch_begin(7)
    cbs.on_epoch_end(7, logs)
    cbs.on_train_end()
    (name,) = os.listdir(tmp_path / "train")
    assert name.startswith("events.out.tfevents.")
    data = (tmp_path / "train" / name).read_bytes()
    events = []
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        events.append(event_pb2.Event.FromString(data[12 : 12 + length]))
        data = data[12 + length + 4 :]
    assert events[0].file_version == "brain.Event:2"
    (event,) = events[1:]
    assert event.step == 7 and abs(event.wall_time - time.time()) < 60
    values = {v.tag: v.simple_value for v in event.summary.value}
    assert values == {
        "epoch_loss": 0.5,
        "epoch_n": 3.0,
        "epoch_flag": 1.0,
        "epoch_big_step": pytest.approx(1e30),
    }


def test_tensorboard_histogram_edge_cases(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.fill_(0.5)  # one value: one bucket
        model[0].bias.fill_(float("nan"))  # nothing finite: no histogram
    run([TensorBoard(tmp_path, histogram_freq=1)], model=model, epochs=1, validation=False)
    train = accumulate(tmp_path / "train")
    tags = set(train.Tags()["histograms"])
    assert tags == {"0.weight/histogram", "1.weight/histogram", "1.bias/histogram",
                    "1.running_mean/histogram", "1.running_var/histogram"}  # fmt: skip
    (event,) = train.Histograms("0.weight/histogram")
    h = event.histogram_value
    assert (h.min, h.max, h.num, list(h.bucket)) == (0.5, 0.5, 4.0, [4.0])


def test_tensorboard_evaluate_outside_fit(tmp_path: Path) -> None:
    tb = TensorBoard(tmp_path)
    cbs = CallbackList([tb], model=tiny_model(), steps=2, verbose=0)
    cbs.on_test_begin()
    cbs.on_test_batch_end(0, {"loss": 1.0})
    cbs.on_test_end({"loss": 0.75})
    val = accumulate(tmp_path / "validation")
    assert scalars(val, "evaluation_loss_vs_iterations") == [(0, 0.75)]


def test_tensorboard_checks_its_arguments(tmp_path: Path) -> None:
    for bad in ("often", 0, -1, 1.5, True):
        with pytest.raises(ValueError, match="update_freq"):
            TensorBoard(tmp_path, update_freq=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="histogram_freq"):
        TensorBoard(tmp_path, histogram_freq=-1)
    for bad_profile in ((5, 2), "a,b", -1, (1, 2, 3)):
        with pytest.raises(ValueError, match="profile_batch"):
            TensorBoard(tmp_path, profile_batch=bad_profile)  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match=r"write_images=True, profile_batch=\(2, 4\), embeddings_freq=1"):
        TensorBoard(tmp_path, write_images=True, profile_batch=(2, 4), embeddings_freq=1)
    with pytest.warns(UserWarning, match="embeddings_metadata"):
        TensorBoard(tmp_path, embeddings_metadata="meta.tsv")
    TensorBoard(tmp_path, write_graph=False, profile_batch="0")  # defaults that do nothing: no warning
    assert not os.listdir(tmp_path)  # nothing written before there is something to write


def test_tensorboard_scalar_values_are_float32(tmp_path: Path) -> None:
    tb = TensorBoard(tmp_path)
    run([tb], epochs=1, validation=False, logs_at=lambda e: {"loss": 0.1, "huge": 3.0e38, "nan": math.nan})
    train = accumulate(tmp_path / "train")
    assert scalars(train, "epoch_loss")[0][1] == pytest.approx(0.1, rel=1e-7)
    assert math.isnan(scalars(train, "epoch_nan")[0][1])
