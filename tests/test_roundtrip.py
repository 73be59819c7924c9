"""State trees round-trip exactly: every type, every dtype, every odd tensor layout, bit for bit."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cairn
from cairn._dtypes import DTYPES
from cairn.backends import MemoryBackend


def same(a: Any, b: Any, path: str = "") -> None:
    """Assert ``b`` is ``a`` rebuilt exactly: same types (tuple stays tuple), values, dtypes and bytes."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), path
        ac, bc = a.detach().resolve_conj().resolve_neg().contiguous(), b.contiguous()
        if a.numel():
            assert ac.reshape(-1).view(torch.uint8).tolist() == bc.reshape(-1).view(torch.uint8).tolist(), (
                path
            )
        return
    if isinstance(a, np.ndarray | np.generic):
        assert type(a) is type(b), path
        assert a.dtype.newbyteorder("=") == b.dtype and np.shape(a) == np.shape(b), path
        assert np.asarray(a).astype(b.dtype).tobytes() == np.asarray(b).tobytes(), path
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
        return
    if isinstance(a, list | tuple):
        assert type(b) is (list if isinstance(a, list) else tuple), path
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}.{i}")
        return
    if isinstance(a, bytearray | memoryview):
        a = bytes(a)
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    elif isinstance(a, float):
        assert a == b and math.copysign(1, a) == math.copysign(1, b), path
    else:
        assert a == b, path


def roundtrip(tmp_path: Path, state: Any, **kw: Any) -> Any:
    cairn.save(tmp_path / "store", state, step=0, **kw)
    return cairn.load(tmp_path / "store")


