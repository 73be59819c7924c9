"""Damaged stores on disk: truncated, bit-flipped, missing or swapped blobs and manifests, and paths that
are not cairn stores at all.

Every failure is a specific :class:`~cairn.errors.CairnError` subclass whose message names the checkpoint,
the key path and the blob; ``Store.verify`` reports what ``load`` would trip on; and everything that is
not damaged keeps loading (other checkpoints, other keys of the same checkpoint).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import struct
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
import torch

import cairn
from cairn.backends import LocalBackend
from cairn.errors import (
    BackendError,
    BlobCorruptError,
    BlobMissingError,
    CairnError,
    CorruptCheckpointError,
    ManifestError,
    NotAStoreError,
    StoreError,
    UnsupportedVersionError,
)

W1 = torch.arange(8, dtype=torch.float32)
W2 = W1 + 100
BIAS = torch.full((4,), 0.5)
BIG = torch.arange(512 * 512, dtype=torch.float32).reshape(512, 512)  # 1 MiB in one chunk: memory-mapped
ARR = np.arange(6, dtype=np.int64).reshape(2, 3)


def state1() -> dict[str, Any]:
    return {"model": {"weight": W1, "bias": BIAS}, "epoch": 1}


def state2() -> dict[str, Any]:
    return {"model": {"weight": W2, "bias": BIAS}, "big": BIG, "arr": ARR, "epoch": 2}


KEYS2 = ["model.weight", "model.bias", "big", "arr", "epoch"]

# ------------------------------------------------------------------------------------------ helpers


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def blob_of(root: Path, checkpoint: str, key: str) -> str:
    m = cairn.Store(root).manifest(checkpoint)
    (entry,) = [t for t in m.tensors if t.path == key]
    (chunk,) = [c for s in entry.shards for c in s.chunks]
    return chunk.blob


def blob_file(root: Path, blob: str) -> Path:
    return root / "blobs" / blob[:2] / blob


def manifest_file(root: Path, name: str) -> Path:
    return root / "checkpoints" / f"{name}.json"


def replace(path: Path, data: bytes) -> None:
    """Rewrite a store file (they are created read-only and never rewritten by cairn)."""
    path.unlink()
    path.write_bytes(data)


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def assert_names(error: BaseException, *parts: str) -> None:
    message = str(error)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


_AUDIT: dict[str, Any] = {"installed": False, "events": None}


def _hook(event: str, args: tuple[Any, ...]) -> None:
    events = _AUDIT["events"]
    if events is not None and event in ("open", "os.scandir", "os.listdir", "os.walk"):
        events.append((event, args))


@pytest.fixture(scope="module")
def opened() -> Callable[[], contextlib.AbstractContextManager[list[str]]]:
    """A context manager collecting every path opened or listed meanwhile (the hook is installed once)."""
    if not _AUDIT["installed"]:
        sys.addaudithook(_hook)
        _AUDIT["installed"] = True

    @contextlib.contextmanager
    def recording() -> Iterator[list[str]]:
        events: list[tuple[str, Any]] = []
        paths: list[str] = []
        _AUDIT["events"] = events
        try:
            yield paths
        finally:
            _AUDIT["events"] = None
            paths += [
                os.path.abspath(os.fsdecode(args[0]))
                for _, args in events
                if args and isinstance(args[0], str | bytes | os.PathLike)
            ]

    return recording


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("damage") / "template"
    cairn.save(root, state1(), step=1)
    cairn.save(root, state2(), step=2)
    return root


@pytest.fixture
def store(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of a store holding step-1 and step-2 (they share the ``model.bias`` blob)."""
    root = tmp_path / "store"
    shutil.copytree(template, root)
    return root


# ------------------------------------------------------------------------------------------ blob damage


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _append(data: bytes) -> bytes:
    return data + b"\x00"


def _empty(data: bytes) -> bytes:
    return b""


def _flip_middle(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :]


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def _zeroed(data: bytes) -> bytes:  # what a crash can leave: the right size, no contents
    return bytes(len(data))


