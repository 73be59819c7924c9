"""Keras 3's small callbacks for PyTorch: ``CSVLogger``, ``RemoteMonitor``, ``LambdaCallback`` and
``TerminateOnNaN``.

Their parameters and defaults are Keras's. Where cairn differs, the class docstring says so: CSVLogger
keeps its columns aligned when it appends and drops the rows a resumed run redoes, RemoteMonitor needs
no ``requests`` and never stops training over a network error, LambdaCallback rejects unknown hook
names.
"""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import json
import math
import os
import socket
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from cairn.callbacks.base import Callback, Logs

__all__ = ["CSVLogger", "LambdaCallback", "RemoteMonitor", "TerminateOnNaN"]


def _plain(value: Any) -> Any:
    """A log value as plain Python: a tensor or NumPy value becomes a number, or a list when it has
    dimensions (``tolist()`` of a 0-d tensor or array is its number)."""
    if hasattr(value, "tolist") and hasattr(value, "ndim"):
        if hasattr(value, "detach"):  # torch.Tensor: off the graph and the device first
            value = value.detach().cpu()
        return value.tolist()
    return value


# -- CSVLogger ----------------------------------------------------------------------------------------


class CSVLogger(Callback):
    """Append one row per epoch to a CSV file: ``epoch`` (0-based, as Keras writes it), then the logs.

    The columns are the first epoch's log keys, sorted, after ``epoch``; a key missing from a later
    epoch is written ``NA``, and a key that appears later is not written (a ``RuntimeWarning`` says so,
    once per key; Keras drops it silently). Each row is written and the file closed before the hook
    returns, so a crash loses no finished epoch.

    Args:
        filename: the CSV file, e.g. ``"run/log.csv"`` (its folder must exist).
        separator: the one-character field separator.
        append: ``True`` appends to an existing file (to continue a run); its header is written only if
            the file is new or empty. ``False`` overwrites the file when the first row is written.

    Two differences from Keras, both for continued runs. When it appends to a file that has a header,
    cairn writes the columns of that header, so old and new rows line up (Keras writes the new run's
    columns under the old header). And when ``BackupAndRestore`` resumes a run (it calls
    :meth:`load_state_dict`), the rows of the epoch being redone and of later epochs, written before
    the crash, are removed first, so every epoch appears once; the file is kept in that case even with
    ``append=False``. A partial last line left by a crash is removed before appending.
    """

    def __init__(self, filename: str | os.PathLike[str], separator: str = ",", append: bool = False) -> None:
        super().__init__()
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"separator must be a single character, not {separator!r}")
        self.filename = os.fspath(filename)
        self.sep = separator
        self.append = append
        self.keys: list[str] | None = None
        """The columns after ``epoch``: fixed by the first row written in a run."""
        self._opened = False  # has this run written (or decided not to keep) the file yet?
        self._header = True
        self._resumed = False
        self._last_epoch: int | None = None
        self._dropped: set[str] = set()

    def on_train_begin(self, logs: Logs | None = None) -> None:
        self.keys = None
        self._opened = False
        self._dropped = set()

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        logs = logs or {}
        if not self._opened:
            self._prepare(epoch, logs)
        assert self.keys is not None
        new = [k for k in logs if k not in self.keys and k != "epoch" and k not in self._dropped]
        if new:
            self._dropped.update(new)
            warnings.warn(
                f"CSVLogger({self.filename!r}): {sorted(new)} were not in the logs when the columns were "
                f"fixed ({self.keys}); these values are not written",
                RuntimeWarning,
                stacklevel=2,
            )
        row = [str(epoch)] + [self._cell(logs[k]) if k in logs else "NA" for k in self.keys]
        with open(self.filename, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter=self.sep, lineterminator="\n")
            if self._header:
                writer.writerow(["epoch", *self.keys])
                self._header = False
            writer.writerow(row)
        self._last_epoch = epoch

    def on_train_end(self, logs: Logs | None = None) -> None:
        if not self._opened and not self._resumed and not self.append:
            # Keras creates (or empties) the file at the start of training even when no epoch ends.
            with open(self.filename, "w", encoding="utf-8"):
                pass
        self._opened = False
        self._resumed = False

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self._last_epoch}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Called by ``BackupAndRestore`` on resume: the next row written replaces the rows from its
        epoch on that the interrupted run had written."""
        last = state_dict.get("last_epoch")
        self._last_epoch = int(last) if last is not None else None
        self._resumed = True
        self._opened = False

    def _cell(self, value: Any) -> str:
        value = _plain(value)
        if isinstance(value, str):
            return value
        if isinstance(value, list | tuple):
            return "[" + ", ".join(map(str, value)) + "]"
        return str(value)

    def _prepare(self, epoch: int, logs: Logs) -> None:
        """Before the first row of a run: choose the columns and whether to write a header; truncate or
        repair the existing file."""
        self._opened = True
        keep = self.append or self._resumed
        header: list[str] = []
        if keep and os.path.exists(self.filename) and os.path.getsize(self.filename) > 0:
            rows, cut = self._read_rows()
            header = rows[0] if rows else []
            kept = rows[:1] + [r for r in rows[1:] if not (self._resumed and _epoch_at_least(r, epoch))]
            if cut or len(kept) != len(rows):
                self._rewrite(kept)
        elif not keep:
            with open(self.filename, "w", encoding="utf-8"):
                pass
        self._resumed = False
        if header and header[0] == "epoch":
            self.keys = header[1:]
            self._header = False
        else:
            self.keys = sorted(k for k in logs if k != "epoch")
            self._header = not header
        self._dropped = set()

    def _read_rows(self) -> tuple[list[list[str]], bool]:
        """The file's rows, and whether its last line was cut (by a crash) and left out."""
        with open(self.filename, newline="", encoding="utf-8") as f:
            text = f.read()
        cut = not text.endswith("\n")
        if cut:
            text = text[: text.rfind("\n") + 1]
        return [row for row in csv.reader(text.splitlines(), delimiter=self.sep) if row], cut

    def _rewrite(self, rows: list[list[str]]) -> None:
        folder = os.path.dirname(os.path.abspath(self.filename))
        fd, tmp = tempfile.mkstemp(prefix=".csvlogger-", dir=folder)
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
                csv.writer(f, delimiter=self.sep, lineterminator="\n").writerows(rows)
            os.chmod(tmp, stat.S_IMODE(os.stat(self.filename).st_mode))  # mkstemp made it 0600
            os.replace(tmp, self.filename)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _epoch_at_least(row: list[str], epoch: int) -> bool:
    try:
        return int(row[0]) >= epoch
    except (ValueError, IndexError):
        return False


