"""The store: write-once content-addressed blobs plus one manifest per checkpoint, committed last."""

from __future__ import annotations

import builtins
import contextlib
import os
import random
import time as _time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import blake3

from cairn import _codec
from cairn._fingerprints import ChunkNames, chunk_names
from cairn._gc import DEFAULT_GRACE, GCReport, collect_garbage
from cairn._info import CheckpointInfo, encode_metrics
from cairn._manifest import (
    FORMAT_VERSION,
    LIMITS,
    NAME_RE,
    RESERVED_NAMES,
    Chunk,
    Manifest,
    Shard,
    TensorEntry,
    canonical_json,
    check_json_value,
    check_name,
    parse_manifest,
    strict_json_loads,
)
from cairn._manifest_cache import manifests
from cairn._read import TensorReader, blob_path
from cairn._sniff import describe_foreign
from cairn._tree import decode_tree, encode_tree, key_matcher
from cairn._verify import VerifyReport, verify_store
from cairn.backends import Backend, LocalBackend, open_backend
from cairn.errors import (
    BackendError,
    CairnError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ManifestError,
    NotAStoreError,
    PinnedError,
    SerializationError,
    UnsupportedVersionError,
)

__all__ = ["DEFAULT_CHUNK_SIZE", "PreparedSave", "Store", "StoreConfig"]

DEFAULT_CHUNK_SIZE = 16 * 2**20
"""Tensors are cut into chunks of at most this many bytes; each chunk is one blob."""

MARKER = "cairn.json"
_MARKER_LIMIT = 1 << 16
_LAYOUT = {MARKER, "blobs", "checkpoints", "tmp", "locks", "pins"}
STORE_FORMAT = "cairn.store"
_WORKERS = max(2, min(8, (os.cpu_count() or 2) * 2))
_SAVE_WORKERS = max(_WORKERS, 16)  # writes of small files wait on fsync: many at once share journal commits


@dataclass(frozen=True)
class PreparedSave:
    """A validated, encoded save waiting for :meth:`Store.commit` (what an async save hands its thread)."""

    name: str
    step: int
    tree: Any
    arrays: list[tuple[str, _codec.EncodedArray]]
    metrics: dict[str, float | int | str]
    metadata: dict[str, Any]
    started: float
    overwrite: bool

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays."""
        return sum(a.nbytes for _, a in self.arrays)


@dataclass(frozen=True)
class StoreConfig:
    """The store marker ``cairn.json``: format version and the writer settings fixed at creation."""

    version: int = FORMAT_VERSION
    hash: str = "blake3"
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def to_bytes(self) -> bytes:
        """The marker file's bytes."""
        body = {"format": STORE_FORMAT, "version": self.version, "hash": self.hash}
        return canonical_json({**body, "chunk_size": self.chunk_size}) + b"\n"

    @classmethod
    def parse(cls, data: bytes, where: str) -> StoreConfig:
        """Validate a marker; refuses another format or a newer version."""
        try:
            doc = strict_json_loads(data, where, _MARKER_LIMIT)
        except ManifestError as e:
            raise NotAStoreError(f"{e}: the store marker is damaged") from None
        if doc.get("format") != STORE_FORMAT:
            raise NotAStoreError(f"{where} is not a cairn store marker")
        version = doc.get("version")
        if type(version) is not int or version < 1:
            raise NotAStoreError(f"{where}: invalid format version {str(version)[:20]!r}")
        if version > FORMAT_VERSION:
            raise UnsupportedVersionError(
                f"{where}: the store has format version {version}, this cairn reads up to {FORMAT_VERSION}; "
                "upgrade cairn (pip install -U tensorcairn)"
            )
        unknown = set(doc) - {"format", "version", "hash", "chunk_size"}
        if unknown:
            raise NotAStoreError(f"{where}: unknown fields {sorted(unknown)[:5]}")
        chunk = doc.get("chunk_size")
        if doc.get("hash") != "blake3" or not isinstance(chunk, int) or not 1 <= chunk <= LIMITS.chunk_bytes:
            raise NotAStoreError(f"{where}: invalid hash or chunk_size")
        return cls(version=version, chunk_size=chunk)


