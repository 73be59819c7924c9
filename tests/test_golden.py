"""The golden store: written once by format version 1 and committed; every later cairn must read it.

Never regenerate ``tests/golden/v1``: if this test fails, the reader broke compatibility. (It was written
by ``python tests/test_golden.py --write`` with the first release of the format.)
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cairn
from cairn._manifest import Chunk, Manifest, Shard, TensorEntry
from cairn._tree import encode_tree

GOLDEN = Path(__file__).parent / "golden" / "v1"


def _t(n: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A deterministic tensor built from raw bytes (no RNG, so it is the same in every torch version)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = (torch.arange(n * itemsize, dtype=torch.int64) * 37 + 11) % 251
    raw = raw.to(torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def golden_state() -> dict[str, Any]:
    """The state saved as checkpoint ``step-1`` of the golden store."""
    module_state: OrderedDict[str, Any] = OrderedDict(
        [("weight", _t(6, torch.float32, (2, 3))), ("bias", _t(2, torch.float32, (2,)))]
    )
    return {
        "model": module_state,
        "dtypes": {
            "f64": _t(3, torch.float64, (3,)),
            "f16": _t(4, torch.float16, (2, 2)),
            "bf16": _t(4, torch.bfloat16, (4,)),
            "f8e4m3": _t(5, torch.float8_e4m3fn, (5,)),
            "f8e5m2": _t(5, torch.float8_e5m2, (5,)),
            "c64": _t(2, torch.complex64, (2,)),
            "i8": _t(4, torch.int8, (4,)),
            "u8": _t(4, torch.uint8, (4,)),
            "i64": _t(2, torch.int64, (2,)),
            "u64": _t(2, torch.uint64, (2,)),
            "bool": _t(6, torch.bool, (2, 3)),
            "zero_d": _t(1, torch.float32, ()),
            "empty": torch.empty(0, 3, dtype=torch.float32),
            "chunked": _t(100, torch.float32, (10, 10)),  # 400 bytes in 64-byte chunks
        },
        "numpy": {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "scalar": np.float32(2.5)},
        "plain": {
            "none": None,
            "bool": True,
            "int": -42,
            "big": 2**100,
            "float": 0.1,
            "nan": float("nan"),
            "inf": float("-inf"),
            "str": "cairn ✓",
            "bytes": b"\x00\x01\xff",
            "tuple": (1, "two", (3.0,)),
            "list": [[], {}, ()],
            7: "int key",
        },
    }


def sharded_tensor() -> torch.Tensor:
    """The tensor of checkpoint ``sharded``: saved as a 2x2 grid of shards, as four writers would."""
    return _t(24, torch.float32, (4, 6))


def write_golden(root: Path) -> None:  # pragma: no cover - run by hand, once per format version
    if root.exists():
        raise SystemExit(f"{root} exists: golden stores are never regenerated")
    store = cairn.Store(root, create=True, chunk_size=64)
    store.save(golden_state(), step=1, metrics={"loss": 0.5, "acc": float("nan")}, metadata={"seed": 0})
    store.save({"model": golden_state()["model"], "epoch": 2}, step=2, metrics={"loss": 0.25})
    full = sharded_tensor()
    shards = []
    for r in (0, 2):
        for c in (0, 3):
            part = full[r : r + 2, c : c + 3].contiguous()
            blob, _ = store._put_chunk(part.reshape(-1).view(torch.uint8).numpy().data)
            shards.append(Shard((r, c), (2, 3), (Chunk(blob, 0, part.numel() * 4),)))
    tree, _ = encode_tree({"w": full})
    entry = TensorEntry("w", "torch", "F32", (4, 6), tuple(shards))
    time = datetime.now(UTC).isoformat(timespec="microseconds")
    store.backend.flush()
    store.backend.create("checkpoints/sharded.json", Manifest("sharded", 3, time, tree, (entry,)).to_bytes())
    store.backend.flush()


def _same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.numel():
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    elif isinstance(a, np.ndarray | np.generic):
        assert type(a) is type(b) and a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert type(a) is type(b) and a == b


def test_golden_store_lists_and_verifies() -> None:
    store = cairn.Store(GOLDEN)
    assert [i.name for i in store.list()] == ["step-1", "step-2", "sharded"]
    info = store.info("step-1")
    assert info.metadata == {"seed": 0} and info.metrics["loss"] == 0.5 and math.isnan(info.metrics["acc"])
    assert store.config.chunk_size == 64
    assert store.verify().ok


def test_golden_checkpoints_load_exactly() -> None:
    _same(golden_state(), cairn.load(GOLDEN, "step-1"))
    _same({"model": golden_state()["model"], "epoch": 2}, cairn.load(GOLDEN, "step-2"))


def test_golden_sharded_tensor_is_assembled() -> None:
    out = cairn.load(GOLDEN, "sharded")
    assert torch.equal(out["w"], sharded_tensor())
    live = {"w": torch.zeros(4, 6)}
    assert cairn.restore(GOLDEN, live, "sharded").ok
    assert torch.equal(live["w"], sharded_tensor())


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] == ["--write"]:
        write_golden(GOLDEN)