BLOB_DAMAGE: list[Any] = [
    pytest.param(_truncate, BlobCorruptError, id="truncated"),
    pytest.param(_append, BlobCorruptError, id="one-byte-longer"),
    pytest.param(_empty, BlobCorruptError, id="empty"),
    pytest.param(_flip_middle, BlobCorruptError, id="bit-flip-middle"),
    pytest.param(_flip_last, BlobCorruptError, id="bit-flip-last"),
    pytest.param(_zeroed, BlobCorruptError, id="zeroed"),
    pytest.param(None, BlobMissingError, id="deleted"),
]


def damage_blob(root: Path, blob: str, how: Callable[[bytes], bytes] | None) -> None:
    path = blob_file(root, blob)
    if how is None:
        path.unlink()
    else:
        replace(path, how(path.read_bytes()))


@pytest.mark.parametrize("key", ["model.weight", "big"])  # a copied read and a memory-mapped one
@pytest.mark.parametrize(("how", "expected"), BLOB_DAMAGE)
def test_damaged_blob_raises_naming_checkpoint_key_and_blob(
    store: Path, key: str, how: Callable[[bytes], bytes] | None, expected: type[CorruptCheckpointError]
) -> None:
    blob = blob_of(store, "step-2", key)
    damage_blob(store, blob, how)

    for call in (lambda: cairn.load(store, "step-2"), lambda: cairn.load(store)):  # by name and as latest
        with pytest.raises(expected) as e:
            call()
        assert_names(e.value, "'step-2'", f"'{key}'", blob)
        assert isinstance(e.value, CorruptCheckpointError)

    with pytest.raises(expected):
        cairn.load(store, "step-2", keys=key)
    # lazy reads: the other keys of the damaged checkpoint are still there
    others = [k for k in KEYS2 if k != key]
    partial = cairn.load(store, "step-2", keys=others)
    assert torch.equal(partial["model"]["bias"], BIAS)
    assert partial["epoch"] == 2 and np.array_equal(partial["arr"], ARR)
    if key == "big":
        assert torch.equal(partial["model"]["weight"], W2) and "big" not in partial
    else:
        assert torch.equal(partial["big"], BIG) and "weight" not in partial["model"]
    # the older checkpoint does not use that blob
    assert same(cairn.load(store, "step-1"), state1())

    report = cairn.Store(store).verify()
    assert not report.ok
    assert report.checkpoints == ["step-1", "step-2"]
    assert report.damaged == ["step-2"]
    (problem,) = report.problems
    assert (problem.checkpoint, problem.key, problem.blob) == ("step-2", key, blob)
    assert blob in problem.message
    assert cairn.Store(store).verify("step-1").ok
    assert not cairn.Store(store).verify("step-2").ok
    assert cairn.Store(store).verify("latest").damaged == ["step-2"]


def test_shared_blob_damage_reports_every_checkpoint_using_it(store: Path) -> None:
    blob = blob_of(store, "step-1", "model.bias")
    assert blob == blob_of(store, "step-2", "model.bias")  # deduplicated
    damage_blob(store, blob, _flip_middle)
    for name in ("step-1", "step-2"):
        with pytest.raises(BlobCorruptError) as e:
            cairn.load(store, name)
        assert_names(e.value, f"'{name}'", "'model.bias'", blob)
    report = cairn.Store(store).verify()
    assert report.damaged == ["step-1", "step-2"]
    assert {(p.checkpoint, p.key, p.blob) for p in report.problems} == {
        ("step-1", "model.bias", blob),
        ("step-2", "model.bias", blob),
    }
    assert cairn.load(store, "step-1", keys=["model.weight", "epoch"])["epoch"] == 1


def test_size_damage_is_caught_even_without_hash_verification(store: Path) -> None:
    blob = blob_of(store, "step-2", "model.weight")
    damage_blob(store, blob, _truncate)
    with pytest.raises(BlobCorruptError, match=blob):
        cairn.load(store, "step-2", verify=False)
    damage_blob(store, blob, None)
    with pytest.raises(BlobMissingError, match=blob):
        cairn.load(store, "step-2", verify=False)