class Store:
    """A cairn checkpoint store at a directory (or any :class:`~cairn.backends.Backend`).

    ``Store(path)`` opens an existing store; ``create=True`` also creates one when ``path`` is a new or
    empty directory (with ``chunk_size`` fixed from then on). Readers check the format version first.

    Saves are incremental in time as well as in bytes: a chunk whose memory holds the same bytes as at
    the process's last save into this store (same address, same xxh3-128 fingerprint) keeps its BLAKE3
    name without being hashed again (see ``cairn._fingerprints``). ``fingerprints=False`` hashes every
    chunk every time.
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | Backend,
        *,
        create: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        fingerprints: bool = True,
    ) -> None:
        self.backend: Backend = open_backend(target)
        self.fingerprints = fingerprints
        self.config = self._open(create, chunk_size)

    @property
    def url(self) -> str:
        """Where the store is."""
        return self.backend.url

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- the marker -----------------------------------------------------------------------------------

    def _open(self, create: bool, chunk_size: int) -> StoreConfig:
        local = isinstance(self.backend, LocalBackend)
        if local and os.path.lexists(self.url) and not os.path.isdir(self.url):
            raise NotAStoreError(describe_foreign(self.url))
        size = self.backend.size(MARKER)
        if size is not None:
            if size > _MARKER_LIMIT:
                raise NotAStoreError(f"{self.url}/{MARKER}: {size} bytes is far too large for a store marker")
            return StoreConfig.parse(self.backend.read(MARKER), f"{self.url}/{MARKER}")
        if not create:
            raise NotAStoreError(
                f"{self.url} is not a cairn store (no {MARKER}); "
                "check the path, or save a checkpoint there first"
            )
        if not 1 <= chunk_size <= LIMITS.chunk_bytes:
            raise ValueError(f"chunk_size must be between 1 and {LIMITS.chunk_bytes}, not {chunk_size}")
        if local and os.path.isdir(self.url) and set(os.listdir(self.url)) - _LAYOUT:
            raise NotAStoreError(
                f"{self.url} is a non-empty directory but not a cairn store; "
                "save into a new or empty directory"
            )
        config = StoreConfig(chunk_size=chunk_size)
        self.backend.create(MARKER, config.to_bytes())  # a racing creator may win: read back theirs
        # (its layout directories may already be there: that is why only foreign entries are refused)
        self.backend.flush()
        return StoreConfig.parse(self.backend.read(MARKER), f"{self.url}/{MARKER}")

    # -- reading manifests ----------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of all committed checkpoints (manifests present), unvalidated, sorted."""
        out = []
        for path in self.backend.list("checkpoints"):
            name = path.removeprefix("checkpoints/").removesuffix(".json")
            if path.endswith(".json") and NAME_RE.fullmatch(name) and name not in RESERVED_NAMES:
                out.append(name)  # anything else in checkpoints/ is not a checkpoint cairn wrote
        return sorted(out)

    def manifest(self, name: str, *, cached: bool = True) -> Manifest:
        """The validated manifest of checkpoint ``name`` (``"latest"`` allowed). A manifest this process read
        before is reused while its file is unchanged (``cached=False``: read anew)."""
        if name == "latest":
            return self.manifest(self._latest_name(), cached=cached)
        check_name(name)
        path = f"checkpoints/{name}.json"
        try:
            size = self.backend.size(path)
        except BackendError as e:  # a symlink, a directory, a FIFO where the manifest should be
            raise ManifestError(f"{self.url}/{path}: {e}") from None
        if size is None:
            raise CheckpointNotFoundError(
                f"no checkpoint {name!r} in {self.url}; `cairn ls {self.url}` lists the checkpoints"
            )
        # a replaced manifest (overwrite=True) is a new file: it has a new stamp
        identity = getattr(self.backend, "identity", None)
        stamp = identity(path) if identity is not None else (size, self.backend.modified(path))
        known = manifests.get(self.url, name, stamp) if cached else None
        if known is not None:
            return known
        if size > LIMITS.manifest_bytes:
            limit = LIMITS.manifest_bytes
            raise ManifestError(f"{self.url}/{path}: {size} bytes is over the {limit}-byte limit")
        m = parse_manifest(self.backend.read(path), f"{self.url}/{path}")
        if m.name != name:
            raise ManifestError(f"{self.url}/{path}: the manifest says it is {m.name!r}, not {name!r}")
        manifests.put(self.url, name, stamp, size, m)
        return m

    def list(
        self, *, on_damaged: Callable[[str, CairnError], None] | None = None
    ) -> builtins.list[CheckpointInfo]:
        """Every committed checkpoint, oldest step first. Manifests that cannot be read (damaged, or of a
        newer format) are skipped and reported to ``on_damaged`` (by default a warning names them)."""
        infos = []
        for name in self.names():
            try:
                infos.append(CheckpointInfo.from_manifest(self.manifest(name)))
            except CheckpointNotFoundError:
                continue  # deleted since it was listed (retention running meanwhile)
            except (CorruptCheckpointError, UnsupportedVersionError) as e:
                if on_damaged is None:
                    import warnings

                    warnings.warn(f"skipping damaged checkpoint {name!r}: {e}", RuntimeWarning, stacklevel=2)
                else:
                    on_damaged(name, e)
        return sorted(infos, key=lambda i: (i.step, i.time, i.name))

    def latest(self) -> CheckpointInfo | None:
        """The checkpoint with the highest step (newest time on ties), or None if there is none."""
        infos = self.list()
        return infos[-1] if infos else None

    def _latest_name(self) -> str:
        latest = self.latest()
        if latest is None:
            raise CheckpointNotFoundError(f"{self.url} holds no checkpoints yet")
        return latest.name

    def info(self, name: str = "latest") -> CheckpointInfo:
        """The :class:`CheckpointInfo` of checkpoint ``name``."""
        return CheckpointInfo.from_manifest(self.manifest(name))

    # -- saving ---------------------------------------------------------------------------------------

    def save(
        self,
        state: Any,
        *,
        step: int | None = None,
        name: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> CheckpointInfo:
        """Save ``state`` as a new checkpoint; returns once it is durably committed.

        ``step`` defaults to one past the latest checkpoint's (0 in an empty store); ``name`` defaults to
        ``step-<step>``. Only chunks the store does not hold yet are written. A committed name is never
        overwritten unless ``overwrite=True``, which replaces it atomically (Keras-style "best" files).
        """
        prepared = self.prepare(
            state, step=step, name=name, metrics=metrics, metadata=metadata, overwrite=overwrite
        )
        return self.commit(prepared)

    def prepare(
        self,
        state: Any,
        *,
        step: int | None = None,
        name: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> PreparedSave:
        """The first half of :meth:`save`: validate and encode ``state`` (its arrays still view the live
        tensors' memory: copy them before changing the tensors if the commit happens later)."""
        started = _time.perf_counter()
        if step is None:
            latest = self.latest()
            step = 0 if latest is None else latest.step + 1
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**63:
            raise ValueError(f"step must be a non-negative integer, not {step!r}")
        name = check_name(f"step-{step}" if name is None else name)
        if overwrite and name in self.pins():
            raise PinnedError(f"checkpoint {name!r} of {self.url} is pinned; unpin it before overwriting it")
        if not overwrite and self.backend.size(f"checkpoints/{name}.json") is not None:
            raise CheckpointExistsError(
                f"checkpoint {name!r} already exists in {self.url}; checkpoints are never overwritten: "
                "pass another name or step (or delete it first)"
            )
        try:
            stored_metrics = encode_metrics(metrics)
        except TypeError as e:
            raise SerializationError(str(e)) from None
        meta = check_json_value(dict(metadata or {}), "metadata")
        tree, arrays = encode_tree(state)
        return PreparedSave(name, step, tree, arrays, stored_metrics, meta, started, overwrite)

    def commit(self, prepared: PreparedSave) -> CheckpointInfo:
        """The second half of :meth:`save`: write the blobs the store lacks, then the manifest."""
        with self.backend.lock("gc", shared=True):  # garbage collection waits for this save, and it for gc
            return self._commit(prepared)

    def _commit(self, p: PreparedSave) -> CheckpointInfo:
        name, step, tree, metrics, metadata, started, overwrite = (
            p.name, p.step, p.tree, p.metrics, p.metadata, p.started, p.overwrite
        )  # fmt: skip
        entries, written, nblobs, reused = self._write_tensors(p.arrays)
        self.backend.flush()  # every blob durable before the manifest can name it
        self._rewrite_gone(reused)
        manifest = Manifest(
            name=name,
            step=step,
            time=datetime.now(UTC).isoformat(timespec="microseconds"),
            tree=tree,
            tensors=tuple(entries),
            metrics=metrics,
            metadata=metadata,
        )
        data = manifest.to_bytes()
        if len(data) > LIMITS.manifest_bytes:
            raise SerializationError(
                f"the manifest would be {len(data)} bytes, over the reader limit of {LIMITS.manifest_bytes}: "
                "keep large values in tensors, not in plain Python values"
            )
        path = f"checkpoints/{name}.json"
        if not self.backend.create(path, data, replace=overwrite):
            raise CheckpointExistsError(f"checkpoint {name!r} was committed by another writer meanwhile")
        try:
            self.backend.flush()  # the commit is durable
        except BaseException:
            if not overwrite:  # the save failed: take its name back, so what is listed is what was saved
                with contextlib.suppress(Exception):  # (a crash may still keep it: it is complete, no harm)
                    self.backend.delete(path)
            raise
        manifests.forget(self.url, name)
        return CheckpointInfo.from_manifest(
            manifest, bytes_written=written, blobs_written=nblobs, seconds=_time.perf_counter() - started
        )

    def _rewrite_gone(self, reused: builtins.list[tuple[str, memoryview]]) -> None:
        """Write again the reused blobs that are gone since (deleted by a gc that cannot see this save,
        another host's, which had looked at them before their age was refreshed), before a manifest
        names them; durable on return."""
        gone = [(blob, view) for blob, view in reused if self.backend.size(blob_path(blob)) != view.nbytes]
        for blob, view in gone:
            self.backend.create(blob_path(blob), view)
        if gone:
            self.backend.flush()

    def _write_tensors(
        self, arrays: builtins.list[tuple[str, _codec.EncodedArray]]
    ) -> tuple[builtins.list[TensorEntry], int, int, builtins.list[tuple[str, memoryview]]]:
        """Write every chunk the store lacks (in parallel); the entries, bytes and blobs written, and the
        chunks that were already there (blob, data)."""
        size = self.config.chunk_size
        jobs = [
            (i, arr.data[pos : pos + size])
            for i, (_, arr) in enumerate(arrays)
            for pos in range(0, arr.nbytes, size)
        ]
        names = chunk_names.begin(self.url) if self.fingerprints else None
        order = _write_order([view for _, view in jobs], names)
        results: builtins.list[tuple[str, bool]] = [("", False)] * len(jobs)
        try:
            with ThreadPoolExecutor(_SAVE_WORKERS, thread_name_prefix="cairn-save") as pool:
                done = pool.map(lambda j: self._put_chunk(jobs[j][1], names), order)
                for j, result in zip(order, done, strict=True):
                    results[j] = result
        finally:
            if names is not None:
                chunk_names.end(self.url, names)
        chunks: builtins.list[tuple[Chunk, ...]] = [() for _ in arrays]
        written = nblobs = 0
        reused: builtins.list[tuple[str, memoryview]] = []
        for (i, view), (blob, new) in zip(jobs, results, strict=True):
            chunks[i] += (Chunk(blob, 0, view.nbytes),)
            if new:
                written += view.nbytes
                nblobs += 1
            else:
                reused.append((blob, view))
        entries = [
            TensorEntry(
                path, arr.kind, arr.dtype.name, arr.shape, (Shard((0,) * len(arr.shape), arr.shape, c),)
            )
            for (path, arr), c in zip(arrays, chunks, strict=True)
        ]
        return entries, written, nblobs, reused

    def _put_chunk(self, data: memoryview, names: ChunkNames | None) -> tuple[str, bool]:
        blob = names.name(data) if names is not None else blake3.blake3(data).hexdigest()
        path = blob_path(blob)
        size = self.backend.size(path)
        if size is not None and size != data.nbytes:  # a damaged copy under this name: replace it
            self.backend.delete(path)
        # when the blob is there, create writes nothing but still makes its name durable for our commit
        return blob, self.backend.create(path, data)

    # -- loading --------------------------------------------------------------------------------------

    def load(
        self,
        name: str = "latest",
        *,
        keys: str | Iterable[str] | None = None,
        map_location: Any = None,
        verify: bool = True,
        mmap: bool = True,
    ) -> Any:
        """The state tree of checkpoint ``name``; with ``keys`` (glob patterns over dotted key paths,
        a pattern also selects everything below it) only the matching leaves are read."""
        m = self.manifest(name)
        select = key_matcher(keys)
        wanted: list[int] = []
        decode_tree(m.tree, lambda i: wanted.append(i), select)
        reader = TensorReader(self.backend, m.name, verify=verify, mmap=mmap)
        values = reader.read_all([m.tensors[i] for i in wanted], _WORKERS)
        loaded = dict(zip(wanted, values, strict=True))
        return decode_tree(
            m.tree, lambda i: _codec.finish(m.tensors[i].kind, loaded[i], map_location), select
        )

    def delete(self, name: str) -> None:
        """Delete checkpoint ``name`` (its manifest; blobs stay until :meth:`gc`). Pinned ones are refused."""
        check_name(name)
        path = f"checkpoints/{name}.json"
        if self.backend.size(path) is None:
            raise CheckpointNotFoundError(f"no checkpoint {name!r} in {self.url}")
        if name in self.pins():
            raise PinnedError(f"checkpoint {name!r} of {self.url} is pinned; unpin it first to delete it")
        self.backend.delete(path)
        self.backend.flush()
        manifests.forget(self.url, name)

    def pins(self) -> set[str]:
        """Names of the pinned checkpoints: retention never deletes them."""
        names = (p.removeprefix("pins/") for p in self.backend.list("pins"))
        return {n for n in names if NAME_RE.fullmatch(n)}

    def pin(self, name: str) -> None:
        """Pin checkpoint ``name`` (``"latest"`` allowed) so that no retention policy ever deletes it."""
        name = self.manifest(name).name
        with self.backend.lock("gc", shared=True):  # gc(grace=0) deletes temp files of writers without it
            self.backend.create(f"pins/{name}", b"")
            self.backend.flush()

    def unpin(self, name: str) -> None:
        """Remove the pin of checkpoint ``name``, if any."""
        check_name(name)
        self.backend.delete(f"pins/{name}")
        self.backend.flush()

    def gc(self, *, grace: float = DEFAULT_GRACE, dry_run: bool = False) -> GCReport:
        """Delete blobs no checkpoint references (older than ``grace`` seconds) and crash leftovers.

        Runs under the store's ``gc`` lock, which saves hold shared: it never races a save.
        """
        return collect_garbage(self, grace=grace, dry_run=dry_run)

    def verify(
        self, name: str | None = None, *, progress: Callable[[int, int], None] | None = None
    ) -> VerifyReport:
        """Check every byte of checkpoint ``name`` (default: all): manifests parsed, blobs sized and hashed.

        Returns a :class:`VerifyReport`; it raises only for a store that cannot be read at all.
        """
        names = None if name is None else [self.manifest(name).name if name == "latest" else check_name(name)]
        return verify_store(self, names, progress)


def _write_order(views: builtins.list[memoryview], names: ChunkNames | None) -> builtins.list[int]:
    """The order to hash and write chunks in: first those that changed at the last save (they will be
    written: their disk writes then overlap the fingerprinting of the rest), then the others in a fixed
    shuffled order, so that chunks that changed, wherever they sit in the state (often a contiguous
    part: the last layers, the head), are spread over the save instead of all waiting at its end."""
    shuffled = list(range(len(views)))
    random.Random(len(views)).shuffle(shuffled)
    if names is None:
        return shuffled
    return sorted(shuffled, key=lambda j: not names.expects_change(views[j]))
