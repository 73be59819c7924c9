"""Keras 3's ``TensorBoard`` callback for PyTorch, writing TensorBoard event files itself.

An event file is a sequence of TFRecords (length, masked CRC-32C of the length, data, masked CRC-32C
of the data), each holding one serialized ``tensorflow.Event`` protobuf. The few protobuf fields
needed (``Event.wall_time``, ``step``, ``file_version``, ``summary``; ``Summary.Value.tag``,
``simple_value`` and ``histo``; ``HistogramProto``) are encoded here by hand, so cairn needs neither
TensorFlow, nor ``tensorboard``, nor ``protobuf`` to write logs that TensorBoard reads.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from cairn.callbacks.base import Callback, Logs

__all__ = ["TensorBoard"]

# -- CRC-32C (Castagnoli), as TFRecord frames it ------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    """One TFRecord: ``uint64 length, uint32 masked_crc(length), data, uint32 masked_crc(data)``."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc32c(length)) + data + struct.pack("<I", _masked_crc32c(data))


# -- protobuf wire format, for the fields used ------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # int64 as protobuf encodes it (negative numbers take 10 bytes)
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _double(field: int, value: float) -> bytes:
    return _key(field, 1) + struct.pack("<d", value)


def _float(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", value)


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def _packed_doubles(field: int, values: Iterable[float]) -> bytes:
    return _bytes(field, b"".join(struct.pack("<d", float(v)) for v in values))


def _event(
    wall_time: float, step: int, *, summary: bytes | None = None, file_version: str | None = None
) -> bytes:
    """A serialized ``Event``: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
    summary = 5 (``Summary``: repeated ``Value value = 1``)."""
    out = _double(1, wall_time) + _key(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes(3, file_version.encode("utf-8"))
    if summary is not None:
        out += _bytes(5, summary)
    return out


def _scalar_value(tag: str, value: float) -> bytes:
    """A ``Summary.Value``: tag = 1 (string), simple_value = 2 (float)."""
    return _bytes(1, _bytes(1, tag.encode("utf-8")) + _float(2, value))


def _histogram_value(tag: str, values: np.ndarray[Any, Any], bins: int = 30) -> bytes | None:
    """A ``Summary.Value`` with histo = 5 (``HistogramProto``: min = 1, max = 2, num = 3, sum = 4,
    sum_squares = 5, bucket_limit = 6 and bucket = 7, packed doubles). Bucket ``i`` counts the values in
    ``(bucket_limit[i-1], bucket_limit[i]]``. Non-finite values are left out; None if none is left."""
    v = values.astype(np.float64, copy=False).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        counts, limits = np.array([v.size], dtype=np.float64), np.array([hi])
    else:
        hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
        counts, limits = hist.astype(np.float64), edges[1:]
    histo = (
        _double(1, lo)
        + _double(2, hi)
        + _double(3, float(v.size))
        + _double(4, float(v.sum()))
        + _double(5, float(np.dot(v, v)))
        + _packed_doubles(6, limits)
        + _packed_doubles(7, counts)
    )
    return _bytes(1, _bytes(1, tag.encode("utf-8")) + _bytes(5, histo))


# -- the writer -----------------------------------------------------------------------------------------

_FILE_IDS = itertools.count()


class _EventWriter:
    """Appends events to one event file in ``folder``; events wait in memory until :meth:`flush`
    (at every epoch end, or when they are older than ``flush_secs``), and no file stays open."""

    def __init__(self, folder: str, flush_secs: float = 10.0) -> None:
        self.folder = folder
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(folder, f"{name}.{next(_FILE_IDS)}.v2")
        self._pending: list[bytes] = []
        self._started = False
        self._flush_secs = flush_secs
        self._last_flush = time.monotonic()

    def add(self, step: int, values: list[bytes]) -> None:
        if values:
            self._pending.append(_record(_event(time.time(), step, summary=b"".join(values))))
            if time.monotonic() - self._last_flush > self._flush_secs:
                self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        if not self._started:
            os.makedirs(self.folder, exist_ok=True)
            self._pending.insert(0, _record(_event(time.time(), 0, file_version="brain.Event:2")))
        data = b"".join(self._pending)
        with open(self.path, "ab") as f:
            f.write(data)
        self._started = True
        self._pending.clear()


# -- the callback -----------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A log value as a float, or None when it is not one number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if hasattr(value, "numel") and hasattr(value, "detach"):  # torch.Tensor
        return float(value.detach().reshape(()).item()) if value.numel() == 1 else None
    if isinstance(value, np.ndarray | np.generic):
        return float(value.reshape(())) if value.size == 1 and value.dtype.kind in "biuf" else None
    return None


def _profile_range(profile_batch: Any) -> tuple[int, int]:
    message = (
        "profile_batch must be a non-negative integer or a pair of positive integers (the range of batches "
        f"to profile), not {profile_batch!r}"
    )
    if isinstance(profile_batch, str):
        try:
            parts = [int(p) for p in profile_batch.split(",")]
        except ValueError:
            raise ValueError(message) from None
        profile_batch = parts[0] if len(parts) == 1 else parts  # "5" or "10,20", as Keras accepts
    if isinstance(profile_batch, int) and not isinstance(profile_batch, bool):
        start = stop = profile_batch
    elif isinstance(profile_batch, tuple | list) and len(profile_batch) == 2:
        start, stop = profile_batch
    else:
        raise ValueError(message)
    if not isinstance(start, int) or not isinstance(stop, int) or start < 0 or stop < start:
        raise ValueError(message)
    return start, stop


class TensorBoard(Callback):
    """Write TensorBoard logs: ``tensorboard --logdir <log_dir>`` shows them.

    What is written, with Keras's names and layout:

    * at each epoch end, the training logs as ``epoch_<name>`` (``epoch_loss``, ``epoch_accuracy``,
      ``epoch_learning_rate``...) in ``log_dir/train``, and the ``val_`` logs, prefix removed, as
      ``epoch_<name>`` in ``log_dir/validation``, so TensorBoard draws training and validation on one
      chart; the step is the epoch (0-based). ``epoch_learning_rate`` is taken from the optimizer's
      first parameter group when the logs have no ``learning_rate``;
    * with ``update_freq="batch"`` or an integer ``N``, every ``N``-th training batch's running logs as
      ``batch_<name>`` in ``log_dir/train``, the step counting training batches from 1 over the whole
      run;
    * with ``write_steps_per_second=True``, ``epoch_steps_per_second`` (training batches over the time
      from the epoch's start to its last training batch) and, at batch frequency,
      ``batch_steps_per_second``;
    * every ``histogram_freq`` epochs, a histogram of each parameter and floating-point buffer of the
      model, tagged ``<name>/histogram`` (``0.weight/histogram``), in ``log_dir/train``;
    * at the end of each evaluation (validation inside ``fit`` included), its logs as
      ``evaluation_<name>_vs_iterations`` in ``log_dir/validation``, the step being the number of
      training batches so far.

    ``write_graph``, ``write_images``, ``profile_batch``, ``embeddings_freq`` and
    ``embeddings_metadata`` are accepted for compatibility with Keras and do nothing: a value that asks
    for the feature (``write_images=True``, ``profile_batch`` other than 0, ``embeddings_freq`` other
    than 0, ``embeddings_metadata``) gives a ``UserWarning``. (Keras on the torch backend raises for a
    non-zero ``profile_batch``; use ``torch.profiler`` with its TensorBoard trace handler to profile.)
    ``write_graph=True`` is the default and is silently ignored.

    The event files are written by cairn itself: neither TensorFlow nor the ``tensorboard`` package is
    needed to write them. Events are kept in memory and appended to the file at every epoch end (and
    after ten seconds), so no file handle stays open. The batch counter is part of
    :meth:`state_dict`, so a run resumed by ``BackupAndRestore`` goes on with the same steps.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] = "logs",
        histogram_freq: int = 0,
        write_graph: bool = True,
        write_images: bool = False,
        write_steps_per_second: bool = False,
        update_freq: str | int = "epoch",
        profile_batch: int | str | tuple[int, int] | list[int] = 0,
        embeddings_freq: int = 0,
        embeddings_metadata: str | Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(histogram_freq, bool) or not isinstance(histogram_freq, int) or histogram_freq < 0:
            raise ValueError(f"histogram_freq must be an integer >= 0, not {histogram_freq!r}")
        if update_freq == "batch":
            update_freq = 1
        if update_freq != "epoch" and (
            isinstance(update_freq, bool) or not isinstance(update_freq, int) or update_freq < 1
        ):
            raise ValueError(f'update_freq must be "epoch", "batch" or an integer >= 1, not {update_freq!r}')
        self.log_dir = os.fspath(log_dir)
        self.histogram_freq = histogram_freq
        self.write_graph = write_graph
        self.write_images = write_images
        self.write_steps_per_second = write_steps_per_second
        self.update_freq: str | int = update_freq
        self.profile_batch = profile_batch
        self.embeddings_freq = embeddings_freq
        self.embeddings_metadata = embeddings_metadata
        unsupported = []
        if write_images:
            unsupported.append("write_images=True")
        if _profile_range(profile_batch) != (0, 0):
            unsupported.append(f"profile_batch={profile_batch!r}")
        if embeddings_freq:
            unsupported.append(f"embeddings_freq={embeddings_freq!r}")
        if embeddings_metadata is not None:
            unsupported.append("embeddings_metadata")
        if unsupported:
            warnings.warn(
                f"cairn's TensorBoard does not support {', '.join(unsupported)}; "
                + ("it is" if len(unsupported) == 1 else "they are")
                + " ignored (scalars and histograms are written)",
                UserWarning,
                stacklevel=2,
            )
        self._writers: dict[str, _EventWriter] = {}
        self._global_batch = 0
        self._restored = False
        self._epoch_start = 0.0
        self._epoch_batches = 0
        self._last_batch_end = 0.0
        self._batch_start = 0.0

    @property
    def _train_dir(self) -> str:
        return os.path.join(self.log_dir, "train")

    @property
    def _val_dir(self) -> str:
        return os.path.join(self.log_dir, "validation")

    def _writer(self, which: str) -> _EventWriter:
        folder = self._train_dir if which == "train" else self._val_dir
        writer = self._writers.get(which)
        if writer is None or writer.folder != folder:
            if writer is not None:
                writer.flush()
            writer = self._writers[which] = _EventWriter(folder)
        return writer

    def _flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    # -- hooks ---------------------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        if not self._restored:
            self._global_batch = 0
        self._restored = False

    def on_train_end(self, logs: Logs | None = None) -> None:
        self._restored = False
        self._flush()

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        self._epoch_start = time.perf_counter()
        self._last_batch_end = self._epoch_start
        self._epoch_batches = 0

    def on_train_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        self._global_batch += 1
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        now = time.perf_counter()
        self._epoch_batches += 1
        self._last_batch_end = now
        if self.update_freq == "epoch":
            return
        assert isinstance(self.update_freq, int)
        step = self._global_batch
        if step % self.update_freq:
            return
        values = self._scalars("batch_", logs or {})
        if self.write_steps_per_second and now > self._batch_start:
            values.append(_scalar_value("batch_steps_per_second", 1.0 / (now - self._batch_start)))
        self._writer("train").add(step, values)

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        logs = dict(logs or {})
        train = {k: v for k, v in logs.items() if not k.startswith("val_")}
        val = {k[4:]: v for k, v in logs.items() if k.startswith("val_")}
        if "learning_rate" not in train:
            lr = self._learning_rate()
            if lr is not None:
                train["learning_rate"] = lr
        values = self._scalars("epoch_", train)
        if self.write_steps_per_second and self._epoch_batches:
            elapsed = self._last_batch_end - self._epoch_start
            if elapsed > 0:
                values.append(_scalar_value("epoch_steps_per_second", self._epoch_batches / elapsed))
        if self.histogram_freq and epoch % self.histogram_freq == 0:
            values.extend(self._histograms())
        if values:
            self._writer("train").add(epoch, values)
        if val:
            self._writer("validation").add(epoch, self._scalars("epoch_", val))
        self._flush()

    def on_test_end(self, logs: Logs | None = None) -> None:
        logs = logs or {}
        named = {f"evaluation_{k.removeprefix('val_')}_vs_iterations": v for k, v in logs.items()}
        values = self._scalars("", named)
        if values:
            writer = self._writer("validation")
            writer.add(self._global_batch, values)
            writer.flush()

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"global_batch": self._global_batch}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._global_batch = int(state_dict.get("global_batch", 0))
        self._restored = True

    # -- helpers ---------------------------------------------------------------------------------------------
    def _scalars(self, prefix: str, logs: Mapping[str, Any]) -> list[bytes]:
        out = []
        for name, value in logs.items():
            number = _number(value)
            if number is not None:
                out.append(_scalar_value(f"{prefix}{name}", number))
        return out

    def _learning_rate(self) -> float | None:
        optimizer = self.optimizer if self.optimizer is not None else getattr(self.model, "optimizer", None)
        groups = getattr(optimizer, "param_groups", None)
        if not groups or "lr" not in groups[0]:
            return None
        return _number(groups[0]["lr"])

    def _histograms(self) -> list[bytes]:
        model = self.model
        if model is None or not hasattr(model, "named_parameters"):
            return []
        tensors = list(model.named_parameters())
        tensors += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        out = []
        for name, tensor in tensors:
            if tensor.numel() == 0 or tensor.is_complex() or tensor.is_meta:
                continue
            data = tensor.detach().float().cpu().numpy()
            value = _histogram_value(f"{name}/histogram", data)
            if value is not None:
                out.append(value)
        return out
