"""What the store reports about checkpoints: :class:`CheckpointInfo`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cairn._manifest import Manifest

__all__ = ["CheckpointInfo", "decode_metrics", "encode_metrics"]


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """A committed checkpoint: its name, step, time, metrics, metadata and sizes."""

    name: str
    step: int
    time: datetime
    metrics: Mapping[str, float | int]
    metadata: Mapping[str, Any]
    nbytes: int
    """Logical size of its tensors, in bytes (what a full, non-incremental save would write)."""
    num_tensors: int
    num_blobs: int
    bytes_written: int | None = None
    """For the result of a save: the new tensor bytes it wrote (0 when nothing changed)."""
    blobs_written: int | None = None
    """For the result of a save: the new blobs it wrote."""
    seconds: float | None = None
    """For the result of a save: how long it took, from call to durable commit."""

    @classmethod
    def from_manifest(cls, m: Manifest, **extra: Any) -> CheckpointInfo:
        """The info of a parsed manifest; ``extra`` fills the save-only fields."""
        return cls(
            name=m.name,
            step=m.step,
            time=datetime.fromisoformat(m.time),
            metrics=decode_metrics(m.metrics),
            metadata=m.metadata,
            nbytes=m.nbytes,
            num_tensors=len(m.tensors),
            num_blobs=len(m.blobs()),
            **extra,
        )

    @property
    def bytes_reused(self) -> int | None:
        """For the result of a save: tensor bytes it referenced without writing them again."""
        return None if self.bytes_written is None else self.nbytes - self.bytes_written


_SPECIAL = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def encode_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float | int | str]:
    """Metrics as stored: numbers (ints kept), non-finite floats as ``"nan"``/``"inf"``/``"-inf"``."""
    out: dict[str, float | int | str] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be strings, not {key!r}")
        if isinstance(value, bool) or not hasattr(value, "__float__"):
            raise TypeError(f"metric {key!r} must be a number, not {type(value).__name__}")
        if isinstance(value, int):
            out[key] = int(value)
            continue
        f = float(value)
        if math.isfinite(f):
            out[key] = f
        else:
            out[key] = "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")
    return out


def decode_metrics(metrics: Mapping[str, float | int | str]) -> dict[str, float | int]:
    """Metrics as returned to users: all numbers."""
    return {k: (_SPECIAL[v] if isinstance(v, str) else v) for k, v in metrics.items()}
