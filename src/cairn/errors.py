"""The errors cairn raises: one tree, rooted at :class:`CairnError`.

Every error carries a message that names what is wrong (the store, the checkpoint, the key, the blob)
and, where there is one, the fix. Nothing cairn raises for bad input is a bare ``KeyError`` or
``struct.error`` from deep inside.

::

    CairnError
    ├── StoreError                      a problem with the store as a whole
    │   ├── NotAStoreError              the path is not a cairn store (or holds another format)
    │   ├── UnsupportedVersionError     the store or checkpoint was written by a newer cairn
    │   └── StoreLockedError            another process holds the store's lock (a second manager)
    ├── CheckpointNotFoundError         no checkpoint of that name (also a FileNotFoundError)
    ├── CheckpointExistsError           that name is already committed (also a FileExistsError)
    ├── PinnedError                     the checkpoint is pinned: unpin it before deleting it
    ├── StaleStepError                  a save's step is behind the store's latest (forgot restore?)
    ├── CorruptCheckpointError          stored data fails a check; nothing from it is returned
    │   ├── ManifestError               the manifest is damaged, hostile or breaks a reader limit
    │   ├── BlobMissingError            a blob the manifest references is absent
    │   └── BlobCorruptError            a blob has the wrong size or the wrong hash
    ├── SerializationError              a value in the state cannot be saved without pickle (also a TypeError)
    ├── RestoreError                    a checkpoint does not fit the live objects (strict restore)
    ├── OutOfMemoryError                a tensor is larger than the memory left (also a MemoryError)
    └── BackendError                    the storage backend failed (I/O error, disk full, bad path)
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BlobCorruptError",
    "BlobMissingError",
    "CairnError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "ManifestError",
    "NotAStoreError",
    "OutOfMemoryError",
    "PinnedError",
    "RestoreError",
    "SerializationError",
    "StaleStepError",
    "StoreError",
    "StoreLockedError",
    "UnsupportedVersionError",
]


class CairnError(Exception):
    """The root of every error cairn raises on purpose."""


class StoreError(CairnError):
    """A problem with the store as a whole rather than with one checkpoint."""


class NotAStoreError(StoreError):
    """The path is not a cairn store: missing, a plain file, another format, or a damaged marker."""


class UnsupportedVersionError(StoreError):
    """The store or a checkpoint was written by a newer format version than this cairn reads."""


class StoreLockedError(StoreError):
    """Another process holds the store's lock: two managers may not write one directory at once."""


class PinnedError(CairnError):
    """The checkpoint is pinned and is never deleted; unpin it first."""


class StaleStepError(CairnError, ValueError):
    """A save's step is behind the latest checkpoint's: a restarted run that did not restore first?"""


class CheckpointNotFoundError(CairnError, FileNotFoundError):
    """No committed checkpoint has the requested name (or the store holds none)."""


class CheckpointExistsError(CairnError, FileExistsError):
    """A checkpoint with this name is already committed; checkpoints are never overwritten."""


class CorruptCheckpointError(CairnError):
    """Stored data failed a check. Nothing from the damaged part is ever returned."""


class ManifestError(CorruptCheckpointError):
    """A manifest is damaged, hostile, or breaks one of the reader's limits."""


class BlobMissingError(CorruptCheckpointError):
    """A blob that a manifest references is not in the store."""


class BlobCorruptError(CorruptCheckpointError):
    """A blob has the wrong size or its bytes do not match their hash."""


class SerializationError(CairnError, TypeError):
    """A value in the state cannot be stored without pickle; the message names its key path and type."""


class RestoreError(CairnError):
    """A checkpoint does not fit the objects it is restored into (missing, unexpected or mismatched keys)."""


class OutOfMemoryError(CairnError, MemoryError):
    """A tensor of the checkpoint cannot be allocated; load fewer keys (``keys=``) or use a bigger machine."""


class BackendError(CairnError, OSError):
    """The storage backend failed: an I/O error, a full disk, a refused or unsafe path."""
