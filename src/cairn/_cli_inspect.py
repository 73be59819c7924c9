"""``cairn`` subcommands that look inside checkpoints: ``diff`` and ``du``, and what ``ls`` (the NEW column)
and ``show --stats`` compute.

Everything here that needs only manifests (:func:`new_bytes`, :func:`disk_usage`, the key-by-key pairing of
:func:`diff_checkpoints`) reads no blob. Tensors are read, verified, only for ``show --stats`` and for the
tensors ``diff`` cannot decide from their blob names; they are read one at a time (one pair for ``diff``)
and reduced in float64 slices of at most ``SLICE`` elements, so memory stays bounded by the largest tensor
plus a few slices. torch is imported only when a torch tensor is read.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np

from cairn._cli_render import (
    Column,
    Entry,
    Output,
    UsageError,
    clean,
    human_size,
    json_number,
    local_time,
    number_text,
    progress_bar,
    tree_nodes,
    walk,
)
from cairn._info import CheckpointInfo, decode_metrics
from cairn._manifest import BLOB_RE, Manifest, TensorEntry, canonical_json
from cairn._read import TensorReader, blob_path
from cairn._store import Store
from cairn._tree import key_matcher

__all__ = [
    "PROGRESS_MIN_BYTES",
    "SLICE",
    "STATS_COLUMNS",
    "DiskUsage",
    "Leaf",
    "TensorChange",
    "TensorStats",
    "add_commands",
    "blob_sizes",
    "diff_checkpoints",
    "disk_usage",
    "leaves",
    "new_bytes",
    "number_text",
    "reading",
    "stats_cells",
    "tensor_diff",
    "tensor_stats",
]

SLICE = 1 << 22
"""Elements reduced at a time (32 MiB of float64)."""

PROGRESS_MIN_BYTES = 32 * 2**20
"""Reads smaller than this finish too fast for a progress bar to be worth drawing."""

_COMPLEX = frozenset({"C32", "C64", "C128"})
_INTEGRAL = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})

Progress = Callable[[int, int], None]
T = TypeVar("T")


# ----------------------------------------------------------------------------------------- NEW bytes


def blob_sizes(m: Manifest) -> dict[str, int]:
    """Every blob ``m`` references, with its size (a chunk is a whole blob in format version 1)."""
    return {c.blob: c.offset + c.nbytes for t in m.tensors for s in t.shards for c in s.chunks}


def new_bytes(store: Store, infos: Sequence[CheckpointInfo]) -> dict[str, int]:
    """For each checkpoint of ``infos``, the bytes of the blobs it references that no *older* one of them
    (by step, then time, then name: the order of :meth:`Store.list`) references: what it cost on disk
    given the earlier ones. Reads manifests only."""
    seen: set[str] = set()
    out: dict[str, int] = {}
    for info in sorted(infos, key=lambda i: (i.step, i.time, i.name)):
        sizes = blob_sizes(store.manifest(info.name))
        out[info.name] = sum(n for blob, n in sizes.items() if blob not in seen)
        seen.update(sizes)
    return out


# ---------------------------------------------------------------------------------------- the leaves


@dataclass(frozen=True)
class Leaf:
    """A row of ``cairn show`` that is not an object, with its raw manifest node (a plain value's JSON, or
    ``{"tensor": i}``) and, for a tensor, its entry in the tensor table."""

    entry: Entry
    node: Any
    tensor: TensorEntry | None


def _leaf_nodes(m: Manifest, select: Callable[[str], bool] | None) -> Iterator[tuple[str, Any]]:
    """The leaves of ``m``'s tree as ``(dotted key, node)``, in the order of :func:`walk`."""
    return ((key, node) for is_object, key, node in tree_nodes(m.tree, select) if not is_object)


def leaves(m: Manifest, select: Callable[[str], bool] | None = None) -> list[Leaf]:
    """The tensors and plain values of ``m`` (those whose dotted key ``select`` accepts), in tree order."""
    entries = [e for e in walk(m, select) if e.type != "object"]
    out = []
    for e, (key, node) in zip(entries, _leaf_nodes(m, select), strict=True):
        assert e.key == key
        tensor = m.tensors[node["tensor"]] if e.type == "tensor" else None
        out.append(Leaf(e, node, tensor))
    return out


# ------------------------------------------------------------------------------------- reading values