# -- RemoteMonitor ------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: a POST is not re-sent elsewhere (and cannot be bounced to another host)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _json_value(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or Infinity
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class RemoteMonitor(Callback):
    """POST each epoch's logs to an HTTP server: to ``root + path``, at every epoch end.

    The body is a form with one field, ``field=<the logs as JSON>``, or, with ``send_as_json=True``, the
    JSON itself (``Content-Type: application/json``). The JSON object holds ``epoch`` (0-based) and
    every log value as a plain number (a list for a tensor with dimensions; NaN and infinities become
    ``null``, which JSON can carry).

    Args:
        root: the server's root URL; ``http`` or ``https``.
        path: the path under ``root`` to post to.
        field: the form field that carries the JSON (unused with ``send_as_json``).
        headers: extra HTTP headers, a dict.
        send_as_json: send the JSON as the request body instead of a form.
        timeout: seconds to wait for the server (cairn's addition; Keras waits 10 s).

    Uses the standard library (Keras needs ``requests``). A server that cannot be reached, answers an
    HTTP error or a redirect, or does not answer within ``timeout`` gives a ``RuntimeWarning`` naming
    the URL and the error, and training goes on. As in Keras, a URL whose ``path`` would change the host
    is refused, and posting to a link-local address (cloud metadata services) is refused; cairn warns at
    the epoch instead of raising, and follows no redirect.
    """

    def __init__(
        self,
        root: str = "http://localhost:9000",
        path: str = "/publish/epoch/end/",
        field: str = "data",
        headers: Mapping[str, str] | None = None,
        send_as_json: bool = False,
        timeout: float = 5.0,
    ) -> None:
        super().__init__()
        parsed = urllib.parse.urlsplit(root)
        if parsed.scheme not in ("http", "https"):
            raise ValueError(f"RemoteMonitor root must be an http:// or https:// URL, not {root!r}")
        if not parsed.hostname:
            raise ValueError(f"RemoteMonitor root {root!r} has no host")
        if urllib.parse.urlsplit(root + path).hostname != parsed.hostname:
            raise ValueError(
                f"RemoteMonitor path {path!r} changes the host of {root!r}: it must not contain '@', "
                "a scheme or other characters that alter the URL's authority"
            )
        if _link_local(parsed.hostname):
            raise ValueError(f"RemoteMonitor refuses the link-local address {parsed.hostname!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, not {timeout!r}")
        self.root = root
        self.path = path
        self.field = field
        self.headers = dict(headers or {})
        self.send_as_json = send_as_json
        self.timeout = timeout

    @property
    def url(self) -> str:
        """Where the logs are posted."""
        return self.root + self.path

    def payload(self, epoch: int, logs: Logs | None) -> dict[str, Any]:
        """The JSON object sent for an epoch."""
        send: dict[str, Any] = {"epoch": epoch}
        for k, v in (logs or {}).items():
            send[str(k)] = _json_value(v)
        return send

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        text = json.dumps(self.payload(epoch, logs), allow_nan=False)
        if self.send_as_json:
            body = text.encode("utf-8")
            content_type = "application/json"
        else:
            body = urllib.parse.urlencode({self.field: text}).encode("ascii")
            content_type = "application/x-www-form-urlencoded"
        headers = {"Content-Type": content_type, **self.headers}
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            host = urllib.parse.urlsplit(self.url).hostname or ""
            if _resolves_link_local(host):
                raise OSError(f"{host!r} resolves to a link-local address, which RemoteMonitor refuses")
            opener = urllib.request.build_opener(_NoRedirect)
            with opener.open(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as e:
            e.close()
            self._warn(epoch, f"HTTP {e.code} {e.reason}")
        except (OSError, ValueError) as e:  # URLError, refused, timeouts, bad status lines, DNS...
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            detail = (
                f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
            )
            self._warn(epoch, detail)
        except Exception as e:  # http.client.HTTPException and the like: never stop training
            self._warn(epoch, f"{type(e).__name__}: {e}")

    def _warn(self, epoch: int, error: str) -> None:
        warnings.warn(
            f"RemoteMonitor could not send the logs of epoch {epoch} to {self.url}: {error}",
            RuntimeWarning,
            stacklevel=3,
        )


def _link_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_link_local
    except ValueError:
        return False


def _resolves_link_local(host: str) -> bool:
    if _link_local(host):
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False  # not resolvable: the request itself fails and says so
    return any(_link_local(str(info[4][0]).split("%")[0]) for info in infos)


# -- LambdaCallback -----------------------------------------------------------------------------------

_LAMBDA_HOOKS = frozenset(name for name in dir(Callback) if name.startswith("on_"))


class LambdaCallback(Callback):
    """A callback made of functions, one per hook, called with the hook's arguments::

        LambdaCallback(on_epoch_end=lambda epoch, logs: print(epoch, logs["loss"]),
                       on_train_end=lambda logs: log_file.close())

    ``on_epoch_begin``/``on_epoch_end`` take ``(epoch, logs)``, the ``*_batch_*`` hooks ``(batch, logs)``
    and ``on_train_begin``/``on_train_end`` and the other begin/end hooks ``(logs)``. Any other hook of
    :class:`~cairn.callbacks.Callback` (``on_test_end``, ``on_predict_batch_end``...) is given by
    keyword. An unknown name raises ``ValueError`` (Keras stores it silently) and a value that is not
    callable ``TypeError``.
    """

    def __init__(
        self,
        on_epoch_begin: Callable[[int, Logs], Any] | None = None,
        on_epoch_end: Callable[[int, Logs], Any] | None = None,
        on_train_begin: Callable[[Logs], Any] | None = None,
        on_train_end: Callable[[Logs], Any] | None = None,
        on_train_batch_begin: Callable[[int, Logs], Any] | None = None,
        on_train_batch_end: Callable[[int, Logs], Any] | None = None,
        **kwargs: Callable[..., Any] | None,
    ) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - _LAMBDA_HOOKS)
        if unknown:
            raise ValueError(
                f"LambdaCallback got unknown hook name(s) {unknown}; the hooks are {sorted(_LAMBDA_HOOKS)}"
            )
        hooks: dict[str, Callable[..., Any] | None] = {
            "on_epoch_begin": on_epoch_begin,
            "on_epoch_end": on_epoch_end,
            "on_train_begin": on_train_begin,
            "on_train_end": on_train_end,
            "on_train_batch_begin": on_train_batch_begin,
            "on_train_batch_end": on_train_batch_end,
            **kwargs,
        }
        for name, fn in hooks.items():
            if fn is None:
                continue
            if not callable(fn):
                raise TypeError(f"LambdaCallback {name} must be callable, not {type(fn).__name__}")
            setattr(self, name, fn)


