"""``ProgbarLogger``: Keras's progress bar, drawn with ``rich``.

``fit`` (and ``evaluate``/``predict`` with ``verbose``) add one; it reads ``params["verbose"]``:

* ``0``: silent;
* ``1``: on a terminal (or in Jupyter), a live bar per epoch, redrawn at most ten times a second, with
  the step count, the ETA and the running logs; when the output is not a terminal (a log file, a pipe,
  CI), one plain line per epoch, plus a progress line every 30 seconds of a long epoch;
* ``2``: one plain line per epoch.

A finished epoch reads ``Epoch 3/10 ━━━━━━━━━━ 32/32 2s 61ms/step - loss: 0.4215 - val_loss: 0.4710`` on
a terminal and ``Epoch 3/10 - 32/32 - 2s - 61ms/step - loss: 0.4215 - val_loss: 0.4710`` elsewhere.
Whether the output is a terminal is rich's decision: ``TTY_INTERACTIVE=0`` forces plain lines and
``TTY_INTERACTIVE=1`` the live bar (``FORCE_COLOR`` also makes rich treat the output as a terminal).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.errors import LiveError
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Column
from rich.text import Text

from cairn.callbacks.base import Callback, Logs

__all__ = ["ProgbarLogger"]


def _format_value(value: Any) -> str | None:
    if hasattr(value, "tolist") and hasattr(value, "ndim"):  # tensor or NumPy value
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        value = value.tolist()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        value = float(value)
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if abs(value) > 1e-3 else f"{value:.4e}"
    if isinstance(value, str):
        return value
    return None  # lists, outputs...: not shown


def format_logs(logs: Mapping[str, Any] | None) -> str:
    """``loss: 0.1234 - accuracy: 0.9500``: the logs that are numbers, in Keras's format."""
    parts = []
    for key, value in (logs or {}).items():
        text = _format_value(value)
        if text is not None:
            parts.append(f"{key}: {text}")
    return " - ".join(parts)


