"""The dtype table: cairn's dtype names (safetensors' vocabulary) and their torch and numpy twins.

Names follow safetensors (``F32``, ``BF16``, ``F8_E4M3`` ...) so that exporting to ``.safetensors`` is a
copy. The table is the reader's allow-list: a manifest naming any other dtype is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DTYPES", "DType", "by_name", "by_numpy_str", "by_torch_name"]


@dataclass(frozen=True)
class DType:
    """One storable element type."""

    name: str
    """cairn's (safetensors') name, as written in manifests."""
    itemsize: int
    """Bytes per element."""
    torch_name: str | None
    """Attribute of the ``torch`` module, or None where torch has no such dtype."""
    numpy_name: str | None
    """numpy dtype string (little-endian), or None where numpy has no such dtype."""


_TABLE: tuple[DType, ...] = (
    DType("BOOL", 1, "bool", "|b1"),
    DType("U8", 1, "uint8", "|u1"),
    DType("I8", 1, "int8", "|i1"),
    DType("U16", 2, "uint16", "<u2"),
    DType("I16", 2, "int16", "<i2"),
    DType("U32", 4, "uint32", "<u4"),
    DType("I32", 4, "int32", "<i4"),
    DType("U64", 8, "uint64", "<u8"),
    DType("I64", 8, "int64", "<i8"),
    DType("F16", 2, "float16", "<f2"),
    DType("BF16", 2, "bfloat16", None),
    DType("F32", 4, "float32", "<f4"),
    DType("F64", 8, "float64", "<f8"),
    DType("C32", 4, "complex32", None),
    DType("C64", 8, "complex64", "<c8"),
    DType("C128", 16, "complex128", "<c16"),
    DType("F8_E4M3", 1, "float8_e4m3fn", None),
    DType("F8_E5M2", 1, "float8_e5m2", None),
    DType("F8_E4M3FNUZ", 1, "float8_e4m3fnuz", None),
    DType("F8_E5M2FNUZ", 1, "float8_e5m2fnuz", None),
    DType("F8_E8M0", 1, "float8_e8m0fnu", None),
)

DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}
"""Every dtype a manifest may name, by name."""

_BY_NUMPY: dict[str, DType] = {d.numpy_name.lstrip("<|"): d for d in _TABLE if d.numpy_name is not None}


def by_name(name: str) -> DType | None:
    """The dtype called ``name`` in manifests, or None if it is not on the allow-list."""
    return DTYPES.get(name)


def by_torch_name(torch_name: str) -> DType | None:
    """The dtype for ``torch.<torch_name>`` (e.g. ``"bfloat16"``), or None if cairn cannot store it."""
    for d in _TABLE:
        if d.torch_name == torch_name:
            return d
    return None


def by_numpy_str(kind_and_size: str) -> DType | None:
    """The dtype for a numpy dtype's ``kind + itemsize`` string such as ``"f4"`` or ``"b1"``."""
    return _BY_NUMPY.get(kind_and_size)
