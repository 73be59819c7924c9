"""Moving checkpoints out of a store: export to ``.safetensors`` or ``torch.save`` files, and copy between
stores sending only the blobs the destination lacks.

Both read through the same checks as :meth:`Store.load`: every manifest is validated and every chunk is
size-checked and hashed before its bytes go anywhere, so damaged data is never exported or copied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import blake3
import numpy as np

from cairn._atomic import atomic_file
from cairn._manifest import LIMITS, Manifest, TensorEntry, check_name, parse_manifest
from cairn._read import TensorReader, blob_path
from cairn._store import Store
from cairn._tree import format_path, key_matcher
from cairn._verify import Problem
from cairn.errors import (
    BackendError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ManifestError,
    UnsupportedVersionError,
)

__all__ = [
    "CopiedCheckpoint",
    "CopyReport",
    "ExportReport",
    "copy_checkpoints",
    "default_prefix",
    "export_checkpoint",
    "export_format",
]

Progress = Callable[[int, int], None]

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_GLOB_CHARS = frozenset("*?[]")
_NOT_IN_SAFETENSORS = frozenset({"C32", "C128"})
"""cairn dtypes that the safetensors format has no name for."""
_RAW = {1: "U8", 2: "U16", 4: "U32", 8: "U64", 16: "C128"}
"""A numpy-readable dtype of each item size: tensors are read as raw bytes of their shape, no torch needed."""
_WORKERS = 8


# ------------------------------------------------------------------------------------------------ export


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_checkpoint` wrote."""

    store: str
    checkpoint: str
    step: int
    path: str
    format: str
    """``"safetensors"`` or ``"torch"``."""
    tensors: list[str]
    """The names of the tensors in the file, in checkpoint order (after prefix stripping)."""
    nbytes: int
    """Logical size of those tensors."""
    values: list[str]
    """Plain (non-tensor) values selected, by their exported name: in ``cairn.values`` of a safetensors
    file's metadata; left out of a ``torch.save`` file, which holds tensors only."""
    prefix: str
    """The prefix stripped from every name that started with it (``""``: none)."""
    file_bytes: int


def export_format(path: str | os.PathLike[str]) -> str:
    """``"safetensors"`` or ``"torch"`` from the file name's suffix; :class:`ValueError` for any other."""
    name = os.fspath(path).lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        return "safetensors"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    suffixes = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
    raise ValueError(f"{os.fspath(path)}: cannot tell the format from the suffix; use one of {suffixes}")


def default_prefix(keys: list[str] | None) -> str | None:
    """The prefix stripped when none is given: ``P.`` when ``keys`` is a single pattern ``P`` or ``P.*``
    with no glob characters in ``P`` (one subtree), else None."""
    if not keys or len(keys) != 1:
        return None
    pattern = keys[0].removesuffix(".*")
    if not pattern or _GLOB_CHARS & set(pattern) or pattern.endswith("."):
        return None
    return pattern + "."


def _leaves(m: Manifest) -> Iterator[tuple[str, Any]]:
    """Every leaf of the state tree: (dotted key, tree node); empty containers are leaves."""

    def visit(node: Any, path: tuple[str | int, ...]) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            if "object" in node:
                yield from visit(node["state"], path)
                return
            for tag in ("dict", "list", "tuple"):
                if node.get(tag):
                    if tag == "dict":
                        for k, child in node[tag]:
                            yield from visit(child, (*path, k))
                    else:
                        for i, child in enumerate(node[tag]):
                            yield from visit(child, (*path, i))
                    return
        yield format_path(path), node

    return visit(m.tree, ())


def _rename(names: list[str], prefix: str) -> list[str]:
    return [n.removeprefix(prefix) if prefix else n for n in names]


def _write_error(path: str, e: OSError) -> BackendError:
    return BackendError(e.errno, f"cannot write {path}: {e.strerror or e}")


