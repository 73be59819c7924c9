"""Importing weights from other formats: ``.safetensors`` (parsed here, validated like a manifest) and
``torch.save`` files (through ``torch.load(weights_only=True)`` only; anything needing full unpickling is
refused with the reason)."""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from collections.abc import Mapping
from typing import Any

from cairn._atomic import atomic_file
from cairn._codec import allocate, encode_array
from cairn._dtypes import by_name
from cairn._info import CheckpointInfo
from cairn._manifest import LIMITS, strict_json_loads
from cairn._store import Store
from cairn.errors import ManifestError, SerializationError

__all__ = ["import_file", "read_safetensors", "read_torch_weights", "write_safetensors"]

SAFETENSORS_HEADER_LIMIT = 100_000_000
"""safetensors' own cap on the JSON header."""


def _looks_like_safetensors(head: bytes) -> bool:
    return (
        len(head) >= 9
        and int.from_bytes(head[:8], "little") <= SAFETENSORS_HEADER_LIMIT
        and head[8:9] == b"{"
    )


def read_safetensors(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors (torch, CPU) and the ``__metadata__`` of a ``.safetensors`` file, fully validated."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ManifestError(f"{path}: too short to be a safetensors file")
        n = int.from_bytes(head, "little")
        if n > SAFETENSORS_HEADER_LIMIT or 8 + n > size:
            raise ManifestError(f"{path}: safetensors header length {n} is impossible for a {size}-byte file")
        header = strict_json_loads(f.read(n), f"{path} (safetensors header)", SAFETENSORS_HEADER_LIMIT)
        meta = header.pop("__metadata__", {}) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ManifestError(f"{path}: __metadata__ must map strings to strings")
        spans: list[tuple[int, int, str]] = []
        for key, entry in header.items():
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                raise ManifestError(f"{path}: tensor {key!r} needs exactly dtype, shape and data_offsets")
            dt = by_name(entry["dtype"]) if isinstance(entry["dtype"], str) else None
            shape, offsets = entry["shape"], entry["data_offsets"]
            if dt is None or dt.torch_name is None:
                raise ManifestError(
                    f"{path}: tensor {key!r} has unsupported dtype {str(entry['dtype'])[:20]!r}"
                )
            if not isinstance(shape, list) or len(shape) > LIMITS.rank or not all(_uint(d) for d in shape):
                raise ManifestError(f"{path}: tensor {key!r} has an invalid shape")
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(_uint(o) for o in offsets):
                raise ManifestError(f"{path}: tensor {key!r} has invalid data_offsets")
            begin, end = offsets
            if end - begin != math.prod(shape) * dt.itemsize:
                raise ManifestError(
                    f"{path}: tensor {key!r} is {end - begin} bytes but its shape needs more/less"
                )
            spans.append((begin, end, key))
        spans.sort()
        pos = 0
        for begin, end, key in spans:  # the buffer must be covered exactly: no holes, no overlaps
            if begin != pos:
                raise ManifestError(f"{path}: tensor {key!r} does not start where the previous one ended")
            pos = end
        if 8 + n + pos != size:
            raise ManifestError(
                f"{path}: the data section is {size - 8 - n} bytes, the header describes {pos}"
            )
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    tensors: dict[str, Any] = {}
    base = 8 + n
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        out = allocate("torch", entry["dtype"], tuple(entry["shape"]))
        if data is not None and end > begin:
            out.buffer[:] = data[base + begin : base + end]
        tensors[key] = out.value
    return tensors, dict(meta)


def _uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= LIMITS.tensor_bytes


def read_torch_weights(path: str) -> Any:
    """The contents of a ``torch.save`` file, loaded with ``weights_only=True`` (tensors and plain values)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError... for files it refuses
        lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
        reason = next(
            (ln for ln in lines if "Unpickler error" in ln), lines[0] if lines else type(e).__name__
        )
        raise SerializationError(
            f"{path}: cannot import it safely: torch.load(weights_only=True) refused it ({reason}). "
            "Loading it fully would unpickle arbitrary objects, which can run code; cairn will not. "
            "Re-save only the state_dict (tensors and plain values) where the file came from."
        ) from None


def import_file(
    source: str | os.PathLike[str], store: Store, *, step: int | None = None, name: str | None = None
) -> CheckpointInfo:
    """Save the weights of a ``.safetensors`` or weights-only ``torch.save`` file as a new checkpoint."""
    path = os.fspath(source)
    with open(path, "rb") as f:
        head = f.read(16)
    metadata: dict[str, Any] = {"imported_from": os.path.basename(path)}
    if _looks_like_safetensors(head):
        state, meta = read_safetensors(path)
        metadata.update(format="safetensors", safetensors_metadata=meta)
    elif head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        state = read_torch_weights(path)
        metadata["format"] = "torch"
    else:
        raise SerializationError(f"{path}: not a .safetensors or torch.save file; nothing to import")
    return store.save(state, step=step, name=name, metadata=metadata)


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Any], metadata: Mapping[str, str]
) -> int:
    """Write ``tensors`` (torch, any device) as a ``.safetensors`` file, atomically and durably: a temp
    file in the same directory, fsync, rename over ``path``, fsync of the directory. Returns its size."""
    encoded = {name: encode_array(t, name) for name, t in tensors.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, arr in encoded.items():
        header[name] = {
            "dtype": arr.dtype.name,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with atomic_file(path) as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for arr in encoded.values():
            f.write(arr.data)
    return 8 + len(head) + offset
