"""Arrays <-> raw bytes: tensors and numpy arrays to (dtype, shape, little-endian C-order bytes) and back.

torch is imported only when a torch tensor is saved or loaded, so the command line and numpy-only users
never pay for it: an object can only be a torch tensor if torch is already imported.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from cairn._dtypes import DType, by_name, by_numpy_str, by_torch_name
from cairn.errors import SerializationError

__all__ = [
    "KINDS",
    "Allocated",
    "EncodedArray",
    "allocate",
    "encode_array",
    "finish",
    "from_buffer",
    "is_array",
]

KINDS = ("torch", "numpy", "numpy-scalar")
"""The array kinds a manifest may name: what ``load`` hands back for that entry."""

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("cairn stores little-endian bytes and supports little-endian hosts only")


@dataclass(frozen=True)
class EncodedArray:
    """An array ready to store: its kind, dtype, shape and its bytes as a flat uint8 view."""

    kind: str
    dtype: DType
    shape: tuple[int, ...]
    data: memoryview
    """Raw little-endian C-order bytes (a 1-D ``B`` view, possibly of the original array's memory)."""

    @property
    def nbytes(self) -> int:
        """Number of bytes of ``data``."""
        return self.data.nbytes


def _torch() -> Any:
    return sys.modules.get("torch")


def is_array(value: object) -> bool:
    """True if ``value`` is a torch tensor, a numpy array or a numpy scalar."""
    if isinstance(value, np.ndarray | np.generic):
        return True
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


def encode_array(value: Any, path: str) -> EncodedArray:
    """Turn a tensor or array into its stored form; ``path`` names it in errors."""
    if isinstance(value, np.ndarray | np.generic):
        return _encode_numpy(value, path)
    return _encode_torch(value, path)


def _encode_numpy(value: np.ndarray[Any, Any] | np.generic, path: str) -> EncodedArray:
    kind = "numpy-scalar" if isinstance(value, np.generic) else "numpy"
    arr = np.asarray(value)
    dt = by_numpy_str(f"{arr.dtype.kind}{arr.dtype.itemsize}") if arr.dtype.kind in "biufc" else None
    if dt is None:
        raise SerializationError(
            f"{path}: numpy dtype {arr.dtype} cannot be stored without pickle; "
            "use a numeric or bool dtype (strings and objects belong in plain Python values)"
        )
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    flat = arr.reshape(-1).view(np.uint8)
    return EncodedArray(kind, dt, tuple(int(d) for d in arr.shape), flat.data)


def _encode_torch(value: Any, path: str) -> EncodedArray:
    torch = _torch()
    assert torch is not None
    t = value.detach()
    if t.layout != torch.strided:
        raise SerializationError(
            f"{path}: a {t.layout} tensor cannot be stored; convert it with .to_dense() first"
        )
    if t.device.type == "meta":
        raise SerializationError(f"{path}: a tensor on the meta device has no data to store")
    torch_name = str(t.dtype).removeprefix("torch.")
    dt = by_torch_name(torch_name)
    if dt is None:
        raise SerializationError(
            f"{path}: torch dtype {torch_name} is not storable (quantized and sub-byte dtypes are not "
            "supported); convert the tensor to a standard dtype first"
        )
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    t = t.contiguous()
    shape = tuple(int(d) for d in t.shape)
    if t.numel() == 0:
        return EncodedArray("torch", dt, shape, memoryview(b""))
    flat = t.reshape(-1).view(torch.uint8).numpy()
    return EncodedArray("torch", dt, shape, flat.data)


@dataclass(frozen=True)
class Allocated:
    """A freshly allocated array and a writable flat byte view of its memory to fill."""

    value: Any
    buffer: memoryview


def allocate(kind: str, dtype_name: str, shape: tuple[int, ...]) -> Allocated:
    """Allocate an uninitialised array of ``kind`` for a validated manifest entry."""
    dt = by_name(dtype_name)
    assert dt is not None, dtype_name
    if kind == "torch":
        import torch

        raw = torch.empty(math.prod(shape) * dt.itemsize, dtype=torch.uint8)
        return Allocated(raw.view(getattr(torch, str(dt.torch_name))).reshape(shape), raw.numpy().data)
    arr = np.empty(shape, dtype=np.dtype(str(dt.numpy_name)))
    return Allocated(arr, arr.reshape(-1).view(np.uint8).data)


def from_buffer(kind: str, dtype_name: str, shape: tuple[int, ...], buffer: Any) -> Any:
    """An array of ``kind`` viewing ``buffer`` (writable, exactly the right size) without a copy."""
    dt = by_name(dtype_name)
    assert dt is not None, dtype_name
    if kind == "torch":
        import torch

        flat = torch.frombuffer(buffer, dtype=torch.uint8)
        return flat.view(getattr(torch, str(dt.torch_name))).reshape(shape)
    return np.frombuffer(buffer, dtype=np.dtype(str(dt.numpy_name))).reshape(shape)


def finish(kind: str, value: Any, map_location: Any = None) -> Any:
    """The final object ``load`` returns for a filled array: scalars unwrapped, tensors moved."""
    if kind == "numpy-scalar":
        return value[()]
    if kind == "torch" and map_location is not None:
        return value.to(map_location)
    return value
