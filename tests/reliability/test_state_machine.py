"""C13: a Hypothesis state machine over a store under CrashFS, checked against a model after every step.

Rules: save, delete, retain(k), gc(grace=0), crash (power loss now: every unsynced operation applied,
dropped or torn, then a fresh handle on the image), a crash in the middle of a save, a delete or a gc,
restart (a new handle), and corrupt_blob (one bit of one blob flipped on the disk). The model is the
dict of committed checkpoints with their digests and blobs, plus the set of corrupted blobs.
Invariants: ``list()`` names exactly the model's checkpoints; those referencing a corrupted blob raise
``CorruptCheckpointError``, the others load bit-identically; ``latest()`` is the highest step.

A blob of the right size is reused by later saves without being hashed (``docs/format.md`` 2.2), so a
save that dedups against a corrupted blob is itself corrupt: the model knows.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import cairn
import cairn._store
import cairn.backends.local
from cairn.errors import CheckpointExistsError, CorruptCheckpointError
from reliability.crashfs import CrashFS, ram_dir
from reliability.harness import Record, trials
from reliability.states import digest

CHUNK = 64  # tiny chunks: tensors of a few blobs, dedup between saves

POOL: list[torch.Tensor] = [
    torch.arange(40, dtype=torch.float32),
    torch.arange(40, dtype=torch.float32) * 2,
    torch.ones(16, dtype=torch.float32),
    torch.arange(24, dtype=torch.int64),
    torch.tensor([True, False] * 9),
    torch.linspace(0, 1, 33).to(torch.bfloat16),
    torch.zeros(0, 3),
    torch.tensor(7.5),
]


@dataclass
class Stats:
    """Totals over every example of a run, for the record."""

    examples: int = 0
    steps: int = 0
    crashes: int = 0
    faults: int = 0
    corruptions: int = 0
    corrupt_loads: int = 0
    midsave_committed: int = 0
    midsave_absent: int = 0


STATS = Stats()
WHERE: list[str] = []  # the directory examples make their stores in (set by the test)


def make_state(step: int, picks: list[int]) -> dict[str, Any]:
    """A small state from the pool: equal picks make equal blobs (dedup)."""
    return {"t": {f"k{i}": POOL[p].clone() for i, p in enumerate(picks)}, "step": step, "tag": f"s{step}"}


class StoreMachine(RuleBasedStateMachine):
    """One store, its CrashFS, and the model of what it must hold."""

    def __init__(self) -> None:
        super().__init__()
        STATS.examples += 1
        # the same path for every example: a flush fsyncs same-depth directories in the order of a set of
        # path strings, so equal paths keep an example's log, hence its replay while shrinking, identical
        self.root = Path(WHERE[0]) / "example" if WHERE else Path(tempfile.mkdtemp(prefix="c13-"))
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir()
        self.generation = 0
        self.model: dict[str, Any] = {}  # name -> digest
        self.blobs: dict[str, set[str]] = {}  # name -> its blobs
        self.corrupt: set[str] = set()
        self._unpatch: Any = None
        self._boot(None)
        self.store = cairn.Store(self.store_dir, create=True, chunk_size=CHUNK)

    # -- plumbing ---------------------------------------------------------------------------------------

    def _boot(self, image: Any) -> None:
        """Start recording on a fresh disk: empty, or the crash ``image``."""
        if self._unpatch is not None:
            self._unpatch.__exit__(None, None, None)
        old = self.root / f"disk{self.generation}"
        self.generation += 1
        disk = self.root / f"disk{self.generation}"
        if image is None:
            disk.mkdir()
        else:
            image.write_to(disk)
            shutil.rmtree(old)
        self.fs = CrashFS(disk)
        self.store_dir = disk / "store"
        self._unpatch = self.fs.patched(cairn.backends.local)
        self._unpatch.__enter__()

    def teardown(self) -> None:
        """Stop recording and remove the example's files."""
        if self._unpatch is not None:
            self._unpatch.__exit__(None, None, None)
        shutil.rmtree(self.root, ignore_errors=True)

    def _crash(self, at: int | None, seed: int, reorder: bool) -> None:
        image = self.fs.crash(at, random.Random(seed), reorder=reorder)
        STATS.crashes += 1
        STATS.faults += image.faults
        self._boot(image)
        self.store = cairn.Store(self.store_dir)
        self._prune_corrupt()

    def _prune_corrupt(self) -> None:
        """A corrupted blob whose file is gone (collected) is corrupt no more: a later save writes it anew."""
        self.corrupt = {b for b in self.corrupt if (self.store_dir / "blobs" / b[:2] / b).exists()}

    def _commit(self, name: str, state: dict[str, Any]) -> None:
        self.model[name] = digest(state)
        self.blobs[name] = self.store.manifest(name).blobs()

    def _forget(self, name: str) -> None:
        del self.model[name]
        del self.blobs[name]

    @staticmethod
    def _step(name: str) -> int:
        return int(name.removeprefix("step-"))

    # -- rules ------------------------------------------------------------------------------------------

    @rule(step=st.integers(0, 12), picks=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=4))
    def save(self, step: int, picks: list[int]) -> None:
        """Save a state; a taken name is refused and changes nothing."""
        name, state = f"step-{step}", make_state(step, picks)
        if name in self.model:
            with pytest.raises(CheckpointExistsError):
                self.store.save(state, step=step)
            return
        self.store.save(state, step=step)
        self._commit(name, state)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        """Delete one checkpoint."""
        self.do_delete(data.draw(st.sampled_from(sorted(self.model))))

    def do_delete(self, name: str) -> None:
        """Delete checkpoint ``name``."""
        self.store.delete(name)
        self._forget(name)

    @rule(k=st.integers(0, 3))
    def retain(self, k: int) -> None:
        """Delete all but the newest ``k`` checkpoints."""
        names = sorted(self.model, key=self._step)
        for name in names[: max(0, len(names) - k)]:
            self.store.delete(name)
            self._forget(name)

    @rule()
    def gc(self) -> None:
        """Collect garbage with no grace: every unreferenced blob goes, corrupted ones included."""
        report = self.store.gc(grace=0)
        self._prune_corrupt()
        assert not any(os.scandir(self.store_dir / "tmp")), "gc(grace=0) left temporary files"
        live = set().union(*self.blobs.values())
        assert not any(p.rpartition("/")[2] in live for p in report.deleted), "gc deleted a live blob"

    @rule(where=st.floats(0, 1), seed=st.integers(0, 2**32 - 1), reorder=st.booleans())
    def crash_during_gc(self, where: float, seed: int, reorder: bool) -> None:
        """Power loss in the middle of a gc: no checkpoint is affected."""
        start = len(self.fs.log)
        self.store.gc(grace=0)
        self._crash(start + round(where * (len(self.fs.log) - start)), seed, reorder)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), where=st.floats(0, 1), seed=st.integers(0, 2**32 - 1), reorder=st.booleans())
    def crash_during_delete(self, data: st.DataObject, where: float, seed: int, reorder: bool) -> None:
        """Power loss in the middle of a delete: the checkpoint is there (intact) or gone."""
        name = data.draw(st.sampled_from(sorted(self.model)))
        start = len(self.fs.log)
        self.store.delete(name)
        end = len(self.fs.log)
        at = start + round(where * (end - start))
        self._crash(at, seed, reorder)
        if name not in self.store.names():
            self._forget(name)
        else:
            assert at < end, "a delete that returned came undone"

    @rule(seed=st.integers(0, 2**32 - 1), reorder=st.booleans())
    def crash(self, seed: int, reorder: bool) -> None:
        """Power loss now: what was not fsynced is applied, dropped or torn; then a fresh handle."""
        self._crash(None, seed, reorder)

    @rule(
        step=st.integers(0, 12),
        picks=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=4),
        where=st.floats(0, 1),
        seed=st.integers(0, 2**32 - 1),
        reorder=st.booleans(),
    )
    def crash_during_save(self, step: int, picks: list[int], where: float, seed: int, reorder: bool) -> None:
        """Power loss in the middle of a save: the checkpoint is there (intact) or not at all."""
        name, state = f"step-{step}", make_state(step, picks)
        if name in self.model:
            return
        start = len(self.fs.log)
        self.store.save(state, step=step)
        end = len(self.fs.log)
        at = start + round(where * (end - start))
        self._crash(at, seed, reorder)
        if name in self.store.names():
            STATS.midsave_committed += 1
            self._commit(name, state)
        else:
            assert at < end, "a save that returned was lost"
            STATS.midsave_absent += 1

    @rule()
    def restart(self) -> None:
        """A new handle on the same directory; verify() names exactly the corrupted checkpoints."""
        self.store = cairn.Store(self.store_dir)
        report = self.store.verify()
        assert {p.checkpoint for p in report.problems} == self._bad()

    @precondition(lambda self: any(self.blobs.values()))
    @rule(data=st.data())
    def corrupt_blob(self, data: st.DataObject) -> None:
        """Flip one bit of one blob on the disk (durably: bit rot is not undone by a crash)."""
        blobs = sorted(set().union(*self.blobs.values()))
        self.do_corrupt(data.draw(st.integers(0, len(blobs) - 1)), data.draw(st.integers(0, 8 * CHUNK - 1)))

    def do_corrupt(self, index: int, where: int) -> None:
        """Flip bit ``where % 8`` of byte ``where // 8`` (modulo its size) of the ``index``-th live blob."""
        blobs = sorted(set().union(*self.blobs.values()))
        blob = blobs[index % len(blobs)]
        path = self.store_dir / "blobs" / blob[:2] / blob
        data = bytearray(path.read_bytes())
        offset = (where // 8) % len(data)
        data[offset] ^= 1 << (where % 8)
        self.fs.poke(path, offset, bytes(data[offset : offset + 1]))
        if blake3.blake3(data).hexdigest() == blob:  # flipped back: intact again
            self.corrupt.discard(blob)
        else:
            self.corrupt.add(blob)
        STATS.corruptions += 1

    # -- invariants -------------------------------------------------------------------------------------

    def _bad(self) -> set[str]:
        return {n for n, b in self.blobs.items() if b & self.corrupt}

    @invariant()
    def matches_model(self) -> None:
        """Listed == model; corrupted ones raise typed errors, the others load bit-identically."""
        STATS.steps += 1
        damaged: list[str] = []
        infos = self.store.list(on_damaged=lambda name, e: damaged.append(name))
        assert not damaged, f"damaged manifests: {damaged}"
        assert sorted(i.name for i in infos) == sorted(self.model)
        bad = self._bad()
        for name, want in self.model.items():
            if name in bad:
                with pytest.raises(CorruptCheckpointError):
                    self.store.load(name)
                STATS.corrupt_loads += 1
            else:
                assert repr(digest(self.store.load(name))) == repr(want), name
        latest = self.store.latest()
        if self.model:
            assert latest is not None and latest.name == max(self.model, key=self._step)
        else:
            assert latest is None


pytestmark = pytest.mark.usefixtures("one_thread_pools")  # repeatable file-system call order


@pytest.fixture
def where(tmp_path: Path) -> Iterator[str]:
    """The directory the examples' stores live in (RAM where possible)."""
    with ram_dir(tmp_path) as d:
        WHERE[:] = [d]
        try:
            yield d
        finally:
            WHERE.clear()


def _budget() -> tuple[int, int]:
    examples, steps = trials(ci=200, soak=5000), trials(ci=50, soak=100)
    if os.environ.get("HYPOTHESIS_PROFILE"):
        examples = max(examples, settings.default.max_examples)
    return examples, steps


def test_state_machine(where: str, record: Record) -> None:
    """C13: random sequences of saves, deletes, retention, gc, crashes, restarts and bit rot."""
    global STATS
    STATS = Stats()
    examples, steps = _budget()
    run_state_machine_as_test(
        StoreMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    record.trials = STATS.examples
    record.faults = STATS.faults + STATS.corruptions
    record.detected = STATS.corrupt_loads
    record.data_lost = 0  # any loss fails an invariant, and the test
    record.notes.update(
        steps=STATS.steps,
        crashes=STATS.crashes,
        ops_dropped_or_torn=STATS.faults,
        bit_flips=STATS.corruptions,
        midsave_committed=STATS.midsave_committed,
        midsave_absent=STATS.midsave_absent,
        max_examples=examples,
        stateful_step_count=steps,
    )


# -- explicit scenarios (regression tests; shrunk counterexamples go here) ----------------------------------


def _scenario(where: str, *calls: tuple[str, dict[str, Any]]) -> StoreMachine:
    WHERE[:] = [where]
    m = StoreMachine()
    try:
        m.matches_model()
        for name, kwargs in calls:
            getattr(m, name)(**kwargs)
            m.matches_model()
    finally:
        m.teardown()
    return m


def test_corrupt_blob_then_dedup_save(where: str, record: Record) -> None:
    """A save that reuses a corrupted blob (same size) is corrupt too; gc then removes nothing it needs."""
    m = _scenario(
        where,
        ("save", {"step": 1, "picks": [0, 2]}),
        ("do_corrupt", {"index": 0, "where": 3}),
        ("save", {"step": 2, "picks": [0, 2]}),
        ("restart", {}),
        ("gc", {}),
        ("crash", {"seed": 1, "reorder": True}),
    )
    record.trials, record.faults, record.detected = 1, 1, len(m._bad())
    assert m._bad() == {"step-1", "step-2"}


@pytest.mark.parametrize("where_frac", [0.0, 0.3, 0.6, 0.9, 1.0])
def test_crash_during_save_after_gc(where: str, record: Record, where_frac: float) -> None:
    """A crash in a save that re-creates blobs the gc just removed: the old checkpoints stay intact."""
    m = _scenario(
        where,
        ("save", {"step": 1, "picks": [0, 1]}),
        ("save", {"step": 2, "picks": [1, 2]}),
        ("do_delete", {"name": "step-1"}),
        ("gc", {}),
        (
            "crash_during_save",
            {"step": 3, "picks": [0, 1, 3], "where": where_frac, "seed": 7, "reorder": True},
        ),
        ("gc", {}),
        ("restart", {}),
    )
    record.trials, record.faults = 1, 1
    assert "step-2" in m.model


def test_flipping_a_bit_back_restores_the_blob(where: str, record: Record) -> None:
    """Shrunk counterexample (of the model): the same bit flipped twice leaves the blob intact."""
    m = _scenario(
        where,
        ("save", {"step": 0, "picks": [0]}),
        ("do_corrupt", {"index": 0, "where": 0}),
        ("do_corrupt", {"index": 0, "where": 0}),
    )
    record.trials, record.faults = 1, 2
    assert not m._bad()
