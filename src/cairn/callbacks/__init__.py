"""Keras-style callbacks for PyTorch training with :func:`cairn.fit` or a hand-written loop.

The names, parameters, defaults and decisions follow Keras 3 (deviations are documented on each
class and in ``docs/callbacks.md``); checkpoints go to cairn stores, so they are atomic, verified and
incremental.
"""

from __future__ import annotations

from cairn.callbacks.base import Callback, CallbackList, History
from cairn.callbacks.checkpoint import BackupAndRestore, ModelCheckpoint
from cairn.callbacks.early_stopping import EarlyStopping
from cairn.callbacks.loggers import CSVLogger, LambdaCallback, RemoteMonitor, TerminateOnNaN
from cairn.callbacks.lr import LearningRateScheduler, ReduceLROnPlateau
from cairn.callbacks.monitor import MonitorCallback
from cairn.callbacks.progbar import ProgbarLogger
from cairn.callbacks.tensorboard import TensorBoard

__all__ = [
    "BackupAndRestore",
    "CSVLogger",
    "Callback",
    "CallbackList",
    "EarlyStopping",
    "History",
    "LambdaCallback",
    "LearningRateScheduler",
    "ModelCheckpoint",
    "MonitorCallback",
    "ProgbarLogger",
    "ReduceLROnPlateau",
    "RemoteMonitor",
    "TensorBoard",
    "TerminateOnNaN",
]
