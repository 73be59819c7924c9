"""Garbage collection: delete the blobs no checkpoint references, and leftovers of crashed writers.

Retention deletes manifests only; this is the only code that deletes blobs. It runs under the store's
``gc`` lock held exclusively, which every save holds shared for its whole duration, so a collection
never races a save that is writing (or reusing) blobs it has not committed yet. As a second guard for
writers that do not take the lock (another host on a shared file system), blobs and temporary files
younger than ``grace`` seconds are spared; reusing a blob refreshes its age.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cairn._manifest import BLOB_RE
from cairn._read import blob_path
from cairn.backends._locks import lock_owner
from cairn.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedVersionError

if TYPE_CHECKING:
    from cairn._store import Store

__all__ = ["DEFAULT_GRACE", "GCReport", "collect_garbage"]

DEFAULT_GRACE = 900.0
"""Seconds an unreferenced blob or temporary file is spared after it was written or last reused."""


@dataclass
class GCReport:
    """What :meth:`Store.gc` did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    blobs_deleted: int = 0
    bytes_freed: int = 0
    blobs_kept: int = 0
    """Blobs still referenced by a checkpoint."""
    bytes_kept: int = 0
    blobs_spared: int = 0
    """Unreferenced blobs younger than the grace period (an in-flight save of another host may need them)."""
    temp_deleted: int = 0
    deleted: list[str] = field(default_factory=list)
    """Paths deleted (or that would be)."""


def collect_garbage(store: Store, *, grace: float = DEFAULT_GRACE, dry_run: bool = False) -> GCReport:
    """Delete unreferenced blobs and stale temporary files of ``store``; see the module docstring.

    Refuses (raising the checkpoint's error) when a manifest cannot be read, since the blobs it needs
    cannot be known: fix or delete that checkpoint first.
    """
    if grace < 0:
        raise ValueError(f"grace must be >= 0 seconds, not {grace}")
    report = GCReport(dry_run=dry_run)
    backend = store.backend
    with backend.lock("gc", owner=lock_owner("gc")):
        live: set[str] = set()
        for name in store.names():
            try:
                live |= store.manifest(name, cached=False).blobs()
            except CheckpointNotFoundError:
                continue  # deleted since it was listed: its blobs are no longer needed by it
            except (CorruptCheckpointError, UnsupportedVersionError) as e:
                raise type(e)(
                    f"{e} -- gc stopped without deleting anything: the blobs of checkpoint {name!r} cannot "
                    "be known. Delete it (cairn forget / Store.delete) or restore it from a copy, then gc."
                ) from None
        now = time.time()
        sizes: dict[str, int] = {}
        for path in sorted(backend.list("blobs")):
            blob = path.rpartition("/")[2]
            if not BLOB_RE.fullmatch(blob) or path != blob_path(blob):
                continue  # not a file cairn wrote: leave it alone
            size = backend.size(path) or 0
            if blob in live:
                report.blobs_kept += 1
                report.bytes_kept += size
            elif now - (backend.modified(path) or now) < grace:
                report.blobs_spared += 1
            else:
                report.blobs_deleted += 1
                report.bytes_freed += size
                report.deleted.append(path)
                sizes[path] = size
        for path in sorted(backend.list("tmp")):
            if now - (backend.modified(path) or now) >= grace:
                report.temp_deleted += 1
                report.deleted.append(path)
        if not dry_run:
            for path in list(report.deleted):
                if path in sizes and grace > 0 and _young(backend.modified(path), grace):
                    # reused since it was looked at, by a save this lock cannot see: spare it
                    report.deleted.remove(path)
                    report.blobs_deleted -= 1
                    report.bytes_freed -= sizes[path]
                    report.blobs_spared += 1
                    continue
                backend.delete(path)
            backend.flush()
    return report


def _young(modified: float | None, grace: float) -> bool:
    """True for a file modified less than ``grace`` seconds ago (or gone: nothing to delete)."""
    return modified is None or time.time() - modified < grace
