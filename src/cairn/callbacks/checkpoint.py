"""``ModelCheckpoint`` and ``BackupAndRestore``: Keras's checkpoint callbacks, on cairn's store.

Both write through the store, so every save is atomic and verified, and unchanged tensors are never
written twice; ``BackupAndRestore`` resumes mid-epoch (Keras records the batch but restarts the epoch)
with the optimizer, the RNG, the data position and the other callbacks' state.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

from cairn._manager import CheckpointManager
from cairn._manifest import RESERVED_NAMES
from cairn._store import MARKER, Store
from cairn.callbacks.base import Callback, Logs
from cairn.callbacks.monitor import MonitorCallback
from cairn.policies import KeepLast

__all__ = ["BackupAndRestore", "ModelCheckpoint"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _training_state(cb: Callback, *, weights_only: bool) -> Any:
    """What a checkpoint callback saves: the model alone, or the model, optimizer and RNG."""
    from cairn._resume import RNGState

    if weights_only:
        return cb.model
    state: dict[str, Any] = {"model": cb.model, "rng": RNGState()}
    if cb.optimizer is not None:
        state["optimizer"] = cb.optimizer
    return state


def _numbers(logs: Logs | None) -> dict[str, float]:
    out = {}
    for k, v in (logs or {}).items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError, RuntimeError):
            continue
    return out


class ModelCheckpoint(MonitorCallback):
    """Save the model (or the whole training state) during ``fit``, as Keras's ``ModelCheckpoint``.

    ``filepath`` is a template formatted with ``epoch`` (1-based), ``batch`` (for batch-level saves)
    and every log key, e.g. ``"ckpts/weights-{epoch:02d}-{val_loss:.2f}"``:

    - ending in ``.safetensors``: the model's weights as a safetensors file (``save_weights_only=True``
      required), replaced atomically;
    - otherwise ``STORE/NAME``: a checkpoint ``NAME`` in the cairn store ``STORE`` (created if new):
      characters a checkpoint name cannot hold become ``-``. A name without placeholders
      (``"ckpts/best-model"``) is overwritten atomically at each save, as Keras overwrites its file
      (``best`` and ``latest`` are reserved names). The store deduplicates: ten checkpoints of a model
      whose backbone is frozen hold the backbone once.

    ``save_weights_only=False`` saves the model, the optimizer and the RNG state (restore them with
    ``cairn.restore(store, {"model": m, "optimizer": opt, "rng": cairn.RNGState()}, name)``).
    ``save_freq="epoch"`` or an integer number of batches; an integer with ``save_best_only`` and a
    ``val_`` monitor is refused up front (validation metrics exist only at epoch end). When the monitor
    is missing from the logs, a best-only save is skipped with a warning (never a silent wrong save).
    """

    def __init__(
        self,
        filepath: str | os.PathLike[str],
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
    ) -> None:
        try:
            super().__init__(monitor=monitor, mode=mode)
        except ValueError:
            if save_best_only:
                raise
            super().__init__(monitor=monitor, mode="min")  # the monitor is unused without save_best_only
        self.filepath = os.fspath(filepath)
        self.verbose = verbose
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self.initial_value_threshold = initial_value_threshold
        if save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1
        ):
            raise ValueError(f"save_freq must be 'epoch' or a positive number of batches, not {save_freq!r}")
        self.save_freq = save_freq
        if isinstance(save_freq, int) and save_best_only and monitor.startswith("val_"):
            raise ValueError(
                f"ModelCheckpoint(save_freq={save_freq}, save_best_only=True, monitor={monitor!r}): "
                "validation metrics exist only at the end of an epoch, so a batch-level save could never "
                "see them. Use save_freq='epoch', or monitor a training metric such as 'loss'."
            )
        self.to_safetensors = self.filepath.endswith(".safetensors")
        if self.to_safetensors and not save_weights_only:
            raise ValueError(
                f"{self.filepath}: a .safetensors file holds weights only: pass save_weights_only=True, "
                "or give a cairn store path (STORE/NAME) to save the optimizer and RNG too"
            )
        last = self.filepath.rpartition("/")[2]
        if not self.to_safetensors and last in RESERVED_NAMES:
            raise ValueError(
                f"ModelCheckpoint({self.filepath!r}): {last!r} is a reserved checkpoint name "
                f"(cairn.load(store, '{last}') means something already); use e.g. '{self.filepath}-model'"
            )
        self.best = initial_value_threshold
        self._batches_seen = 0
        self._epoch = 0

    def on_train_begin(self, logs: Logs | None = None) -> None:
        super().on_train_begin(logs)
        if not self._keep_loaded_state():
            self.best = self.initial_value_threshold
            self._batches_seen = 0

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        self._batches_seen += 1
        if isinstance(self.save_freq, int) and self._batches_seen % self.save_freq == 0:
            self._save(self._epoch, batch, logs)

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self._restored = False
        if self.save_freq == "epoch":
            self._save(epoch, None, logs)

    def _path(self, epoch: int, batch: int | None, logs: Logs | None) -> str:
        fields = {**(logs or {}), "epoch": epoch + 1}
        if batch is not None:
            fields["batch"] = batch + 1
        try:
            return self.filepath.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise KeyError(
                f'Failed to format this callback filepath: "{self.filepath}". Reason: {e!r}; the available '
                f"keys are {', '.join(sorted(fields))}"
            ) from None

    def _save(self, epoch: int, batch: int | None, logs: Logs | None) -> None:
        path = self._path(epoch, batch, logs)
        if self.save_best_only:
            current = self._get_monitor_value(logs)
            if current is None:
                warnings.warn(
                    f"Can save best model only with {self.monitor} available, skipping.", stacklevel=3
                )
                return
            if not self._is_improvement(current, self.best):
                if self.verbose:
                    print(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {self.best}")
                return
            if self.verbose:
                change = f"{self.monitor} improved from {self.best} to {current}"
                print(f"\nEpoch {epoch + 1}: {change}, saving the model to {path}")
            self.best = current
        elif self.verbose:
            print(f"\nEpoch {epoch + 1}: saving model to {path}")
        self._write(path, epoch, logs)

    def _write(self, path: str, epoch: int, logs: Logs | None) -> None:
        if self.to_safetensors:
            from cairn._interop import write_safetensors

            directory = os.path.dirname(path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            write_safetensors(path, dict(self.model.state_dict()), {"epoch": str(epoch + 1)})
            return
        store_dir, _, raw_name = path.rpartition("/")
        name = _UNSAFE.sub("-", raw_name).strip("-.") or f"epoch-{epoch + 1}"
        if not name[0].isalnum():
            name = f"ckpt-{name}"
        store = Store(store_dir or ".", create=True)
        state = _training_state(self, weights_only=self.save_weights_only)
        if isinstance(state, dict):
            state["epoch"] = epoch + 1
        store.save(state, step=self._batches_seen, name=name[:128], metrics=_numbers(logs), overwrite=True)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = super().state_dict()
        return {**state, "batches_seen": self._batches_seen}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._batches_seen = int(state_dict.get("batches_seen", 0))


class BackupAndRestore(Callback):
    """Back up the whole training state during ``fit``, so that ``fit`` called again after a crash or
    preemption resumes where the backup was taken, as Keras's ``BackupAndRestore``, but further:

    - mid-epoch: with an integer ``save_freq`` (batches), ``fit`` resumes at the next batch of the
      epoch (Keras records the batch but restarts the epoch). The data continues exactly with a data
      loader that has ``state_dict()`` (``cairn.resumable_loader``); other iterables are fast-forwarded;
    - with the optimizer, the RNG state, and the state of the other callbacks (EarlyStopping's ``wait``
      and ``best``, ReduceLROnPlateau's cooldown, ModelCheckpoint's best, the History) restored too.

    ``backup_dir`` is a cairn store holding the last two backups (the manager falls back to the older
    one if the newest is damaged). ``delete_checkpoint=True`` removes it when training ends normally.
    Runs after every other callback, so the state it saves includes their work for that batch or epoch.
    """

    run_last = True

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int = "epoch",
        delete_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        if save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1
        ):
            raise ValueError(f"save_freq must be 'epoch' or a positive number of batches, not {save_freq!r}")
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.delete_checkpoint = delete_checkpoint
        self._manager: CheckpointManager | None = None
        self._resume: tuple[int, int] | None = None
        self._epoch = 0
        self._global = 0

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = _training_state(self, weights_only=False)
        # callbacks that keep state, keyed by class and rank among their class: stable when stateless
        # callbacks come and go between runs (a progress bar with another verbose, Keras's interrupter)
        seen: dict[str, int] = {}
        callbacks: dict[str, Callback] = {}
        for cb in self.params.get("callbacks", ()):
            if cb is self or type(cb).state_dict is Callback.state_dict:
                continue
            kind = type(cb).__name__
            callbacks[f"{kind}-{seen.get(kind, 0)}"] = cb
            seen[kind] = seen.get(kind, 0) + 1
        state["callbacks"] = callbacks
        if self.params.get("tracker") is not None:  # fit's running means of the current epoch
            state["tracker"] = self.params["tracker"]
        data = self.params.get("train_data")
        if callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None)):
            state["data"] = data
        return state

    def on_train_begin(self, logs: Logs | None = None) -> None:
        self._manager = CheckpointManager(self.backup_dir, keep=KeepLast(2), preemption_signals=())
        state = self._state()
        state["progress"] = {"epoch": 0, "batch": 0, "global": 0}
        step = self._manager.restore(state, strict=False)
        progress = state["progress"]  # replaced by the saved one
        report = self._manager.restored
        if report is not None and (report.missing or report.mismatched):
            raise RuntimeError(
                f"the backup in {self.backup_dir} does not fit this training run:\n{report.summary()}\n"
                "Delete the backup directory to start afresh."
            )
        if step:
            self._resume = (int(progress["epoch"]), int(progress["batch"]))
            self._global = int(progress["global"])
        else:
            self._resume, self._global = None, 0

    def resume_point(self) -> tuple[int, int] | None:
        return self._resume

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        self._global += 1
        if isinstance(self.save_freq, int) and self._global % self.save_freq == 0:
            self._backup(self._epoch, batch + 1)

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if self.save_freq == "epoch":
            self._backup(epoch + 1, 0)

    def _backup(self, epoch: int, batch: int) -> None:
        assert self._manager is not None, "on_train_begin was not called"
        state = self._state()
        state["progress"] = {"epoch": epoch, "batch": batch, "global": self._global}
        self._manager.save(self._global, state, force=True)

    def close(self) -> None:
        """Release the backup store (``fit`` calls this when training fails; the backup stays)."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def on_train_end(self, logs: Logs | None = None) -> None:
        self.close()
        self._resume = None
        if self.delete_checkpoint and os.path.isfile(os.path.join(self.backup_dir, MARKER)):
            shutil.rmtree(self.backup_dir)
