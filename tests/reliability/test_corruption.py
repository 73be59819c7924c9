"""C5, C6, C7 of the reliability plan: random on-disk damage is always detected, never handed to the user.

Each test damages one random file of a store holding three checkpoints (two of which share blobs), checks
what every entry point says about it, then repairs the damage in place and goes on with the next trial:

* **C5** truncates a random referenced blob to a random length in ``[0, size - 1]`` (0 included), or a
  manifest; **C6** flips one random bit at a random offset of a random blob or manifest; **C7** deletes a
  random referenced blob or a whole ``blobs/xx`` fan-out directory.
* ``load`` of a damaged checkpoint raises the typed error (``BlobCorruptError``, ``BlobMissingError``,
  ``ManifestError``) naming the blob hash or the manifest file, and never hands out a tensor; for size
  damage the damaged tensor is not even allocated (size pre-flight). Undamaged checkpoints keep restoring
  bit-identically (``data_lost`` counts the ones that do not, and must stay 0).
* ``verify()`` lists exactly the damaged checkpoints and blobs; ``gc()`` never deletes a manifest (nor
  anything else a checkpoint references) to "repair" the store.

``test_load_without_verification_checks_sizes_only`` documents the ``verify=False`` fast path: it still
checks every blob's size (so truncations are always caught) but does not hash, so a bit flip of the right
size goes through, and ``Store.verify`` catches every one of them.

Trial counts come from :func:`reliability.harness.trials` (``CAIRN_SOAK=1`` for the soak counts); the
random seed of each test is in its record's notes and in the assertion messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import cairn
import cairn._read as read_module
from cairn.errors import (
    BlobCorruptError,
    BlobMissingError,
    CairnError,
    CorruptCheckpointError,
    ManifestError,
)
from reliability.harness import Record, trials
from reliability.states import digest, make_state

CHUNK = 2**20  # a 1 MiB chunk size: the big tensors span several blobs, and one is memory-mapped
NAMES = ("step-1", "step-2", "step-3")
SEED = int(os.environ.get("CAIRN_RELIABILITY_SEED", "20260101"))


def _states() -> dict[str, dict[str, Any]]:
    """Three states; step-2 shares its ``model`` and ``big`` tensors (their blobs) with step-1."""
    g = torch.Generator().manual_seed(99)
    one = make_state(1, mib=0.5)
    one["big"] = torch.randn(2**18, generator=g)  # exactly one 1 MiB chunk: loaded memory-mapped
    one["multi"] = torch.randn(600_000, generator=g)  # 2.3 MiB: three chunks
    two = make_state(2, mib=0.5)
    two["model"] = one["model"]
    two["big"] = one["big"]
    two["multi"] = torch.randn(300_000, generator=g)
    three = make_state(3, mib=0.25)
    return {"step-1": one, "step-2": two, "step-3": three}


@dataclass
class Layout:
    """What the template store holds: expected fingerprints, and which checkpoint/key uses which blob."""

    digests: dict[str, Any]
    users: dict[str, set[str]] = field(default_factory=dict)  # blob -> checkpoints referencing it
    keys: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (checkpoint, blob) -> keys

    @property
    def blobs(self) -> list[str]:
        return sorted(self.users)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Layout]:
    root = tmp_path_factory.mktemp("corruption") / "template"
    store = cairn.Store(root, create=True, chunk_size=CHUNK)
    states = _states()
    for step, (name, state) in enumerate(states.items(), start=1):
        store.save(state, step=step, name=name)
    layout = Layout(digests={name: digest(state) for name, state in states.items()})
    for name in NAMES:
        for entry in cairn.Store(root).manifest(name).tensors:
            for shard in entry.shards:
                for chunk in shard.chunks:
                    layout.users.setdefault(chunk.blob, set()).add(name)
                    layout.keys.setdefault((name, chunk.blob), set()).add(entry.path)
    for name in NAMES:  # the control: the template restores bit-identically
        assert digest(cairn.load(root, name)) == layout.digests[name], name
    assert any(len(users) > 1 for users in layout.users.values())  # shared blobs exist
    assert any(
        len(t.shards[0].chunks) > 1 for t in cairn.Store(root).manifest("step-1").tensors
    )  # multi-chunk
    return root, layout


@pytest.fixture
def store(template: tuple[Path, Layout], tmp_path: Path) -> tuple[Path, Layout]:
    root, layout = template
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    return copy, layout


# ------------------------------------------------------------------------------------------ helpers


def blob_file(root: Path, blob: str) -> Path:
    return root / "blobs" / blob[:2] / blob


def manifest_file(root: Path, name: str) -> Path:
    return root / "checkpoints" / f"{name}.json"


def rewrite(path: Path, data: bytes) -> None:
    """Replace a (read-only, write-once) store file by ``data``, keeping it read-only."""
    path.unlink()
    path.write_bytes(data)
    path.chmod(0o444)


def listing(root: Path) -> dict[str, int]:
    """Every file of the store (lock files aside) and its size."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if not rel.startswith("locks"):
                out[rel] = os.lstat(os.path.join(dirpath, f)).st_size
    return out