def _flat(value: Any) -> Any:
    """A tensor or array (as :class:`TensorReader` returns it) as a 1-D view."""
    return value.reshape(-1)


def _is_torch(value: Any) -> bool:
    return not isinstance(value, np.ndarray)


def _floats(part: Any, dtype: str) -> np.ndarray[Any, Any]:
    """A 1-D slice as float64 (complex dtypes: complex128), on the CPU, in numpy."""
    if _is_torch(part):
        import torch

        return np.asarray(
            (part.to(torch.complex128) if dtype in _COMPLEX else part.to(torch.float64)).numpy()
        )
    return np.asarray(part, dtype=np.complex128 if dtype in _COMPLEX else np.float64)


def _native(part: Any) -> np.ndarray[Any, Any]:
    """A 1-D slice of an integer or bool tensor as a numpy array of its own dtype."""
    return np.asarray(part.numpy()) if _is_torch(part) else np.asarray(part)


def _raw(part: Any) -> np.ndarray[Any, Any]:
    """A 1-D slice's bytes, as uint8."""
    if _is_torch(part):
        import torch

        return np.asarray(part.contiguous().view(torch.uint8).numpy())
    return np.ascontiguousarray(part).view(np.uint8)


def _read(store: Store, m: Manifest, t: TensorEntry) -> Any:
    return TensorReader(store.backend, m.name, verify=True).read(t)


# --------------------------------------------------------------------------------------------- stats


@dataclass
class TensorStats:
    """Statistics of one tensor, computed in float64 (of the absolute value for complex tensors).

    ``min``, ``max``, ``mean`` and ``std`` (the population standard deviation) are of the finite values
    only, and None when there is none (an empty tensor, or one of NaN and infinities only); ``nan`` and
    ``inf`` count the others. ``min`` and ``max`` of integer and bool tensors are exact integers.
    """

    count: int = 0
    nan: int = 0
    inf: int = 0
    min: float | int | None = None
    max: float | int | None = None
    mean: float | None = None
    std: float | None = None
    _n: int = field(default=0, repr=False)
    _m2: float = field(default=0.0, repr=False)

    def _add(self, x: np.ndarray[Any, Any], lo: float | int, hi: float | int) -> None:
        """Merge a slice of finite values whose own min and max are ``lo`` and ``hi``."""
        n = int(x.size)
        if n == 0:
            return
        mean = float(x.mean())
        m2 = float(np.square(x - mean).sum())
        if self._n == 0:
            self.mean, self._m2, self.min, self.max = mean, m2, lo, hi
        else:  # Chan et al.: merge the (count, mean, M2) of two parts
            assert self.mean is not None and self.min is not None and self.max is not None
            delta = mean - self.mean
            total = self._n + n
            self.mean += delta * n / total
            self._m2 += m2 + delta * delta * self._n * n / total
            self.min, self.max = min(self.min, lo), max(self.max, hi)
        self._n += n
        self.std = math.sqrt(self._m2 / self._n)

    def as_json(self) -> dict[str, Any]:
        """The ``stats`` object of ``cairn show --stats --json``."""
        return {
            "count": self.count,
            "min": None if self.min is None else json_number(self.min),
            "max": None if self.max is None else json_number(self.max),
            "mean": None if self.mean is None else json_number(self.mean),
            "std": None if self.std is None else json_number(self.std),
            "nan": self.nan,
            "inf": self.inf,
        }


def _slice_stats(stats: TensorStats, part: Any, dtype: str) -> None:
    stats.count += int(part.shape[0])
    if dtype in _INTEGRAL:
        native = _native(part)
        x = native.astype(np.float64)
        stats._add(x, int(native.min()), int(native.max()))
        return
    x = _floats(part, dtype)
    if dtype in _COMPLEX:
        x = np.abs(x)
    finite = np.isfinite(x)
    if not finite.all():
        nan = int(np.isnan(x).sum())
        stats.nan += nan
        stats.inf += int(x.size - int(finite.sum()) - nan)
        x = x[finite]
    if x.size:
        stats._add(x, float(x.min()), float(x.max()))


