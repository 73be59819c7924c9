"""Hostile manifests: every lie a crafted ``checkpoints/<name>.json`` can tell is refused with a CairnError.

Each hostile variant is written over a real checkpoint and, unless the case is about the digest, signed
again (the digest recomputed) so that it gets past the integrity check and reaches the validation behind
it. Every case must raise a specific :class:`~cairn.errors.CairnError` subclass from both ``cairn.load``
and ``Store.manifest`` — never another exception type, never slowly, never opening a file outside the
store (an audit hook watches), never unpickling or running anything.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import json
import os
import pickle
import shutil
import site
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import hypothesis
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cairn
from cairn._manifest import canonical_json
from cairn.backends import LocalBackend
from cairn.errors import CairnError, ManifestError, UnsupportedVersionError

NAME = "victim"
HANG_GUARD_S = 30.0  # not a speed check: only a hang (or a quadratic blow-up) takes this long

STATE: dict[str, Any] = {
    "model": {"weight": torch.arange(4, dtype=torch.float32), "bias": torch.zeros(2)},
    "arr": np.arange(6, dtype=np.int64).reshape(2, 3),
    "scalar": np.float32(1.5),
    "epoch": 3,
    "big": 2**70,
    "inf": float("inf"),
    "raw": b"xyz",
    "pair": (1, "a"),
}

# ------------------------------------------------------------------------------------------ audit hook

_AUDIT: dict[str, Any] = {"installed": False, "events": None}
_WATCHED = ("open", "os.scandir", "os.listdir", "os.walk", "shutil.copyfile")
_FORBIDDEN = (
    "pickle.find_class",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "subprocess.Popen",
)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    events = _AUDIT["events"]
    if events is not None and (event in _WATCHED or event in _FORBIDDEN):
        events.append((event, args))


def _allowed_prefixes() -> tuple[str, ...]:
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.__file__)}
    dirs.update(site.getsitepackages())
    dirs.update(os.path.dirname(m.__file__ or "") for m in (torch, np, blake3, cairn))
    out = set()
    for d in dirs:
        if d:
            out.update({os.path.abspath(d) + os.sep, os.path.realpath(d) + os.sep})
    return tuple(sorted(out))


@pytest.fixture(scope="module")
def audit() -> Callable[[], contextlib.AbstractContextManager[list[tuple[str, Any]]]]:
    """A context manager recording file opens and code-running events (the hook is installed once)."""
    if not _AUDIT["installed"]:
        sys.addaudithook(_hook)
        _AUDIT["installed"] = True

    @contextlib.contextmanager
    def recording() -> Iterator[list[tuple[str, Any]]]:
        events: list[tuple[str, Any]] = []
        _AUDIT["events"] = events
        try:
            yield events
        finally:
            _AUDIT["events"] = None

    return recording


def assert_confined(events: list[tuple[str, Any]], root: Path) -> None:
    """No file outside the store (or the Python install) was opened, and nothing ran code."""
    inside = (os.path.abspath(root) + os.sep, os.path.realpath(root) + os.sep)
    allowed = inside + _allowed_prefixes()
    for event, args in events:
        assert event not in _FORBIDDEN, (event, args)
        target = args[0] if args else None
        if target is None or isinstance(target, int):
            continue  # a file descriptor (os.fdopen of a file opened before)
        path = os.path.abspath(os.fsdecode(target))
        assert (path + os.sep).startswith(allowed), f"{event} outside the store: {path}"


# ------------------------------------------------------------------------------------------ stores


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "template"
    cairn.save(root, STATE, step=7, name=NAME, metrics={"loss": 0.5})
    return root


@pytest.fixture
def store(template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(template, root)
    return root


def manifest_path(root: Path, name: str = NAME) -> Path:
    return root / "checkpoints" / f"{name}.json"


def write(path: Path, data: bytes) -> None:
    """Replace a (read-only, write-once) store file."""
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_bytes(data)


def sign(doc: dict[str, Any]) -> bytes:
    """Manifest bytes for ``doc`` with a correct digest, as a writer would produce them."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    body["digest"] = blake3.blake3(canonical_json(body)).hexdigest()
    return canonical_json(body) + b"\n"


def blob_file(root: Path, blob: str) -> Path:
    return root / "blobs" / blob[:2] / blob


def tensor(doc: dict[str, Any], path: str) -> dict[str, Any]:
    return next(t for t in doc["tensors"] if t["path"] == path)


def chunk(doc: dict[str, Any], path: str = "model.weight") -> dict[str, Any]:
    return tensor(doc, path)["shards"][0]["chunks"][0]


def pair(doc: dict[str, Any], key: str) -> list[Any]:
    """The ``[key, node]`` pair of a top-level key of the state tree (set ``[1]`` to replace the node)."""
    return next(p for p in doc["tree"]["dict"] if p[0] == key)


def timed(fn: Callable[[], Any]) -> tuple[Exception | None, float]:
    start = time.perf_counter()
    try:
        fn()
    except Exception as e:  # the test inspects whatever came out
        return e, time.perf_counter() - start
    return None, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ the cases

Build = Callable[[dict[str, Any], bytes], bytes]


def signed(mutate: Callable[[dict[str, Any]], Any]) -> Build:
    """Mutate the parsed manifest, then sign it again so it passes the digest check."""

    def build(doc: dict[str, Any], raw: bytes) -> bytes:
        mutate(doc)
        return sign(doc)

    return build


def unsigned(mutate: Callable[[dict[str, Any]], Any]) -> Build:
    """Mutate the parsed manifest and keep the old digest."""

    def build(doc: dict[str, Any], raw: bytes) -> bytes:
        mutate(doc)
        return canonical_json(doc) + b"\n"

    return build


def text(fn: Callable[[bytes], bytes]) -> Build:
    """Edit the manifest file's bytes directly (for what canonical JSON cannot express)."""
    return lambda doc, raw: fn(raw)


