"""Manifests: the frozen dataclasses, canonical JSON, and the validation every reader runs first.

A manifest is the commit record of one checkpoint (see ``docs/format.md``). Readers treat its bytes as
hostile until they pass :func:`parse_manifest`: size cap, strict JSON (no duplicate keys, no NaN, no
overflowing numbers), a digest over the canonical body, and structural limits checked in Python
integers before anything is allocated.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import blake3
import numpy as np

from cairn._codec import KINDS
from cairn._dtypes import by_name
from cairn._tree import MAX_TREE_DEPTH, format_path
from cairn.errors import ManifestError, SerializationError, UnsupportedVersionError

__all__ = [
    "FORMAT_VERSION",
    "LIMITS",
    "Chunk",
    "Limits",
    "Manifest",
    "Shard",
    "TensorEntry",
    "canonical_json",
    "check_json_value",
    "check_name",
    "parse_manifest",
    "strict_json_loads",
]

FORMAT_VERSION = 1
"""The manifest and store format version this cairn writes and the newest it reads."""

MANIFEST_FORMAT = "cairn.checkpoint"
BLOB_RE = re.compile(r"[0-9a-f]{64}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED_NAMES = frozenset({"latest", "best"})
_INT_RE = re.compile(r"-?0x[0-9a-f]+")
_B64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")


@dataclass(frozen=True)
class Limits:
    """Hard limits a reader enforces before it trusts or allocates anything."""

    manifest_bytes: int = 64 * 2**20
    tensors: int = 1_000_000
    chunks: int = 10_000_000
    shards_per_tensor: int = 4096
    rank: int = 64
    tensor_bytes: int = 2**50
    chunk_bytes: int = 2**31
    tree_depth: int = 4 * MAX_TREE_DEPTH + 16
    shard_comparisons: int = 50_000_000
    name_chars: int = 4096


LIMITS = Limits()


@dataclass(frozen=True)
class Chunk:
    """A run of bytes of a shard, stored in a blob: ``nbytes`` bytes of blob ``blob`` from ``offset``."""

    blob: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Shard:
    """A box of a tensor, ``shape`` elements from ``offset``; its C-order bytes are its chunks, in order."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor or array of the state: where it sits, what it is, and the shards that hold its bytes."""

    path: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    shards: tuple[Shard, ...]

    @cached_property
    def itemsize(self) -> int:
        """Bytes per element."""
        dt = by_name(self.dtype)
        assert dt is not None
        return dt.itemsize

    @cached_property
    def nbytes(self) -> int:
        """Logical size of the tensor in bytes."""
        return math.prod(self.shape) * self.itemsize