def tensor_stats(
    store: Store, m: Manifest, tensors: Sequence[TensorEntry], progress: Progress | None = None
) -> list[TensorStats]:
    """The :class:`TensorStats` of each of ``tensors`` (entries of ``m``), read and verified one at a time;
    ``progress(bytes_done, bytes_total)`` is called as they are reduced."""
    total = sum(t.nbytes for t in tensors)
    done = 0
    if progress:
        progress(0, total)
    out = []
    for t in tensors:
        stats = TensorStats()
        if t.nbytes:
            flat = _flat(_read(store, m, t))
            n = int(flat.shape[0])
            for start in range(0, n, SLICE):
                part = flat[start : start + SLICE]
                with np.errstate(all="ignore"):
                    _slice_stats(stats, part, t.dtype)
                done += int(part.shape[0]) * t.itemsize
                if progress:
                    progress(done, total)
            del flat
        out.append(stats)
    return out


# ---------------------------------------------------------------------------------------------- diff


@dataclass
class TensorChange:
    """How the values of two tensors of the same dtype and shape differ.

    ``max_abs_diff`` is the largest ``|a - b|`` (elements equal on both sides, or NaN on both, count as 0;
    NaN when an element is NaN on one side only, infinite when one is infinite on one side only or with
    different signs) and
    ``rel_l2`` is ``||a - b|| / ||a||`` (``a`` the left tensor, its non-finite elements left out of
    ``||a||``; NaN or infinite when ``max_abs_diff`` is, infinite when ``a`` is all zeros and ``b`` is
    not), both in float64 (of complex values: their difference's modulus). ``equal`` is whether the bytes
    are identical.
    """

    equal: bool = True
    max_abs_diff: float = 0.0
    rel_l2: float = 0.0
    _d2: float = field(default=0.0, repr=False)
    _a2: float = field(default=0.0, repr=False)

    def _add(self, a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], same_bytes: bool) -> None:
        finite = np.isfinite(a)
        self._a2 += float(np.square(np.abs(a if finite.all() else a[finite])).sum())
        if same_bytes:
            return
        self.equal = False
        d = np.abs(a - b)
        d[(a == b) | (np.isnan(a) & np.isnan(b))] = 0.0
        if d.size:
            top = float(np.nan) if np.isnan(d).any() else float(d.max())
            if math.isnan(top) or math.isnan(self.max_abs_diff):
                self.max_abs_diff = float("nan")
            else:
                self.max_abs_diff = max(self.max_abs_diff, top)
        self._d2 += float(np.square(d).sum())

    def _finish(self) -> None:
        if not math.isfinite(self._d2):
            self.rel_l2 = self._d2  # NaN or infinity: an element differs by that much
        elif self._a2 > 0:
            self.rel_l2 = math.sqrt(self._d2) / math.sqrt(self._a2)
        else:
            self.rel_l2 = 0.0 if self._d2 == 0 else float("inf")


def tensor_diff(
    left: tuple[Store, Manifest, TensorEntry],
    right: tuple[Store, Manifest, TensorEntry],
    progress: Callable[[int], None] | None = None,
) -> TensorChange:
    """Compare the values of two tensors of the same dtype and shape, read and verified (``left`` first);
    ``progress(nbytes)`` is called with the bytes of both sides reduced since its last call."""
    ta, tb = left[2], right[2]
    assert (ta.dtype, ta.shape) == (tb.dtype, tb.shape)
    change = TensorChange()
    if ta.nbytes:
        a = _flat(_read(*left))
        b = _flat(_read(*right))
        n = int(a.shape[0])
        for start in range(0, n, SLICE):
            pa, pb = a[start : start + SLICE], b[start : start + SLICE]
            same = bool(np.array_equal(_raw(pa), _raw(pb)))
            with np.errstate(all="ignore"):
                change._add(_floats(pa, ta.dtype), _floats(pb, tb.dtype), same)
            if progress:
                progress(2 * int(pa.shape[0]) * ta.itemsize)
        del a, b
    change._finish()
    return change


@dataclass
class _Side:
    store: Store
    m: Manifest

    @property
    def info(self) -> CheckpointInfo:
        return CheckpointInfo.from_manifest(self.m)

    def ref(self) -> dict[str, Any]:
        return {"store": self.store.url, "name": self.m.name, "step": self.m.step, "time": self.m.time}


def _describe(e: Entry) -> str:
    """A leaf as one cell: ``F32 [4, 3]`` for a tensor, the value's repr otherwise."""
    if e.type == "tensor":
        kind = "" if e.kind == "torch" else f" ({e.kind})"
        return f"{e.dtype} [{', '.join(map(str, e.shape or []))}]{kind}"
    if e.type == "object":
        return f"object {clean(e.object or '')}"
    return e.repr or ""