def put(where: Callable[[dict[str, Any]], Any], key: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        where(doc)[key] = value

    return mutate


def drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.pop(key)


def W(d: dict[str, Any]) -> dict[str, Any]:
    return tensor(d, "model.weight")


def WC(d: dict[str, Any]) -> dict[str, Any]:
    return chunk(d)


def A(d: dict[str, Any]) -> dict[str, Any]:
    return tensor(d, "arr")


def node(key: str) -> Callable[[dict[str, Any]], list[Any]]:
    return lambda d: pair(d, key)


def blob_name(value: Callable[[str], Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        c = chunk(doc)
        c["blob"] = value(c["blob"])

    return mutate


def arr_shards(make: Callable[[str], list[dict[str, Any]]]) -> Callable[[dict[str, Any]], None]:
    """Replace the shards of ``arr`` (shape [2, 3], I64: 48 bytes in one blob) by ``make(blob)``."""

    def mutate(doc: dict[str, Any]) -> None:
        a = A(doc)
        a["shards"] = make(a["shards"][0]["chunks"][0]["blob"])

    return mutate


def shard(offset: list[int], shape: list[int], blob: str, nbytes: int | None = None) -> dict[str, Any]:
    n = 8 * int(np.prod(shape)) if nbytes is None else nbytes
    return {
        "offset": offset,
        "shape": shape,
        "chunks": [{"blob": blob, "offset": 0, "nbytes": n}] if n else [],
    }


def nested_tree(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"list": [value]}
    return value


def replace_once(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        assert old in raw, old
        return raw.replace(old, new, 1)

    return edit


def set_step_text(token: bytes) -> Callable[[bytes], bytes]:
    return replace_once(b'"step":7', b'"step":' + token)


def two_digits(doc: dict[str, Any]) -> None:
    pair(doc, "epoch")[1] = {"list": [{"tensor": 0}, {"tensor": 0}]}


def dup_json_key(raw: bytes) -> bytes:
    return b'{"step":8,' + raw[1:]


def deep_dict_text(n: int) -> Callable[[bytes], bytes]:
    return lambda raw: b'{"dict":[["a",' * n + b"1" + b"]]}" * n


M, V = ManifestError, UnsupportedVersionError

CASES: list[Any] = [
    # -- blob names: the only thing that becomes a path ----------------------------------------------------
    pytest.param(signed(put(WC, "blob", "../../etc/passwd")), M, id="blob-path-traversal"),
    pytest.param(signed(put(WC, "blob", "../" * 18 + "etc/passwd")), M, id="blob-traversal-64-chars"),
    pytest.param(signed(put(WC, "blob", "/etc/passwd")), M, id="blob-absolute"),
    pytest.param(signed(blob_name(str.upper)), M, id="blob-uppercase-hex"),
    pytest.param(signed(blob_name(lambda b: b[:63])), M, id="blob-63-chars"),
    pytest.param(signed(blob_name(lambda b: b + "0")), M, id="blob-65-chars"),
    pytest.param(signed(blob_name(lambda b: b[:2] + "/" + b[3:])), M, id="blob-with-slash"),
    pytest.param(signed(blob_name(lambda b: b[:63] + "\n")), M, id="blob-trailing-newline"),
    pytest.param(signed(blob_name(lambda b: "\uff10" * 64)), M, id="blob-fullwidth-digits"),
    pytest.param(signed(blob_name(lambda b: "\x00" * 64)), M, id="blob-nul-bytes"),
    pytest.param(signed(blob_name(lambda b: int(b[:15], 16))), M, id="blob-integer"),
    pytest.param(signed(blob_name(lambda b: [b])), M, id="blob-list"),
    # -- shapes ------------------------------------------------------------------------------------------
    pytest.param(signed(put(W, "shape", [-4])), M, id="shape-negative"),
    pytest.param(signed(put(W, "shape", [2**40, 2**40, 2**40])), M, id="shape-2**120-elements"),
    pytest.param(signed(put(W, "shape", [1] * 65)), M, id="shape-rank-65"),
    pytest.param(signed(put(W, "shape", [4.0])), M, id="shape-float"),
    pytest.param(signed(put(W, "shape", [True, True, True, True])), M, id="shape-bool"),
    pytest.param(signed(put(W, "shape", ["4"])), M, id="shape-string"),
    pytest.param(signed(put(W, "shape", 4)), M, id="shape-not-a-list"),
    pytest.param(signed(put(W, "shape", [2**64])), M, id="shape-2**64"),
    pytest.param(signed(put(W, "shape", None)), M, id="shape-null"),
    # -- dtypes and kinds --------------------------------------------------------------------------------
    pytest.param(signed(put(W, "dtype", "F128")), M, id="dtype-F128"),
    pytest.param(signed(put(W, "dtype", "object")), M, id="dtype-object"),
    pytest.param(signed(put(W, "dtype", "f32")), M, id="dtype-lowercase"),
    pytest.param(signed(put(W, "dtype", "<f4")), M, id="dtype-numpy-string"),
    pytest.param(signed(put(W, "dtype", None)), M, id="dtype-null"),
    pytest.param(signed(put(W, "dtype", "F64")), M, id="dtype-lie-F64-over-16-bytes"),
    pytest.param(signed(put(WC, "nbytes", 8)), M, id="size-lie-F32x4-in-8-bytes"),
    pytest.param(signed(put(W, "kind", "pickle")), M, id="kind-pickle"),
    pytest.param(signed(put(W, "kind", "torch.load")), M, id="kind-torch-load"),
    pytest.param(signed(put(W, "kind", None)), M, id="kind-null"),
    pytest.param(
        signed(lambda d: W(d).update(kind="numpy", dtype="BF16", shape=[8])), M, id="kind-numpy-with-BF16"
    ),
    pytest.param(signed(put(lambda d: tensor(d, "scalar"), "shape", [1])), M, id="numpy-scalar-shape-1"),
    pytest.param(signed(lambda d: W(d).update(path=None)), M, id="tensor-path-null"),
    pytest.param(signed(lambda d: W(d).update(path="x" * 5000)), M, id="tensor-path-5000-chars"),
    pytest.param(signed(lambda d: W(d).update(pickle="x")), M, id="tensor-unknown-field"),
    # -- chunks -------------------------------------------------------------------------------------------
    pytest.param(signed(put(WC, "nbytes", 0)), M, id="chunk-nbytes-0"),
    pytest.param(signed(put(WC, "nbytes", -16)), M, id="chunk-nbytes-negative"),
    pytest.param(signed(put(WC, "nbytes", 2**62)), M, id="chunk-nbytes-2**62"),
    pytest.param(signed(put(WC, "nbytes", 16.0)), M, id="chunk-nbytes-float"),
    pytest.param(signed(put(WC, "nbytes", "16")), M, id="chunk-nbytes-string"),
    pytest.param(signed(put(WC, "offset", 1)), M, id="chunk-offset-nonzero"),
    pytest.param(signed(put(WC, "offset", -1)), M, id="chunk-offset-negative"),
    pytest.param(signed(put(WC, "path", "/etc/passwd")), M, id="chunk-extra-path-field"),
    pytest.param(signed(lambda d: WC(d).pop("nbytes")), M, id="chunk-missing-nbytes"),
    pytest.param(signed(put(lambda d: W(d)["shards"][0], "chunks", [])), M, id="chunks-empty"),
    pytest.param(signed(put(lambda d: W(d)["shards"][0], "chunks", "blob")), M, id="chunks-not-a-list"),
    pytest.param(
        signed(lambda d: W(d)["shards"][0]["chunks"].extend([dict(WC(d))] * 3)), M, id="chunks-4x-the-bytes"
    ),
    # -- shards -------------------------------------------------------------------------------------------
    pytest.param(signed(arr_shards(lambda b: [shard([1, 0], [2, 3], b)])), M, id="shard-out-of-bounds"),
    pytest.param(signed(arr_shards(lambda b: [shard([0, 4], [2, 3], b)])), M, id="shard-offset-past-end"),
    pytest.param(
        signed(arr_shards(lambda b: [shard([0, 0], [1, 3], b), shard([0, 0], [1, 3], b)])),
        M,
        id="shards-overlapping",
    ),
    pytest.param(
        signed(arr_shards(lambda b: [shard([0, 0], [2, 2], b), shard([0, 1], [1, 2], b)])),
        M,
        id="shards-overlapping-same-volume",
    ),
    pytest.param(signed(arr_shards(lambda b: [shard([0, 0], [1, 3], b)])), M, id="shards-not-covering"),
    pytest.param(
        signed(arr_shards(lambda b: [shard([0, 0], [1, 3], b)] * 3)), M, id="shards-covering-too-much"
    ),
    pytest.param(signed(arr_shards(lambda b: [])), M, id="shards-none"),
    pytest.param(signed(arr_shards(lambda b: [shard([0], [2, 3], b)])), M, id="shard-rank-mismatch"),
    pytest.param(signed(arr_shards(lambda b: [shard([0, 0], [2, 3], b)] * 4097)), M, id="shards-4097"),
    pytest.param(signed(arr_shards(lambda b: [shard([0, 0], [0, 3], b, 8)])), M, id="shard-empty-with-bytes"),
    pytest.param(signed(arr_shards(lambda b: "shards")), M, id="shards-not-a-list"),
    # -- the tree ----------------------------------------------------------------------------------------
    pytest.param(signed(put(node("arr"), 1, {"tensor": 99})), M, id="tree-tensor-index-99"),
    pytest.param(signed(put(node("arr"), 1, {"tensor": -1})), M, id="tree-tensor-index-negative"),
    pytest.param(signed(put(node("arr"), 1, {"tensor": "2"})), M, id="tree-tensor-index-string"),
    pytest.param(signed(put(node("arr"), 1, {"tensor": True})), M, id="tree-tensor-index-bool"),
    pytest.param(signed(put(node("arr"), 1, {"tensor": 0})), M, id="tree-tensor-referenced-twice"),
    pytest.param(signed(two_digits), M, id="tree-tensor-twice-in-one-list"),
    pytest.param(signed(put(node("arr"), 1, None)), M, id="tree-tensor-unreferenced"),
    pytest.param(signed(put(A, "path", "model.weight")), M, id="tensor-path-lie"),
    pytest.param(signed(put(node("epoch"), 1, {"set": [1, 2]})), M, id="tree-unknown-tag"),
    pytest.param(signed(put(node("epoch"), 1, {"list": [], "tuple": []})), M, id="tree-two-tags"),
    pytest.param(signed(put(node("epoch"), 1, {})), M, id="tree-empty-object"),
    pytest.param(signed(put(node("epoch"), 1, [1, 2])), M, id="tree-bare-json-array"),
    pytest.param(signed(put(node("epoch"), 1, {"dict": [["a", 1], ["a", 2]]})), M, id="dict-duplicate-keys"),
    pytest.param(signed(put(node("epoch"), 1, {"dict": [[1, 1], [1, 2]]})), M, id="dict-duplicate-int-keys"),
    pytest.param(signed(put(node("epoch"), 1, {"dict": {"a": 1}})), M, id="dict-pairs-not-a-list"),
    pytest.param(signed(put(node("epoch"), 1, {"dict": [["a", 1, 2]]})), M, id="dict-pair-of-three"),
    pytest.param(signed(put(node("epoch"), 1, {"dict": [[True, 1]]})), M, id="dict-bool-key"),
    pytest.param(signed(put(node("epoch"), 1, {"dict": [[1.5, 1]]})), M, id="dict-float-key"),
    pytest.param(signed(put(node("epoch"), 1, {"dict": [[None, 1]]})), M, id="dict-null-key"),
    pytest.param(signed(put(node("epoch"), 1, {"list": {"a": 1}})), M, id="list-not-an-array"),
    pytest.param(signed(put(node("epoch"), 1, {"int": "12"})), M, id="int-not-hex"),
    pytest.param(signed(put(node("epoch"), 1, {"int": "0xZZ"})), M, id="int-bad-hex"),
    pytest.param(signed(put(node("epoch"), 1, {"int": 12})), M, id="int-not-a-string"),
    pytest.param(signed(put(node("epoch"), 1, {"float": "1.0"})), M, id="float-not-special"),
    pytest.param(signed(put(node("epoch"), 1, {"float": 1.0})), M, id="float-number"),
    pytest.param(signed(put(node("epoch"), 1, {"bytes": "!!!!"})), M, id="bytes-not-base64"),
    pytest.param(signed(put(node("epoch"), 1, {"bytes": "abc"})), M, id="bytes-bad-length"),
    pytest.param(signed(put(node("epoch"), 1, {"bytes": "A==="})), M, id="bytes-too-much-padding"),
    pytest.param(
        signed(put(node("epoch"), 1, {"object": "os.system", "state": 1, "x": 1})), M, id="object-extra"
    ),
    pytest.param(signed(put(node("epoch"), 1, {"object": "x" * 600, "state": 1})), M, id="object-long-name"),
    pytest.param(signed(put(node("epoch"), 1, {"object": 5, "state": 1})), M, id="object-name-not-str"),
    pytest.param(
        signed(put(node("epoch"), 1, {"object": "m.T", "state": {"dict": []}, "meta": {"tensor": 0}})),
        M,
        id="object-meta-holds-tensor",
    ),
    pytest.param(signed(put(node("epoch"), 1, nested_tree(300))), M, id="tree-300-deep"),
    pytest.param(signed(put(lambda d: d, "tree", {})), M, id="tree-root-empty-object"),
    pytest.param(signed(put(lambda d: d, "tree", None)), M, id="tree-root-null"),
    # -- the JSON text ------------------------------------------------------------------------------------
    pytest.param(text(deep_dict_text(100_000)), M, id="json-tree-nested-100000"),
    pytest.param(text(lambda raw: b"[" * 100_000 + b"]" * 100_000), M, id="json-array-nested-100000"),
    pytest.param(
        text(lambda raw: b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), M, id="json-nested-in-obj"
    ),
    pytest.param(text(lambda raw: b'{"a":' * 100_000 + b"1" + b"}" * 100_000), M, id="json-objects-100000"),
    pytest.param(text(dup_json_key), M, id="json-duplicate-top-key"),
    pytest.param(
        text(replace_once(b'"kind":"torch"', b'"kind":"torch","kind":"numpy"')), M, id="json-duplicate-kind"
    ),
    pytest.param(text(replace_once(b'["epoch",3]', b'["epoch",NaN]')), M, id="json-NaN"),
    pytest.param(text(replace_once(b'["epoch",3]', b'["epoch",Infinity]')), M, id="json-Infinity"),
    pytest.param(text(replace_once(b'["epoch",3]', b'["epoch",-Infinity]')), M, id="json-minus-Infinity"),
    pytest.param(text(replace_once(b'["epoch",3]', b'["epoch",1e999]')), M, id="json-1e999"),
    pytest.param(text(replace_once(b'"loss":0.5', b'"loss":NaN')), M, id="json-metric-NaN"),
    pytest.param(text(set_step_text(b"9" * 5000)), M, id="json-int-5000-digits"),
    pytest.param(text(set_step_text(b"9" * 4000)), M, id="json-int-4000-digits"),
    pytest.param(text(set_step_text(b"1" + b"0" * 400 + b".0")), M, id="json-float-overflow"),
    pytest.param(text(replace_once(b'"name":"victim"', b'"name":"vic\xfftim"')), M, id="non-utf8"),
    pytest.param(text(replace_once(b'"name":"victim"', b'"name":"vic\xc3tim"')), M, id="truncated-utf8"),
    pytest.param(text(lambda raw: raw.decode().encode("utf-16")), M, id="utf16"),
    pytest.param(text(lambda raw: b"\xef\xbb\xbf" + raw), M, id="utf8-bom"),
    pytest.param(text(replace_once(b'"name":"victim"', b'"name":"vic\x01tim"')), M, id="control-character"),
    pytest.param(
        text(replace_once(b'["epoch",3]', b'["epoch","\\ud800"]')),
        M,
        id="lone-surrogate-escape",
    ),
    pytest.param(text(lambda raw: raw.rstrip() + b"{}"), M, id="trailing-garbage"),
    pytest.param(text(lambda raw: raw + b"\x00" * 64), M, id="trailing-nul-bytes"),
    pytest.param(text(lambda raw: b""), M, id="empty-file"),
    pytest.param(text(lambda raw: b" \n\t "), M, id="whitespace-only"),
    pytest.param(text(lambda raw: b"null"), M, id="json-null"),
    pytest.param(text(lambda raw: b"[]"), M, id="json-array"),
    pytest.param(text(lambda raw: b'"cairn.checkpoint"'), M, id="json-string"),
    pytest.param(text(lambda raw: b"{"), M, id="json-unclosed"),
    pytest.param(text(lambda raw: b"\x80\x04\x95" + pickle.dumps({"a": 1})), M, id="pickle-bytes"),
    # -- the envelope -------------------------------------------------------------------------------------
    pytest.param(signed(put(lambda d: d, "version", 2)), V, id="version-2"),
    pytest.param(signed(put(lambda d: d, "version", 2**80)), V, id="version-2**80"),
    pytest.param(unsigned(put(lambda d: d, "version", 2)), V, id="version-2-unsigned"),
    pytest.param(signed(put(lambda d: d, "version", 0)), M, id="version-0"),
    pytest.param(signed(put(lambda d: d, "version", "1")), M, id="version-string"),
    pytest.param(signed(put(lambda d: d, "version", None)), M, id="version-null"),
    pytest.param(
        signed(put(lambda d: d, "version", True)),
        M,
        id="version-true",
    ),
    pytest.param(
        signed(put(lambda d: d, "version", 1.0)),
        M,
        id="version-float",
    ),
    pytest.param(signed(put(lambda d: d, "format", "cairn.store")), M, id="format-store-marker"),
    pytest.param(signed(put(lambda d: d, "format", None)), M, id="format-null"),
    pytest.param(signed(drop("format")), M, id="missing-format"),
    pytest.param(signed(drop("version")), M, id="missing-version"),
    pytest.param(signed(drop("name")), M, id="missing-name"),
    pytest.param(signed(drop("step")), M, id="missing-step"),
    pytest.param(signed(drop("time")), M, id="missing-time"),
    pytest.param(signed(drop("metrics")), M, id="missing-metrics"),
    pytest.param(signed(drop("metadata")), M, id="missing-metadata"),
    pytest.param(signed(drop("tree")), M, id="missing-tree"),
    pytest.param(signed(drop("tensors")), M, id="missing-tensors"),
    pytest.param(unsigned(drop("digest")), M, id="missing-digest"),
    pytest.param(signed(put(lambda d: d, "loader", "pickle")), M, id="unknown-field"),
    pytest.param(signed(put(lambda d: d, "step", -1)), M, id="step-negative"),
    pytest.param(signed(put(lambda d: d, "step", True)), M, id="step-bool"),
    pytest.param(signed(put(lambda d: d, "step", "7")), M, id="step-string"),
    pytest.param(signed(put(lambda d: d, "step", 7.0)), M, id="step-float"),
    pytest.param(signed(put(lambda d: d, "step", 2**63)), M, id="step-2**63"),
    pytest.param(signed(put(lambda d: d, "time", "yesterday")), M, id="time-not-iso"),
    pytest.param(signed(put(lambda d: d, "time", "2024-13-01T00:00:00")), M, id="time-month-13"),
    pytest.param(signed(put(lambda d: d, "time", "2024-01-01T00:00:00" + "0" * 1000)), M, id="time-long"),
    pytest.param(signed(put(lambda d: d, "time", 1700000000)), M, id="time-number"),
    pytest.param(signed(put(lambda d: d, "time", "2024-01-01T00:00:00")), M, id="time-without-utc-offset"),
    pytest.param(signed(put(lambda d: d, "name", "other")), M, id="name-mismatch"),
    pytest.param(signed(put(lambda d: d, "name", "../../etc/passwd")), M, id="name-traversal"),
    pytest.param(signed(put(lambda d: d, "name", "latest")), M, id="name-reserved"),
    pytest.param(signed(put(lambda d: d, "name", 7)), M, id="name-number"),
    pytest.param(signed(put(lambda d: d, "metrics", {"loss": "low"})), M, id="metric-string"),
    pytest.param(signed(put(lambda d: d, "metrics", {"loss": {"nan": 1}})), M, id="metric-nested-object"),
    pytest.param(signed(put(lambda d: d, "metrics", {"loss": [0.5]})), M, id="metric-list"),
    pytest.param(signed(put(lambda d: d, "metrics", {"loss": True})), M, id="metric-bool"),
    pytest.param(signed(put(lambda d: d, "metrics", {"loss": None})), M, id="metric-null"),
    pytest.param(signed(put(lambda d: d, "metrics", [["loss", 0.5]])), M, id="metrics-not-object"),
    pytest.param(signed(put(lambda d: d, "metadata", ["x"])), M, id="metadata-not-object"),
    pytest.param(signed(put(lambda d: d, "tensors", {"0": None})), M, id="tensors-not-a-list"),
    pytest.param(signed(put(lambda d: d, "tensors", [5])), M, id="tensor-entry-not-object"),
    pytest.param(unsigned(put(lambda d: d, "step", 8)), M, id="digest-stale"),
    pytest.param(unsigned(put(lambda d: d, "digest", "0" * 64)), M, id="digest-zeros"),
    pytest.param(unsigned(lambda d: d.update(digest=d["digest"].upper())), M, id="digest-uppercase"),
    pytest.param(unsigned(put(lambda d: d, "digest", 5)), M, id="digest-number"),
    pytest.param(
        unsigned(lambda d: d.update(digest=blake3.blake3(canonical_json(d)).hexdigest())),
        M,
        id="digest-over-itself",
    ),
]


@pytest.mark.parametrize(("build", "expected"), CASES)
def test_hostile_manifest_raises_specific_error(
    store: Path, audit: Any, build: Build, expected: type[CairnError]
) -> None:
    path = manifest_path(store)
    raw = path.read_bytes()
    write(path, build(json.loads(raw), raw))

    def load() -> Any:
        return cairn.load(store, NAME)

    def manifest() -> Any:
        return cairn.Store(store).manifest(NAME)

    with audit() as events:
        results = [timed(load), timed(manifest)]
    assert_confined(events, store)
    for error, seconds in results:
        assert seconds < HANG_GUARD_S, f"took {seconds:.1f} s"
        assert isinstance(error, expected), repr(error)
        assert NAME in str(error), str(error)

    # the rest of the store keeps working around it: listing skips it, verify reports it
    with pytest.warns(RuntimeWarning, match=NAME):
        assert cairn.Store(store).list() == []
    report = cairn.Store(store).verify()
    assert not report.ok
    assert report.damaged == [NAME]
    assert report.problems[0].key is None and report.problems[0].blob is None


def test_cases_cover_the_brief() -> None:
    assert len(CASES) >= 40


def test_unmodified_template_loads(store: Path, audit: Any) -> None:
    """The control: the checkpoint the hostile cases start from is valid and loads exactly."""
    raw = manifest_path(store).read_bytes()
    write(manifest_path(store), sign(json.loads(raw)))  # signing again is a no-op
    assert manifest_path(store).read_bytes() == raw
    with audit() as events:
        out = cairn.load(store, NAME)
    assert_confined(events, store)
    opened = [os.fsdecode(args[0]) for event, args in events if event == "open" and isinstance(args[0], str)]
    assert str(manifest_path(store)) in opened  # the hook sees what the loader opens
    assert torch.equal(out["model"]["weight"], STATE["model"]["weight"])
    assert np.array_equal(out["arr"], STATE["arr"])
    assert out["big"] == 2**70 and out["raw"] == b"xyz" and out["pair"] == (1, "a")


def test_valid_multi_shard_manifest_loads(store: Path) -> None:
    """A manifest may split a tensor into shards: the control for the hostile shard cases."""
    arr = STATE["arr"]
    top, bottom = arr[:1].tobytes(), arr[1:].tobytes()
    doc = json.loads(manifest_path(store).read_bytes())
    shards = []
    for offset, data in (([0, 0], top), ([1, 0], bottom)):
        blob = blake3.blake3(data).hexdigest()
        blob_file(store, blob).parent.mkdir(exist_ok=True)
        write(blob_file(store, blob), data)
        shards.append(
            {"offset": offset, "shape": [1, 3], "chunks": [{"blob": blob, "offset": 0, "nbytes": 24}]}
        )
    A(doc)["shards"] = shards[::-1]
    write(manifest_path(store), sign(doc))
    assert np.array_equal(cairn.load(store, NAME)["arr"], arr)
    assert cairn.Store(store).verify().ok


# ------------------------------------------------------------------------------------------ huge inputs


def test_manifest_over_64_mib_is_refused_before_reading(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = manifest_path(store)
    path.unlink()
    with open(path, "wb") as f:  # sparse: costs no disk
        f.truncate(64 * 2**20 + 1)
    original = LocalBackend.read

    def spy(self: LocalBackend, rel: str) -> bytes:
        assert not rel.startswith("checkpoints/"), f"read {rel} before checking its size"
        return original(self, rel)

    monkeypatch.setattr(LocalBackend, "read", spy)
    for call in (lambda: cairn.load(store, NAME), lambda: cairn.Store(store).manifest(NAME)):
        error, seconds = timed(call)
        assert isinstance(error, ManifestError), repr(error)
        assert NAME in str(error) and "limit" in str(error)
        assert seconds < HANG_GUARD_S


def test_huge_manifest_within_reason_is_not_quadratic(store: Path) -> None:
    """Many tiny tree entries: parsing stays linear (well under the hang guard)."""
    doc = json.loads(manifest_path(store).read_bytes())
    pair(doc, "epoch")[1] = {"dict": [[f"k{i}", i] for i in range(200_000)]}
    write(manifest_path(store), sign(doc))
    error, seconds = timed(lambda: cairn.load(store, NAME, keys="arr"))
    assert error is None and seconds < HANG_GUARD_S


@pytest.mark.parametrize("layout", ["column", "grid"])
def test_many_shards_do_not_stall_the_reader(store: Path, layout: str) -> None:
    """The most shards a tensor may have, in a column and in a 64 x 64 grid (a regression: the overlap
    check used to compare every pair of boxes, minutes for a large manifest)."""
    n = 4096
    doc = json.loads(manifest_path(store).read_bytes())
    a = A(doc)
    blob = a["shards"][0]["chunks"][0]["blob"]
    if layout == "column":
        a.update(dtype="U8", shape=[1, n])
        a["shards"] = [shard([0, j], [1, 1], blob, 1) for j in range(n)]
    else:
        a.update(dtype="U8", shape=[64, 64])
        a["shards"] = [shard([i, j], [1, 1], blob, 1) for i in range(64) for j in range(64)]
    write(manifest_path(store), sign(doc))
    error, seconds = timed(lambda: cairn.Store(store).manifest(NAME))
    assert error is None and seconds < HANG_GUARD_S


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_unallocatable_tensor_raises_cairn_error(store: Path, kind: str) -> None:
    """128 TiB declared in 65536 chunks of 2 GiB that all name one (sparse) blob of the right size."""
    fake = "ab" * 32
    blob_file(store, fake).parent.mkdir(exist_ok=True)
    with open(blob_file(store, fake), "wb") as f:
        f.truncate(2**31)
    doc = json.loads(manifest_path(store).read_bytes())
    a = A(doc)
    a.update(kind=kind, dtype="U8", shape=[2**47])
    a["shards"] = [
        {"offset": [0], "shape": [2**47], "chunks": [{"blob": fake, "offset": 0, "nbytes": 2**31}] * 2**16}
    ]
    write(manifest_path(store), sign(doc))
    error, seconds = timed(lambda: cairn.load(store, NAME, keys="arr"))
    assert seconds < HANG_GUARD_S
    assert isinstance(error, CairnError), repr(error)


@pytest.mark.parametrize("depth", [100, 900, 990, 1000, 5000])
def test_deep_metadata_never_escapes(store: Path, depth: int) -> None:
    """Metadata is free-form JSON; however deep it nests, the reader answers or raises a CairnError."""
    raw = manifest_path(store).read_bytes()
    deep = b"[" * depth + b"]" * depth
    hostile = raw.replace(b'"metadata":{}', b'"metadata":{"x":' + deep + b"}", 1)
    with contextlib.suppress(RecursionError):  # too deep to sign: the stale digest is refused anyway
        hostile = sign(json.loads(hostile))
    write(manifest_path(store), hostile)
    for call in (lambda: cairn.load(store, NAME), lambda: cairn.Store(store).manifest(NAME)):
        error, seconds = timed(call)
        assert seconds < HANG_GUARD_S
        assert error is None or isinstance(error, ManifestError), repr(error)


# ------------------------------------------------------------------------------------------ list and latest


def test_naive_time_next_to_an_aware_one_does_not_break_listing(store: Path) -> None:
    """Two checkpoints at the same step, one with a time lacking its UTC offset (incomparable with the
    other's): listing and loading the latest answer (skipping it) instead of raising a TypeError."""
    cairn.save(store, {"x": 1}, step=7, name="other")
    doc = json.loads(manifest_path(store).read_bytes())
    doc["time"] = "2024-01-01T00:00:00"
    write(manifest_path(store), sign(doc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skipping it as damaged is a fine answer
        error, _ = timed(lambda: cairn.Store(store).list())
        assert error is None, repr(error)
        box: list[Any] = []
        error, _ = timed(lambda: box.append(cairn.load(store)))
        assert error is None, repr(error)
    assert box[0] == {"x": 1} or same(box[0], cairn.load(store, NAME))


def test_newer_version_checkpoint_is_named(store: Path) -> None:
    doc = json.loads(manifest_path(store).read_bytes())
    doc["version"] = 2
    write(manifest_path(store), sign(doc))
    with pytest.raises(UnsupportedVersionError, match="upgrade") as e:
        cairn.load(store, NAME)
    assert NAME in str(e.value)


# ------------------------------------------------------------------------------------------ pickles


class _Canary:
    """Unpickling this creates the canary file (``open(path, "w")``); nothing may ever unpickle it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _payload(form: str, canary: Path) -> bytes:
    evil = {"evil": _Canary(str(canary))}
    if form == "pickle":
        return pickle.dumps(evil, protocol=2)
    buf = io.BytesIO()
    if form == "torch.save-large":  # over 1 MiB: a single-chunk tensor this large is memory-mapped
        evil["pad"] = torch.zeros(300_000)  # type: ignore[assignment]
    torch.save(evil, buf)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("form", ["pickle", "torch.save", "torch.save-large"])
def test_pickle_payload_blob_loads_as_plain_bytes(
    store: Path, tmp_path: Path, audit: Any, kind: str, form: str
) -> None:
    canary = tmp_path / "canary"
    payload = _payload(form, canary)
    assert b"open" in payload and not canary.exists()  # a real payload, and saving it ran nothing
    blob = blake3.blake3(payload).hexdigest()
    blob_file(store, blob).parent.mkdir(exist_ok=True)
    write(blob_file(store, blob), payload)
    doc = json.loads(manifest_path(store).read_bytes())
    n = len(payload)
    A(doc).update(kind=kind, dtype="U8", shape=[n])
    A(doc)["shards"] = [{"offset": [0], "shape": [n], "chunks": [{"blob": blob, "offset": 0, "nbytes": n}]}]
    write(manifest_path(store), sign(doc))

    with audit() as events:
        out = cairn.load(store, NAME)
        report = cairn.Store(store).verify()
    assert_confined(events, store)
    assert not canary.exists()
    assert report.ok
    arr = out["arr"]
    if kind == "torch":
        assert isinstance(arr, torch.Tensor) and arr.dtype == torch.uint8
        arr = arr.numpy()
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8
    assert arr.tobytes() == payload


def test_loading_never_calls_an_unpickler(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an unpickler was called")

    for owner, attr in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
        (np, "load"),
    ]:
        monkeypatch.setattr(owner, attr, refuse)
    out = cairn.load(store, NAME)
    assert cairn.Store(store).verify().ok
    cairn.restore(store, {"model": {"weight": torch.zeros(4), "bias": torch.ones(2)}}, NAME, strict=False)
    assert out["epoch"] == 3


_BANNED_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "pickletools",
    "marshal",
    "shelve",
    "dill",
    "cloudpickle",
    "joblib",
}
_BANNED_CALLS = {"eval", "exec", "__import__", "importlib.import_module", "np.load", "numpy.load"}
_TORCH_LOADS = {"torch.load", "torch.serialization.load"}
# the import tool (``cairn import``) may read a torch.save file, weights-only; nothing else may
_IMPORTERS = {"_interop.py"}
# what cairn.load / Store / verify / restore run: these never reach the importer
_LOADER = {
    "__init__.py",
    "_api.py",
    "_codec.py",
    "_dtypes.py",
    "_info.py",
    "_manifest.py",
    "_read.py",
    "_restore.py",
    "_sniff.py",
    "_store.py",
    "_tree.py",
    "_verify.py",
    "errors.py",
    "base.py",
    "local.py",
    "memory.py",
}


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _weights_only(call: ast.Call) -> bool:
    return any(
        k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def _imported(n: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(n, ast.Import):
        return [a.name for a in n.names]
    module = n.module or ""
    return [module] + [f"{module}.{a.name}" for a in n.names]


def test_no_module_of_cairn_can_unpickle() -> None:
    """No module imports a pickle-like module or calls eval/exec; torch.load appears only in the
    importer, always with weights_only=True; and no module of the loader imports the importer."""
    src = Path(cairn.__file__).parent
    files = sorted(src.rglob("*.py"))
    assert {f.name for f in files} >= _LOADER
    found = []
    for file in files:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        where = f"{file.relative_to(src)}"
        for n in ast.walk(tree):
            if isinstance(n, ast.Import | ast.ImportFrom):
                for name in _imported(n):
                    parts = name.split(".")
                    if parts[0] in _BANNED_MODULES:
                        found.append(f"{where}:{n.lineno}: imports {name}")
                    if parts[0] in ("torch", "numpy") and parts[-1] == "load":
                        found.append(f"{where}:{n.lineno}: imports {name}")
                    if file.name in _LOADER and any(p.lstrip("_") == "interop" for p in parts):
                        found.append(f"{where}:{n.lineno}: the loader imports the importer ({name})")
            elif isinstance(n, ast.Call):
                name = _dotted(n.func)
                if name in _BANNED_CALLS:
                    found.append(f"{where}:{n.lineno}: {name}()")
                if name in _TORCH_LOADS and (file.name not in _IMPORTERS or not _weights_only(n)):
                    found.append(f"{where}:{n.lineno}: {name}() outside the importer or not weights_only")
            elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in _BANNED_MODULES:
                found.append(f"{where}:{n.lineno}: the string {n.value!r}")
    assert found == []


def test_loading_does_not_import_the_importer(store: Path) -> None:
    """``cairn.load`` and friends never pull in the module that may call torch.load."""
    saved = sys.modules.pop("cairn._interop", None)
    try:
        cairn.load(store, NAME)
        cairn.Store(store).verify()
        cairn.Store(store).list()
        assert "cairn._interop" not in sys.modules
    finally:
        if saved is not None:
            sys.modules["cairn._interop"] = saved


# ------------------------------------------------------------------------------------------ fuzzing


def _mutate(raw: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(raw)
    for op, pos, value in ops:
        i = pos % (len(data) + 1)
        if op == "flip" and data:
            data[i % len(data)] ^= 1 << (value % 8)
        elif op == "insert":
            data[i:i] = bytes([value % 256])
        elif op == "delete" and data:
            del data[i % len(data)]
        elif op == "set" and data:
            data[i % len(data)] = value % 256
    return bytes(data)


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "set"]), st.integers(0, 2**20), st.integers(0, 255)
    ),
    min_size=1,
    max_size=4,
)


def same(a: Any, b: Any) -> bool:
    """Exact equality of two loaded state trees (tensors and arrays compared by dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray | np.generic):
        return type(a) is type(b) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _load_outcome(root: Path) -> tuple[Exception | None, Any]:
    """Load the victim by name, as the latest and verify; anything raised must be a CairnError."""
    box: list[Any] = []
    error, seconds = timed(lambda: box.append(cairn.load(root, NAME)))
    assert seconds < HANG_GUARD_S
    assert error is None or isinstance(error, CairnError), repr(error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        latest, _ = timed(lambda: cairn.load(root))
        verified, _ = timed(lambda: cairn.Store(root).verify())
    assert latest is None or isinstance(latest, CairnError), repr(latest)
    assert verified is None or isinstance(verified, CairnError), repr(verified)
    return error, box[0] if box else None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS)
def test_random_byte_damage_only_raises_cairn_errors(
    tmp_path_factory: pytest.TempPathFactory, template: Path, ops: list[tuple[str, int, int]]
) -> None:
    """Flip, insert, delete or overwrite a few bytes: the same state comes back (a harmless edit such as
    inserted whitespace) or a ManifestError is raised, never anything else."""
    root = _fuzz_store(tmp_path_factory, template, "bytes")
    mutated = _mutate(manifest_path(template).read_bytes(), ops)
    write(manifest_path(root), mutated)
    error, value = _load_outcome(root)
    if error is None:
        assert same(value, cairn.load(template, NAME))
    else:
        assert isinstance(error, ManifestError | UnsupportedVersionError), repr(error)


_FUZZ_STORES: dict[str, Path] = {}


def _fuzz_store(factory: pytest.TempPathFactory, template: Path, key: str) -> Path:
    if key not in _FUZZ_STORES:
        root = factory.mktemp(f"fuzz-{key}") / "store"
        shutil.copytree(template, root)
        _FUZZ_STORES[key] = root
    return _FUZZ_STORES[key]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


_ATOMS = st.sampled_from(
    [
        "torch",
        "numpy",
        "numpy-scalar",
        "F32",
        "U8",
        "BF16",
        "C32",
        "F8_E8M0",
        "BOOL",
        "0x1f",
        "-0x1",
        "nan",
        "inf",
        "AA==",
        "dict",
        "tensor",
        "model.weight",
        "arr",
        "../x",
        "a" * 64,
        0,
        1,
        2,
        -1,
        2**31,
        2**63,
        2**64,
    ]
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | _ATOMS,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.text(max_size=6) | st.sampled_from(["tensor", "dict", "list", "int", "bytes"]),
            children,
            max_size=2,
        )
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_signed_structure_only_raises_cairn_errors(
    tmp_path_factory: pytest.TempPathFactory, template: Path, data: st.DataObject
) -> None:
    """Replace a random part of the manifest by random JSON, signed: load answers or raises a CairnError."""
    root = _fuzz_store(tmp_path_factory, template, "structure")
    doc = json.loads(manifest_path(template).read_bytes())
    doc.pop("digest")
    hostile = copy.deepcopy(doc)
    paths = [p for p in _paths(hostile) if p]
    where = data.draw(st.sampled_from(paths), label="where")
    value = data.draw(_JSON, label="value")
    parent = hostile
    for k in where[:-1]:
        parent = parent[k]
    parent[where[-1]] = value
    write(manifest_path(root), sign(hostile))
    _load_outcome(root)


_BOXES = st.integers(1, 3).flatmap(
    lambda rank: st.tuples(
        st.lists(st.integers(0, 3), min_size=rank, max_size=rank),
        st.lists(
            st.tuples(
                st.lists(st.integers(0, 3), min_size=rank, max_size=rank),
                st.lists(st.integers(0, 3), min_size=rank, max_size=rank),
            ),
            min_size=1,
            max_size=6,
        ),
    )
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=_BOXES, whole=st.booleans())
def test_random_shard_layouts_are_exact_tilings_or_refused(
    tmp_path_factory: pytest.TempPathFactory, template: Path, layout: Any, whole: bool
) -> None:
    """Any box layout whose blobs exist: the reader returns every element from the one shard covering it
    (never uninitialised memory) or raises a ManifestError when the boxes do not tile the tensor exactly."""
    shape, boxes = layout
    if whole:  # often also a box that is the whole tensor, so that valid layouts are drawn too
        boxes = [([0] * len(shape), list(shape)), *boxes[1:]]
    root = _fuzz_store(tmp_path_factory, template, "shards")
    cover = np.zeros(shape, dtype=np.int64)
    expected = np.zeros(shape, dtype=np.uint8)
    in_bounds = all(o + n <= d for offset, size in boxes for o, n, d in zip(offset, size, shape, strict=True))
    shards = []
    for i, (offset, size) in enumerate(boxes):
        volume = int(np.prod(size))
        data = bytes([i + 1]) * volume
        chunks = []
        if volume:
            blob = blake3.blake3(data).hexdigest()
            if not blob_file(root, blob).exists():
                blob_file(root, blob).parent.mkdir(exist_ok=True)
                blob_file(root, blob).write_bytes(data)
            chunks = [{"blob": blob, "offset": 0, "nbytes": volume}]
        shards.append({"offset": offset, "shape": size, "chunks": chunks})
        if in_bounds:
            box = tuple(slice(o, o + n) for o, n in zip(offset, size, strict=True))
            cover[box] += 1
            expected[box] = i + 1
    doc = json.loads(manifest_path(template).read_bytes())
    A(doc).update(kind="numpy", dtype="U8", shape=shape, shards=shards)
    write(manifest_path(root), sign(doc))
    exact = in_bounds and bool((cover == 1).all())
    hypothesis.event("exact tiling" if exact else "not a tiling")
    error, out = _load_outcome(root)
    if exact:
        assert error is None, repr(error)
        assert np.array_equal(out["arr"], expected)
    else:
        assert isinstance(error, ManifestError), repr(error)