class AllocationSpy:
    """Records the key of every tensor the reader allocates or maps (to prove the size pre-flight)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: list[str] = []
        self._local = threading.local()
        original_read = read_module.TensorReader.read
        original_allocate = read_module.allocate
        original_from_buffer = read_module.from_buffer
        spy = self

        def read(reader: Any, entry: Any) -> Any:
            spy._local.key = entry.path
            return original_read(reader, entry)

        def allocate(*args: Any, **kwargs: Any) -> Any:
            spy.keys.append(getattr(spy._local, "key", "?"))
            return original_allocate(*args, **kwargs)

        def from_buffer(*args: Any, **kwargs: Any) -> Any:
            spy.keys.append(getattr(spy._local, "key", "?"))
            return original_from_buffer(*args, **kwargs)

        monkeypatch.setattr(read_module.TensorReader, "read", read)
        monkeypatch.setattr(read_module, "allocate", allocate)
        monkeypatch.setattr(read_module, "from_buffer", from_buffer)

    @contextlib.contextmanager
    def watching(self) -> Iterator[list[str]]:
        self.keys = []
        yield self.keys


@dataclass
class Damage:
    """One injected fault: the files touched and what a correct reader must conclude."""

    what: str  # "blob" or "manifest"
    blobs: set[str]  # damaged blobs (empty for a manifest)
    manifest: str | None  # damaged manifest's checkpoint
    damaged: set[str]  # checkpoints that can no longer be restored
    size_damage: bool  # the damage changes a file's size (caught before allocating)
    benign: bool = False  # the bytes changed but not what they mean (e.g. only the final newline cut)
    seed: int = 0  # the test's seed and the trial number, to replay a failure
    trial: int = 0


@dataclass
class Tally:
    faults: int = 0
    detected: int = 0
    data_lost: int = 0
    benign: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    allocated_before_error: int = 0  # other (intact) tensors allocated before the error was raised


def check_trial(
    root: Path, layout: Layout, damage: Damage, spy: AllocationSpy, expected: type[CairnError], tally: Tally
) -> None:
    """Every entry point on a damaged store: typed errors for what is damaged, exact data for the rest."""
    where = f"{damage}"
    tally.faults += 1
    tally.by_kind[damage.what] = tally.by_kind.get(damage.what, 0) + 1
    if damage.benign:
        tally.benign += 1
    ok = True
    for name in NAMES:
        if name in damage.damaged:
            with spy.watching() as allocated, pytest.raises(expected) as e:
                cairn.load(root, name)
            message = str(e.value)
            if damage.blobs:
                assert any(b in message for b in damage.blobs), (where, message)
                assert repr(name) in message, (where, message)
                if damage.size_damage:  # the damaged tensor was never allocated: sizes are checked first
                    bad = {k for b in damage.blobs for k in layout.keys.get((name, b), ())}
                    assert not bad & set(allocated), (where, allocated)
                    tally.allocated_before_error += bool(allocated)
            else:
                assert f"{name}.json" in message, (where, message)
        else:
            try:
                got = digest(cairn.load(root, name))
            except CairnError as e:  # an intact checkpoint must load: anything else is data lost
                ok = False
                tally.data_lost += 1
                raise AssertionError(f"{where}: intact {name} failed: {e!r}") from None
            if got != layout.digests[name]:
                ok = False
                tally.data_lost += 1
                raise AssertionError(f"{where}: {name} came back different (damage handed to the user)")

    report = cairn.Store(root).verify()
    assert report.checkpoints == list(NAMES), where
    assert report.damaged == sorted(damage.damaged), (where, report.problems)
    if damage.blobs:
        assert {p.blob for p in report.problems} == damage.blobs & set(layout.users), where
        for p in report.problems:
            assert p.blob is not None and p.blob in p.message and p.key in layout.keys[(p.checkpoint, p.blob)]
    else:
        assert all(p.blob is None and p.key is None for p in report.problems), where

    before = listing(root)
    try:
        gc = cairn.Store(root).gc(grace=0)
    except CorruptCheckpointError as e:  # a manifest it cannot read: gc refuses, deleting nothing
        assert damage.manifest is not None and not damage.benign, (where, e)
        assert damage.manifest in str(e), (where, e)
    else:
        assert damage.manifest is None or damage.benign, (where, gc)
        assert gc.deleted == [] and gc.blobs_deleted == 0, (where, gc)
    assert listing(root) == before, f"{where}: gc changed the damaged store"
    if ok:
        tally.detected += 1


def finish(record: Record, tally: Tally, n: int, seed: int, root: Path, layout: Layout, **notes: Any) -> None:
    """Fill in the record, then check the repaired store is whole again (the damage was all undone)."""
    record.trials = n
    record.faults = tally.faults
    record.detected = tally.detected
    record.data_lost = tally.data_lost
    record.notes.update(
        seed=seed,
        by_kind=tally.by_kind,
        benign=tally.benign,
        # size damage is caught per tensor before that tensor is allocated (docs/format.md 8.1, step 10);
        # intact tensors of the same checkpoint read in parallel may be allocated first (then dropped)
        loads_that_allocated_other_tensors_first=tally.allocated_before_error,
        **notes,
    )
    assert cairn.Store(root).verify().ok
    for name in NAMES:
        assert digest(cairn.load(root, name)) == layout.digests[name]
    assert tally.data_lost == 0
    assert tally.detected == tally.faults == n


def pick_target(
    rng: random.Random, root: Path, layout: Layout, manifest_share: float
) -> tuple[str, str, Path]:
    """A random blob (uniform over referenced blobs) or, with probability ``manifest_share``, a manifest."""
    if rng.random() < manifest_share:
        name = rng.choice(NAMES)
        return "manifest", name, manifest_file(root, name)
    blob = rng.choice(layout.blobs)
    return "blob", blob, blob_file(root, blob)


# ------------------------------------------------------------------------------------------ C5


def test_c5_truncated_blob_or_manifest_is_detected(
    store: tuple[Path, Layout], record: Record, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C5: truncate a random referenced blob (or a manifest) to a random length in [0, size - 1]."""
    root, layout = store
    spy = AllocationSpy(monkeypatch)
    rng = random.Random(SEED)
    n = trials(100, 1000)
    tally = Tally()
    lengths = {"zero": 0, "max": 0}
    for t in range(n):
        what, ident, path = pick_target(rng, root, layout, manifest_share=0.2)
        original = path.read_bytes()
        length = rng.randint(0, len(original) - 1)
        lengths["zero"] += length == 0
        lengths["max"] += length == len(original) - 1
        if what == "blob":
            damage = Damage("blob", {ident}, None, layout.users[ident], size_damage=True)
            expected: type[CairnError] = BlobCorruptError
        else:
            # cutting only the final newline leaves the same canonical JSON: still the whole checkpoint
            benign = original[:length] == original.rstrip(b"\n")
            damage = Damage("manifest", set(), ident, set() if benign else {ident}, True, benign)
            expected = ManifestError
        damage.seed, damage.trial = SEED, t
        rewrite(path, original[:length])
        try:
            check_trial(root, layout, damage, spy, expected, tally)
        finally:
            rewrite(path, original)
    finish(record, tally, n, SEED, root, layout, lengths=lengths)


