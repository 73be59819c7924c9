"""atheris harness (F1): ``cairn._manifest.parse_manifest(bytes, where)`` on fuzzed bytes.

Only cairn's typed errors (``CairnError`` subclasses) may escape the parser; anything else is a crash.
The first byte picks a mode: raw bytes, or "re-digested" (when the rest parses as a JSON object, its
``digest`` is recomputed so the fuzzer gets past the checksum into the field validation).

Run: ``python fuzz/fuzz_manifest.py fuzz/corpus/manifest -max_total_time=3600 -timeout=1 -rss_limit_mb=2048``
(see ``fuzz/README.md``).
"""

from __future__ import annotations

import contextlib
import json
import sys

import atheris

with atheris.instrument_imports():
    import cairn._manifest as manifest_mod
    from cairn.errors import CairnError


def redigest(data: bytes) -> bytes:
    """``data`` with a correct digest, if it is a JSON object (harness code: its own errors are ignored)."""
    import blake3

    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            return data
        doc.pop("digest", None)
        body = manifest_mod.canonical_json(doc)
        doc["digest"] = blake3.blake3(body).hexdigest()
        return manifest_mod.canonical_json(doc)
    except Exception:
        return data


def test_one_input(data: bytes) -> None:
    """One input: parse it; only CairnError may escape."""
    if not data:
        return
    mode, body = data[0], data[1:]
    if mode & 1:
        body = redigest(body)
    with contextlib.suppress(CairnError):
        manifest_mod.parse_manifest(body, "fuzz.json")


def main() -> None:
    """libFuzzer entry point."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
