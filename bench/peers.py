"""One save, load and lazy-read function per system: cairn (sync, async), torch.save, safetensors and
torch.distributed.checkpoint (DCP).

Every save returns :class:`SaveTimes` (seconds the caller was blocked, seconds until durable). Saves
write into a directory ``dest`` that does not exist yet; a save is durable when every file it wrote and
every directory on the way is fsynced (cairn does that itself; the peers get :func:`harness.fsync_tree`
inside their timer). Loads and lazy reads take the same directory.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from harness import cairn, fsync_tree
from states import Flat, dotted, nest

try:
    import safetensors.torch as st
except ImportError:  # the safetensors rows are then left out
    st = None

try:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
except ImportError:  # the DCP rows are then left out
    dcp = None

warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled.*")  # DCP without a group


class SaveTimes(NamedTuple):
    """Seconds the caller was blocked, and seconds until the checkpoint was durable."""

    blocking: float
    durable: float


def _sync(t0: float) -> SaveTimes:
    s = time.perf_counter() - t0
    return SaveTimes(s, s)


# -- cairn --------------------------------------------------------------------------------------------


def cairn_save(dest: Path, flat: Flat, step: int = 0) -> SaveTimes:
    """``cairn.save(dest, state, step=step)``: durable when it returns."""
    t0 = time.perf_counter()
    cairn.save(dest, nest(flat), step=step)
    return _sync(t0)


class CairnAsync:
    """A ``CheckpointManager(async_save=True)`` on ``dest``: blocking is ``save()``, durable is ``wait()``."""

    def __init__(self, dest: Path) -> None:
        self.mgr = cairn.CheckpointManager(dest, async_save=True, preemption_signals=())

    def save(self, flat: Flat, step: int) -> SaveTimes:
        state = nest(flat)
        if self.mgr.restored is None and self.mgr.latest() is None:  # a run starts: restore() first
            self.mgr.restore(state)  # (which reserves the staging memory in the background)
            writer = self.mgr._writer
            if writer is not None and writer._reserving is not None:
                writer._reserving.join()  # a real run trains a few steps before its first save
        t0 = time.perf_counter()
        self.mgr.save(step, state, force=True)
        blocked = time.perf_counter() - t0
        self.mgr.wait()
        return SaveTimes(blocked, time.perf_counter() - t0)

    def close(self) -> None:
        self.mgr.close()


def cairn_load(dest: Path, verify: bool) -> Any:
    return cairn.load(dest, "step-0", verify=verify)


def cairn_lazy(dest: Path, key: str, like: torch.Tensor) -> torch.Tensor:
    tree = cairn.load(dest, "step-0", keys=dotted(key))
    for part in key.split("/"):
        tree = tree[part]
    return tree  # type: ignore[no-any-return]


# -- torch.save ---------------------------------------------------------------------------------------

TORCH_FILE = "state.pt"


def torch_save(dest: Path, flat: Flat) -> SaveTimes:
    """``torch.save(nested state, file)`` + fsync."""
    t0 = time.perf_counter()
    dest.mkdir()
    torch.save(nest(flat), dest / TORCH_FILE)
    fsync_tree(dest)
    return _sync(t0)


def torch_load(dest: Path) -> Any:
    return torch.load(dest / TORCH_FILE, weights_only=True, mmap=False)


def torch_lazy(dest: Path, key: str, like: torch.Tensor) -> torch.Tensor:
    tree = torch.load(dest / TORCH_FILE, weights_only=True, mmap=True)
    for part in key.split("/"):
        tree = tree[part]
    return tree  # type: ignore[no-any-return]


# -- safetensors --------------------------------------------------------------------------------------

ST_FILE = "state.safetensors"


def safetensors_save(dest: Path, flat: Flat) -> SaveTimes:
    """``safetensors.torch.save_file(flat, file)`` + fsync."""
    assert st is not None
    t0 = time.perf_counter()
    dest.mkdir()
    st.save_file(flat, dest / ST_FILE)
    fsync_tree(dest)
    return _sync(t0)


def safetensors_load(dest: Path) -> Any:
    assert st is not None
    return st.load_file(dest / ST_FILE)


def safetensors_lazy(dest: Path, key: str, like: torch.Tensor) -> torch.Tensor:
    assert st is not None
    from safetensors import safe_open

    with safe_open(dest / ST_FILE, "pt") as f:
        return f.get_tensor(key)  # type: ignore[no-any-return]


# -- torch.distributed.checkpoint ---------------------------------------------------------------------


def dcp_save(dest: Path, flat: Flat, threads: int = 1) -> SaveTimes:
    """``dcp.save(flat, storage_writer=FileSystemWriter(dest, thread_count=threads))`` + fsync."""
    assert dcp is not None
    t0 = time.perf_counter()
    dcp.save(flat, storage_writer=FileSystemWriter(dest, thread_count=threads))
    fsync_tree(dest)
    return _sync(t0)


def dcp_async_save(dest: Path, flat: Flat) -> SaveTimes:
    """``dcp.async_save(flat, checkpoint_id=dest)``: blocking until it returns its future, durable once
    ``future.result()`` returns and the files are fsynced."""
    assert dcp is not None
    t0 = time.perf_counter()
    future = dcp.async_save(flat, checkpoint_id=dest)
    blocked = time.perf_counter() - t0
    future.result()
    fsync_tree(dest)
    return SaveTimes(blocked, time.perf_counter() - t0)


def dcp_load(dest: Path, like: Flat) -> Any:
    """``dcp.load`` into a freshly allocated state (``torch.empty``, inside the timer)."""
    assert dcp is not None
    out = {k: torch.empty_like(t) for k, t in like.items()}
    dcp.load(out, checkpoint_id=dest)
    return out


def dcp_lazy(dest: Path, key: str, like: torch.Tensor) -> torch.Tensor:
    assert dcp is not None
    out = {key: torch.empty_like(like)}
    dcp.load(out, checkpoint_id=dest)
    return out[key]


# -- the registry -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class System:
    """A peer of cairn: how it saves, loads everything, and reads one tensor lazily."""

    save_name: str
    save: Callable[[Path, Flat], SaveTimes]
    fmt: str  # systems of the same fmt share a loader; only the first one's output is loaded
    load_name: str
    load: Callable[[Path, Flat], Any]
    lazy_name: str
    lazy: Callable[[Path, str, torch.Tensor], torch.Tensor]
    asynchronous: bool = False


def peer_systems() -> list[System]:
    """The peers that are installed."""
    out = [
        System(
            "torch.save + fsync",
            torch_save,
            "torch",
            "torch.load(weights_only=True)",
            lambda d, _: torch_load(d),
            "torch.load(mmap=True)[key]",
            torch_lazy,
        )
    ]
    if st is not None:
        out.append(
            System(
                "safetensors.save_file + fsync",
                safetensors_save,
                "safetensors",
                "safetensors.load_file",
                lambda d, _: safetensors_load(d),
                "safe_open().get_tensor(key)",
                safetensors_lazy,
            )
        )
    if dcp is not None:
        dcp_loads = ("dcp.load (preallocated)", dcp_load, "dcp.load({key})", dcp_lazy)
        out += [
            System("dcp.save", dcp_save, "dcp", *dcp_loads),
            System("dcp.save (thread_count=2)", lambda d, f: dcp_save(d, f, threads=2), "dcp", *dcp_loads),
            System("dcp.async_save", dcp_async_save, "dcp", *dcp_loads, asynchronous=True),
        ]
    return out


CAIRN_LOADS: list[tuple[str, Callable[[Path, Flat], Any]]] = [
    ("cairn.load (verify=True)", lambda d, _: cairn_load(d, verify=True)),
    ("cairn.load (verify=False)", lambda d, _: cairn_load(d, verify=False)),
]
CAIRN_LAZY = "cairn.load(keys=key)"