# ------------------------------------------------------------------------------------------ C6


def test_c6_bit_flip_in_blob_or_manifest_is_detected(
    store: tuple[Path, Layout], record: Record, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C6: flip one random bit at a random offset of a random blob or manifest (hash verification on)."""
    root, layout = store
    spy = AllocationSpy(monkeypatch)
    rng = random.Random(SEED + 6)
    n = trials(200, 10_000)
    tally = Tally()
    for t in range(n):
        what, ident, path = pick_target(rng, root, layout, manifest_share=0.25)
        original = path.read_bytes()
        data = bytearray(original)
        offset, bit = rng.randrange(len(data)), rng.randrange(8)
        data[offset] ^= 1 << bit
        if what == "blob":
            damage = Damage("blob", {ident}, None, layout.users[ident], size_damage=False)
            expected: type[CairnError] = BlobCorruptError
        else:
            benign = _same_json(bytes(data), original)  # e.g. "1e-05" -> "1E-05": the same manifest
            damage = Damage("manifest", set(), ident, set() if benign else {ident}, False, benign)
            expected = ManifestError
        damage.seed, damage.trial = SEED + 6, t
        rewrite(path, bytes(data))
        try:
            check_trial(root, layout, damage, spy, expected, tally)
        finally:
            rewrite(path, original)
    finish(record, tally, n, SEED + 6, root, layout)


def _same_json(a: bytes, b: bytes) -> bool:
    try:
        return bool(json.loads(a) == json.loads(b))
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------ C7


def test_c7_missing_blob_or_blob_directory_is_detected(
    store: tuple[Path, Layout], record: Record, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C7: delete a random referenced blob, or a whole ``blobs/xx`` directory."""
    root, layout = store
    spy = AllocationSpy(monkeypatch)
    rng = random.Random(SEED + 7)
    n = trials(50, 500)
    tally = Tally()
    dirs = 0
    for t in range(n):
        blob = rng.choice(layout.blobs)
        whole_dir = rng.random() < 0.3
        directory = blob_file(root, blob).parent
        saved = {p.name: p.read_bytes() for p in directory.iterdir()} if whole_dir else {}
        if whole_dir:
            dirs += 1
            gone = set(saved)
            shutil.rmtree(directory)
        else:
            saved = {blob: blob_file(root, blob).read_bytes()}
            gone = {blob}
            blob_file(root, blob).unlink()
        damaged = set().union(*(layout.users.get(b, set()) for b in gone))
        damage = Damage(
            "blob-dir" if whole_dir else "blob", gone, None, damaged, True, seed=SEED + 7, trial=t
        )
        try:
            check_trial(root, layout, damage, spy, BlobMissingError, tally)
        finally:
            directory.mkdir(exist_ok=True)
            for name, data in saved.items():
                (directory / name).write_bytes(data)
                (directory / name).chmod(0o444)
    finish(record, tally, n, SEED + 7, root, layout, whole_directories=dirs)


# ------------------------------------------------------------------------------------------ verify=False


def test_load_without_verification_checks_sizes_only(store: tuple[Path, Layout], record: Record) -> None:
    """``load(verify=False)`` skips hashing but not the size pre-flight: every truncation of a blob is still
    a BlobCorruptError and every deletion a BlobMissingError. A bit flip keeps the size, so the fast path
    hands it through (documented: that is the opt-out), while ``verify()`` catches 100% of the flips."""
    root, layout = store
    rng = random.Random(SEED + 8)
    n = trials(60, 600)
    counts = {"truncate": 0, "delete": 0, "flip": 0, "flip_passed_unverified": 0, "flip_caught_by_verify": 0}
    detected = 0
    for i in range(n):
        blob = rng.choice(layout.blobs)
        path = blob_file(root, blob)
        original = path.read_bytes()
        how = ("truncate", "delete", "flip")[i % 3]
        counts[how] += 1
        name = sorted(layout.users[blob])[0]
        try:
            if how == "delete":
                path.unlink()
            else:
                data = bytearray(
                    original[: rng.randint(0, len(original) - 1)] if how == "truncate" else original
                )
                if how == "flip":
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                rewrite(path, bytes(data))
            if how == "flip":
                loaded = cairn.load(root, name, verify=False)  # no hash: the flip is not seen here...
                counts["flip_passed_unverified"] += digest(loaded) != layout.digests[name]
                report = cairn.Store(root).verify()  # ...but the full check sees every one
                assert report.damaged == sorted(layout.users[blob]), (SEED, blob, report.problems)
                assert {p.blob for p in report.problems} == {blob}
                counts["flip_caught_by_verify"] += 1
                detected += 1
            else:
                expected = BlobMissingError if how == "delete" else BlobCorruptError
                for mmap in (True, False):
                    with pytest.raises(expected, match=blob):
                        cairn.load(root, name, verify=False, mmap=mmap)
                detected += 1
        finally:
            if path.exists():
                path.unlink()
            path.write_bytes(original)
            path.chmod(0o444)
    record.trials = record.faults = n
    record.detected = detected
    record.notes.update(seed=SEED + 8, **counts)
    assert detected == n
    assert counts["flip_passed_unverified"] == counts["flip"]  # the documented limit of verify=False
    assert counts["flip_caught_by_verify"] == counts["flip"]
    assert cairn.Store(root).verify().ok


def test_store_files_are_read_only_so_damage_needs_a_rewrite(store: tuple[Path, Layout]) -> None:
    """The control of the harness's ``rewrite``: cairn leaves blobs and manifests mode 0444."""
    root, layout = store
    for path in [blob_file(root, b) for b in layout.blobs] + [manifest_file(root, n) for n in NAMES]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o444, path
