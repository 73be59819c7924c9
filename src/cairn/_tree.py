"""State trees <-> manifest tree nodes: every Python value keeps its type, arrays go to the tensor table.

A tree node is JSON: ``null``, ``true``/``false``, a string, an integer, a float (always written with a
``.`` or an exponent), or an object with exactly one tag key:
``{"int": "0x..."}`` (integers beyond 64 bits), ``{"float": "nan"|"inf"|"-inf"}``, ``{"bytes": base64}``,
``{"list": [...]}``, ``{"tuple": [...]}``, ``{"dict": [[key, node], ...]}`` (keys str or int, order kept),
``{"tensor": index}`` (into the manifest's tensor table) and ``{"object": type name, "state": node}``
(an object saved through ``state_dict()``; its type name is informational and never imported).
"""

from __future__ import annotations

import base64
import fnmatch
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cairn._codec import EncodedArray, encode_array, is_array
from cairn.errors import SerializationError

__all__ = [
    "MAX_TREE_DEPTH",
    "Stateful",
    "array_sizes",
    "decode_tree",
    "encode_tree",
    "format_path",
    "is_stateful",
    "key_matcher",
]

MAX_TREE_DEPTH = 64
"""The deepest nesting of containers a saved state may have."""

_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1

Key = str | int
Path = tuple[Key, ...]


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``: modules, optimizers, schedulers, your own."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


def is_stateful(value: object) -> bool:
    """True if ``value`` is saved through ``state_dict()`` (and restored through ``load_state_dict()``)."""
    return (
        not isinstance(value, type)
        and callable(getattr(value, "state_dict", None))
        and callable(getattr(value, "load_state_dict", None))
    )


class KeyMatcher:
    """A test of dotted key paths against glob patterns (see :func:`key_matcher`); it also tells which
    containers cannot hold a match, so that a selective walk skips them."""

    def __init__(self, globs: list[str]) -> None:
        self.globs = globs
        self._literal = [re.split(r"[*?\[]", p, maxsplit=1)[0] for p in globs]  # before the first glob char
        self._exact = set(globs)
        self._prefixes = tuple(p + "." for p in globs)
        wild = [fnmatch.translate(p) for p, lit in zip(globs, self._literal, strict=True) if lit != p]
        self._glob = re.compile("|".join(f"(?:{w})" for w in wild)) if wild else None

    def __call__(self, path: str) -> bool:
        return (
            path in self._exact
            or path.startswith(self._prefixes)
            or (self._glob is not None and self._glob.match(path) is not None)
        )

    def may_hold(self, path: str) -> bool:
        """False only if neither ``path`` nor anything below it can match: every match of a pattern
        starts with the pattern's literal prefix."""
        below = path + "."
        return any(below.startswith(lit) or lit.startswith(below) for lit in self._literal)


def key_matcher(patterns: str | Iterable[str] | None) -> KeyMatcher | None:
    """A test of dotted key paths against glob ``patterns`` (None: no selection). A pattern also matches
    itself literally (keys may hold glob characters: ``"[0]"``) and everything below it (``"model"``
    selects ``"model.fc.weight"``). The selection of ``load(keys=)``, ``restore(include=/exclude=)`` and
    the command line's ``--key``."""
    if patterns is None:
        return None
    return KeyMatcher([patterns] if isinstance(patterns, str) else list(patterns))


def format_path(path: Path) -> str:
    """The dotted form of a key path, as shown to users and matched by ``keys=`` globs."""
    return ".".join(str(k) for k in path)


def _type_name(value: object) -> str:
    t = type(value)
    return f"{t.__module__}.{t.__qualname__}"