def export_checkpoint(
    store: Store,
    name: str,
    path: str | os.PathLike[str],
    *,
    keys: list[str] | None = None,
    strip_prefix: str | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """Write the tensors of checkpoint ``name`` (``"latest"`` allowed) to a ``.safetensors`` file or a
    weights-only ``torch.save`` file (``.pt``, ``.pth``, ``.bin``), chosen by ``path``'s suffix.

    ``keys`` selects leaves as ``Store.load(keys=...)`` does (globs over dotted keys, a key also selects
    everything below it). Tensors are named by their dotted key, minus ``strip_prefix``: ``None`` means
    the :func:`default_prefix` of ``keys`` (``keys=["model"]`` strips ``model.``), ``""`` keeps full
    keys, and ``"P"`` or ``"P."`` strips ``P.`` from every name that starts with it (at least one must).
    Both kinds of arrays, torch and numpy, become tensors of the same dtype and shape.

    A safetensors file is written tensor by tensor (memory holds one tensor at a time); its
    ``__metadata__`` holds ``format`` (``"pt"``) and ``cairn.checkpoint``, ``cairn.step``,
    ``cairn.time``, ``cairn.metrics``, ``cairn.metadata``, ``cairn.values`` (JSON: the selected plain
    values as manifest tree nodes, by exported name) and ``cairn.prefix``. A torch file holds
    ``{name: tensor}`` only, readable with ``torch.load(path, weights_only=True)``. Either is written
    atomically: the old file, if any, stays until the new one is complete and durable. Every chunk is
    hashed as it is read; damage raises :class:`~cairn.errors.CorruptCheckpointError` (naming the
    checkpoint, key and blob) and leaves no file. Bad arguments raise :class:`ValueError`.
    """
    out = os.fspath(path)
    fmt = export_format(out)
    m = store.manifest(name)
    select = key_matcher(keys or None)  # the selection of Store.load(keys=...) and cairn show --key
    tensors = [t for t in m.tensors if select is None or select(t.path)]
    if keys and not tensors:
        patterns = ", ".join(repr(k) for k in keys)
        raise ValueError(f"no tensor of checkpoint {m.name!r} matches the keys {patterns}")
    if not tensors:
        raise ValueError(f"checkpoint {m.name!r} holds no tensors; nothing to export")
    values = [(k, node) for k, node in _leaves(m) if not _is_tensor(node) and (select is None or select(k))]
    full = [t.path for t in tensors] + [k for k, _ in values]
    prefix = _prefix(full, keys, strip_prefix)
    names = _rename([t.path for t in tensors], prefix)
    value_names = _rename([k for k, _ in values], prefix)
    _check_names(m.name, [t.path for t in tensors], names, prefix)
    if fmt == "safetensors":
        for t in tensors:
            if t.dtype in _NOT_IN_SAFETENSORS:
                raise ValueError(
                    f"checkpoint {m.name!r}, key {t.path!r}: dtype {t.dtype} has no safetensors name; "
                    "export it to a .pt file, or leave it out of the selected keys"
                )
    reader = TensorReader(store.backend, m.name)
    total = sum(t.nbytes for t in tensors)
    if progress:
        progress(0, total)
    if fmt == "safetensors":
        meta = {
            "format": "pt",
            "cairn.checkpoint": m.name,
            "cairn.step": str(m.step),
            "cairn.time": m.time,
            "cairn.metrics": _json(dict(m.metrics)),
            "cairn.metadata": _json(dict(m.metadata)),
            "cairn.values": _json(dict(zip(value_names, (n for _, n in values), strict=True))),
            "cairn.prefix": prefix,
        }
        size = _write_safetensors(out, reader, tensors, names, meta, total, progress)
    else:
        size = _write_torch(out, reader, tensors, names, total, progress)
    return ExportReport(
        store=store.url,
        checkpoint=m.name,
        step=m.step,
        path=out,
        format=fmt,
        tensors=names,
        nbytes=total,
        values=value_names,
        prefix=prefix,
        file_bytes=size,
    )


def _is_tensor(node: Any) -> bool:
    return isinstance(node, dict) and "tensor" in node


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _prefix(full: list[str], keys: list[str] | None, strip_prefix: str | None) -> str:
    if strip_prefix is None:
        auto = default_prefix(keys)
        return auto if auto is not None and all(k.startswith(auto) for k in full) else ""
    if not strip_prefix:
        return ""
    prefix = strip_prefix if strip_prefix.endswith(".") else strip_prefix + "."
    if not any(k.startswith(prefix) for k in full):
        raise ValueError(
            f"no selected key starts with {prefix!r}: there is no prefix {strip_prefix!r} to strip"
        )
    return prefix


def _check_names(checkpoint: str, keys: list[str], names: list[str], prefix: str) -> None:
    seen: dict[str, str] = {}
    for key, name in zip(keys, names, strict=True):
        if not name:
            raise ValueError(
                f"checkpoint {checkpoint!r}: the tensor at the root of the state has no key to name it by"
            )
        if name in seen:
            why = f" once {prefix!r} is stripped" if prefix else ""
            raise ValueError(
                f"checkpoint {checkpoint!r}: keys {seen[name]!r} and {key!r} both export as {name!r}{why}; "
                "select only one of them" + (", or keep the full keys" if prefix else "")
            )
        seen[name] = key


def _raw(reader: TensorReader, t: TensorEntry) -> memoryview:
    """The verified bytes of ``t`` (C order), read as an unsigned array of its item size: no torch."""
    arr = reader.read(replace(t, kind="numpy", dtype=_RAW[t.itemsize]))
    return memoryview(arr.reshape(-1).view(np.uint8))


def _write_safetensors(
    out: str,
    reader: TensorReader,
    tensors: list[TensorEntry],
    names: list[str],
    meta: dict[str, str],
    total: int,
    progress: Progress | None,
) -> int:
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for t, name in zip(tensors, names, strict=True):
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    done = 0
    with atomic_file(out) as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for t in tensors:
            f.write(_raw(reader, t))
            done += t.nbytes
            if progress:
                progress(done, total)
    return 8 + len(head) + offset


def _write_torch(
    out: str,
    reader: TensorReader,
    tensors: list[TensorEntry],
    names: list[str],
    total: int,
    progress: Progress | None,
) -> int:
    import torch

    state: dict[str, Any] = {}
    done = 0
    for t, name in zip(tensors, names, strict=True):
        state[name] = reader.read(replace(t, kind="torch"))
        done += t.nbytes
        if progress:
            progress(done, total)
    with atomic_file(out) as f:
        torch.save(state, f)
        size = f.tell()
    return size


# -------------------------------------------------------------------------------------------------- copy


@dataclass
class CopiedCheckpoint:
    """One checkpoint of a copy: what happened to it and what it cost."""

    name: str
    step: int | None
    """None when its manifest could not be read."""
    status: str
    """``"copied"``, ``"skipped"`` (the destination holds the identical manifest) or ``"failed"``."""
    nbytes: int = 0
    """Logical size of its tensors."""
    blobs_sent: int = 0
    """Blobs written to the destination for it (a blob shared with an earlier one of the same copy is
    counted there)."""
    bytes_sent: int = 0
    problem: Problem | None = None
    """Why it failed."""


@dataclass
class CopyReport:
    """The outcome of :func:`copy_checkpoints`."""

    src: str
    dst: str
    checkpoints: list[CopiedCheckpoint] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no checkpoint failed."""
        return not self.failed

    @property
    def copied(self) -> list[str]:
        """Names of the checkpoints committed to the destination by this copy."""
        return [c.name for c in self.checkpoints if c.status == "copied"]

    @property
    def skipped(self) -> list[str]:
        """Names of the checkpoints the destination already held, byte for byte."""
        return [c.name for c in self.checkpoints if c.status == "skipped"]

    @property
    def failed(self) -> list[str]:
        """Names of the checkpoints not copied because of a problem (see each one's ``problem``)."""
        return [c.name for c in self.checkpoints if c.status == "failed"]

    @property
    def problems(self) -> list[Problem]:
        """The problems of the failed checkpoints."""
        return [c.problem for c in self.checkpoints if c.problem is not None]

    @property
    def blobs_sent(self) -> int:
        """Blobs written to the destination."""
        return sum(c.blobs_sent for c in self.checkpoints)

    @property
    def bytes_sent(self) -> int:
        """Bytes of the blobs written to the destination."""
        return sum(c.bytes_sent for c in self.checkpoints)

    @property
    def nbytes(self) -> int:
        """Logical size of the checkpoints copied: what a copy without deduplication would send."""
        return sum(c.nbytes for c in self.checkpoints if c.status == "copied")


class _BlobProblem(Exception):
    """What is wrong with a blob of the source, to complete "blob <hash> ..."."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _read_manifest(store: Store, name: str) -> tuple[bytes, Manifest]:
    """The bytes of checkpoint ``name``'s manifest file and the manifest, validated."""
    path = f"checkpoints/{name}.json"
    where = f"{store.url}/{path}"
    try:
        size = store.backend.size(path)
        if size is not None and size > LIMITS.manifest_bytes:
            raise ManifestError(f"{where}: {size} bytes is over the {LIMITS.manifest_bytes}-byte limit")
        data = store.backend.read(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"no checkpoint {name!r} in {store.url}; `cairn ls {store.url}` lists the checkpoints"
        ) from None
    except BackendError as e:
        raise ManifestError(f"{where}: {e}") from None
    m = parse_manifest(data, where)
    if m.name != name:
        raise ManifestError(f"{where}: the manifest says it is {m.name!r}, not {name!r}")
    return data, m


def _blob_sizes(m: Manifest) -> dict[str, tuple[int, str]]:
    """Every blob of ``m`` in order: its size and the first key that uses it."""
    out: dict[str, tuple[int, str]] = {}
    for t in m.tensors:
        for s in t.shards:
            for c in s.chunks:
                out.setdefault(c.blob, (c.offset + c.nbytes, t.path))
    return out


def _read_blob(src: Store, blob: str, size: int) -> memoryview:
    """The bytes of ``blob`` in ``src``, checked for size and hash."""
    path = blob_path(blob)
    try:
        actual = src.backend.size(path)
        if actual is None:
            raise _BlobProblem(f"is missing from {src.url}")
        if actual != size:
            raise _BlobProblem(f"has {actual} bytes in {src.url}, expected {size} (truncated or damaged)")
        data = src.backend.map(path)
        if data is None or data.nbytes != size:
            data = memoryview(bytearray(size))
            if src.backend.readinto(path, data) != size:
                raise _BlobProblem(f"changed in {src.url} while it was read")
    except FileNotFoundError:
        raise _BlobProblem(f"is missing from {src.url}") from None
    except BackendError as e:
        raise _BlobProblem(f"cannot be read from {src.url}: {e}") from None
    if blake3.blake3(data).hexdigest() != blob:
        raise _BlobProblem(f"in {src.url}: its bytes do not match their hash (damaged)")
    return data


def _keep_name(dst: Store, path: str) -> bool:
    """Make a blob ``dst`` already holds count for the commit as a save does when it reuses one: ``create``
    of an existing name writes nothing but refreshes its age for gc and makes its name durable at the next
    flush. The data passed is the blob itself (a zero-copy map where the backend has one), so that were it
    deleted meanwhile it is recreated with its true bytes. False if the blob is gone."""
    try:
        data = dst.backend.map(path)
        if data is None:
            data = memoryview(dst.backend.read(path))
    except FileNotFoundError:
        return False
    dst.backend.create(path, data)
    return True


def copy_checkpoints(
    src: Store, dst: Store, names: list[str] | None = None, progress: Progress | None = None
) -> CopyReport:
    """Copy checkpoints ``names`` (default: every one) of ``src`` into ``dst``, sending only the blobs
    ``dst`` lacks.

    For each checkpoint, oldest step first: its manifest is read and validated; if ``dst`` already has
    a manifest of that name with the same bytes the checkpoint is skipped, with other bytes it fails (a
    name collision: nothing is overwritten). Otherwise every blob it references that ``dst`` does not
    hold (by name and size) is read from ``src``, its size and hash verified, and created in ``dst``;
    then ``dst`` is flushed, and the manifest file is created in ``dst`` byte for byte (so its digest
    stays valid) and flushed: the commit protocol of a save, so a copy interrupted at any point leaves
    ``dst`` with complete checkpoints only. A checkpoint with a missing or damaged blob in ``src``
    fails and no manifest of it is written (blobs already sent for it are unreferenced, for ``gc``);
    the others are still copied. Failures are reported, not raised: check :attr:`CopyReport.ok`.
    Errors of ``dst`` itself (disk full, I/O errors) are raised.

    Blobs ``dst`` already holds are trusted by name and size, as a save trusts them (``cairn verify``
    hashes them). Chunks are copied as they are: a manifest names its blobs, so when the two stores
    have different ``chunk_size`` settings the copied checkpoints keep ``src``'s chunking, which
    ``dst`` reads like its own; only deduplication between them and later saves into ``dst`` suffers.
    Pins are not copied. The whole copy holds ``dst``'s ``gc`` lock shared, as a save does.
    ``progress(done, total)`` is called with the bytes sent so far and the bytes to send.
    """
    if src.url == dst.url:
        raise ValueError(f"{src.url}: the source and destination are the same store")
    wanted = src.names() if names is None else list(dict.fromkeys(check_name(n) for n in names))
    report = CopyReport(src.url, dst.url)
    plan: list[tuple[CopiedCheckpoint, bytes, Manifest]] = []
    for name in wanted:
        try:
            data, m = _read_manifest(src, name)
        except (CorruptCheckpointError, UnsupportedVersionError) as e:
            report.checkpoints.append(CopiedCheckpoint(name, None, "failed", problem=Problem(name, str(e))))
            continue
        plan.append((CopiedCheckpoint(name, m.step, "copied", nbytes=m.nbytes), data, m))
    plan.sort(key=lambda p: (p[2].step, p[2].time, p[2].name))
    with dst.backend.lock("gc", shared=True):
        todo: list[tuple[CopiedCheckpoint, bytes, Manifest]] = []
        missing: dict[str, int] = {}  # blob -> size, for the blobs dst lacks
        checked: set[str] = set()
        for entry, data, m in plan:
            if _collides(dst, entry, data):
                report.checkpoints.append(entry)
                continue
            todo.append((entry, data, m))
            for blob, (size, _) in _blob_sizes(m).items():
                if blob not in checked and dst.backend.size(blob_path(blob)) != size:
                    missing[blob] = size
                checked.add(blob)
        total = sum(missing.values())
        sent: dict[str, _BlobProblem | None] = {}  # blob -> None once in dst, else why it cannot be sent
        done = 0
        if progress:
            progress(0, total)
        with ThreadPoolExecutor(_WORKERS, thread_name_prefix="cairn-copy") as pool:
            for entry, data, m in todo:
                report.checkpoints.append(entry)
                blobs = _blob_sizes(m)
                new = [b for b in blobs if b in missing and b not in sent]
                for blob, problem in zip(
                    new, pool.map(lambda b: _send(src, dst, b, missing[b]), new), strict=True
                ):
                    sent[blob] = problem
                    if problem is None:
                        entry.blobs_sent += 1
                        entry.bytes_sent += missing[blob]
                    done += missing[blob]
                    if progress:
                        progress(done, total)
                bad = next(((b, sent[b]) for b in blobs if sent.get(b) is not None), None)
                if bad is None:
                    bad = _keep_present(src, dst, blobs, missing, sent)
                if bad is not None:
                    blob, problem = bad
                    assert problem is not None
                    key = blobs[blob][1]
                    message = f"checkpoint {m.name!r}, key {key!r}: blob {blob} {problem.what}; not copied"
                    entry.status = "failed"
                    entry.problem = Problem(m.name, message, key, blob)
                    continue
                dst.backend.flush()  # every blob durable before the manifest that names it
                if not dst.backend.create(f"checkpoints/{m.name}.json", data):
                    _collides(dst, entry, data)  # created by another writer meanwhile: same bytes or not
                    continue
                dst.backend.flush()  # the commit is durable
    order = {n: i for i, n in enumerate(wanted)}
    report.checkpoints.sort(key=lambda c: (c.step is None, c.step or 0, order[c.name]))
    return report


def _collides(dst: Store, entry: CopiedCheckpoint, data: bytes) -> bool:
    """True (and ``entry`` marked skipped or failed) when ``dst`` has a manifest of ``entry``'s name."""
    path = f"checkpoints/{entry.name}.json"
    try:
        existing = dst.backend.read(path) if dst.backend.size(path) is not None else None
    except FileNotFoundError:
        existing = None
    if existing is None:
        return False
    if existing == data:
        entry.status = "skipped"
    else:
        entry.status = "failed"
        entry.problem = Problem(
            entry.name,
            f"checkpoint {entry.name!r} already exists in {dst.url} with different contents; "
            "checkpoints are never overwritten: delete it there first, or copy into another store",
        )
    return True


def _send(src: Store, dst: Store, blob: str, size: int) -> _BlobProblem | None:
    """Copy one blob, verified; the problem instead when ``src``'s copy is missing or damaged."""
    try:
        data = _read_blob(src, blob, size)
    except _BlobProblem as e:
        return e
    path = blob_path(blob)
    existing = dst.backend.size(path)
    if existing is not None and existing != size:  # a damaged copy under this name: replace it
        dst.backend.delete(path)
    dst.backend.create(path, data)
    return None


def _keep_present(
    src: Store,
    dst: Store,
    blobs: dict[str, tuple[int, str]],
    missing: dict[str, int],
    sent: dict[str, _BlobProblem | None],
) -> tuple[str, _BlobProblem | None] | None:
    """Make the blobs ``dst`` already held count for this commit; a blob gone meanwhile is sent instead."""
    for blob, (size, _) in blobs.items():
        if blob in missing or blob in sent:
            continue
        if not _keep_name(dst, blob_path(blob)):
            problem = _send(src, dst, blob, size)
            if problem is not None:
                return blob, problem
        sent[blob] = None
    return None
