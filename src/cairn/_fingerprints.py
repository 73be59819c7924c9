"""Chunk names not recomputed: BLAKE3 is skipped for memory that holds the same bytes as at the last save.

Hashing every byte of the state with BLAKE3 (about 2–4 GB/s per core) dominates an incremental save
where most of the state did not change (frozen layers). xxh3-128 reads memory about four times faster.
For each chunk a save remembers (address, size) -> (xxh3-128 fingerprint, BLAKE3 name); the next save
into the same store computes only the fingerprint of the chunk at that address, and when it matches,
takes the BLAKE3 name from before. The fingerprint reads every byte, so any change is seen, however it
was made (in place, through ``.data``, through a numpy view). Blobs stay named, and verified on load, by
BLAKE3; an accidental match of two different 128-bit fingerprints has probability 2^-128.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import blake3
import numpy as np
import xxhash

__all__ = ["ChunkNames", "chunk_names"]

Key = tuple[int, int]  # (address, size)
Entry = tuple[
    bytes | None, str, int
]  # (xxh3-128 fingerprint or None, BLAKE3 name, saves left unfingerprinted + 1)


def _key(data: memoryview) -> Key:
    return (np.frombuffer(data, dtype=np.uint8).ctypes.data if data.nbytes else 0, data.nbytes)


class ChunkNames:
    """The fingerprints and names of the chunks of one save, and of the last save into the same store.

    Memory that changed at its last fingerprinted save (trained weights, optimizer moments: most of a
    training state) is not fingerprinted for the next ``SKIP`` saves, only hashed: fingerprinting what
    changes every time would add its cost to every save for nothing. Every ``SKIP + 1``-th save it is
    fingerprinted again, so memory that stops changing (a layer frozen later) is found.
    """

    SKIP = 8

    def __init__(self, previous: dict[Key, Entry]) -> None:
        self._previous = previous
        self.seen: dict[Key, Entry] = {}

    def expects_change(self, data: memoryview) -> bool:
        """True if the memory of ``data`` changed at the last save into this store (it is then hashed
        without a fingerprint)."""
        known = self._previous.get(_key(data))
        return known is not None and known[2] > 1

    def name(self, data: memoryview) -> str:
        """The BLAKE3 name (hex) of ``data``, taken from the last save when the same memory held it."""
        key = _key(data)
        known = self._previous.get(key)
        if known is not None and known[2] > 1:  # changed lately: hash only
            blob = blake3.blake3(data).hexdigest()
            self.seen[key] = (None, blob, known[2] - 1)  # (one dict store: safe from the writer threads)
            return blob
        fingerprint = xxhash.xxh3_128_digest(data)
        if known is not None and known[0] == fingerprint:
            blob, skip = known[1], 0
        else:
            blob = blake3.blake3(data).hexdigest()
            skip = self.SKIP + 1 if known is not None and known[0] is not None else 0
        self.seen[key] = (fingerprint, blob, skip)
        return blob


class _Registry:
    """The chunks of the last save into each of the last few stores (by URL) this process saved into."""

    def __init__(self, stores: int = 8) -> None:
        self._last: OrderedDict[str, dict[Key, Entry]] = OrderedDict()
        self._stores = stores
        self._lock = threading.Lock()

    def begin(self, url: str) -> ChunkNames:
        """The names of a new save into the store at ``url``."""
        with self._lock:
            return ChunkNames(self._last.get(url, {}))

    def end(self, url: str, names: ChunkNames) -> None:
        """Remember the chunks of a finished (or failed: their names are right either way) save."""
        with self._lock:
            self._last[url] = names.seen
            self._last.move_to_end(url)
            while len(self._last) > self._stores:
                self._last.popitem(last=False)


chunk_names = _Registry()