def _tensor_changes(a: Entry, b: Entry) -> list[str]:
    return [what for what in ("kind", "dtype", "shape") if getattr(a, what) != getattr(b, what)]


def _pair_up(left: list[tuple[str, T]], right: list[tuple[str, T]]) -> list[tuple[str, T | None, T | None]]:
    """Match items by key (the n-th item with a key on the left with the n-th on the right): the left's
    items in order, then those only on the right, in the right's order."""
    index: dict[str, list[T]] = {}
    for key, item in right:
        index.setdefault(key, []).append(item)
    used: dict[str, int] = {}
    out: list[tuple[str, T | None, T | None]] = []
    for key, item in left:
        n = used.get(key, 0)
        used[key] = n + 1
        pool = index.get(key, [])
        out.append((key, item, pool[n] if n < len(pool) else None))
    seen: dict[str, int] = {}
    for key, item in right:
        n = seen.get(key, 0)
        seen[key] = n + 1
        if n >= used.get(key, 0):
            out.append((key, None, item))
    return out


def _metric_rows(left: Manifest, right: Manifest) -> list[dict[str, Any]]:
    ml, mr = decode_metrics(left.metrics), decode_metrics(right.metrics)
    rows = []
    for name in sorted(ml.keys() | mr.keys()):
        a, b = ml.get(name), mr.get(name)
        delta = None if a is None or b is None else b - a
        rows.append({"metric": name, "left": a, "right": b, "delta": delta})
    return rows