@pytest.mark.parametrize("mmap", [True, False])
def test_swapped_blob_of_the_right_size_is_caught(store: Path, mmap: bool) -> None:
    """Another blob's bytes under this blob's name: same size, wrong hash."""
    w1, w2 = blob_of(store, "step-1", "model.weight"), blob_of(store, "step-2", "model.weight")
    replace(blob_file(store, w2), blob_file(store, w1).read_bytes())
    with pytest.raises(BlobCorruptError) as e:
        cairn.load(store, "step-2", mmap=mmap)
    assert_names(e.value, "'step-2'", "'model.weight'", w2)


def test_restore_from_a_damaged_checkpoint_changes_nothing(store: Path) -> None:
    damage_blob(store, blob_of(store, "step-2", "big"), _flip_middle)
    live = {"model": {"weight": torch.zeros(8), "bias": torch.zeros(4)}, "big": torch.zeros(512, 512)}
    with pytest.raises(BlobCorruptError, match="'big'"):
        cairn.restore(store, live, "step-2", strict=False)
    assert not live["model"]["weight"].any() and not live["big"].any()


def test_a_save_after_damage_repairs_the_blob(store: Path) -> None:
    """A damaged blob is never trusted again: saving the same tensor writes its true bytes back."""
    blob = blob_of(store, "step-2", "model.weight")
    damage_blob(store, blob, _truncate)
    cairn.save(store, {"w": W2}, step=3)
    assert same(cairn.load(store, "step-2"), state2())
    assert cairn.Store(store).verify().ok


# ------------------------------------------------------------------------------------------ not a file


def _symlink_to_outside(path: Path, tmp_path: Path) -> Path:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(path.read_bytes())  # the right bytes: following the link would "work"
    path.unlink()
    path.symlink_to(outside)
    return outside


def _directory(path: Path, tmp_path: Path) -> Path:
    path.unlink()
    path.mkdir()
    (path / "x").write_bytes(b"x")
    return path / "x"


def _fifo(path: Path, tmp_path: Path) -> Path:
    path.unlink()
    os.mkfifo(path)  # opening it would block forever
    return path


NOT_A_FILE = [
    pytest.param(_symlink_to_outside, id="symlink-outside"),
    pytest.param(_directory, id="directory"),
    pytest.param(_fifo, id="fifo"),
]


@pytest.mark.parametrize("make", NOT_A_FILE)
def test_blob_that_is_not_a_regular_file_is_refused(
    store: Path, tmp_path: Path, opened: Any, make: Callable[[Path, Path], Path]
) -> None:
    blob = blob_of(store, "step-2", "model.weight")
    never_open = make(blob_file(store, blob), tmp_path)
    with opened() as paths:
        for call in (lambda: cairn.load(store, "step-2"), lambda: cairn.load(store, "step-2", mmap=False)):
            with pytest.raises(BlobCorruptError) as e:
                call()
            assert_names(e.value, "'step-2'", "'model.weight'", blob)
        assert same(cairn.load(store, "step-1"), state1())
        assert cairn.load(store, "step-2", keys="big")["big"].shape == (512, 512)
        report = cairn.Store(store).verify()
    assert str(never_open) not in paths  # not followed, and a FIFO never opened (it would block)
    assert report.damaged == ["step-2"]
    assert [(p.checkpoint, p.key, p.blob) for p in report.problems] == [("step-2", "model.weight", blob)]


def test_blob_directory_symlinked_outside_is_refused(store: Path, tmp_path: Path, opened: Any) -> None:
    blob = blob_of(store, "step-2", "model.weight")
    prefix = blob_file(store, blob).parent
    outside = tmp_path / "outside"
    shutil.copytree(prefix, outside)
    shutil.rmtree(prefix)
    prefix.symlink_to(outside, target_is_directory=True)
    with opened() as paths:
        with pytest.raises(BlobCorruptError) as e:
            cairn.load(store, "step-2", keys="model.weight")
        assert_names(e.value, "'step-2'", "'model.weight'", blob)
        assert cairn.Store(store).verify().damaged == ["step-2"]
    assert not [p for p in paths if p.startswith(str(outside))]