class _Encoder:
    def __init__(self) -> None:
        self.arrays: list[tuple[str, EncodedArray]] = []

    def encode(self, value: Any, path: Path) -> Any:
        if len(path) > MAX_TREE_DEPTH:
            raise SerializationError(
                f"{format_path(path[:8])}...: the state is nested deeper than {MAX_TREE_DEPTH} levels "
                "(a container that contains itself?)"
            )
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, np.generic) and not isinstance(value, str | bytes):
            return self._array(value, path)  # before float: numpy's float64 is a float subclass
        if isinstance(value, int):
            if _INT64_MIN <= value <= _UINT64_MAX:
                return int(value)
            return {"int": hex(value)}
        if isinstance(value, float):
            if math.isfinite(value):
                return float(value)
            return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise SerializationError(
                    f"{self._where(path)}: the string is not valid Unicode (lone surrogates); "
                    "store it as bytes instead"
                ) from None
            return str(value)
        if isinstance(value, bytes | bytearray | memoryview):
            return {"bytes": base64.b64encode(bytes(value)).decode("ascii")}
        if is_array(value):
            return self._array(value, path)
        if isinstance(value, Mapping):
            return {"dict": self._encode_items(value, path)}
        if isinstance(value, list):
            return {"list": [self.encode(v, (*path, i)) for i, v in enumerate(value)]}
        if isinstance(value, tuple):
            return {"tuple": [self.encode(v, (*path, i)) for i, v in enumerate(value)]}
        if is_stateful(value):
            state = value.state_dict()
            node: dict[str, Any] = {"object": _type_name(value), "state": self.encode(state, path)}
            meta = getattr(state, "_metadata", None)
            if isinstance(meta, Mapping):
                meta_encoder = _Encoder()
                node["meta"] = meta_encoder.encode(dict(meta), (*path, "_metadata"))
                if meta_encoder.arrays:
                    raise SerializationError(
                        f"{self._where(path)}._metadata: holds arrays; torch's state-dict metadata must be "
                        "plain values"
                    )
            return node
        raise SerializationError(
            f"{self._where(path)}: cannot save a value of type {_type_name(value)} without pickle. "
            "cairn stores tensors, numpy arrays, None/bool/int/float/str/bytes, dict/list/tuple of "
            "those, and objects with state_dict()/load_state_dict(); convert it to one of these"
        )

    def _encode_items(self, value: Mapping[Any, Any], path: Path) -> list[list[Any]]:
        items: list[list[Any]] = []
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, str | int):
                raise SerializationError(
                    f"{self._where(path)}: dict key {k!r} has type {_type_name(k)}; "
                    "only str and int keys can be stored"
                )
            if isinstance(k, int) and not _INT64_MIN <= k <= _UINT64_MAX:
                raise SerializationError(f"{self._where(path)}: int dict key {k} is beyond 64 bits")
            if isinstance(k, str):
                self.encode(k, (*path, "<key>"))  # checks it is valid Unicode
            items.append([k if isinstance(k, str) else int(k), self.encode(v, (*path, k))])
        return items

    def _array(self, value: Any, path: Path) -> dict[str, int]:
        self.arrays.append((format_path(path), encode_array(value, self._where(path))))
        return {"tensor": len(self.arrays) - 1}

    @staticmethod
    def _where(path: Path) -> str:
        return format_path(path) or "<root>"


def encode_tree(state: Any) -> tuple[Any, list[tuple[str, EncodedArray]]]:
    """Encode a state tree: its manifest node and the arrays it holds, as (dotted path, array) in order."""
    enc = _Encoder()
    node = enc.encode(state, ())
    return node, enc.arrays


def array_sizes(state: Any) -> list[int]:
    """Bytes of each array in ``state`` (none for a state that cannot be encoded: it fails at save)."""
    try:
        return [array.nbytes for _, array in encode_tree(state)[1]]
    except (TypeError, ValueError, SerializationError):
        return []


def decode_tree(
    node: Any,
    resolve: Callable[[int], Any],
    select: Callable[[str], bool] | None = None,
) -> Any:
    """Rebuild the Python tree of a *validated* manifest node.

    ``resolve(i)`` returns tensor ``i`` of the table. With ``select``, only leaves whose dotted path it
    accepts are kept (and only their tensors resolved); containers left empty by that are dropped.
    """
    keep, value = _decode(node, (), resolve, select)
    if keep:
        return value
    return {} if isinstance(node, dict) and "dict" in node else None


def _kept(has_children: bool, was_empty: bool, path: Path, select: Callable[[str], bool] | None) -> bool:
    """A container is kept when unfiltered, when a child was kept, or when it was empty and matches."""
    return select is None or has_children or (was_empty and select(format_path(path)))


def _decode(
    node: Any, path: Path, resolve: Callable[[int], Any], select: Callable[[str], bool] | None
) -> tuple[bool, Any]:
    if isinstance(node, dict):
        container = "dict" in node or "list" in node or "tuple" in node
        if container and path and isinstance(select, KeyMatcher) and not select.may_hold(format_path(path)):
            return False, None  # nothing below can match: not walked
        if "dict" in node:
            out: dict[Any, Any] = {}
            for k, child in node["dict"]:
                keep, v = _decode(child, (*path, k), resolve, select)
                if keep:
                    out[k] = v
            return _kept(bool(out), not node["dict"], path, select), out
        if "list" in node or "tuple" in node:
            tag = "list" if "list" in node else "tuple"
            items = []
            for i, child in enumerate(node[tag]):
                keep, v = _decode(child, (*path, i), resolve, select)
                if keep:
                    items.append(v)
            kept = _kept(bool(items), not node[tag], path, select)
            return kept, (items if tag == "list" else tuple(items))
        if "object" in node:
            keep, state = _decode(node["state"], path, resolve, select)
            if keep and "meta" in node and isinstance(state, dict):
                state = OrderedDict(state)
                _, meta = _decode(node["meta"], (*path, "_metadata"), resolve, None)
                state._metadata = meta  # type: ignore[attr-defined]
            return keep, state
        if select is not None and not select(format_path(path)):
            return False, None
        if "tensor" in node:
            return True, resolve(node["tensor"])
        if "int" in node:
            return True, int(node["int"], 16)
        if "float" in node:
            return True, float(node["float"])
        return True, base64.b64decode(node["bytes"])
    if select is not None and not select(format_path(path)):
        return False, None
    return True, node
