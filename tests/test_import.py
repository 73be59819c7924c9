"""``cairn import``: safetensors and weights-only torch files become checkpoints; nothing unsafe is run."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import cairn
from cairn._interop import import_file


class _Evil:
    def __init__(self, canary: str) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.canary}",))


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"w": torch.randn(3, 4), "b": torch.zeros(4, dtype=torch.bfloat16), "n": torch.arange(3)}


def test_import_a_torch_weights_file(tmp_path: Path) -> None:
    torch.save(_weights(), tmp_path / "w.pt")
    info = import_file(tmp_path / "w.pt", cairn.Store(tmp_path / "s", create=True), name="base")
    assert info.metadata == {"imported_from": "w.pt", "format": "torch"}
    out = cairn.load(tmp_path / "s", "base")
    assert out.keys() == _weights().keys()
    for k, v in _weights().items():
        assert torch.equal(out[k], v) and out[k].dtype == v.dtype


def test_import_a_safetensors_file(tmp_path: Path) -> None:
    safetensors.torch.save_file(_weights(), tmp_path / "w.safetensors", metadata={"arch": "toy"})
    info = import_file(tmp_path / "w.safetensors", cairn.Store(tmp_path / "s", create=True), step=5)
    assert info.step == 5 and info.metadata["safetensors_metadata"] == {"arch": "toy"}
    out = cairn.load(tmp_path / "s")
    for k, v in _weights().items():
        assert torch.equal(out[k], v)


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "evil": _Evil(str(canary))}, tmp_path / "evil.pt")
    with pytest.raises(cairn.SerializationError, match=r"weights_only=True.*can run code"):
        import_file(tmp_path / "evil.pt", cairn.Store(tmp_path / "s", create=True))
    assert not canary.exists()
    assert cairn.Store(tmp_path / "s").list() == []


def _safetensors(header: dict[str, object], data: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.mark.parametrize(
    ("header", "data", "length"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None),  # short data
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, None),  # size lie
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None),  # hole
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            None,
        ),  # overlap
        ({"a": {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None),  # dtype
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None),  # shape
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4, None),
        ({"__metadata__": {"k": 1}}, b"", None),  # metadata must be str -> str
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 2**40),  # length lie
    ],
)
def test_hostile_safetensors_are_refused(
    tmp_path: Path, header: dict[str, object], data: bytes, length: int | None
) -> None:
    (tmp_path / "bad.safetensors").write_bytes(_safetensors(header, data, length))
    with pytest.raises(cairn.CairnError):
        import_file(tmp_path / "bad.safetensors", cairn.Store(tmp_path / "s", create=True))


def test_unknown_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"hello world, not weights")
    with pytest.raises(cairn.SerializationError, match=r"not a \.safetensors or torch\.save"):
        import_file(tmp_path / "x.bin", cairn.Store(tmp_path / "s", create=True))


def test_the_import_command(tmp_path: Path) -> None:
    safetensors.torch.save_file(_weights(), tmp_path / "w.safetensors")
    canary = tmp_path / "pwned"
    torch.save(_Evil(str(canary)), tmp_path / "evil.pt")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cairn", *args], capture_output=True, text=True, check=False
        )

    ok = run("import", str(tmp_path / "w.safetensors"), str(tmp_path / "s"), "--name", "base")
    assert ok.returncode == 0 and "@base: 3 tensors" in ok.stdout
    bad = run("import", str(tmp_path / "evil.pt"), str(tmp_path / "s"))
    assert bad.returncode == 1 and "cairn: error:" in bad.stderr and "Traceback" not in bad.stderr
    assert not canary.exists()
    missing = run("import", str(tmp_path / "nope.pt"), str(tmp_path / "s"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