def test_checkpoints_directory_symlinked_outside_is_not_followed(
    store: Path, tmp_path: Path, opened: Any
) -> None:
    checkpoints = store / "checkpoints"
    outside = tmp_path / "outside"
    shutil.move(checkpoints, outside)
    checkpoints.symlink_to(outside, target_is_directory=True)
    with opened() as paths:
        with pytest.raises(CairnError):
            cairn.load(store)
        with pytest.raises(CairnError):
            cairn.load(store, "step-2")
        assert cairn.Store(store).list() == []
    assert not [p for p in paths if p.startswith(str(outside))]


@pytest.mark.parametrize("make", NOT_A_FILE)
def test_manifest_that_is_not_a_regular_file_is_refused(
    store: Path, tmp_path: Path, opened: Any, make: Callable[[Path, Path], Path]
) -> None:
    path = manifest_file(store, "step-2")
    outside = make(path, tmp_path)
    with opened() as paths:
        with pytest.raises((BackendError, ManifestError)) as e:
            cairn.load(store, "step-2")
        assert "step-2" in str(e.value)
        assert same(cairn.load(store, "step-1"), state1())
    assert str(outside) not in paths


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_symlink_to_outside, id="symlink-outside"),
        pytest.param(_directory, id="directory"),
        pytest.param(_fifo, id="fifo"),
    ],
)
def test_manifest_that_is_not_a_regular_file_is_skipped_and_reported(
    store: Path, tmp_path: Path, make: Callable[[Path, Path], Path]
) -> None:
    make(manifest_file(store, "step-2"), tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [i.name for i in cairn.Store(store).list()] == ["step-1"]
        assert same(cairn.load(store), state1())
    assert all("step-2" in str(w.message) for w in caught)
    report = cairn.Store(store).verify()
    assert report.damaged == (["step-2"] if "step-2" in report.checkpoints else [])


# ------------------------------------------------------------------------------------------ manifest damage


def _flip_byte(index: int) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        i = index % len(data)
        return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]

    return edit


def _flip_digest(data: bytes) -> bytes:
    i = data.index(b'"digest":"') + len(b'"digest":"') + 7
    return data[:i] + (b"0" if data[i : i + 1] != b"0" else b"1") + data[i + 1 :]


def _flip_step(data: bytes) -> bytes:
    return data.replace(b'"step":2', b'"step":3', 1)


