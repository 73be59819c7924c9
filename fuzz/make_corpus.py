"""Write the seed corpora of the fuzz harnesses: ``python fuzz/make_corpus.py`` (idempotent).

``corpus/manifest/``: manifests of a real save (raw, mode byte 0, and re-digested, mode byte 1) plus hostile
ones (deep nesting, NaN, huge integers, duplicate keys, non-UTF-8, a BOM, a lone surrogate, huge shapes, an
unknown version). ``corpus/store/``: the empty input (the valid template store) and a few mutation seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def real_manifests() -> list[bytes]:
    """Manifests from a real save: plain arrays, nested containers, empty and 0-d arrays, metrics."""
    import cairn

    root = tempfile.mkdtemp(prefix="cairn-corpus-")
    store = cairn.Store(root, create=True, chunk_size=64)
    store.save({"a": np.arange(10.0)}, step=1)
    store.save(
        {"a": np.arange(40.0).reshape(5, 8), "b": {"c": np.ones((2, 3), np.float16), "l": [1, "x", None]},
         "e": np.zeros((0, 4)), "s": np.array(3, np.int64), "flag": np.array([True, False])},
        step=2, metrics={"loss": 0.5, "acc": 1}, metadata={"note": "seed", "nested": {"k": [1, 2]}},
    )  # fmt: skip
    out = [Path(root, "checkpoints", n).read_bytes() for n in sorted(os.listdir(Path(root, "checkpoints")))]
    return out


def hostile(valid: bytes) -> list[bytes]:
    """Hand-made hostile manifests (the C8 kinds)."""
    doc = json.loads(valid)
    cases = [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b'{"format":"cairn.checkpoint","version":1,"step":NaN}',
        b'{"step":' + b"9" * 5000 + b"}",
        b'{"format":"cairn.checkpoint","format":"x"}',
        b"\xff\xfe{}",
        b"\xef\xbb\xbf" + valid,
        valid.replace(b'"name":"', b'"name":"\\ud800'),
        valid[: len(valid) // 2],
        b'{"format":"cairn.checkpoint","version":99}',
        b"1e999",
        b"{}",
    ]
    big = dict(doc)
    big["tensors"] = [dict(doc["tensors"][0], shape=[2**32, 2**32, 4])]
    cases.append(json.dumps(big).encode())
    neg = dict(doc)
    neg["tensors"] = [dict(doc["tensors"][0], shape=[-1])]
    cases.append(json.dumps(neg).encode())
    trav = dict(doc)
    trav["name"] = "../../etc/passwd"
    cases.append(json.dumps(trav).encode())
    return cases


def write(directory: Path, items: list[bytes]) -> None:
    """Each item as a file named by its hash."""
    directory.mkdir(parents=True, exist_ok=True)
    for item in items:
        (directory / hashlib.sha1(item).hexdigest()).write_bytes(item)


def main() -> None:
    """Write both corpora."""
    manifests = real_manifests()
    seeds = [b"\x00" + m for m in manifests] + [b"\x01" + m for m in manifests]
    seeds += [b"\x00" + h for h in hostile(manifests[-1])] + [
        b"\x01" + h for h in hostile(manifests[-1])[-3:]
    ]
    write(HERE / "corpus" / "manifest", seeds)
    store_seeds = [b"", b"\x01\x07\x00\x03", b"\x02\x00\x01\x05\xff", b"\x03\x07\x02\x01\x00\x07\x01"]
    write(HERE / "corpus" / "store", store_seeds)


if __name__ == "__main__":
    main()
