"""cairn: crash-proof checkpoints for ML training.

Pickle-free, content-addressed (every checkpoint after the first is incremental), atomic (a checkpoint
exists completely or not at all) and verified (every byte checksummed)::

    import cairn
    cairn.save("ckpts", {"model": model, "optim": opt, "epoch": 3}, step=300, metrics={"val_loss": 0.21})
    tree = cairn.load("ckpts")                        # the latest checkpoint as plain tensors and values
    cairn.restore("ckpts", {"model": model, "optim": opt})   # load_state_dict into live objects
"""

from __future__ import annotations

from cairn._api import load, restore, save
from cairn._info import CheckpointInfo
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
    RestoreError,
    SerializationError,
    StoreError,
    UnsupportedVersionError,
)

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "BackendError",
    "BlobCorruptError",
    "BlobMissingError",
    "CairnError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "ManifestError",
    "Mismatch",
    "NotAStoreError",
    "OutOfMemoryError",
    "Problem",
    "RestoreError",
    "RestoreReport",
    "SerializationError",
    "Store",
    "StoreError",
    "UnsupportedVersionError",
    "VerifyReport",
    "__version__",
    "load",
    "restore",
    "save",
]