# -- TerminateOnNaN -----------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    if hasattr(value, "isfinite") and hasattr(value, "detach"):  # a tensor: one check, one sync
        return bool(value.detach().isfinite().all())
    value = _plain(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True  # not a number: nothing to judge


class TerminateOnNaN(Callback):
    """Stop training when a training batch's ``loss`` is NaN or infinite.

    By default it prints ``Batch N: Invalid loss, terminating training`` and sets
    ``model.stop_training = True``: the batch loop ends and ``on_train_end`` still runs for every
    callback. With ``raise_error=True`` it raises ``RuntimeError`` at once instead, so no other
    callback's ``on_train_end`` runs (a backup is not deleted, a best checkpoint is not overwritten).
    """

    def __init__(self, raise_error: bool = False) -> None:
        super().__init__()
        self.raise_error = raise_error

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is None or _finite(loss):
            return
        if self.raise_error:
            raise RuntimeError(
                f"NaN or Inf loss encountered at batch {batch}. Loss value: {_plain(loss)}. "
                "Terminating training immediately."
            )
        print(f"Batch {batch}: Invalid loss, terminating training", flush=True)
        model = self.model
        if model is None:
            raise RuntimeError("TerminateOnNaN has no model to stop: call set_model(model) first")
        model.stop_training = True
