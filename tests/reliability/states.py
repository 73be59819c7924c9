"""Test states for the reliability suite, and the bit-identity check of "restores bit-identically".

A state holds what the plan asks for: float32, bf16, float16, int64, bool, a 0-d tensor, an empty tensor,
a non-contiguous tensor (saved contiguous), a numpy array and plain values in nested dicts and lists.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch


def make_state(seed: int, *, mib: float = 1.0, tensors: int = 8) -> dict[str, Any]:
    """A deterministic state of about ``mib`` MiB in ``tensors`` float32 tensors, plus the odd ones."""
    g = torch.Generator().manual_seed(seed)
    per = max(1, int(mib * 2**20 / 4 / tensors))
    big = {f"w{i}": torch.randn(per, generator=g) for i in range(tensors)}
    wide = torch.randn(6, 8, generator=g)
    return {
        "model": big,
        "odd": {
            "bf16": torch.randn(33, generator=g).to(torch.bfloat16),
            "half": torch.randn(5, 3, generator=g).to(torch.float16),
            "long": torch.randint(-(2**40), 2**40, (17,), generator=g),
            "bool": torch.rand(9, generator=g) > 0.5,
            "scalar": torch.tensor(float(seed)),
            "empty": torch.zeros(0, 4),
            "strided": wide.t(),  # non-contiguous
            "np": np.arange(seed, seed + 12, dtype=np.int32).reshape(3, 4),
        },
        "extra": [seed, {"lr": 0.001 * (seed + 1), "name": f"run-{seed}"}, (1, 2.5, None)],
    }


def digest(value: Any) -> Any:
    """A comparable fingerprint of a state: SHA-256 of every tensor's raw bytes plus dtype and shape."""
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8)  # raw bytes, bools too (.to() would map any nonzero to 1)
        return ("tensor", str(t.dtype), tuple(t.shape), hashlib.sha256(raw.numpy().tobytes()).hexdigest())
    if isinstance(value, np.ndarray):
        return ("ndarray", str(value.dtype), value.shape, hashlib.sha256(value.tobytes()).hexdigest())
    if isinstance(value, dict):
        return {k: digest(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return (type(value).__name__, [digest(v) for v in value])
    return value
