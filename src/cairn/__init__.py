"""cairn: crash-proof checkpoints for ML training.

Pickle-free, content-addressed (every checkpoint after the first is incremental), atomic (a checkpoint
exists completely or not at all) and verified (every byte checksummed)::

    import cairn
    cairn.save("ckpts", {"model": model, "optim": opt, "epoch": 3}, step=300, metrics={"val_loss": 0.21})
    tree = cairn.load("ckpts")                        # the latest checkpoint as plain tensors and values
    cairn.restore("ckpts", {"model": model, "optim": opt})   # load_state_dict into live objects
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cairn._api import load, restore, save
from cairn._gc import GCReport
from cairn._info import CheckpointInfo
from cairn._manager import CheckpointManager
from cairn._manifest import FORMAT_VERSION
from cairn._restore import Mismatch, RestoreReport
from cairn._store import Store
from cairn._verify import Problem, VerifyReport
from cairn.errors import (
    BackendError,
    BlobCorruptError,
    BlobMissingError,
    CairnError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ManifestError,
    NotAStoreError,
    OutOfMemoryError,
    PinnedError,
    RestoreError,
    SerializationError,
    StaleStepError,
    StoreError,
    StoreLockedError,
    UnsupportedVersionError,
)
from cairn.policies import (
    AtSteps,
    Every,
    KeepAll,
    KeepAny,
    KeepBest,
    KeepEvery,
    KeepLast,
    KeepWithin,
    SaveContext,
)

if TYPE_CHECKING:
    from cairn._fit import evaluate, fit, predict
    from cairn._resume import ResumableDataLoader, ResumableSampler, RNGState, resumable_loader

__version__ = "0.1.0"

_RESUME = {"RNGState", "ResumableDataLoader", "ResumableSampler", "resumable_loader"}
_FIT = {"fit", "evaluate", "predict"}


def __getattr__(name: str) -> Any:
    """Names that import torch load on first use, so ``import cairn`` (and ``cairn ls``) never needs it."""
    if name in _RESUME:
        from cairn import _resume

        return getattr(_resume, name)
    if name in _FIT:
        from cairn import _fit

        return getattr(_fit, name)
    raise AttributeError(f"module 'cairn' has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "AtSteps",
    "BackendError",
    "BlobCorruptError",
    "BlobMissingError",
    "CairnError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "Every",
    "GCReport",
    "KeepAll",
    "KeepAny",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepWithin",
    "ManifestError",
    "Mismatch",
    "NotAStoreError",
    "OutOfMemoryError",
    "PinnedError",
    "Problem",
    "RNGState",
    "RestoreError",
    "RestoreReport",
    "ResumableDataLoader",
    "ResumableSampler",
    "SaveContext",
    "SerializationError",
    "StaleStepError",
    "Store",
    "StoreError",
    "StoreLockedError",
    "UnsupportedVersionError",
    "VerifyReport",
    "__version__",
    "evaluate",
    "fit",
    "load",
    "predict",
    "restore",
    "resumable_loader",
    "save",
]