@dataclass(frozen=True)
class Manifest:
    """The commit record of one checkpoint."""

    name: str
    step: int
    time: str
    tree: Any
    tensors: tuple[TensorEntry, ...]
    metrics: Mapping[str, float | int | str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Logical size of all tensors, in bytes."""
        return sum(t.nbytes for t in self.tensors)

    def blobs(self) -> set[str]:
        """Every blob this checkpoint references."""
        return {c.blob for t in self.tensors for s in t.shards for c in s.chunks}

    def body(self) -> dict[str, Any]:
        """The manifest as a JSON object, without its digest."""
        return {
            "format": MANIFEST_FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "step": self.step,
            "time": self.time,
            "metrics": dict(self.metrics),
            "metadata": dict(self.metadata),
            "tree": self.tree,
            "tensors": [
                {
                    "path": t.path,
                    "kind": t.kind,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "shards": [
                        {
                            "offset": list(s.offset),
                            "shape": list(s.shape),
                            "chunks": [
                                {"blob": c.blob, "offset": c.offset, "nbytes": c.nbytes} for c in s.chunks
                            ],
                        }
                        for s in t.shards
                    ],
                }
                for t in self.tensors
            ],
        }

    def to_bytes(self) -> bytes:
        """The manifest file: canonical JSON of the body plus ``digest``, the BLAKE3 of the body."""
        body = self.body()
        body["digest"] = blake3.blake3(canonical_json(body)).hexdigest()
        return canonical_json(body) + b"\n"


def canonical_json(value: Any) -> bytes:
    """Canonical JSON: UTF-8, sorted keys, no spaces, no NaN, floats in shortest round-trip form."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError) as e:
        raise SerializationError(f"value is not plain JSON: {e}") from None


def check_json_value(value: Any, where: str, depth: int = 0) -> Any:
    """Check that ``value`` is plain JSON (str keys; None, bool, int, finite float, str, list, dict) and
    return it with tuples as lists; raise :class:`SerializationError` naming the offending key otherwise."""
    if depth > MAX_TREE_DEPTH:
        raise SerializationError(f"{where}: nested deeper than {MAX_TREE_DEPTH} levels")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SerializationError(f"{where}: {value} is not a finite number; JSON has no NaN or infinity")
        return value
    if isinstance(value, list | tuple):
        return [check_json_value(v, f"{where}.{i}", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SerializationError(
                    f"{where}: key {k!r} is not a string (JSON objects have string keys)"
                )
            out[k] = check_json_value(v, f"{where}.{k}", depth + 1)
        return out
    raise SerializationError(
        f"{where}: a {type(value).__name__} is not plain JSON; use None, bool, int, float, str, list or dict"
    )


def check_name(name: object) -> str:
    """Validate a checkpoint name: 1-128 of ``[A-Za-z0-9._-]``, starting alphanumeric, not reserved."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
        raise ValueError(
            f"invalid checkpoint name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting "
            f"with a letter or digit, and not {' or '.join(sorted(RESERVED_NAMES))}"
        )
    return name


# ---------------------------------------------------------------------------------------------- reading


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-finite number {token} is not allowed")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"number {token[:32]} overflows a float")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k[:64]!r}")
            seen.add(k)
    return out


_FREE_CONTAINERS = 1 << 20  # up to this many arrays and objects, any density is fine
_BYTES_PER_CONTAINER = 12  # above it, at least this many bytes per array or object (cairn writes ~24)


def strict_json_loads(data: bytes, what: str, max_bytes: int) -> Any:
    """Parse untrusted JSON: size-capped, UTF-8, no duplicate keys, no NaN/Infinity, bounded nesting."""
    if len(data) > max_bytes:
        raise ManifestError(f"{what}: {len(data)} bytes is over the {max_bytes}-byte limit")
    containers = data.count(b"[") + data.count(b"{")  # (brackets in strings count too: an upper bound)
    if containers > max(_FREE_CONTAINERS, len(data) // _BYTES_PER_CONTAINER):
        raise ManifestError(
            f"{what}: {containers} JSON arrays and objects in {len(data)} bytes; no state cairn saves is "
            "that dense (each costs a Python object to parse): not a manifest cairn wrote"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{what}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.lstrip().startswith("{"):
        raise ManifestError(f"{what}: not a JSON object")
    try:
        return json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
        )
    except MemoryError:
        raise ManifestError(f"{what}: not enough memory to parse {len(data)} bytes of JSON") from None
    except RecursionError:
        raise ManifestError(f"{what}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, duplicate keys, NaN, int digit limit
        raise ManifestError(f"{what}: invalid JSON: {str(e)[:200]}") from None


def _fail(what: str, message: str) -> ManifestError:
    return ManifestError(f"{what}: {message}")


def _int(value: Any, what: str, field_name: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(what, f"{field_name} must be an integer in [{lo}, {hi}], not {str(value)[:40]}")
    return value


def _obj(
    value: Any, what: str, field_name: str, keys: set[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(what, f"{field_name} must be a JSON object")
    missing = keys - value.keys()
    extra = value.keys() - keys - optional
    if missing or extra:
        raise _fail(
            what, f"{field_name}: missing fields {sorted(missing)}, unknown fields {sorted(extra)[:5]}"
        )
    return value


def _dims(value: Any, what: str, field_name: str, limits: Limits) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > limits.rank:
        raise _fail(what, f"{field_name} must be a list of at most {limits.rank} integers")
    return tuple(_int(d, what, field_name, 0, limits.tensor_bytes) for d in value)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused: parsing builds many containers and no cycles, and in a
    process holding a large heap (torch) the collections it triggers cost as much as the parse."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_manifest(data: bytes, what: str, limits: Limits = LIMITS) -> Manifest:
    """Parse and fully validate manifest bytes; ``what`` names the file in errors."""
    with _no_gc():
        return _parse_manifest(data, what, limits)


def _parse_manifest(data: bytes, what: str, limits: Limits) -> Manifest:
    entries = data.count(b'"dtype"')  # at least one per tensor entry: too many is refused before parsing
    if entries > limits.tensors:
        raise _fail(what, f"about {entries} tensor entries, over the limit of {limits.tensors}")
    doc = strict_json_loads(data, what, limits.manifest_bytes)
    if doc.get("format") != MANIFEST_FORMAT:
        raise _fail(what, f"not a cairn manifest (format field is {str(doc.get('format'))[:40]!r})")
    version = doc.get("version")
    if type(version) is int and version > FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"{what}: written in format version {version}, this cairn reads up to {FORMAT_VERSION}; "
            "upgrade cairn (pip install -U tensorcairn)"
        )
    if type(version) is not int or version != FORMAT_VERSION:
        raise _fail(what, f"unknown format version {str(version)[:20]}")
    keys = {"format", "version", "name", "step", "time", "metrics", "metadata", "tree", "tensors", "digest"}
    _obj(doc, what, "manifest", keys)
    digest = doc.pop("digest")
    try:
        body = canonical_json(doc)
    except SerializationError:  # e.g. a lone surrogate escape, which UTF-8 cannot encode
        raise _fail(what, "holds text that is not valid Unicode") from None
    if not isinstance(digest, str) or blake3.blake3(body).hexdigest() != digest:
        raise _fail(what, "digest does not match the manifest body (the file is damaged or was edited)")

    name = doc["name"]
    try:
        check_name(name)
    except ValueError as e:
        raise _fail(what, str(e)) from None
    step = _int(doc["step"], what, "step")
    time = doc["time"]
    try:
        if not isinstance(time, str) or len(time) > 40 or datetime.fromisoformat(time).tzinfo is None:
            raise ValueError
    except ValueError:
        raise _fail(
            what, f"time must be an ISO 8601 timestamp with a UTC offset, not {str(time)[:40]!r}"
        ) from None
    metrics = _check_metrics(doc["metrics"], what)
    if not isinstance(doc["metadata"], dict):
        raise _fail(what, "metadata must be a JSON object")
    tensors = _check_tensors(doc["tensors"], what, limits)
    paths: list[str | None] = [None] * len(tensors)
    _check_node(doc["tree"], (), 0, what, paths, limits)
    for i, (entry, path) in enumerate(zip(tensors, paths, strict=True)):
        if path is None:
            raise _fail(what, f"tensor {i} ({entry.path[:80]}) is not referenced by the tree")
        if path != entry.path:
            raise _fail(what, f"tensor {i} says its path is {entry.path[:80]!r} but sits at {path[:80]!r}")
    return Manifest(name, step, time, doc["tree"], tuple(tensors), metrics, doc["metadata"])


def _check_metrics(value: Any, what: str) -> dict[str, float | int | str]:
    if not isinstance(value, dict):
        raise _fail(what, "metrics must be a JSON object")
    for k, v in value.items():
        ok = (isinstance(v, int | float) and not isinstance(v, bool)) or v in ("nan", "inf", "-inf")
        if not ok:
            raise _fail(what, f"metric {k[:64]!r} must be a number (or 'nan', 'inf', '-inf')")
    return value


def _check_tensors(value: Any, what: str, limits: Limits) -> list[TensorEntry]:
    if not isinstance(value, list) or len(value) > limits.tensors:
        raise _fail(what, f"tensors must be a list of at most {limits.tensors} entries")
    out: list[TensorEntry] = []
    total_chunks = 0
    budget = [limits.shard_comparisons]
    for i, raw in enumerate(value):
        t = _obj(raw, what, f"tensor {i}", {"path", "kind", "dtype", "shape", "shards"})
        path = t["path"]
        if not isinstance(path, str) or len(path) > limits.name_chars:
            raise _fail(what, f"tensor {i}: path must be a string of at most {limits.name_chars} characters")
        where = f"tensor {path[:120]!r}"
        kind, dtype = t["kind"], t["dtype"]
        dt = by_name(dtype) if isinstance(dtype, str) else None
        if dt is None:
            raise _fail(what, f"{where}: dtype {str(dtype)[:20]!r} is not one cairn knows")
        if kind not in KINDS:
            raise _fail(what, f"{where}: kind {str(kind)[:20]!r} is not one of {KINDS}")
        if kind != "torch" and dt.numpy_name is None:
            raise _fail(what, f"{where}: numpy has no dtype {dtype}")
        shape = _dims(t["shape"], what, f"{where} shape", limits)
        if kind == "numpy-scalar" and shape:
            raise _fail(what, f"{where}: a numpy scalar has shape []")
        nbytes = math.prod(shape) * dt.itemsize
        if nbytes > limits.tensor_bytes:
            raise _fail(what, f"{where}: {nbytes} bytes is over the {limits.tensor_bytes}-byte limit")
        shards = t["shards"]
        if not isinstance(shards, list) or not 1 <= len(shards) <= limits.shards_per_tensor:
            raise _fail(what, f"{where}: needs 1 to {limits.shards_per_tensor} shards")
        parsed = tuple(
            _check_shard(s, j, shape, dt.itemsize, what, where, limits) for j, s in enumerate(shards)
        )
        total_chunks += sum(len(s.chunks) for s in parsed)
        if total_chunks > limits.chunks:
            raise _fail(what, f"more than {limits.chunks} chunks in all")
        _check_cover(parsed, shape, what, where, budget)
        out.append(TensorEntry(path, kind, dtype, shape, parsed))
    return out


def _check_shard(
    raw: Any, j: int, shape: tuple[int, ...], itemsize: int, what: str, where: str, limits: Limits
) -> Shard:
    s = _obj(raw, what, f"{where} shard {j}", {"offset", "shape", "chunks"})
    offset = _dims(s["offset"], what, f"{where} shard {j} offset", limits)
    sshape = _dims(s["shape"], what, f"{where} shard {j} shape", limits)
    if len(offset) != len(shape) or len(sshape) != len(shape):
        raise _fail(what, f"{where} shard {j}: offset and shape must have the tensor's rank {len(shape)}")
    if any(o + n > d for o, n, d in zip(offset, sshape, shape, strict=True)):
        raise _fail(what, f"{where} shard {j}: box {list(offset)}+{list(sshape)} exceeds shape {list(shape)}")
    chunks_raw = s["chunks"]
    if not isinstance(chunks_raw, list) or len(chunks_raw) > limits.chunks:
        raise _fail(what, f"{where} shard {j}: chunks must be a list")
    chunks = []
    for k, c in enumerate(chunks_raw):
        c = _obj(c, what, f"{where} shard {j} chunk {k}", {"blob", "offset", "nbytes"})
        blob = c["blob"]
        if not isinstance(blob, str) or not BLOB_RE.fullmatch(blob):
            raise _fail(what, f"{where}: blob name {str(blob)[:80]!r} is not 64 lowercase hex digits")
        off = _int(c["offset"], what, f"{where} chunk offset", 0, 0)
        n = _int(c["nbytes"], what, f"{where} chunk nbytes", 1, limits.chunk_bytes)
        chunks.append(Chunk(blob, off, n))
    expected = math.prod(sshape) * itemsize
    if sum(c.nbytes for c in chunks) != expected:
        raise _fail(
            what,
            f"{where} shard {j}: chunks hold {sum(c.nbytes for c in chunks)} bytes but "
            f"shape {list(sshape)} needs {expected}",
        )
    return Shard(offset, sshape, tuple(chunks))


def _check_cover(
    shards: tuple[Shard, ...], shape: tuple[int, ...], what: str, where: str, budget: list[int]
) -> None:
    """Shards must tile the tensor exactly: volumes add up and no two boxes overlap.

    Overlap is found by a sweep along the dimension with the most distinct shard offsets: a box is only
    compared with the boxes that start inside it along that dimension (vectorised). ``budget`` bounds the
    comparisons of a whole manifest, so a hostile layout cannot stall the reader.
    """
    if sum(math.prod(s.shape) for s in shards) != math.prod(shape):
        raise _fail(what, f"{where}: shards do not cover the tensor exactly")
    boxes = [s for s in shards if math.prod(s.shape)]
    if len(boxes) < 2:
        return
    lo = np.array([s.offset for s in boxes], dtype=np.int64)
    hi = lo + np.array([s.shape for s in boxes], dtype=np.int64)
    d = max(range(len(shape)), key=lambda k: len(np.unique(lo[:, k])))
    order = np.argsort(lo[:, d], kind="stable")
    lo, hi = lo[order], hi[order]
    ends = np.searchsorted(lo[:, d], hi[:, d], side="left")  # boxes i+1..ends[i]-1 start inside box i
    for i in np.flatnonzero(ends > np.arange(1, len(boxes) + 1)):
        j = int(ends[i])
        budget[0] -= j - int(i) - 1
        if budget[0] < 0:
            raise _fail(what, f"{where}: the shard layout is too complex to validate")
        if np.any(np.all((lo[i + 1 : j] < hi[i]) & (lo[i] < hi[i + 1 : j]), axis=1)):
            raise _fail(what, f"{where}: shards overlap")


def _check_node(
    node: Any, path: tuple[str | int, ...], depth: int, what: str, paths: list[str | None], limits: Limits
) -> None:
    if depth > limits.tree_depth:
        raise _fail(what, f"tree nested deeper than {limits.tree_depth} at {format_path(path[:8])[:120]}")
    if node is None or isinstance(node, bool | int | float | str):
        return
    where = f"tree node {format_path(path)[:120] or '<root>'}"
    if not isinstance(node, dict) or not node:
        raise _fail(what, f"{where}: not a valid tree node")
    tag = next(iter(node)) if len(node) == 1 else ("object" if "object" in node else "?")
    if tag == "dict":
        pairs = node["dict"]
        if not isinstance(pairs, list):
            raise _fail(what, f"{where}: dict must be a list of [key, value] pairs")
        seen: set[tuple[type, str | int]] = set()
        for pair in pairs:
            if not isinstance(pair, list) or len(pair) != 2:
                raise _fail(what, f"{where}: dict entries must be [key, value] pairs")
            k = pair[0]
            if isinstance(k, bool) or not isinstance(k, str | int):
                raise _fail(what, f"{where}: dict keys must be strings or integers")
            if (type(k), k) in seen:
                raise _fail(what, f"{where}: duplicate dict key {str(k)[:64]!r}")
            seen.add((type(k), k))
            _check_node(pair[1], (*path, k), depth + 1, what, paths, limits)
    elif tag in ("list", "tuple"):
        items = node[tag]
        if not isinstance(items, list):
            raise _fail(what, f"{where}: {tag} must be a JSON array")
        for i, child in enumerate(items):
            _check_node(child, (*path, i), depth + 1, what, paths, limits)
    elif tag == "object":
        _obj(node, what, where, {"object", "state"}, frozenset({"meta"}))
        if not isinstance(node["object"], str) or len(node["object"]) > 512:
            raise _fail(what, f"{where}: object type name must be a short string")
        _check_node(node["state"], path, depth + 1, what, paths, limits)
        if "meta" in node:  # torch's per-module versions; may hold no tensors (an empty table)
            _check_node(node["meta"], (*path, "_metadata"), depth + 1, what, [], limits)
    elif tag == "tensor":
        i = node["tensor"]
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(paths):
            raise _fail(what, f"{where}: tensor index {str(i)[:20]} is out of range")
        if paths[i] is not None:
            raise _fail(what, f"{where}: tensor {i} is referenced twice")
        paths[i] = format_path(path)
    elif tag == "int":
        if not isinstance(node["int"], str) or not _INT_RE.fullmatch(node["int"]):
            raise _fail(what, f"{where}: big integer must be a hex string like '-0x1f'")
    elif tag == "float":
        if node["float"] not in ("nan", "inf", "-inf"):
            raise _fail(what, f"{where}: special float must be 'nan', 'inf' or '-inf'")
    elif tag == "bytes":
        b = node["bytes"]
        if not isinstance(b, str) or len(b) % 4 or not _B64_RE.fullmatch(b):
            raise _fail(what, f"{where}: bytes must be base64")
    else:
        raise _fail(what, f"{where}: unknown node type {sorted(node)[:3]}")