def format_duration(seconds: float) -> str:
    """``45s``, ``3:05``, ``1:02:03``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}:{secs:02d}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _per_step(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.0f}s/step" if seconds >= 10 else f"{seconds:.1f}s/step"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.0f}ms/step"
    return f"{seconds * 1e6:.0f}us/step"


class _Bar:
    """One epoch's (or one evaluation's) progress: a live rich bar, or plain lines."""

    PLAIN_INTERVAL = 30.0
    """Seconds between progress lines when verbose is 1 and the output is not a terminal."""
    REFRESH_INTERVAL = 0.1
    """Seconds between redraws of the live bar."""
    BAR_WIDTH = 30

    def __init__(self, title: str, total: int | None, verbose: int) -> None:
        self.title = title
        self.total = total
        self.verbose = verbose
        self.seen = 0
        self.first: int | None = None  # steps already done when this bar started (a resumed epoch)
        self.start = time.monotonic()
        self.last_draw = self.start
        self.console = Console()  # writes to sys.stdout as it is at each write
        # is_interactive: a terminal that is not dumb (TTY_INTERACTIVE=0 turns it off, =1 on)
        self.live = verbose == 1 and (self.console.is_interactive or self.console.is_jupyter)
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(bar_width=self.BAR_WIDTH),
                TextColumn("{task.fields[count]}", markup=False),
                TextColumn("{task.fields[timing]}", markup=False),
                # the metrics wrap under themselves rather than squeezing the bar out of a narrow terminal
                TextColumn("{task.fields[metrics]}", markup=False, table_column=Column(no_wrap=False)),
                console=self.console,
                auto_refresh=False,
                transient=True,  # replaced by one finished line (see finish), which the terminal wraps
                redirect_stdout=True,
                redirect_stderr=True,
            )
            try:
                self.progress.start()
            except LiveError:  # another live display is active: plain lines then
                self.live, self.progress = False, None
            else:
                self.task = self.progress.add_task(
                    title, total=total, count=self._count(), timing="", metrics=""
                )
                self.progress.refresh()

    def _count(self) -> str:
        return f"{self.seen}/{self.total}" if self.total is not None else f"{self.seen}"

    def _elapsed_parts(self) -> list[str]:
        elapsed = time.monotonic() - self.start
        done = self.seen - (self.first or 0)
        parts = [format_duration(elapsed)]
        if done > 0:
            parts.append(_per_step(elapsed / done))
        return parts

    def _eta(self) -> str:
        done = self.seen - (self.first or 0)
        elapsed = time.monotonic() - self.start
        if self.total is None or done <= 0 or elapsed <= 0:
            return format_duration(elapsed)
        return "ETA " + format_duration((self.total - self.seen) * elapsed / done)

    def update(self, seen: int, logs: Logs | None) -> None:
        if self.first is None:
            self.first = seen - 1
        self.seen = seen
        if self.total is not None and seen > self.total:
            self.total = seen
        now = time.monotonic()
        if self.live:
            assert self.progress is not None and self.task is not None
            self.progress.update(
                self.task,
                completed=seen,
                total=self.total,
                count=self._count(),
                timing=self._eta(),
                metrics=format_logs(logs),
            )
            if now - self.last_draw >= self.REFRESH_INTERVAL:
                self.last_draw = now
                self.progress.refresh()
        elif self.verbose == 1 and now - self.last_draw >= self.PLAIN_INTERVAL:
            self.last_draw = now
            self._print(self._line([self._eta()], logs))

    def finish(self, logs: Logs | None) -> None:
        if self.total is None:
            self.total = self.seen
        if self.live:
            assert self.progress is not None
            self.progress.stop()
            filled = round(self.BAR_WIDTH * self.seen / self.total) if self.total else self.BAR_WIDTH
            line = Text.assemble(
                f"{self.title} " if self.title else "",
                ("━" * filled, "bar.finished" if filled == self.BAR_WIDTH else "bar.complete"),
                ("━" * (self.BAR_WIDTH - filled), "bar.back"),
                f" {self._count()} {' '.join(self._elapsed_parts())}",
            )
            metrics = format_logs(logs)
            if metrics:
                line.append(f" - {metrics}")
            self.console.print(line, soft_wrap=True)
        else:
            self._print(self._line(self._elapsed_parts(), logs))

    def _line(self, timing: list[str], logs: Logs | None) -> str:
        parts = [self.title] if self.title else []
        if self.seen:
            parts.append(self._count())
        parts += timing
        metrics = format_logs(logs)
        if metrics:
            parts.append(metrics)
        return " - ".join(parts)

    def _print(self, line: str) -> None:
        out = sys.stdout
        out.write(line + "\n")
        out.flush()


class ProgbarLogger(Callback):
    """Print training progress and metrics, as Keras's ``ProgbarLogger`` does (see the module doc).

    It reads ``params["verbose"]`` (0, 1, 2; ``"auto"`` means 1), ``params["epochs"]`` and
    ``params["steps"]`` (batches per epoch; None when unknown: the bar then counts without a total).
    Inside ``fit``, validation is silent and its logs appear on the epoch's line; ``evaluate`` and
    ``predict`` show their own bar. Output goes to ``sys.stdout``.

    Unlike Keras, the epoch number is shown on the bar's line (``Epoch 1/10``) rather than on a line
    above it, also when ``epochs`` is 1, and verbose 2 prints one line per epoch, not two.
    """

    def __init__(self) -> None:
        super().__init__()
        self.verbose = 1
        self.epochs = 1
        self.target: int | None = None
        self._in_fit = False
        self._bar: _Bar | None = None

    def set_params(self, params: Mapping[str, Any]) -> None:
        super().set_params(params)
        verbose = params.get("verbose", 1)
        self.verbose = 1 if verbose == "auto" else int(verbose)
        self.epochs = int(params.get("epochs") or 1)
        steps = params.get("steps")
        self.target = int(steps) if steps is not None else None

    # -- fit -----------------------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        self._in_fit = True  # validation inside fit is silent

    def on_train_end(self, logs: Logs | None = None) -> None:
        self._in_fit = False
        self._close(None)

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        self._open(f"Epoch {epoch + 1}/{self.epochs}")

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        self._update(batch, logs)

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if self.verbose and self._bar is None:
            self._open(f"Epoch {epoch + 1}/{self.epochs}")
        self._close(logs)

    # -- evaluate ------------------------------------------------------------------------------------------
    def on_test_begin(self, logs: Logs | None = None) -> None:
        if not self._in_fit:
            self._open("Evaluate")

    def on_test_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if not self._in_fit:
            self._update(batch, logs)

    def on_test_end(self, logs: Logs | None = None) -> None:
        if not self._in_fit:
            self._close(logs)

    # -- predict -------------------------------------------------------------------------------------------
    def on_predict_begin(self, logs: Logs | None = None) -> None:
        self._open("Predict")

    def on_predict_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        self._update(batch, None)  # the outputs are not shown

    def on_predict_end(self, logs: Logs | None = None) -> None:
        self._close(None)

    # -- the bar -------------------------------------------------------------------------------------------
    def _open(self, title: str) -> None:
        self._close(None)
        if self.verbose:
            self._bar = _Bar(title, self.target, self.verbose)

    def _update(self, batch: int, logs: Logs | None) -> None:
        if not self.verbose:
            return
        if self._bar is None:
            self._bar = _Bar("", self.target, self.verbose)
        self._bar.update(batch + 1, logs)

    def _close(self, logs: Logs | None) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.finish(logs)
