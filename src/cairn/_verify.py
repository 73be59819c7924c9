"""Full integrity checks: every manifest parsed, every referenced blob's size and hash checked."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import blake3
import numpy as np

from cairn._read import blob_path
from cairn.errors import (
    BackendError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsupportedVersionError,
)

if TYPE_CHECKING:
    from cairn._store import Store

__all__ = ["Problem", "VerifyReport", "verify_store"]


@dataclass(frozen=True)
class Problem:
    """One thing found wrong: which checkpoint, which key and blob where known, and what."""

    checkpoint: str
    message: str
    key: str | None = None
    blob: str | None = None


@dataclass
class VerifyReport:
    """The outcome of :meth:`Store.verify`."""

    checkpoints: list[str] = field(default_factory=list)
    """The checkpoints checked."""
    blobs_checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems

    @property
    def damaged(self) -> list[str]:
        """Names of the checkpoints that cannot be restored, sorted."""
        return sorted({p.checkpoint for p in self.problems})


def _check_blob(store: Store, blob: str, nbytes: int) -> str | None:
    """None if the blob is intact, else what is wrong with it."""
    path = blob_path(blob)
    try:
        return _blob_problem(store, path, blob, nbytes)
    except BackendError as e:
        return f"cannot be read: {e}"


def _blob_problem(store: Store, path: str, blob: str, nbytes: int) -> str | None:
    size = store.backend.size(path)
    if size is None:
        return "missing"
    if size != nbytes:
        return f"has {size} bytes, expected {nbytes} (truncated or damaged)"
    data = store.backend.map(path)
    if data is None:
        buf = np.empty(nbytes, dtype=np.uint8).data
        n = store.backend.readinto(path, buf)
        data = buf[:n]
    if blake3.blake3(data).hexdigest() != blob:
        return "bytes do not match their hash (damaged)"
    return None


def verify_store(
    store: Store, names: list[str] | None = None, progress: Callable[[int, int], None] | None = None
) -> VerifyReport:
    """Check the named checkpoints (default all), calling ``progress(bytes_done, bytes_total)`` as it goes."""
    report = VerifyReport()
    refs: dict[str, tuple[int, list[tuple[str, str]]]] = {}
    for name in store.names() if names is None else names:
        try:
            m = store.manifest(name)
        except CheckpointNotFoundError:
            if names is None:
                continue  # deleted since it was listed (retention running meanwhile): nothing to check
            raise
        except (CorruptCheckpointError, UnsupportedVersionError) as e:
            report.checkpoints.append(name)
            report.problems.append(Problem(name, str(e)))
            continue
        report.checkpoints.append(name)
        for t in m.tensors:
            for s in t.shards:
                for c in s.chunks:
                    refs.setdefault(c.blob, (c.nbytes, []))[1].append((name, t.path))
    total = sum(n for n, _ in refs.values())
    done = 0
    if progress:
        progress(0, total)
    with ThreadPoolExecutor(4, thread_name_prefix="cairn-verify") as pool:
        results = pool.map(lambda item: (item[0], _check_blob(store, item[0], item[1][0])), refs.items())
        for blob, problem in results:
            nbytes, users = refs[blob]
            report.blobs_checked += 1
            report.bytes_checked += nbytes
            done += nbytes
            if problem is not None:
                seen = set()
                for checkpoint, key in users:
                    if (checkpoint, key) not in seen:
                        seen.add((checkpoint, key))
                        report.problems.append(Problem(checkpoint, f"blob {blob} {problem}", key, blob))
            if progress:
                progress(done, total)
    return report
