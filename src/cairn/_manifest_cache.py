"""Parsed manifests kept for the process: reading one checkpoint's tensors one at a time (``load(keys=)``
in a loop, ``cairn show``) parses and validates its manifest once, not at every call.

An entry is used only while the manifest file is unchanged: same size, modification time and (locally)
inode; a checkpoint replaced with ``overwrite=True`` is a new file. At most ``max_bytes`` of manifests (by
file size) are kept, the least recently used dropped first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from cairn._manifest import Manifest

__all__ = ["ManifestCache", "manifests"]


class ManifestCache:
    """Manifests by (store URL, checkpoint name), each with the stamp of the file it was parsed from."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self._entries: OrderedDict[tuple[str, str], tuple[Hashable, int, Manifest]] = OrderedDict()
        self._bytes = 0
        self._max = max_bytes
        self._lock = threading.Lock()

    def get(self, url: str, name: str, stamp: Hashable) -> Manifest | None:
        """The manifest parsed from the file with this ``stamp``, if kept."""
        with self._lock:
            entry = self._entries.get((url, name))
            if entry is None or entry[0] != stamp:
                return None
            self._entries.move_to_end((url, name))
            return entry[2]

    def put(self, url: str, name: str, stamp: Hashable, size: int, manifest: Manifest) -> None:
        """Keep ``manifest``, parsed from a file of ``size`` bytes with this ``stamp``."""
        with self._lock:
            self._drop((url, name))
            if size > self._max:
                return
            self._entries[(url, name)] = (stamp, size, manifest)
            self._bytes += size
            while self._bytes > self._max:
                _, (_, dropped, _) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def forget(self, url: str, name: str) -> None:
        """Drop the entry of a deleted or rewritten checkpoint."""
        with self._lock:
            self._drop((url, name))

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]


manifests = ManifestCache()
