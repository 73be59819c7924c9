"""The store as a user sees it: incremental saves, discovery, names, errors that say what to do."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import cairn
from cairn import _store
from cairn.backends import MemoryBackend


def _state(seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {
        "frozen": torch.randn(256, 64, generator=g),
        "head": torch.randn(64, 10, generator=g),
        "step": 3,
    }


def test_saving_the_same_state_twice_writes_no_tensor_bytes(tmp_path: Path) -> None:
    state = _state()
    first = cairn.save(tmp_path / "s", state, step=1)
    assert first.bytes_written == first.nbytes == (256 * 64 + 64 * 10) * 4
    second = cairn.save(tmp_path / "s", state, step=2)
    assert second.bytes_written == 0 and second.blobs_written == 0
    assert second.bytes_reused == second.nbytes


def test_changing_one_tensor_writes_only_its_chunks(tmp_path: Path) -> None:
    state = _state()
    cairn.save(tmp_path / "s", state, step=1, chunk_size=4096)
    state["frozen"][0, 0] += 1  # one element: one 4 KiB chunk of this tensor changes
    info = cairn.save(tmp_path / "s", state, step=2)
    assert info.bytes_written == 4096 and info.blobs_written == 1
    assert torch.equal(cairn.load(tmp_path / "s", "step-2")["frozen"], state["frozen"])
    assert not torch.equal(cairn.load(tmp_path / "s", "step-1")["frozen"], state["frozen"])


def test_info_list_latest(tmp_path: Path) -> None:
    store = cairn.Store(tmp_path / "s", create=True)
    assert store.list() == [] and store.latest() is None
    for step in (5, 1, 3):
        store.save({"x": torch.ones(2) * step}, step=step, metrics={"loss": 1.0 / step}, metadata={"s": step})
    infos = store.list()
    assert [i.step for i in infos] == [1, 3, 5]
    assert [i.name for i in infos] == ["step-1", "step-3", "step-5"]
    latest = store.latest()
    assert latest is not None and latest.name == "step-5" and latest.metrics == {"loss": 0.2}
    assert store.info("step-3").metadata == {"s": 3}
    assert store.info().name == "step-5"
    assert torch.equal(store.load()["x"], torch.ones(2) * 5)
    assert latest.time.tzinfo is not None
    assert (latest.num_tensors, latest.num_blobs, latest.nbytes) == (1, 1, 8)


def test_default_step_and_name(tmp_path: Path) -> None:
    assert cairn.save(tmp_path / "s", {"a": 1}).name == "step-0"
    assert cairn.save(tmp_path / "s", {"a": 2}).name == "step-1"
    info = cairn.save(tmp_path / "s", {"a": 3}, step=10, name="warmup-done")
    assert (info.name, info.step) == ("warmup-done", 10)
    assert cairn.load(tmp_path / "s") == {"a": 3}
    assert cairn.load(tmp_path / "s", "step-0") == {"a": 1}


def test_checkpoints_are_never_overwritten(tmp_path: Path) -> None:
    cairn.save(tmp_path / "s", {"a": 1}, step=1)
    with pytest.raises(cairn.CheckpointExistsError, match="never overwritten"):
        cairn.save(tmp_path / "s", {"a": 2}, step=1)
    assert cairn.load(tmp_path / "s") == {"a": 1}


@pytest.mark.parametrize("name", ["", "latest", "best", "a/b", "../x", ".hidden", "x" * 129, "sp ace"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        cairn.save(tmp_path / "s", {"a": 1}, name=name)


@pytest.mark.parametrize("step", [-1, 1.5, True, "3", 2**63])
def test_bad_steps_are_refused(tmp_path: Path, step: object) -> None:
    with pytest.raises(ValueError, match="step"):
        cairn.save(tmp_path / "s", {"a": 1}, step=step)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_unsupported_values_name_the_key_and_type(tmp_path: Path) -> None:
    class Opaque:
        pass

    with pytest.raises(cairn.SerializationError, match=r"model\.layers\.1\.cfg.*Opaque.*without pickle"):
        cairn.save(tmp_path / "s", {"model": {"layers": [0, {"cfg": Opaque()}]}})
    with pytest.raises(cairn.SerializationError, match="key"):
        cairn.save(tmp_path / "s", {(1, 2): "tuple keys"})
    with pytest.raises(cairn.SerializationError, match="sparse"):
        cairn.save(tmp_path / "s", {"sp": torch.eye(3).to_sparse()})
    with pytest.raises(cairn.SerializationError, match="numpy dtype"):
        cairn.save(tmp_path / "s", {"strings": np.array(["a", "b"])})
    with pytest.raises(cairn.SerializationError, match="quantized"):
        cairn.save(tmp_path / "s", {"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)})
    with pytest.raises(cairn.SerializationError, match="not plain JSON"):
        cairn.save(tmp_path / "s", {"a": 1}, metadata={"when": object()})
    with pytest.raises(cairn.SerializationError, match="metric"):
        cairn.save(tmp_path / "s", {"a": 1}, metrics={"loss": "low"})
    with pytest.raises(cairn.SerializationError, match="deeper"):
        deep: list[object] = []
        deep.append(deep)
        cairn.save(tmp_path / "s", {"loop": deep})
    assert cairn.Store(tmp_path / "s").list() == []  # nothing was committed by the failed saves


def test_metrics_accept_numbers_of_any_kind(tmp_path: Path) -> None:
    metrics = {"loss": torch.tensor(0.5), "acc": np.float32(0.25), "n": 7, "bad": float("nan")}
    info = cairn.save(tmp_path / "s", {}, metrics=metrics)
    got = cairn.Store(tmp_path / "s").info(info.name).metrics
    assert got["loss"] == 0.5 and got["acc"] == 0.25 and got["n"] == 7 and got["bad"] != got["bad"]


def test_delete_removes_only_the_manifest(tmp_path: Path) -> None:
    store = cairn.Store(tmp_path / "s", create=True)
    store.save(_state(), step=1)
    store.save(_state(), step=2)
    store.delete("step-2")
    assert [i.name for i in store.list()] == ["step-1"]
    assert store.verify().ok
    with pytest.raises(cairn.CheckpointNotFoundError):
        store.delete("step-2")
    with pytest.raises(cairn.CheckpointNotFoundError, match="cairn ls"):
        store.load("step-2")


def test_not_found_errors(tmp_path: Path) -> None:
    with pytest.raises(cairn.NotAStoreError, match="not a cairn store"):
        cairn.load(tmp_path / "missing")
    cairn.Store(tmp_path / "empty", create=True)
    with pytest.raises(cairn.CheckpointNotFoundError, match="no checkpoints"):
        cairn.load(tmp_path / "empty")
    assert isinstance(cairn.CheckpointNotFoundError("x"), FileNotFoundError)


def test_concurrent_saves_from_threads(tmp_path: Path) -> None:
    store = cairn.Store(tmp_path / "s", create=True)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            store.save({"shared": torch.ones(1000), "own": torch.full((100,), float(i))}, step=i)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [i.step for i in store.list()] == list(range(6))
    assert store.verify().ok
    assert torch.equal(store.load("step-4")["own"], torch.full((100,), 4.0))


def test_verify_reports_sizes(tmp_path: Path) -> None:
    store = cairn.Store(tmp_path / "s", create=True)
    store.save(_state(), step=1)
    progress: list[tuple[int, int]] = []
    report = store.verify(progress=lambda done, total: progress.append((done, total)))
    assert report.ok and report.checkpoints == ["step-1"] and report.blobs_checked == 2
    assert progress[-1][0] == progress[-1][1] == report.bytes_checked
    assert store.verify("latest").checkpoints == ["step-1"]


def test_a_store_can_live_in_memory() -> None:
    backend = MemoryBackend()
    info = cairn.save(backend, _state(), step=1)
    assert cairn.Store(backend).info().name == info.name
    assert cairn.Store(backend).verify().ok


def test_stray_files_in_checkpoints_are_not_checkpoints(tmp_path: Path) -> None:
    cairn.save(tmp_path / "s", {"a": 1}, step=1)
    (tmp_path / "s" / "checkpoints" / "bad name.json").write_text("{}")
    (tmp_path / "s" / "checkpoints" / "notes.txt").write_text("hi")
    store = cairn.Store(tmp_path / "s")
    assert store.names() == ["step-1"]
    assert [i.name for i in store.list()] == ["step-1"] and store.verify().ok
    assert cairn.save(tmp_path / "s", {"a": 2}).name == "step-2"


def test_a_newer_checkpoint_does_not_hide_the_others(tmp_path: Path) -> None:
    import json

    import blake3

    from cairn._manifest import canonical_json

    cairn.save(tmp_path / "s", {"a": 1}, step=1)
    cairn.save(tmp_path / "s", {"a": 2}, step=2)
    path = tmp_path / "s" / "checkpoints" / "step-2.json"
    body = json.loads(path.read_bytes())
    del body["digest"]
    body["version"] = 99
    body["digest"] = blake3.blake3(canonical_json(body)).hexdigest()
    path.chmod(0o644)
    path.write_bytes(canonical_json(body))
    store = cairn.Store(tmp_path / "s")
    seen: list[tuple[str, cairn.CairnError]] = []
    assert [i.name for i in store.list(on_damaged=lambda n, e: seen.append((n, e)))] == ["step-1"]
    assert seen[0][0] == "step-2" and isinstance(seen[0][1], cairn.UnsupportedVersionError)
    with pytest.warns(RuntimeWarning, match="step-2"):
        assert cairn.load(tmp_path / "s") == {"a": 1}
    with pytest.raises(cairn.UnsupportedVersionError, match="upgrade"):
        cairn.load(tmp_path / "s", "step-2")
    report = store.verify()
    assert report.damaged == ["step-2"] and "version 99" in report.problems[0].message


def test_a_symlinked_store_root_is_followed(tmp_path: Path) -> None:
    cairn.save(tmp_path / "real", {"a": 1}, step=1)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert cairn.load(tmp_path / "link") == {"a": 1}
    cairn.save(tmp_path / "link", {"a": 2}, step=2)
    assert cairn.load(tmp_path / "real") == {"a": 2}


def test_metadata_must_be_plain_json(tmp_path: Path) -> None:
    with pytest.raises(cairn.SerializationError, match="key 1 is not a string"):
        cairn.save(tmp_path / "s", {}, metadata={"ok": {1: "x"}})
    with pytest.raises(cairn.SerializationError, match="finite"):
        cairn.save(tmp_path / "s", {}, metadata={"x": float("nan")})
    info = cairn.save(tmp_path / "s", {}, metadata={"t": (1, 2), "n": None})
    assert info.metadata == {"t": [1, 2], "n": None}


def test_state_dict_metadata_with_arrays_is_refused(tmp_path: Path) -> None:
    from collections import OrderedDict

    class Odd:
        def state_dict(self) -> OrderedDict[str, object]:
            sd: OrderedDict[str, object] = OrderedDict(w=torch.ones(1))
            sd._metadata = {"": {"version": torch.ones(1)}}  # type: ignore[attr-defined]
            return sd

        def load_state_dict(self, sd: object) -> None:
            pass

    with pytest.raises(cairn.SerializationError, match="_metadata"):
        cairn.save(tmp_path / "s", {"odd": Odd()})


def test_the_shard_check_has_a_budget() -> None:
    from cairn._manifest import Chunk, ManifestError, Shard, _check_cover

    blob = "ab" * 32
    grid = tuple(Shard((i, j), (2, 3), (Chunk(blob, 0, 24),)) for i in (0, 2) for j in (0, 3))
    _check_cover(grid, (4, 6), "m", "w", [10])
    with pytest.raises(ManifestError, match="too complex"):
        _check_cover(grid, (4, 6), "m", "w", [0])
    overlapping = (*grid[:3], Shard((1, 2), (2, 3), ()))
    with pytest.raises(ManifestError, match="overlap"):
        _check_cover(overlapping, (4, 6), "m", "w", [100])


def _save_rank(root: str, rank: int) -> cairn.CheckpointInfo:
    return cairn.save(root, {"rank": rank, "shared": np.ones(1000)}, step=rank)


def test_racing_creators_share_one_store(tmp_path: Path) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        infos = pool.starmap(_save_rank, [(str(tmp_path / "s"), i) for i in range(4)])
    assert sorted(i.step for i in infos) == [0, 1, 2, 3]
    assert [i.step for i in cairn.Store(tmp_path / "s").list()] == [0, 1, 2, 3]


def test_overwrite_replaces_a_checkpoint_atomically(tmp_path: Path) -> None:
    store = cairn.Store(tmp_path / "s", create=True)
    store.save({"w": torch.zeros(3)}, step=1, name="best-model", metrics={"val_loss": 0.5})
    assert store.info("best-model").metrics == {"val_loss": 0.5}  # cached, then replaced below
    store.save({"w": torch.ones(3)}, step=4, name="best-model", metrics={"val_loss": 0.2}, overwrite=True)
    assert store.info("best-model").step == 4 and torch.equal(store.load("best-model")["w"], torch.ones(3))
    assert store.names() == ["best-model"] and store.verify().ok
    store.pin("best-model")
    with pytest.raises(cairn.PinnedError):
        store.save({"w": torch.ones(3)}, step=5, name="best-model", overwrite=True)


def test_unchanged_chunks_are_not_hashed_again_but_every_change_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk whose memory holds the same bytes as at the process's last save into the store keeps its
    name without BLAKE3; every way of changing bytes (in place, through .data, through a numpy view)
    is still seen, because the fingerprint reads the bytes."""
    hashed: list[int] = []
    real = _store.blake3.blake3

    def counting(data: Any = b"", **kwargs: Any) -> Any:
        if memoryview(data).nbytes == 4096:  # a chunk (manifest digests are BLAKE3 too)
            hashed.append(4096)
        return real(data, **kwargs)

    monkeypatch.setattr(_store.blake3, "blake3", counting)
    store = cairn.Store(tmp_path, create=True, chunk_size=4096)
    w = torch.zeros(4096)  # four chunks
    state = {"w": w, "b": np.zeros(1024, dtype=np.float32)}  # one chunk
    store.save(state, step=0)
    assert len(hashed) == 5
    hashed.clear()
    store.save(state, step=1)
    assert hashed == []  # nothing changed: nothing hashed
    w.data[0] = 1.0  # .data bypasses torch's version counter
    w.numpy()[2048] = 2.0  # so does a numpy view
    state["b"][-1] = 3.0
    info = store.save(state, step=2)
    assert len(hashed) == 3 and info.blobs_written == 3
    out = cairn.load(tmp_path, "step-2")
    assert out["w"][0] == 1.0 and out["w"][2048] == 2.0 and out["b"][-1] == 3.0
    assert torch.equal(cairn.load(tmp_path, "step-1")["w"], torch.zeros(4096))
    hashed.clear()
    cairn.Store(tmp_path, fingerprints=False).save(state, step=3)
    assert len(hashed) == 5
    hashed.clear()
    cairn.save(tmp_path, state, step=4)  # another handle of the same store, in the same process
    assert len(hashed) == 3  # what changed at step 2 is not fingerprinted for a while: only hashed
    counts = []
    for step in range(5, 15):
        hashed.clear()
        store.save(state, step=step)
        counts.append(len(hashed))
    # ...for 8 saves in all; then fingerprinted again (and hashed), and found unchanged from then on
    assert counts == [3] * 8 + [0, 0], counts


def test_a_blob_deleted_between_check_and_map_is_reported_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader racing a gc of another checkpoint's blobs gets BlobMissingError naming the blob, not a bare
    FileNotFoundError from the memory map."""
    store = cairn.Store(tmp_path, create=True, chunk_size=2**20)
    store.save({"w": torch.arange(600_000, dtype=torch.float32)}, step=0)  # 3 chunks: mapped as one region
    blobs = sorted(store.manifest("step-0").blobs())
    real = type(store.backend).map_concat

    def gone_meanwhile(self: Any, paths: list[str]) -> Any:
        (tmp_path / paths[-1]).unlink()
        return real(self, paths)

    monkeypatch.setattr(type(store.backend), "map_concat", gone_meanwhile)
    with pytest.raises(cairn.BlobMissingError, match="is missing") as info:
        store.load("step-0")
    assert any(b in str(info.value) for b in blobs)