def _same_number(a: float | int | None, b: float | int | None) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def diff_checkpoints(
    left: tuple[Store, Manifest],
    right: tuple[Store, Manifest],
    select: Callable[[str], bool] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compare two checkpoints (possibly of different stores) key by key; the ``cairn diff --json`` document
    less its ``left``/``right`` headers. Tensors whose blobs are the same are equal without a read; the
    others of the same kind, dtype and shape are read and compared (:func:`tensor_diff`)."""
    ls, rs = _Side(*left), _Side(*right)
    lleaves, rleaves = leaves(ls.m, select), leaves(rs.m, select)
    lobjs = [(e.key, e) for e in walk(ls.m, select) if e.type == "object"]
    robjs = [(e.key, e) for e in walk(rs.m, select) if e.type == "object"]
    pairs = _pair_up([(x.entry.key, x) for x in lleaves], [(x.entry.key, x) for x in rleaves])

    added: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    shared = equal = values = 0
    to_read: list[tuple[int, Leaf, Leaf, TensorEntry, TensorEntry]] = []
    for key, a, b in pairs:
        if b is None:
            assert a is not None
            removed.append(asdict(a.entry))
        elif a is None:
            added.append(asdict(b.entry))
        elif a.tensor is not None and b.tensor is not None:
            what = _tensor_changes(a.entry, b.entry)
            if what:
                changed.append(
                    {"key": key, "changes": what, "left": asdict(a.entry), "right": asdict(b.entry)}
                )
            elif a.tensor.shards == b.tensor.shards:
                shared += 1
            else:
                to_read.append((len(changed), a, b, a.tensor, b.tensor))
                changed.append({})  # filled in below, or dropped if the values are equal
        elif a.entry.type == b.entry.type == "value" and canonical_json(a.node) == canonical_json(b.node):
            values += 1
        else:
            what = ["value"] if a.entry.type == b.entry.type else ["type"]
            changed.append({"key": key, "changes": what, "left": asdict(a.entry), "right": asdict(b.entry)})
    for key, oa, ob in _pair_up(lobjs, robjs):
        if oa is not None and ob is not None and oa.object != ob.object:
            changed.append({"key": key, "changes": ["object"], "left": asdict(oa), "right": asdict(ob)})

    total = sum(x.nbytes + y.nbytes for *_, x, y in to_read)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    if progress:
        progress(0, total)
    for slot, a, b, ta, tb in to_read:
        change = tensor_diff((ls.store, ls.m, ta), (rs.store, rs.m, tb), step)
        if change.equal:
            equal += 1
            changed[slot] = {}
            continue
        changed[slot] = {
            "key": a.entry.key,
            "changes": ["values"],
            "left": asdict(a.entry),
            "right": asdict(b.entry),
            "max_abs_diff": json_number(change.max_abs_diff),
            "rel_l2": json_number(change.rel_l2),
        }
    changed = [c for c in changed if c]
    for c in changed:
        c.setdefault("max_abs_diff", None)
        c.setdefault("rel_l2", None)
    metrics = _metric_rows(ls.m, rs.m)
    same_metrics = all(_same_number(r["left"], r["right"]) for r in metrics)
    for r in metrics:
        for k in ("left", "right", "delta"):
            r[k] = None if r[k] is None else json_number(r[k])
    return {
        "identical": not (added or removed or changed) and same_metrics,
        "added": added,
        "removed": removed,
        "changed": changed,
        "unchanged": {
            "tensors_shared": shared,
            "tensors_equal": equal,
            "values": values,
            "total": shared + equal + values,
        },
        "metrics": metrics,
    }


# ------------------------------------------------------------------------------------------------ du


@dataclass
class DiskUsage:
    """What a store holds and what it costs on disk (``cairn du``)."""

    checkpoints: list[dict[str, Any]]
    """Per checkpoint, oldest first: ``name``, ``step``, ``nbytes`` (logical) and ``new_bytes``."""
    damaged: list[str]
    """Checkpoints whose manifest cannot be read: their blobs cannot be known."""
    logical_bytes: int
    """The sum of the checkpoints' logical sizes: what full, independent copies would take."""
    blob_bytes: int
    """Sizes of the distinct blobs present that a checkpoint references."""
    num_blobs: int
    manifest_bytes: int
    num_manifests: int
    unreferenced_bytes: int
    """Blobs present that no readable checkpoint references: what ``cairn gc`` reclaims (once they are
    older than its grace period)."""
    unreferenced_blobs: int
    missing_blobs: int
    """Blobs a checkpoint references that are not there (``cairn verify`` names them)."""
    missing_bytes: int

    @property
    def stored_bytes(self) -> int:
        """What the checkpoints take on disk: their blobs, each once, and their manifests."""
        return self.blob_bytes + self.manifest_bytes

    @property
    def saved_bytes(self) -> int:
        """What sharing blobs saves: logical minus stored (negative when manifests outweigh the data)."""
        return self.logical_bytes - self.stored_bytes

    @property
    def ratio(self) -> float | None:
        """Logical over stored size, None for an empty store."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else None

    def as_json(self) -> dict[str, Any]:
        """The ``cairn du --json`` document, less ``store``."""
        return {
            **asdict(self),
            "stored_bytes": self.stored_bytes,
            "saved_bytes": self.saved_bytes,
            "ratio": self.ratio,
            "disk_bytes": self.stored_bytes + self.unreferenced_bytes,
        }


def disk_usage(store: Store) -> DiskUsage:
    """Measure ``store``: manifests and blob sizes only, no blob is read."""
    damaged: list[str] = []
    infos = store.list(on_damaged=lambda name, e: damaged.append(name))
    fresh = new_bytes(store, infos)
    referenced: dict[str, int] = {}
    for info in infos:
        referenced.update(blob_sizes(store.manifest(info.name)))
    manifest_bytes = num_manifests = 0
    for name in store.names():
        size = store.backend.size(f"checkpoints/{name}.json")
        if size is not None:
            manifest_bytes += size
            num_manifests += 1
    present: dict[str, int] = {}
    for path in store.backend.list("blobs"):
        blob = path.rpartition("/")[2]
        if BLOB_RE.fullmatch(blob) and path == blob_path(blob):
            present[blob] = store.backend.size(path) or 0
    missing = [b for b in referenced if b not in present]
    unreferenced = [b for b in present if b not in referenced]
    return DiskUsage(
        checkpoints=[
            {"name": i.name, "step": i.step, "nbytes": i.nbytes, "new_bytes": fresh[i.name]} for i in infos
        ],
        damaged=sorted(damaged),
        logical_bytes=sum(i.nbytes for i in infos),
        blob_bytes=sum(n for b, n in present.items() if b in referenced),
        num_blobs=len(referenced) - len(missing),
        manifest_bytes=manifest_bytes,
        num_manifests=num_manifests,
        unreferenced_bytes=sum(present[b] for b in unreferenced),
        unreferenced_blobs=len(unreferenced),
        missing_blobs=len(missing),
        missing_bytes=sum(referenced[b] for b in missing),
    )


# ----------------------------------------------------------------------------------------- rendering


def _signed_size(n: int) -> str:
    return "-" + human_size(-n) if n < 0 else human_size(n)


@contextmanager
def reading(what: str, nbytes: int) -> Iterator[Progress | None]:
    """A progress callback drawing a bar on stderr when it is a terminal and the read is large enough."""
    if not sys.stderr.isatty() or nbytes < PROGRESS_MIN_BYTES:
        yield None
        return
    with progress_bar(what) as update:
        yield update


def stats_cells(stats: TensorStats | None) -> list[str]:
    """MIN, MAX, MEAN, STD, NAN, INF cells of a ``show --stats`` row (blank for a non-tensor)."""
    if stats is None:
        return [""] * 6
    return [
        number_text(stats.min),
        number_text(stats.max),
        number_text(stats.mean),
        number_text(stats.std),
        str(stats.nan),
        str(stats.inf),
    ]


STATS_COLUMNS = [Column(h, right=True) for h in ("MIN", "MAX", "MEAN", "STD", "NAN", "INF")]


# ------------------------------------------------------------------------------------------ commands


def _checkpoint(ref: str) -> tuple[Store, Manifest]:
    from cairn.cli import _open, _resolve, parse_ref

    path, name = parse_ref(ref)
    store = _open(path)
    return store, store.manifest(_resolve(store, name))


def cmd_diff(args: argparse.Namespace, out: Output) -> int:
    """``cairn diff REF REF``: what changed from the left checkpoint to the right one."""
    left, right = _checkpoint(args.left), _checkpoint(args.right)
    select = key_matcher(args.key)
    if args.key and not leaves(left[1], select) and not leaves(right[1], select):
        patterns = ", ".join(repr(k) for k in args.key)
        raise UsageError(f"no key of {left[1].name!r} or {right[1].name!r} matches --key {clean(patterns)}")
    size = _bytes_to_read(left, right, select)
    with reading("comparing", size) as progress:
        doc = diff_checkpoints(left, right, select, progress)
    status = 0 if doc["identical"] else 1
    sides = {"left": _Side(*left).ref(), "right": _Side(*right).ref()}
    if args.json:
        out.json({**sides, **doc})
        return status
    for label, (store, m) in (("left", left), ("right", right)):
        when = local_time(_Side(store, m).info.time)
        out.line(f"{label:<5}  {clean(store.url)}@{m.name}  (step {m.step}, {when})")
    out.line()
    rows: list[list[str]] = []
    styles: list[str | None] = []
    for c in doc["changed"]:
        left_text, right_text = _describe(Entry(**c["left"])), _describe(Entry(**c["right"]))
        detail = left_text if c["changes"] == ["values"] else f"{left_text} → {right_text}"
        numbers = ["", ""]  # only for values read and compared
        if c["max_abs_diff"] is not None:
            numbers = [number_text(c["max_abs_diff"]), number_text(c["rel_l2"])]
        rows.append([c["key"], ",".join(c["changes"]), detail, *numbers])
        styles.append("yellow")
    for what, style in (("added", "green"), ("removed", "red")):
        for e in doc[what]:
            rows.append([e["key"], what, _describe(Entry(**e)), "", ""])
            styles.append(style)
    if rows:
        for row in rows:
            row[0] = clean(row[0]) or "<root>"
        columns = [Column("KEY"), Column("CHANGE"), Column("DETAIL")]
        out.table([*columns, Column("MAX ABS DIFF", right=True), Column("REL L2", right=True)], rows, styles)
        out.line()
    if doc["metrics"]:
        metric_rows = [
            [clean(r["metric"]), number_text(r["left"]), number_text(r["right"]), number_text(r["delta"])]
            for r in doc["metrics"]
        ]
        columns = [Column("METRIC"), Column("LEFT", right=True), Column("RIGHT", right=True)]
        out.table([*columns, Column("DELTA", right=True)], metric_rows)
        out.line()
    out.line(_summary(doc), style="green" if doc["identical"] else "bold")
    return status


def _bytes_to_read(
    left: tuple[Store, Manifest], right: tuple[Store, Manifest], select: Callable[[str], bool] | None
) -> int:
    """Roughly what :func:`diff_checkpoints` will read (for deciding on a progress bar)."""
    rights = {x.entry.key: x.tensor for x in leaves(right[1], select) if x.tensor is not None}
    total = 0
    for x in leaves(left[1], select):
        other = rights.get(x.entry.key)
        if x.tensor is not None and other is not None and x.tensor.shards != other.shards:
            total += x.tensor.nbytes + other.nbytes
    return total


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _summary(doc: dict[str, Any]) -> str:
    u = doc["unchanged"]
    parts = []
    if u["tensors_shared"]:
        parts.append(f"{_plural(u['tensors_shared'], 'tensor')} sharing blobs, not read")
    if u["tensors_equal"]:
        parts.append(f"{_plural(u['tensors_equal'], 'tensor')} read and equal")
    if u["values"]:
        parts.append(f"{_plural(u['values'], 'equal value')}")
    detail = f" ({'; '.join(parts)})" if parts else ""
    if doc["identical"]:
        return f"identical: {u['total']} unchanged{detail}"
    counts = f"{len(doc['added'])} added, {len(doc['removed'])} removed, {len(doc['changed'])} changed"
    metrics = "" if all(_same_number(r["left"], r["right"]) for r in doc["metrics"]) else ", metrics differ"
    return f"differ: {counts}, {u['total']} unchanged{detail}{metrics}"


def cmd_du(args: argparse.Namespace, out: Output) -> int:
    """``cairn du PATH``: logical and stored sizes, and what sharing blobs saves."""
    from cairn.cli import _open

    store = _open(args.path)
    du = disk_usage(store)
    if args.json:
        out.json({"store": store.url, **du.as_json()})
        return 0
    if du.checkpoints:
        columns = [Column("NAME"), Column("STEP", right=True), Column("SIZE", right=True)]
        rows = [
            [c["name"], str(c["step"]), human_size(c["nbytes"]), human_size(c["new_bytes"])]
            for c in du.checkpoints
        ]
        out.table([*columns, Column("NEW", right=True)], rows)
        out.line()
    ratio = du.ratio
    if ratio is None:
        saving = "-"
    elif du.saved_bytes >= 0:
        saving = f"{human_size(du.saved_bytes)} ({ratio:.1f}× smaller)"
    else:
        saving = f"{_signed_size(du.saved_bytes)} (none: the manifests cost more than shared blobs save)"
    garbage = ""
    if du.damaged and du.unreferenced_blobs:
        garbage = " (at most: damaged checkpoints may use some; `cairn gc` waits until they are deleted)"
    elif du.unreferenced_blobs:
        garbage = " (`cairn gc` reclaims them once past its grace period)"
    fields = [
        ("checkpoints", str(len(du.checkpoints))),
        ("logical", f"{human_size(du.logical_bytes)} (the sum of the checkpoints' sizes)"),
        (
            "stored",
            f"{human_size(du.stored_bytes)} ({_plural(du.num_blobs, 'blob')} {human_size(du.blob_bytes)}"
            f" + {_plural(du.num_manifests, 'manifest')} {human_size(du.manifest_bytes)})",
        ),
        ("saved", saving),
        (
            "unreferenced",
            f"{human_size(du.unreferenced_bytes)} in {_plural(du.unreferenced_blobs, 'blob')}{garbage}",
        ),
    ]
    if du.missing_blobs:
        fields.append(
            (
                "missing",
                f"{_plural(du.missing_blobs, 'blob')} ({human_size(du.missing_bytes)}): run `cairn verify`",
            )
        )
    if du.damaged:
        fields.append(("damaged", f"{', '.join(du.damaged)} (unreadable manifests: run `cairn verify`)"))
    out.fields(fields)
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``diff`` and ``du`` on the ``cairn`` parser."""
    diff = sub.add_parser(
        "diff", parents=[common], help="compare two checkpoints: keys added, removed, changed; metrics"
    )
    diff.add_argument("left", metavar="PATH[@NAME]", help="the left (older) checkpoint (default: latest)")
    diff.add_argument(
        "right", metavar="PATH[@NAME]", help="the right (newer) checkpoint, maybe in another store"
    )
    diff.add_argument(
        "--key",
        metavar="GLOB",
        action="append",
        help="only keys matching this glob over dotted keys (or below it); may be repeated",
    )
    diff.set_defaults(func=cmd_diff)

    du = sub.add_parser("du", parents=[common], help="logical and stored sizes; what shared blobs save")
    du.add_argument("path", metavar="PATH", help="the store directory")
    du.set_defaults(func=cmd_du)