MANIFEST_DAMAGE: list[Any] = [
    pytest.param(_flip_byte(0), id="flip-first-byte"),
    pytest.param(_flip_byte(len(b'{"digest":"') + 70), id="flip-after-digest"),
    pytest.param(_flip_byte(200), id="flip-byte-200"),
    pytest.param(_flip_byte(-3), id="flip-near-end"),
    pytest.param(_flip_digest, id="digest-digit-changed"),
    pytest.param(_flip_step, id="step-edited"),
    pytest.param(lambda d: d[: len(d) // 2], id="truncated-half"),
    pytest.param(lambda d: d[:-3], id="truncated-end"),
    pytest.param(lambda d: b"", id="empty"),
    pytest.param(lambda d: bytes(len(d)), id="zeroed"),
    pytest.param(lambda d: bytes(range(256)) * 16, id="garbage"),
    pytest.param(lambda d: b"{}", id="empty-object"),
    pytest.param(lambda d: d + d, id="written-twice"),
]


def _check_damaged_manifest(store: Path) -> None:
    for call in (lambda: cairn.load(store, "step-2"), lambda: cairn.Store(store).manifest("step-2")):
        with pytest.raises(ManifestError) as e:
            call()
        assert_names(e.value, "step-2")
    assert same(cairn.load(store, "step-1"), state1())
    with pytest.warns(RuntimeWarning, match="step-2"):
        assert [i.name for i in cairn.Store(store).list()] == ["step-1"]
    with pytest.warns(RuntimeWarning, match="step-2"):  # "latest" skips it, saying so
        assert same(cairn.load(store), state1())
    seen: list[tuple[str, CorruptCheckpointError]] = []
    assert [i.name for i in cairn.Store(store).list(on_damaged=lambda n, e: seen.append((n, e)))] == [
        "step-1"
    ]
    assert [(n, type(e)) for n, e in seen] == [("step-2", ManifestError)]
    report = cairn.Store(store).verify()
    assert report.checkpoints == ["step-1", "step-2"] and report.damaged == ["step-2"]
    (problem,) = report.problems
    assert problem.checkpoint == "step-2" and problem.key is None and problem.blob is None
    assert "step-2" in problem.message
    assert cairn.Store(store).verify("step-1").ok


@pytest.mark.parametrize("edit", MANIFEST_DAMAGE)
def test_damaged_manifest_raises_manifest_error(store: Path, edit: Callable[[bytes], bytes]) -> None:
    path = manifest_file(store, "step-2")
    replace(path, edit(path.read_bytes()))
    _check_damaged_manifest(store)


def test_manifest_of_another_checkpoint_under_this_name(store: Path) -> None:
    replace(manifest_file(store, "step-2"), manifest_file(store, "step-1").read_bytes())
    _check_damaged_manifest(store)


def test_damaged_manifest_of_the_only_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "store"
    cairn.save(root, state1(), step=1)
    replace(manifest_file(root, "step-1"), b"{")
    with pytest.warns(RuntimeWarning, match="step-1"), pytest.raises(cairn.CheckpointNotFoundError):
        cairn.load(root)
    with pytest.warns(RuntimeWarning, match="step-1"):
        assert cairn.Store(root).latest() is None


STRAY_MANIFESTS = ["latest.json", "best.json", ".hidden.json", "_x.json", "-x.json", "a" * 129 + ".json"]


@pytest.mark.parametrize("stray", STRAY_MANIFESTS)
def test_stray_file_in_checkpoints_does_not_break_the_store(store: Path, stray: str) -> None:
    shutil.copy(manifest_file(store, "step-1"), store / "checkpoints" / stray)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert [i.name for i in cairn.Store(store).list()] == ["step-1", "step-2"]
        assert same(cairn.load(store), state2())
        assert cairn.Store(store).verify().checkpoints == ["step-1", "step-2"]


def test_marker_over_the_limit_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    cairn.save(root, state1(), step=1)
    replace(root / "cairn.json", b" " * (1 << 17) + (root / "cairn.json").read_bytes())
    with pytest.raises(NotAStoreError, match=r"cairn\.json"):
        cairn.load(root)


def test_marker_over_the_limit_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    cairn.save(root, state1(), step=1)
    marker = root / "cairn.json"
    marker.unlink()
    with open(marker, "wb") as f:
        f.truncate(1 << 36)  # sparse: 64 GiB of nothing
    original = LocalBackend.read

    def spy(self: LocalBackend, rel: str) -> bytes:
        if rel == "cairn.json":
            raise AssertionError("read cairn.json without checking its size")
        return original(self, rel)

    monkeypatch.setattr(LocalBackend, "read", spy)
    with pytest.raises(NotAStoreError):
        cairn.load(root)


# ------------------------------------------------------------------------------------------ not a store


def test_missing_path_is_not_a_store(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for call in (
        lambda: cairn.load(missing),
        lambda: cairn.Store(missing),
        lambda: cairn.Store(missing).list(),
    ):
        with pytest.raises(NotAStoreError, match="nope"):
            call()
    assert not missing.exists()


def test_empty_directory_is_not_a_store(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotAStoreError, match="empty"):
        cairn.load(empty)
    with pytest.raises(NotAStoreError):
        cairn.Store(empty).verify()
    assert list(empty.iterdir()) == []


def test_non_empty_directory_is_never_turned_into_a_store(tmp_path: Path) -> None:
    other = tmp_path / "project"
    other.mkdir()
    (other / "train.py").write_text("print('hi')\n")
    (other / "checkpoints").mkdir()
    before = listing(other)
    with pytest.raises(NotAStoreError, match="project"):
        cairn.load(other)
    with pytest.raises(NotAStoreError, match="non-empty"):
        cairn.save(other, state1(), step=1)
    assert listing(other) == before


def _torch_save(path: Path) -> None:
    torch.save({"weight": torch.zeros(3)}, path)


def _pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": [0.0, 0.0]}, protocol=4))


def _pickle_protocol_2(path: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": [0.0, 0.0]}, protocol=2))


def _safetensors(path: Path) -> None:
    header = json.dumps({"weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))


def _safetensors_lib(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(path))


def _json(path: Path) -> None:
    path.write_text('{"format": "cairn.store", "version": 1}')


def _binary(path: Path) -> None:
    path.write_bytes(bytes(range(256)))


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


FOREIGN = [
    pytest.param(_torch_save, "model.pt", ("torch.save", "cairn import"), id="torch.save"),
    pytest.param(_pickle, "model.pkl", ("pickle",), id="pickle"),
    pytest.param(_pickle_protocol_2, "model.pkl", ("pickle",), id="pickle-protocol-2"),
    pytest.param(_safetensors, "model.safetensors", ("safetensors", "cairn import"), id="safetensors"),
    pytest.param(_safetensors_lib, "lib.safetensors", ("safetensors",), id="safetensors-lib"),
    pytest.param(_json, "cairn.json", ("JSON", "directory"), id="json-marker-file"),
    pytest.param(_binary, "blob.bin", ("not a cairn store",), id="binary"),
    pytest.param(_empty_file, "empty.pt", ("not a cairn store",), id="empty-file"),
]


@pytest.mark.parametrize(("make", "filename", "words"), FOREIGN)
def test_foreign_file_is_recognised_and_left_alone(
    tmp_path: Path, opened: Any, make: Callable[[Path], None], filename: str, words: tuple[str, ...]
) -> None:
    path = tmp_path / filename
    make(path)
    before = path.read_bytes()
    with opened() as paths:
        for call in (
            lambda: cairn.load(path),
            lambda: cairn.Store(path),
            lambda: cairn.Store(path, create=True),
            lambda: cairn.save(path, state1(), step=1),
        ):
            with pytest.raises(NotAStoreError) as e:
                call()
            assert_names(e.value, filename, *words)
    assert path.read_bytes() == before
    assert listing(tmp_path) == [filename]
    assert not [p for p in paths if p.startswith(str(path) + os.sep)]


def _marker(root: Path, data: bytes) -> None:
    replace(root / "cairn.json", data)


def _marker_doc(**changes: Any) -> bytes:
    doc = {"chunk_size": 16 * 2**20, "format": "cairn.store", "hash": "blake3", "version": 1}
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


BAD_MARKERS = [
    pytest.param(b"", id="empty"),
    pytest.param(b'{"format":"cairn.store","ver', id="truncated"),
    pytest.param(bytes(range(256)), id="garbage"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
    pytest.param(b"[1]", id="json-array"),
    pytest.param(b"{}", id="empty-object"),
    pytest.param(_marker_doc(format="cairn.checkpoint"), id="wrong-format"),
    pytest.param(_marker_doc(format=...), id="no-format"),
    pytest.param(_marker_doc(version=0), id="version-0"),
    pytest.param(_marker_doc(version="1"), id="version-string"),
    pytest.param(_marker_doc(version=True), id="version-true"),
    pytest.param(_marker_doc(version=None), id="version-null"),
    pytest.param(_marker_doc(hash="md5"), id="hash-md5"),
    pytest.param(_marker_doc(chunk_size=0), id="chunk-size-0"),
    pytest.param(_marker_doc(chunk_size=2**40), id="chunk-size-huge"),
    pytest.param(_marker_doc(chunk_size="16"), id="chunk-size-string"),
    pytest.param(b'{"format":"cairn.store","format":"cairn.store","version":1}', id="duplicate-key"),
    pytest.param(b'{"format":"cairn.store","version":NaN}', id="nan"),
    pytest.param(b'{"format":"cairn.store","version":' + b"1" * 5000 + b"}", id="int-5000-digits"),
    pytest.param(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, id="nested"),
]


@pytest.mark.parametrize("data", BAD_MARKERS)
def test_damaged_marker_is_not_a_store(tmp_path: Path, data: bytes) -> None:
    root = tmp_path / "store"
    cairn.save(root, state1(), step=1)
    _marker(root, data)
    before = listing(root)
    for call in (
        lambda: cairn.load(root),
        lambda: cairn.Store(root),
        lambda: cairn.save(root, state2(), step=2),
    ):
        with pytest.raises(NotAStoreError) as e:
            call()
        assert_names(e.value, "cairn.json")
    assert listing(root) == before
    assert (root / "cairn.json").read_bytes() == data  # never "repaired" by overwriting


@pytest.mark.parametrize("version", [2, 99, 2**70])
def test_newer_store_version_asks_to_upgrade(tmp_path: Path, version: int) -> None:
    root = tmp_path / "store"
    cairn.save(root, state1(), step=1)
    _marker(root, _marker_doc(version=version))
    before = listing(root)
    for call in (
        lambda: cairn.load(root),
        lambda: cairn.Store(root),
        lambda: cairn.save(root, state2(), step=2),
    ):
        with pytest.raises(UnsupportedVersionError, match="upgrade") as e:
            call()
        assert isinstance(e.value, StoreError)
        assert_names(e.value, str(version)[:20], "cairn.json")
    assert listing(root) == before


def test_marker_that_is_not_a_regular_file(tmp_path: Path, opened: Any) -> None:
    root = tmp_path / "store"
    cairn.save(root, state1(), step=1)
    outside = tmp_path / "outside.json"
    shutil.copy(root / "cairn.json", outside)
    (root / "cairn.json").unlink()
    (root / "cairn.json").symlink_to(outside)
    with opened() as paths, pytest.raises(CairnError, match=r"cairn\.json"):
        cairn.load(root)
    assert str(outside) not in paths
    (root / "cairn.json").unlink()
    (root / "cairn.json").mkdir()
    with pytest.raises(CairnError, match=r"cairn\.json"):
        cairn.load(root)


def test_torch_save_payload_is_never_unpickled(tmp_path: Path) -> None:
    """A torch.save file handed to cairn is sniffed by its first bytes, never unpickled."""
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(canary), "w"))

    buf = io.BytesIO()
    torch.save({"evil": Evil()}, buf)
    path = tmp_path / "model.pt"
    path.write_bytes(buf.getvalue())
    with pytest.raises(CairnError):
        cairn.load(path)
    assert not canary.exists()


@pytest.mark.parametrize("part", ["tmp", "blobs", "checkpoints", "blob-prefix"])
def test_save_never_writes_through_a_symlinked_directory(store: Path, tmp_path: Path, part: str) -> None:
    """A store directory replaced by a link to elsewhere: saving refuses instead of writing there."""
    new = torch.arange(5, dtype=torch.float64)  # a new blob: its prefix directory is computed below
    prefix = blake3.blake3(new.numpy().tobytes()).hexdigest()[:2]
    rel = {"blob-prefix": f"blobs/{prefix}"}.get(part, part)
    inside = store / rel
    outside = tmp_path / "elsewhere"
    if inside.exists():
        shutil.move(inside, outside)
    else:
        outside.mkdir()
    inside.symlink_to(outside, target_is_directory=True)
    before = listing(outside)
    with pytest.raises(CairnError):
        cairn.save(store, {"new": new}, step=3)
    assert listing(outside) == before
    assert not manifest_file(store, "step-3").exists()


def _hangs(call: Callable[[], Any], fifo: Path, seconds: float = 2.0) -> tuple[bool, list[BaseException]]:
    """Run ``call`` in a thread; if it is still blocked after ``seconds``, unblock it by opening the FIFO
    for writing (so the test never hangs) and report that it hung."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:  # handed to the test
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    hung = thread.is_alive()
    if hung:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(seconds)
    return hung, errors


def test_fifo_as_store_path_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    hung, errors = _hangs(lambda: cairn.load(fifo), fifo)
    assert not hung, "cairn.load blocked on a FIFO"
    assert len(errors) == 1 and isinstance(errors[0], NotAStoreError), errors
