"""C4: simulated power loss. A workload of saves runs under CrashFS; crash states are rebuilt and checked.

The workload: create the store, a first save, an incremental save (dedup), a delete, a gc, a save that
re-creates blobs the gc removed, then a checkpoint saved under a fixed name and overwritten (the
``os.replace`` path). At a random crash point each unsynced write is applied, dropped or torn and each
unsynced directory operation applied or dropped (reordered, or as a journal prefix); the image is opened
with a fresh ``Store``. Every listed checkpoint must load bit-identically, every acknowledged one must be
there, no deleted one may come back, and only typed errors may be raised.

Mutation twins run the same harness on broken protocols (file fsync removed, blob flush skipped, manifest
committed before the blobs are fsynced): each must be caught in at least one crash state.

``CAIRN_SEED`` fixes the random seed (it is printed, and kept in the record's notes): crash points and the
fate of every operation. The log itself can differ slightly between runs: a flush fsyncs directories of
equal depth in the iteration order of a set of paths, which changes with the temporary directory's name.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import shutil
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import cairn
import cairn._store
import cairn.backends.local
from cairn.backends.local import LocalBackend
from reliability.crashfs import CrashFS, ram_dir
from reliability.harness import Record, trials
from reliability.states import digest, make_state

CHUNK = 5 * 2**18  # 1.25 MiB: the big tensor is one blob of over 1 MiB, written with O_DIRECT where it can be
BIG = 300_000  # floats: 1.2 MB, not a multiple of 4 KiB (O_DIRECT pads the tail, then ftruncates)


def seed_for(test: str) -> int:
    """The run's seed (``CAIRN_SEED`` or a fresh one, printed), mixed with the test's name."""
    base = os.environ.get("CAIRN_SEED")
    seed = int(base) if base else random.SystemRandom().randrange(2**32)
    print(f"CAIRN_SEED={seed} ({test})")
    return seed


def _variant(state: dict[str, Any], seed: int, *keys: str) -> dict[str, Any]:
    """``state`` with the tensors ``model.<key>`` replaced (the rest dedups against it)."""
    g = torch.Generator().manual_seed(seed)
    model = {k: (torch.randn(v.shape, generator=g) if k in keys else v) for k, v in state["model"].items()}
    return {**state, "model": model}


@dataclass
class Event:
    """A save or delete of one checkpoint name, between two markers of the log."""

    kind: str
    start: int
    end: int = -1
    digest: Any = None


@dataclass
class Workload:
    """What the run did, for judging a crash state: events per checkpoint name, store creation."""

    store_rel: str
    created: int = -1
    events: dict[str, list[Event]] = field(default_factory=dict)


def run_workload(fs: CrashFS, store_dir: Path) -> Workload:
    """The saves of C4, under CrashFS, with a marker before and after each store operation."""
    wl = Workload(os.path.relpath(store_dir, fs.base))
    a = make_state(1, mib=0.06, tensors=10)
    a["model"]["big"] = torch.randn(BIG, generator=torch.Generator().manual_seed(1))
    b = _variant(a, 2, "w0")
    c = _variant(a, 3, "w1")  # brings back a's w0 blob, which the gc below deleted
    d = _variant(b, 4, "w2", "w3", "big")
    e = _variant(d, 5, "w4")

    def save(
        store: cairn.Store, state: dict[str, Any], step: int, name: str | None = None, overwrite: bool = False
    ) -> None:
        key = name or f"step-{step}"
        ev = Event("save", fs.mark("save", name=key), digest=digest(state))
        wl.events.setdefault(key, []).append(ev)
        store.save(state, step=step, name=name, overwrite=overwrite)
        ev.end = fs.mark("saved", name=key)

    with fs.patched(cairn.backends.local):
        store = cairn.Store(store_dir, create=True, chunk_size=CHUNK)
        wl.created = fs.mark("created")
        save(store, a, 1)
        save(store, b, 2)
        ev = Event("delete", fs.mark("delete", name="step-1"))
        wl.events["step-1"].append(ev)
        store.delete("step-1")
        ev.end = fs.mark("deleted", name="step-1")
        fs.mark("gc")
        report = store.gc(grace=0)
        assert report.blobs_deleted > 0, "the workload's gc must delete blobs"
        fs.mark("gc-done")
        save(store, c, 3)
        save(store, d, 4, name="top")
        save(store, e, 5, name="top", overwrite=True)  # the replace path
    fs.check_model()
    return wl


def allowed(wl: Workload, name: str, at: int) -> set[Any]:
    """What checkpoint ``name`` may look like after a crash at ``at``: digests, and None for absent."""
    outcome: Any = None
    inflight: list[Any] = []
    for ev in wl.events.get(name, []):
        result = ev.digest if ev.kind == "save" else None
        if ev.end != -1 and ev.end < at:
            outcome = result
        elif ev.start < at:
            inflight.append(result)
    return {_key(outcome), *(_key(r) for r in inflight)}


def _key(d: Any) -> Any:
    return None if d is None else repr(d)


def judge(store_path: Path, wl: Workload, at: int, *, recover: bool) -> tuple[list[str], int]:
    """Violations found in the crash image at ``store_path`` (crash point ``at``); and typed errors seen."""
    bad: list[str] = []
    typed = 0
    try:
        store = cairn.Store(store_path)
    except cairn.NotAStoreError as e:
        if wl.created < at:
            bad.append(f"store lost after its creation returned: {e}")
        elif recover:  # a crash while the store was being created: creating it again must work
            try:
                cairn.Store(store_path, create=True, chunk_size=CHUNK).save(make_state(98, mib=0.01), step=0)
            except Exception as e2:
                bad.append(f"re-creating the store after a crash in its creation raised {e2!r}")
        return bad, 1
    except cairn.CairnError as e:
        return [f"opening raised {type(e).__name__}: {e}"], 1
    except Exception as e:
        return [f"opening raised untyped {type(e).__name__}: {e}"], 0
    damaged: list[str] = []
    try:
        infos = store.list(on_damaged=lambda name, err: damaged.append(f"{name}: {type(err).__name__}"))
    except Exception as e:
        return [f"list() raised {type(e).__name__}: {e}"], 0
    if damaged:
        typed += len(damaged)
        bad.append(f"damaged manifests visible: {damaged}")
    listed = {i.name for i in infos}
    for name in sorted(listed | set(wl.events)):
        ok = allowed(wl, name, at)
        if name not in listed:
            if None not in ok:
                bad.append(f"{name}: acknowledged checkpoint lost")
            continue
        try:
            got = _key(digest(store.load(name)))
        except cairn.CairnError as e:
            typed += 1
            bad.append(f"{name}: listed but unloadable: {type(e).__name__}: {e}")
            continue
        except Exception as e:
            bad.append(f"{name}: load raised untyped {type(e).__name__}: {e}")
            continue
        if got not in ok:
            bad.append(f"{name}: loaded state is not one that was saved under this name")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            latest = store.latest()
        except Exception as e:
            bad.append(f"latest() raised {type(e).__name__}: {e}")
            latest = None
    if infos and (latest is None or latest.name != infos[-1].name):
        bad.append(f"latest() is {latest and latest.name}, the list ends with {infos[-1].name}")
    if not bad:
        problems = store.verify().problems
        if problems:
            bad.append(f"verify() found {problems[:3]}")
    if recover and not bad and wl.created < at:
        bad += _recover(store, infos)
    return bad, typed


def _recover(store: cairn.Store, infos: list[Any]) -> list[str]:
    """After a crash the next save and gc must succeed and leave every checkpoint loadable."""
    before = {i.name: _key(digest(store.load(i.name))) for i in infos}
    fresh = make_state(99, mib=0.02, tensors=2)
    try:
        store.save(fresh, step=1000)
        store.gc(grace=0)
    except Exception as e:
        return [f"recovery save/gc raised {type(e).__name__}: {e}"]
    after = {i.name: _key(digest(store.load(i.name))) for i in store.list()}
    if after != {**before, "step-1000": _key(digest(fresh))}:
        return ["after recovery save+gc the checkpoints changed"]
    if store.verify().problems or any(os.scandir(os.path.join(store.url, "tmp"))):
        return ["after recovery gc the store is not clean"]
    return []


@dataclass
class Campaign:
    """Totals of one batch of crash states."""

    states: int = 0
    faults: int = 0
    violations: int = 0
    typed: int = 0
    untyped: int = 0
    clean: int = 0
    examples: list[str] = field(default_factory=list)
    log: dict[str, int] = field(default_factory=dict)

    def tally(self, faults: int, bad: list[str], typed: int, where: str) -> None:
        """Count one judged crash state."""
        self.states += 1
        self.faults += faults
        self.typed += typed
        self.untyped += sum("untyped" in b for b in bad)
        if bad:
            self.violations += 1
            if len(self.examples) < 5:
                self.examples.append(f"{where}: {bad[:3]}")
        else:
            self.clean += 1


def campaign(
    tmp_path: Path, n: int, seed: int, prepare: Callable[[CrashFS], contextlib.AbstractContextManager[Any]]
) -> Campaign:
    """Run the workload under ``prepare`` (a protocol mutation, or nothing), then judge ``n`` crash states."""
    disk = tmp_path / "disk"
    disk.mkdir()
    fs = CrashFS(disk)
    with prepare(fs):
        wl = run_workload(fs, disk / "store")
    rng = random.Random(seed)
    out = Campaign()
    points = len(fs.log)
    out.log = dict(collections.Counter(op.kind for op in fs.log))
    out.log["tail_truncates"] = sum(op.kind == "trunc" and op.size > 0 for op in fs.log)
    names = [i + 1 for i, op in enumerate(fs.log) if op.kind in ("link", "rename", "unlink")]
    with ram_dir(tmp_path) as scratch:
        for i in range(n):
            # half the crash points uniform, half just after a name changed (where protocols break)
            at = (
                rng.randint(0, points)
                if rng.random() < 0.5
                else min(points, rng.choice(names) + rng.randint(0, 3))
            )
            state = fs.crash(at, rng, reorder=rng.random() < 0.75)
            dest = Path(scratch) / "state"
            state.write_to(dest)
            try:
                bad, typed = judge(dest / wl.store_rel, wl, at, recover=i % 10 == 0 or at <= wl.created)
            finally:
                shutil.rmtree(dest)
            out.tally(state.faults, bad, typed, f"crash point {at}/{points} (state {i})")
    return out


@contextlib.contextmanager
def intact(fs: CrashFS) -> Iterator[None]:
    """The protocol as shipped."""
    yield


def _is_file(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


@contextlib.contextmanager
def no_file_fsync(fs: CrashFS) -> Iterator[None]:
    """Mutant 1: ``fsync`` of files removed (directory fsyncs stay)."""
    real = fs.proxy.fsync
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fs.proxy, "fsync", lambda fd: None if _is_file(fd) else real(fd))
        yield


@contextlib.contextmanager
def no_blob_flush(fs: CrashFS) -> Iterator[None]:
    """Mutant 2: the flush (directory fsyncs) before the manifest link skipped."""
    create, flush = LocalBackend.create, LocalBackend.flush
    last = [""]

    def creating(self: LocalBackend, path: str, *args: Any, **kwargs: Any) -> bool:
        last[0] = path
        return create(self, path, *args, **kwargs)

    def flushing(self: LocalBackend, *args: Any, **kwargs: Any) -> None:
        if not last[0].startswith("blobs/"):  # the flush that follows the blobs is skipped
            flush(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalBackend, "create", creating)
        mp.setattr(LocalBackend, "flush", flushing)
        yield


@contextlib.contextmanager
def manifest_first(fs: CrashFS) -> Iterator[None]:
    """Mutant 3: blobs are fsynced only after the manifest is linked (the order of the steps broken)."""
    create, real_fsync = LocalBackend.create, fs.proxy.fsync
    local = threading.local()
    owed: list[str] = []

    def fsync(fd: int) -> None:
        if getattr(local, "blob", False) and _is_file(fd):
            return
        real_fsync(fd)

    def creating(self: LocalBackend, path: str, *args: Any, **kwargs: Any) -> bool:
        if path.startswith("blobs/"):
            local.blob = True
            try:
                return create(self, path, *args, **kwargs)
            finally:
                local.blob = False
                owed.append(os.path.join(self.root, path))
        done = create(self, path, *args, **kwargs)
        if path.startswith("checkpoints/"):
            proxy: Any = fs.proxy
            for full in owed:  # the blob fsyncs, too late
                fd = proxy.open(full, os.O_RDONLY)
                try:
                    proxy.fsync(fd)
                finally:
                    proxy.close(fd)
            owed.clear()
        return done

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fs.proxy, "fsync", fsync)
        mp.setattr(LocalBackend, "create", creating)
        yield


pytestmark = pytest.mark.usefixtures("one_thread_pools")  # repeatable file-system call order


def test_power_loss_crash_states(tmp_path: Path, record: Record) -> None:
    """C4: crash states of the shipped protocol never show a partial, lost or untyped-failing checkpoint."""
    seed = seed_for("C4")
    n = trials(ci=500, soak=10000)
    result = campaign(tmp_path, n, seed, intact)
    record.trials = result.states
    record.faults = result.faults
    record.detected = result.clean
    record.data_lost = result.violations
    record.notes.update(seed=seed, typed_errors=result.typed, examples=result.examples, logged_ops=result.log)
    assert result.states == n
    assert result.untyped == 0
    assert result.violations == 0, f"seed {seed}: {result.examples}"


MUTANTS = {"no_file_fsync": no_file_fsync, "no_blob_flush": no_blob_flush, "manifest_first": manifest_first}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_power_loss_mutation_twin(tmp_path: Path, record: Record, mutant: str) -> None:
    """C4 test-the-test: the same harness catches each broken protocol in at least one crash state."""
    seed = seed_for(f"C4 mutant {mutant}")
    n = trials(ci=500, soak=5000)
    result = campaign(tmp_path, n, seed, MUTANTS[mutant])
    record.trials = result.states
    record.faults = result.faults
    record.detected = result.violations
    record.notes.update(
        seed=seed, mutant=mutant, typed_errors=result.typed, untyped=result.untyped, examples=result.examples
    )
    assert result.violations >= 1, f"seed {seed}: mutant {mutant} survived {n} crash states"
    assert result.untyped == 0, f"seed {seed}: a damaged image raised an untyped error: {result.examples}"


# -- the shim itself ----------------------------------------------------------------------------------------


def test_crashfs_models_direct_io_pwrite_and_ftruncate(tmp_path: Path, record: Record) -> None:
    """O_DIRECT writes of a padded tail then ftruncate, and pwrite: unsynced until fsync, exact after."""
    import mmap

    disk = tmp_path / "disk"
    disk.mkdir()
    fs = CrashFS(disk)
    proxy: Any = fs.proxy
    payload = bytes(range(256)) * 20  # 5120 bytes: one full sector and a tail
    buf = mmap.mmap(-1, 2 * 4096)  # page-aligned, as O_DIRECT wants
    buf[: len(payload)] = payload
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = proxy.open(str(disk / "f"), flags | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:  # a file system without O_DIRECT
        fd = proxy.open(str(disk / "f"), flags, 0o644)
    proxy.write(fd, memoryview(buf))  # the padded tail...
    proxy.ftruncate(fd, len(payload))  # ...cut back
    proxy.close(fd)
    fd = proxy.open(str(disk / "f"), os.O_WRONLY)  # a second descriptor: the fsync is per inode
    proxy.pwrite(fd, b"HEAD", 0)
    before_sync = len(fs.log)
    proxy.fsync(fd)
    proxy.close(fd)
    fs.check_model()
    expected = b"HEAD" + payload[4:]
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        image = fs.crash(before_sync, rng)
        f = image.tree.files().get("f")
        seen.add("absent" if f is None else "exact" if f[1] == expected else f"{len(f[1])} bytes")
    after = fs.crash(None, rng).tree.files()
    record.trials, record.faults = 201, len(seen)
    assert after.get("f", ("f", b""))[1] == expected or "f" not in after  # the name itself is not synced
    assert "absent" in seen and "exact" in seen and len(seen) > 3, seen  # dropped, applied and torn
    synced = [
        CrashFS.durable(fs, i, len(fs.log)) for i, op in enumerate(fs.log) if op.kind in ("write", "trunc")
    ]
    assert all(synced)


def test_crashfs_refuses_unmodelled_calls(tmp_path: Path, record: Record) -> None:
    """Mutating calls the model does not cover raise; out-of-band changes are caught by check_model."""
    from reliability.crashfs import UnmodelledOperation

    disk = tmp_path / "disk"
    disk.mkdir()
    fs = CrashFS(disk)
    proxy: Any = fs.proxy
    for name in ("makedirs", "truncate", "symlink", "sendfile", "copy_file_range", "dup", "dup2", "renames"):
        with pytest.raises(UnmodelledOperation):
            getattr(proxy, name)
    with pytest.raises(UnmodelledOperation):
        proxy.write(os.open(os.devnull, os.O_WRONLY), b"x")  # a descriptor it did not open
    with pytest.raises(UnmodelledOperation):
        proxy.mkdir(str(tmp_path / "outside"))
    with pytest.raises(UnmodelledOperation):
        proxy.fdopen(proxy.open(str(disk / "g"), os.O_WRONLY | os.O_CREAT, 0o644), "wb")
    assert proxy.path is os.path and proxy.O_CREAT == os.O_CREAT and proxy.lstat is os.lstat
    (disk / "sneaky").write_bytes(b"written behind the shim's back")
    with pytest.raises(AssertionError, match="missed operations"):
        fs.check_model()
    record.trials, record.detected = 11, 11


# -- bugs found ---------------------------------------------------------------------------------------------


def test_reused_blob_relinked_by_another_writer_is_made_durable(tmp_path: Path, record: Record) -> None:
    """A blob reused by a save must be durable when save() returns, whoever linked it last."""
    disk = tmp_path / "disk"
    disk.mkdir()
    path = disk / "store"
    state = {"x": torch.arange(1000, dtype=torch.float32)}
    raw = state["x"].numpy().tobytes()
    cairn.Store(path, create=True)
    fs = CrashFS(disk)
    with fs.patched(cairn.backends.local):
        writer = cairn.Store(path)  # a long-lived writer (a training run)
        writer.save(state, step=1)  # links blob X and makes it durable: its handle remembers that
        writer.delete("step-1")
        cairn.Store(path).gc(grace=0)  # another handle (cairn gc) deletes X
        import blake3

        blob = blake3.blake3(raw).hexdigest()
        cairn.Store(path).backend.create(
            f"blobs/{blob[:2]}/{blob}", raw
        )  # re-linked; killed before its flush
        writer.save(state, step=2)  # reuses X; returns: step-2 is acknowledged
    end = len(fs.log)
    lost = 0
    with ram_dir(tmp_path) as scratch:
        for seed in range(64):
            dest = Path(scratch) / f"s{seed}"
            fs.crash(end, random.Random(seed)).write_to(dest)
            try:
                cairn.Store(dest / "store").load("step-2")
            except cairn.CorruptCheckpointError:
                lost += 1
    record.trials, record.faults, record.data_lost = 64, 64, lost
    assert lost == 0, f"step-2 was acknowledged, yet {lost}/64 crash states lose its blob"
