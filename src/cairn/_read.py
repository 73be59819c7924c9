"""Verified tensor reads: sizes checked before allocating, every chunk hashed before a tensor is returned."""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import blake3
import numpy as np

from cairn._codec import Allocated, allocate, from_buffer
from cairn._manifest import Chunk, Shard, TensorEntry
from cairn.backends._mapping import populate
from cairn.backends.base import Backend
from cairn.errors import BackendError, BlobCorruptError, BlobMissingError, OutOfMemoryError

__all__ = ["MMAP_MIN_BYTES", "TensorReader", "blob_path"]

Job = Callable[[], None]

_SMALL = 1 << 18  # tensors under this many bytes are not worth a thread hand-off
_WIDE_HASH = 1 << 20  # a chunk this large, hashed alone, is hashed by all cores
_ALL_CORES = blake3.blake3.AUTO

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
        self.hash_threads = 1  # blake3's own threads per chunk: more when chunks are not hashed in parallel

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
        if not self.verify:
            return
        threads = self.hash_threads if chunk.nbytes >= _WIDE_HASH else 1
        if blake3.blake3(data, max_threads=threads).hexdigest() != chunk.blob:
            raise BlobCorruptError(
                f"{self._where(entry, chunk.blob)}: its bytes do not match their hash (the file is damaged); "
                "restore an older checkpoint"
            )

    def _fill_chunk(self, entry: TensorEntry, chunk: Chunk, part: memoryview) -> None:
        try:
            n = self.backend.readinto(blob_path(chunk.blob), part)
        except FileNotFoundError:
            n = -1
        if n != chunk.nbytes:
            self._check_size(entry, chunk)  # raises with the precise reason
            raise BlobCorruptError(f"{self._where(entry, chunk.blob)} changed while it was read")
        self._check_hash(entry, chunk, part)

    def _fill(self, entry: TensorEntry, chunks: tuple[Chunk, ...], buffer: memoryview) -> list[Job]:
        """One job per chunk: read it into its place in ``buffer`` and hash it."""
        jobs: list[Job] = []
        pos = 0
        for chunk in chunks:
            jobs.append(partial(self._fill_chunk, entry, chunk, buffer[pos : pos + chunk.nbytes]))
            pos += chunk.nbytes
        return jobs

    def _mapped(
        self, entry: TensorEntry, chunks: list[Chunk], map_them: Callable[[], memoryview | None]
    ) -> memoryview | None:
        """``map_them()`` (a zero-copy map of ``chunks``); a chunk deleted since its size was checked is
        reported as missing, by name."""
        try:
            return map_them()
        except FileNotFoundError:
            pass
        for chunk in chunks:
            self._check_size(entry, chunk)  # raises BlobMissingError for the one that is gone
        raise BlobCorruptError(
            f"checkpoint {self.checkpoint!r}, key {entry.path!r} changed while it was read"
        )

    def plan(self, entry: TensorEntry) -> tuple[Callable[[], Any], list[Job]]:
        """How to read ``entry``: the jobs that fill it (independent; run them in any order, in any
        threads) and the function that returns the value once they all ran. Memory is allocated only
        for chunks whose size was checked: a large tensor read into memory has every chunk's size
        checked and its memory allocated here, before any job runs; a small one-chunk tensor (under
        ``MMAP_MIN_BYTES``) is allocated, read and size-checked by its one job; a memory map (which
        allocates nothing) is checked against the sizes it maps."""
        chunks = [c for s in entry.shards for c in s.chunks]
        shape = entry.shape
        whole = len(entry.shards) == 1 and entry.shards[0].shape == shape
        if whole and len(chunks) == 1 and entry.nbytes < MMAP_MIN_BYTES:
            small: list[Any] = []

            def read_small() -> None:
                self._check_size(entry, chunks[0])  # (and a FIFO or device is never opened)
                out = self._allocate(entry)
                self._fill_chunk(entry, chunks[0], out.buffer)
                small.append(out.value)

            return lambda: small[0], [read_small]
        mappable = whole and self.mmap and entry.nbytes >= MMAP_MIN_BYTES  # (a map allocates nothing)
        if mappable and len(chunks) == 1:

            def map_one() -> tuple[Any, memoryview | None]:
                view = self._mapped(entry, chunks, lambda: self.backend.map(blob_path(chunks[0].blob)))
                if view is not None and view.nbytes == chunks[0].nbytes:
                    return from_buffer(entry.kind, entry.dtype, shape, view), view
                # not mappable after all, or the wrong size (raised by the read's size check)
                return replace_mmap(self, False).read(entry), None

            if not self.verify:  # map it now; its job reads its pages in
                value, view = map_one()
                return lambda: value, [] if view is None else [partial(populate, view)]
            mapped: list[Any] = []

            def map_and_hash() -> None:
                value, view = map_one()
                if view is not None:
                    self._check_hash(entry, chunks[0], view)
                mapped.append(value)

            return lambda: mapped[0], [map_and_hash]
        map_concat = getattr(self.backend, "map_concat", None)
        if mappable and map_concat is not None:
            view = self._mapped(entry, chunks, lambda: map_concat([blob_path(c.blob) for c in chunks]))
            if view is not None and view.nbytes == entry.nbytes:
                value = from_buffer(entry.kind, entry.dtype, shape, view)
                jobs: list[Job] = []
                pos = 0
                for chunk in chunks:
                    part = view[pos : pos + chunk.nbytes]
                    jobs.append(
                        partial(self._check_hash, entry, chunk, part)
                        if self.verify
                        else partial(populate, part)
                    )
                    pos += chunk.nbytes
                return lambda: value, jobs
        for chunk in chunks:  # every size is checked before anything is allocated
            self._check_size(entry, chunk)
        out = self._allocate(entry)
        if whole:
            return lambda: out.value, self._fill(entry, entry.shards[0].chunks, out.buffer)
        elements = np.frombuffer(out.buffer, dtype=f"V{entry.itemsize}").reshape(shape)
        return lambda: out.value, [partial(self._place, entry, shard, elements) for shard in entry.shards]

    def _allocate(self, entry: TensorEntry) -> Allocated:
        try:
            return allocate(entry.kind, entry.dtype, entry.shape)
        except (MemoryError, RuntimeError) as e:  # numpy raises MemoryError, torch RuntimeError
            raise OutOfMemoryError(
                f"checkpoint {self.checkpoint!r}, key {entry.path!r}: cannot allocate {entry.nbytes} bytes "
                f"({str(e)[:120]}); load fewer keys at a time with keys=, or use a machine with more memory"
            ) from None

    def read(self, entry: TensorEntry) -> Any:
        """The tensor or array of ``entry``, of its kind (scalars not yet unwrapped), on the CPU."""
        value, jobs = self.plan(entry)
        for job in jobs:
            job()
        return value()

    def read_all(self, entries: list[TensorEntry], workers: int) -> list[Any]:
        """The values of ``entries``, read by ``workers`` threads chunk by chunk (a large tensor is read
        by all of them, not by one); small tensors are read by the calling thread meanwhile."""
        plans = [self.plan(entry) for entry in entries]
        large = [
            job for entry, (_, js) in zip(entries, plans, strict=True) if entry.nbytes >= _SMALL for job in js
        ]
        small = [
            job for entry, (_, js) in zip(entries, plans, strict=True) if entry.nbytes < _SMALL for job in js
        ]
        if len(large) > 1 and workers > 1:
            self.hash_threads = 1
            with ThreadPoolExecutor(min(workers, len(large)), thread_name_prefix="cairn-load") as pool:
                futures = [pool.submit(job) for job in large]
                try:
                    for job in small:
                        job()
                    for future in futures:
                        future.result()
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # a damaged chunk: do not read the rest first
                    raise
        else:  # at most one large job: blake3 hashes it with every core instead
            self.hash_threads = _ALL_CORES
            for job in large + small:
                job()
        return [value() for value, _ in plans]

    def _place(self, entry: TensorEntry, shard: Shard, elements: np.ndarray[Any, Any]) -> None:
        nbytes = math.prod(shard.shape) * entry.itemsize
        if nbytes == 0:
            return
        buf = np.empty(nbytes, dtype=np.uint8)
        for job in self._fill(entry, shard.chunks, buf.data):
            job()
        box = tuple(slice(o, o + n) for o, n in zip(shard.offset, shard.shape, strict=True))
        elements[box] = buf.view(f"V{entry.itemsize}").reshape(shard.shape)


def replace_mmap(reader: TensorReader, mmap: bool) -> TensorReader:
    """``reader`` with memory mapping switched on or off."""
    return TensorReader(reader.backend, reader.checkpoint, verify=reader.verify, mmap=mmap)
