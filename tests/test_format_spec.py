"""The format spec keeps honest: docs/format.md and docs/schema/*.json against what cairn writes and reads.

- every manifest cairn writes (and every one in the golden store) validates against the JSON Schema, and
  so does every store marker;
- broken manifests are rejected by the schema *and* by the reader;
- the dtype and limits tables of docs/format.md, and the constants of the schemas, match the code;
- manifest bytes on disk are canonical JSON plus one newline, with a correct digest;
- the worked example of docs/format.md is what cairn really writes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
import torch
from jsonschema import Draft202012Validator

import cairn
from cairn._codec import KINDS
from cairn._dtypes import DTYPES
from cairn._manifest import LIMITS, canonical_json, parse_manifest
from cairn.errors import CairnError, ManifestError, UnsupportedVersionError

ROOT = Path(__file__).resolve().parent.parent
FORMAT_MD = ROOT / "docs" / "format.md"
SCHEMAS = ROOT / "docs" / "schema"
GOLDEN = Path(__file__).parent / "golden" / "v1"


def _load_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / name).read_text("utf-8"))
    Draft202012Validator.check_schema(schema)
    return schema


MANIFEST_SCHEMA = _load_schema("manifest.schema.json")
STORE_SCHEMA = _load_schema("store.schema.json")
MANIFEST = Draft202012Validator(MANIFEST_SCHEMA)
STORE = Draft202012Validator(STORE_SCHEMA)


def _errors(validator: Draft202012Validator, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]


# --------------------------------------------------------------------------------------- saved states


def _plain() -> Any:
    return {
        "none": None,
        "flags": [True, False],
        "ints": [0, -1, 2**63 - 1, -(2**63), 2**64 - 1],
        "big": [2**64, -(2**63) - 1, 2**200, -(2**100)],
        "floats": [0.0, -0.0, 1.0, 0.1, 1e16, 1.5e-5, -1e300],
        "special": [float("nan"), float("inf"), float("-inf")],
        "str": ["", "cairn ✓", 'quote " backslash \\ newline \n tab \t nul \x00', "𝔘nicode"],
        "bytes": [b"", b"\x00\x01\xff", bytearray(b"ab"), memoryview(b"abc")],
        "tuple": (1, ("nested", (2.5,)), ()),
        "empty": [[], {}, ()],
        7: "int key",
        -3: {2**40: "big int key"},
        "nested": {"a": {"b": {"c": [{"d": ({"e": None},)}]}}},
    }


def _numpy() -> Any:
    return {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "f64": np.linspace(0, 1, 7),
        "f16": np.ones(5, dtype=np.float16),
        "i8": np.array([-1, 0, 1], dtype=np.int8),
        "u16": np.arange(6, dtype=np.uint16),
        "u64": np.array([2**64 - 1], dtype=np.uint64),
        "bool": np.array([[True, False], [False, True]]),
        "c128": np.array([1 + 2j, 3 - 4j]),
        "zero_d": np.array(3.5),
        "empty": np.zeros((0, 4), dtype=np.int32),
        "big_endian": np.arange(4, dtype=">i4"),
        "strided": np.arange(20, dtype=np.int64).reshape(4, 5)[:, ::2],
        "scalars": [np.float32(1.5), np.int64(-7), np.bool_(True), np.complex64(1j), np.float64("nan")],
    }


def _torch() -> Any:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "f32": base,
        "transposed": base.t(),
        "bf16": base.to(torch.bfloat16),
        "f16": base.to(torch.float16),
        "f64": base.to(torch.float64),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(8, dtype=torch.uint8),
        "u16": torch.arange(8).to(torch.uint16),
        "i64": torch.tensor([2**62, -(2**62)]),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.tensor([1 + 1j, 2 - 3j], dtype=torch.complex64),
        "f8e4m3": base.to(torch.float8_e4m3fn),
        "f8e5m2": base.to(torch.float8_e5m2),
        "zero_d": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "big": torch.arange(1000, dtype=torch.float32),  # 4000 bytes: many chunks
    }


def _training() -> Any:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1)
    model(torch.randn(5, 3)).pow(2).mean().backward()
    optim.step()
    sched.step()
    return {"model": model, "optim": optim, "sched": sched, "epoch": 1, "rng": torch.get_rng_state()}


STATES: dict[str, Callable[[], Any]] = {
    "plain": _plain,
    "numpy": _numpy,
    "torch": _torch,
    "training": _training,
    "bare_tensor": lambda: torch.ones(2, 2),
    "bare_list": lambda: [np.zeros(3), "x", (torch.zeros(1),)],
}


def _save(root: Path, state: Any, **kwargs: Any) -> tuple[bytes, bytes]:
    """Save ``state`` in a new store at ``root``; the manifest's and the marker's bytes."""
    info = cairn.save(root, state, chunk_size=64, **kwargs)
    return (root / "checkpoints" / f"{info.name}.json").read_bytes(), (root / "cairn.json").read_bytes()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, bytes]]:
    out = {}
    for i, (name, make) in enumerate(STATES.items()):
        out[name] = _save(
            tmp_path_factory.mktemp(name) / "store",
            make(),
            step=i,
            metrics={"loss": 0.25, "count": 3, "bad": float("nan"), "up": float("inf")},
            metadata={"run": name, "config": {"lr": 0.001, "layers": [1, 2], "ok": True, "none": None}},
        )
    return out


# --------------------------------------------------------------------------- (a) valid documents pass


@pytest.mark.parametrize("state", list(STATES))
def test_saved_manifest_validates_against_schema(saved: dict[str, tuple[bytes, bytes]], state: str) -> None:
    data, _ = saved[state]
    assert _errors(MANIFEST, json.loads(data)) == []


@pytest.mark.parametrize("state", list(STATES))
def test_store_marker_validates_against_schema(saved: dict[str, tuple[bytes, bytes]], state: str) -> None:
    _, marker = saved[state]
    assert _errors(STORE, json.loads(marker)) == []


def test_store_marker_with_custom_chunk_size_validates(tmp_path: Path) -> None:
    cairn.Store(tmp_path / "s", create=True, chunk_size=1)
    assert _errors(STORE, json.loads((tmp_path / "s" / "cairn.json").read_bytes())) == []


def test_golden_store_validates_against_schemas() -> None:
    manifests = sorted((GOLDEN / "checkpoints").glob("*.json"))
    assert manifests, "the golden store has no manifests"
    for path in manifests:
        assert _errors(MANIFEST, json.loads(path.read_bytes())) == [], path.name
    assert _errors(STORE, json.loads((GOLDEN / "cairn.json").read_bytes())) == []


def test_schema_accepts_a_sharded_entry() -> None:
    """Several shards per tensor (the N-writers case), as in the golden store's ``sharded`` checkpoint."""
    doc = json.loads((GOLDEN / "checkpoints" / "sharded.json").read_bytes())
    assert len(doc["tensors"][0]["shards"]) > 1
    assert _errors(MANIFEST, doc) == []