def test_plain_values_keep_their_types(tmp_path: Path) -> None:
    state = {
        "none": None,
        "t": True,
        "f": False,
        "zero": 0,
        "neg": -7,
        "big": 2**200,
        "negbig": -(2**65),
        "u64": 2**64 - 1,
        "float": 0.1,
        "negzero": -0.0,
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "tiny": 5e-324,
        "str": "héllo ✓ \x00 \n",
        "empty": "",
        "bytes": b"\x00\xff raw",
        "tuple": (1, (2, 3), []),
        "list": [1, [2, {"a": ()}]],
        "intkeys": {0: "a", -1: "b", 2**63: "c", "0": "string zero"},
        "nested": {"a": {"b": {"c": {}}}},
    }
    same(state, roundtrip(tmp_path, state))


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_torch_dtype_is_bit_exact(tmp_path: Path, name: str) -> None:
    dtype = getattr(torch, str(DTYPES[name].torch_name))
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (3 * 5 * DTYPES[name].itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    t = raw.view(dtype).reshape(3, 5)
    state = {"t": t, "scalar": t.reshape(-1)[0].clone(), "empty": torch.empty(0, 4, dtype=dtype)}
    same(state, roundtrip(tmp_path, state))


@pytest.mark.parametrize(
    "dtype",
    [
        *["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"],
        *["float16", "float32", "float64", "complex64", "complex128", ">f4", ">i8", ">c16"],
    ],
)
def test_every_numpy_dtype(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=64, dtype=np.uint8).view(np.dtype(dtype).newbyteorder("<")).copy()
    a = a.astype(np.dtype(dtype)).reshape(2, -1)
    state = {"a": a, "s": a.reshape(-1)[1], "zero_d": np.array(a.reshape(-1)[0]), "empty": a[:0]}
    out = roundtrip(tmp_path, state)
    same(state, out)
    assert out["zero_d"].shape == ()


def test_odd_layouts_are_saved_contiguous(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    z = torch.randn(4, 3, dtype=torch.complex64)
    state = {
        "transposed": base.transpose(0, 2),
        "sliced": base[1:, ::2, 1:4],
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "conj": z.conj(),
        "neg": torch._neg_view(base[0]),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "grad": (torch.ones(2, requires_grad=True) * 2),
        "np_strided": np.arange(20.0).reshape(4, 5)[:, ::2],
        "np_fortran": np.asfortranarray(np.arange(6).reshape(2, 3)),
    }
    out = roundtrip(tmp_path, state)
    same(state, out)
    assert torch.equal(out["conj"], z.conj().resolve_conj())
    assert not out["param"].requires_grad and type(out["param"]) is torch.Tensor


def test_large_tensors_are_chunked(tmp_path: Path) -> None:
    t = torch.randn(1000, 37, dtype=torch.float64)
    info = cairn.save(tmp_path / "s", {"t": t, "small": torch.ones(3)}, chunk_size=4096)
    m = cairn.Store(tmp_path / "s").manifest(info.name)
    chunks = m.tensors[0].shards[0].chunks
    assert len(chunks) == math.ceil(t.numel() * 8 / 4096)
    assert all(c.nbytes <= 4096 for c in chunks)
    assert torch.equal(cairn.load(tmp_path / "s")["t"], t)


def test_stateful_objects_save_their_state_dict(tmp_path: Path) -> None:
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def state_dict(self) -> dict[str, int]:
            return {"n": self.n}

        def load_state_dict(self, sd: dict[str, int]) -> None:
            self.n = sd["n"]

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    c = Counter()
    c.n = 7
    out = roundtrip(tmp_path, {"model": model, "opt": opt, "counter": c})
    same(dict(model.state_dict()), dict(out["model"]))
    same(opt.state_dict(), out["opt"])
    assert out["counter"] == {"n": 7}
    assert out["model"]._metadata == model.state_dict()._metadata  # torch's module versions kept


def test_map_location_and_memory_backend() -> None:
    backend = MemoryBackend()
    cairn.save(backend, {"w": torch.ones(3)}, step=1)
    out = cairn.load(backend, map_location="cpu")
    assert torch.equal(out["w"], torch.ones(3))


def test_loaded_tensors_are_writable_and_independent(tmp_path: Path) -> None:
    t = torch.arange(1 << 19, dtype=torch.float32)  # 2 MiB: memory-mapped when loaded
    cairn.save(tmp_path / "s", {"t": t, "u": t.clone()}, step=0)
    a = cairn.load(tmp_path / "s")
    a["t"] += 1  # copy-on-write: neither the store nor the other tensor changes
    b = cairn.load(tmp_path / "s")
    assert torch.equal(b["t"], t) and torch.equal(a["u"], t)
    assert cairn.Store(tmp_path / "s").verify().ok


# -- property tests ------------------------------------------------------------------------------------

_numpy_dtypes = st.sampled_from(
    ["bool", "int8", "uint16", "int32", "uint64", "float16", "float32", "complex64"]
)
_arrays = _numpy_dtypes.flatmap(
    lambda d: hnp.arrays(np.dtype(d), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)
_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
    | st.binary(max_size=8)
    | _arrays
    | _arrays.map(lambda a: torch.from_numpy(a.copy()))
)
_keys = st.text(max_size=6) | st.integers(-(2**63), 2**64 - 1)
_trees = st.recursive(
    _leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(_keys, children, max_size=4)
    ),
    max_leaves=20,
)


@given(state=st.dictionaries(_keys, _trees, max_size=5))
def test_random_trees_roundtrip(state: dict[Any, Any]) -> None:
    backend = MemoryBackend()
    cairn.save(backend, state, step=0, chunk_size=7)
    same(state, cairn.load(backend))


@given(state=st.dictionaries(st.text(max_size=4), _trees, max_size=4), data=st.data())
def test_key_selection_returns_the_matching_subtree(state: dict[str, Any], data: st.DataObject) -> None:
    backend = MemoryBackend()
    cairn.save(backend, state, step=0)
    if not state:
        assert cairn.load(backend, keys="anything") == {}
        return
    key = data.draw(st.sampled_from(sorted(state)))
    out = cairn.load(backend, keys=[key]) if key else cairn.load(backend)
    assert key in out
    same(state[key], out[key])


_KEY = st.sampled_from(["a", "b", "ab", "a.b", "x[0]", "*", "0"])
_TREES = st.recursive(
    st.integers(0, 9),
    lambda kids: st.dictionaries(_KEY, kids, max_size=3) | st.lists(kids, max_size=3),
    max_leaves=12,
)


_PATTERN = st.text("ab0.*?[]x", max_size=6) | st.lists(_KEY | st.just("a*"), min_size=1, max_size=3).map(
    ".".join
)


@given(_TREES, st.lists(_PATTERN, min_size=1, max_size=3))
@example({"a": {"b": 1, "ab": [2]}, "b": 3}, ["a.b"])
@example({"x[0]": [1, {"a": 2}], "x0": 3}, ["x[0].1.a"])
@example({"ab": {"a": 1}, "b": {"a": 2}}, ["a*.a", "?.a"])
def test_key_selection_walks_only_what_can_match_and_selects_as_globs_do(
    tree: Any, patterns: list[str]
) -> None:
    """``keys=`` skips containers no pattern can reach into; what it selects is exactly what testing
    every path against the globs (literally, by fnmatch, or as a prefix) selects."""
    import fnmatch

    from cairn._tree import decode_tree, encode_tree, key_matcher

    node, arrays = encode_tree(tree)
    assert not arrays

    def brute(path: str) -> bool:
        return any(path == p or fnmatch.fnmatchcase(path, p) or path.startswith(p + ".") for p in patterns)

    fast = key_matcher(patterns)
    assert fast is not None
    assert decode_tree(node, lambda i: None, fast) == decode_tree(node, lambda i: None, brute)
