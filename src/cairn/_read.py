"""Verified tensor reads: sizes checked before allocating, every chunk hashed before a tensor is returned."""

from __future__ import annotations

import math
from typing import Any

import blake3
import numpy as np

from cairn._codec import allocate, from_buffer
from cairn._manifest import Chunk, Shard, TensorEntry
from cairn.backends.base import Backend
from cairn.errors import BackendError, BlobCorruptError, BlobMissingError, OutOfMemoryError

__all__ = ["MMAP_MIN_BYTES", "TensorReader", "blob_path"]

MMAP_MIN_BYTES = 1 << 20
"""Tensors at least this large, stored in one chunk, are memory-mapped instead of copied."""


def blob_path(blob: str) -> str:
    """Where a blob lives in the store (``blobs/ab/ab12...``); ``blob`` must already be validated hex."""
    return f"blobs/{blob[:2]}/{blob}"


class TensorReader:
    """Reads tensors of one checkpoint, verifying as it goes."""

    def __init__(self, backend: Backend, checkpoint: str, *, verify: bool = True, mmap: bool = True) -> None:
        self.backend = backend
        self.checkpoint = checkpoint
        self.verify = verify
        self.mmap = mmap and backend.properties.mmap

    def _where(self, entry: TensorEntry, blob: str) -> str:
        return f"checkpoint {self.checkpoint!r}, key {entry.path!r}: blob {blob}"

    def _check_size(self, entry: TensorEntry, chunk: Chunk) -> None:
        try:
            size = self.backend.size(blob_path(chunk.blob))
        except BackendError as e:  # not a regular file, a symlink, an unreadable directory...
            raise BlobCorruptError(f"{self._where(entry, chunk.blob)}: {e}") from None
        if size is None:
            raise BlobMissingError(
                f"{self._where(entry, chunk.blob)} is missing from {self.backend.url}; "
                "run `cairn verify` to list every damaged checkpoint, and restore an older one"
            )
        if size != chunk.offset + chunk.nbytes:
            raise BlobCorruptError(
                f"{self._where(entry, chunk.blob)} has {size} bytes, expected {chunk.nbytes} "
                "(truncated or damaged); restore an older checkpoint"
            )

    def _check_hash(self, entry: TensorEntry, chunk: Chunk, data: Any) -> None:
        if self.verify and blake3.blake3(data).hexdigest() != chunk.blob:
            raise BlobCorruptError(
                f"{self._where(entry, chunk.blob)}: its bytes do not match their hash (the file is damaged); "
                "restore an older checkpoint"
            )

    def _fill(self, entry: TensorEntry, chunks: tuple[Chunk, ...], buffer: memoryview) -> None:
        pos = 0
        for chunk in chunks:
            part = buffer[pos : pos + chunk.nbytes]
            try:
                n = self.backend.readinto(blob_path(chunk.blob), part)
            except FileNotFoundError:
                n = -1
            if n != chunk.nbytes:
                self._check_size(entry, chunk)  # raises with the precise reason
                raise BlobCorruptError(f"{self._where(entry, chunk.blob)} changed while it was read")
            self._check_hash(entry, chunk, part)
            pos += chunk.nbytes

    def read(self, entry: TensorEntry) -> Any:
        """The tensor or array of ``entry``, of its kind (scalars not yet unwrapped), on the CPU."""
        chunks = [c for s in entry.shards for c in s.chunks]
        for chunk in chunks:  # every size is checked before anything is allocated
            self._check_size(entry, chunk)
        shape = entry.shape
        whole = len(entry.shards) == 1 and entry.shards[0].shape == shape
        if whole and self.mmap and len(chunks) == 1 and entry.nbytes >= MMAP_MIN_BYTES:
            mapped = self.backend.map(blob_path(chunks[0].blob))
            if mapped is not None and mapped.nbytes == chunks[0].nbytes:
                self._check_hash(entry, chunks[0], mapped)
                return from_buffer(entry.kind, entry.dtype, shape, mapped)
        try:
            out = allocate(entry.kind, entry.dtype, shape)
        except (MemoryError, RuntimeError) as e:  # numpy raises MemoryError, torch RuntimeError
            raise OutOfMemoryError(
                f"checkpoint {self.checkpoint!r}, key {entry.path!r}: cannot allocate {entry.nbytes} bytes "
                f"({str(e)[:120]}); load fewer keys at a time with keys=, or use a machine with more memory"
            ) from None
        if whole:
            self._fill(entry, entry.shards[0].chunks, out.buffer)
            return out.value
        elements = np.frombuffer(out.buffer, dtype=f"V{entry.itemsize}").reshape(shape)
        for shard in entry.shards:
            self._place(entry, shard, elements)
        return out.value

    def _place(self, entry: TensorEntry, shard: Shard, elements: np.ndarray[Any, Any]) -> None:
        nbytes = math.prod(shard.shape) * entry.itemsize
        if nbytes == 0:
            return
        buf = np.empty(nbytes, dtype=np.uint8)
        self._fill(entry, shard.chunks, buf.data)
        box = tuple(slice(o, o + n) for o, n in zip(shard.offset, shard.shape, strict=True))
        elements[box] = buf.view(f"V{entry.itemsize}").reshape(shard.shape)