# ------------------------------------------------------------------------- (b) invalid documents fail


@pytest.fixture(scope="module")
def base_manifest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A valid manifest with a torch tensor (entry 0), a numpy array (entry 1) and assorted tree nodes."""
    state = {"w": torch.ones(2, 3), "a": np.arange(3), "x": [1, (2.5,), {"k": b"\x01"}], 5: 2**70}
    data, _ = _save(tmp_path_factory.mktemp("base") / "store", state, step=1)
    doc: dict[str, Any] = json.loads(data)
    assert _errors(MANIFEST, doc) == []
    return doc


def _chunk(doc: dict[str, Any]) -> dict[str, Any]:
    chunk: dict[str, Any] = doc["tensors"][0]["shards"][0]["chunks"][0]
    return chunk


def _set_tree_leaf(doc: dict[str, Any], node: Any) -> None:
    doc["tree"]["dict"].append(["extra", node])


BROKEN: dict[str, tuple[Callable[[dict[str, Any]], None], type[CairnError]]] = {
    "blob uppercase hex": (lambda d: _chunk(d).update(blob=_chunk(d)["blob"].upper()), ManifestError),
    "blob too short": (lambda d: _chunk(d).update(blob=_chunk(d)["blob"][:63]), ManifestError),
    "blob path traversal": (lambda d: _chunk(d).update(blob="../" + "0" * 61), ManifestError),
    "chunk offset not 0": (lambda d: _chunk(d).update(offset=8), ManifestError),
    "chunk nbytes 0": (lambda d: _chunk(d).update(nbytes=0), ManifestError),
    "unknown dtype": (lambda d: d["tensors"][0].update(dtype="F12"), ManifestError),
    "lowercase dtype": (lambda d: d["tensors"][0].update(dtype="f32"), ManifestError),
    "unknown kind": (lambda d: d["tensors"][0].update(kind="jax"), ManifestError),
    "numpy kind with BF16": (lambda d: d["tensors"][1].update(dtype="BF16"), ManifestError),
    "numpy scalar with a shape": (lambda d: d["tensors"][1].update(kind="numpy-scalar"), ManifestError),
    "no shards": (lambda d: d["tensors"][0].update(shards=[]), ManifestError),
    "rank over 64": (lambda d: d["tensors"][0].update(shape=[1] * 65), ManifestError),
    "extra top-level field": (lambda d: d.update(comment="hi"), ManifestError),
    "missing field": (lambda d: d.pop("metrics"), ManifestError),
    "extra tensor field": (lambda d: d["tensors"][0].update(offset=0), ManifestError),
    "extra shard field": (lambda d: d["tensors"][0]["shards"][0].update(rank=0), ManifestError),
    "extra chunk field": (lambda d: _chunk(d).update(crc=0), ManifestError),
    "wrong format": (lambda d: d.update(format="cairn.store"), ManifestError),
    "newer version": (lambda d: d.update(version=2), UnsupportedVersionError),
    "reserved name": (lambda d: d.update(name="latest"), ManifestError),
    "name with a slash": (lambda d: d.update(name="a/b"), ManifestError),
    "negative step": (lambda d: d.update(step=-1), ManifestError),
    "metric is a list": (lambda d: d["metrics"].update(loss=[1]), ManifestError),
    "metadata is a list": (lambda d: d.update(metadata=[]), ManifestError),
    "unknown tree tag": (lambda d: _set_tree_leaf(d, {"set": [1, 2]}), ManifestError),
    "two tags in one node": (lambda d: _set_tree_leaf(d, {"list": [], "tuple": []}), ManifestError),
    "empty object node": (lambda d: _set_tree_leaf(d, {}), ManifestError),
    "big int not hex": (lambda d: _set_tree_leaf(d, {"int": "123"}), ManifestError),
    "special float unknown": (lambda d: _set_tree_leaf(d, {"float": "NaN"}), ManifestError),
    "bytes not base64": (lambda d: _set_tree_leaf(d, {"bytes": "abc"}), ManifestError),
    "dict pair of three": (lambda d: _set_tree_leaf(d, {"dict": [["k", 1, 2]]}), ManifestError),
    "dict key boolean": (lambda d: _set_tree_leaf(d, {"dict": [[True, 1]]}), ManifestError),
    "tensor index negative": (lambda d: _set_tree_leaf(d, {"tensor": -1}), ManifestError),
    "object without state": (lambda d: _set_tree_leaf(d, {"object": "x.Y"}), ManifestError),
    "object with extra key": (
        lambda d: _set_tree_leaf(d, {"object": "x.Y", "state": None, "code": "import os"}),
        ManifestError,
    ),
    "tensor inside meta": (
        lambda d: _set_tree_leaf(d, {"object": "x.Y", "state": None, "meta": {"tensor": 0}}),
        ManifestError,
    ),
}


def _with_digest(body: dict[str, Any]) -> bytes:
    body = dict(body)
    body.pop("digest", None)
    body["digest"] = blake3.blake3(canonical_json(body)).hexdigest()
    return canonical_json(body) + b"\n"


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_manifest_is_rejected_by_schema_and_reader(base_manifest: dict[str, Any], case: str) -> None:
    mutate, error = BROKEN[case]
    doc = copy.deepcopy(base_manifest)
    mutate(doc)
    assert _errors(MANIFEST, doc), f"the schema accepts a manifest with {case}"
    with pytest.raises(error):  # the digest is right: only the broken rule can reject it
        parse_manifest(_with_digest(doc), case)


def test_broken_marker_is_rejected_by_schema(saved: dict[str, tuple[bytes, bytes]]) -> None:
    marker = json.loads(saved["plain"][1])
    for change in ({"hash": "sha256"}, {"chunk_size": 0}, {"version": 2}, {"id": "x"}, {"format": "cairn"}):
        assert _errors(STORE, {**marker, **change}), change


# ------------------------------------------------------------------- (c) the doc's tables and the code


def _table(marker: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table after ``<!-- table:<marker>`` in format.md."""
    lines = FORMAT_MD.read_text("utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"<!-- table:{marker}"))
    rows = []
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(rows) > 2 and set(rows[1][0]) <= {"-", ":"}, f"no table after the {marker} marker"
    return rows[2:]


def _code(cell: str) -> str:
    """The first `code span` of a table cell."""
    match = re.search(r"`([^`]*)`", cell)
    assert match, f"no code span in {cell!r}"
    return match.group(1)


def test_dtype_table_matches_the_code() -> None:
    rows = _table("dtypes")
    assert [_code(r[0]) for r in rows] == list(DTYPES)
    for name, itemsize, torch_cell, numpy_cell, *_ in rows:
        dt = DTYPES[_code(name)]
        assert int(itemsize) == dt.itemsize, dt.name
        assert _code(torch_cell) == f"torch.{dt.torch_name}", dt.name
        assert getattr(torch, str(dt.torch_name)).itemsize == dt.itemsize, dt.name
        if dt.numpy_name is None:
            assert numpy_cell == "—", dt.name
        else:
            assert _code(numpy_cell) == np.dtype(dt.numpy_name).name, dt.name


def test_limits_table_matches_the_code() -> None:
    table = {_code(r[0]): int(_code(r[1])) for r in _table("limits")}
    assert table == dataclasses.asdict(LIMITS)


def test_schema_constants_match_the_code() -> None:
    defs = MANIFEST_SCHEMA["$defs"]
    assert defs["dtype"]["enum"] == list(DTYPES)
    no_numpy = defs["tensor"]["allOf"][1]["then"]["properties"]["dtype"]["not"]["enum"]
    assert no_numpy == [d.name for d in DTYPES.values() if d.numpy_name is None]
    assert tuple(defs["tensor"]["properties"]["kind"]["enum"]) == KINDS
    assert MANIFEST_SCHEMA["properties"]["tensors"]["maxItems"] == LIMITS.tensors
    assert defs["tensor"]["properties"]["shards"]["maxItems"] == LIMITS.shards_per_tensor
    assert defs["tensor"]["properties"]["path"]["maxLength"] == LIMITS.name_chars
    assert defs["dims"]["maxItems"] == LIMITS.rank
    assert defs["dim"]["maximum"] == LIMITS.tensor_bytes
    assert defs["chunk"]["properties"]["nbytes"]["maximum"] == LIMITS.chunk_bytes
    assert STORE_SCHEMA["properties"]["chunk_size"]["maximum"] == LIMITS.chunk_bytes
    assert MANIFEST_SCHEMA["properties"]["version"]["const"] == cairn.FORMAT_VERSION
    assert STORE_SCHEMA["properties"]["version"]["const"] == cairn.FORMAT_VERSION


def test_schema_fields_are_the_fields_cairn_writes(base_manifest: dict[str, Any]) -> None:
    assert set(MANIFEST_SCHEMA["required"]) == set(MANIFEST_SCHEMA["properties"]) == set(base_manifest)
    tensor = base_manifest["tensors"][0]
    assert set(MANIFEST_SCHEMA["$defs"]["tensor"]["required"]) == set(tensor)
    assert set(MANIFEST_SCHEMA["$defs"]["shard"]["required"]) == set(tensor["shards"][0])
    assert set(MANIFEST_SCHEMA["$defs"]["chunk"]["required"]) == set(tensor["shards"][0]["chunks"][0])


# ------------------------------------------------------------------------- (d) canonical bytes on disk


def _assert_canonical_manifest(data: bytes) -> None:
    doc = json.loads(data)
    assert data == canonical_json(doc) + b"\n"
    digest = doc.pop("digest")
    assert digest == blake3.blake3(canonical_json(doc)).hexdigest()


@pytest.mark.parametrize("state", list(STATES))
def test_manifest_bytes_are_canonical(saved: dict[str, tuple[bytes, bytes]], state: str) -> None:
    data, marker = saved[state]
    _assert_canonical_manifest(data)
    assert marker == canonical_json(json.loads(marker)) + b"\n"


def test_golden_manifests_are_canonical() -> None:
    for path in sorted((GOLDEN / "checkpoints").glob("*.json")):
        _assert_canonical_manifest(path.read_bytes())


def test_floats_and_ints_stay_apart_in_canonical_json(saved: dict[str, tuple[bytes, bytes]]) -> None:
    """A float is always written with '.' or an exponent, so 1.0 never reads back as the int 1."""
    text = saved["plain"][0].decode()
    for literal in ("0.0", "-0.0", "1.0", "0.1", "1e+16", "1.5e-05", "-1e+300", "18446744073709551615"):
        assert literal in text, literal
    assert '{"int":"0x10000000000000000"}' in text and '{"float":"nan"}' in text


# ------------------------------------------------------------------------------- the worked example


def _example() -> tuple[dict[str, Any], str]:
    text = FORMAT_MD.read_text("utf-8")
    match = re.search(r"<!-- example:manifest[^\n]*\n```json\n(.*?)\n```", text, re.S)
    assert match, "no example manifest in docs/format.md"
    return json.loads(match.group(1)), text


def test_worked_example_is_what_cairn_writes(tmp_path: Path) -> None:
    example, text = _example()
    assert _errors(MANIFEST, example) == []
    _assert_canonical_manifest(canonical_json(example) + b"\n")  # its digest is right
    on_disk = len(canonical_json(example)) + 1
    assert f"({on_disk} bytes with its newline)" in text

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.25]]))
        model.bias.fill_(1.0)
    cairn.save(tmp_path / "ex", {"model": model, "epoch": 3}, step=3, metrics={"loss": 0.125})
    again = json.loads((tmp_path / "ex" / "checkpoints" / "step-3.json").read_bytes())
    for doc in (example, again):
        del doc["time"], doc["digest"]
    assert again == example
    for entry in example["tensors"]:
        blob = entry["shards"][0]["chunks"][0]["blob"]
        assert f"blobs/{blob[:2]}/{blob}" in text
        assert (tmp_path / "ex" / "blobs" / blob[:2] / blob).is_file()
    assert (
        math.prod(example["tensors"][0]["shape"]) * 4
        == example["tensors"][0]["shards"][0]["chunks"][0]["nbytes"]
    )
