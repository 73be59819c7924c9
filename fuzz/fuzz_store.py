"""atheris harness (F1): a fuzzed store tree, then ``Store(dir)``, ``list()``, ``load()``, ``verify()``.

At start-up a real store is saved into a template (a few tensors, two checkpoints sharing blobs). Every input
is read by a ``FuzzedDataProvider`` as a list of mutations of that template: overwrite, truncate, flip bytes
of, delete, or replace by a symlink / directory / FIFO any file (``cairn.json``, ``checkpoints/*.json``,
blobs), add files at fuzzed paths, or edit one JSON value inside a manifest (re-digested so the edit gets past
the checksum). The empty input is the valid store. Only ``CairnError`` subclasses may escape; anything else
is a crash.

Run: ``python fuzz/fuzz_store.py fuzz/corpus/store -max_total_time=3600 -timeout=1 -rss_limit_mb=2048``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from typing import Any

import atheris

with atheris.instrument_imports():
    import cairn
    import cairn._manifest as manifest_mod
    from cairn.errors import CairnError

import contextlib

import numpy as np

Entry = tuple[str, Any]  # ("file", bytes) | ("link", target) | ("dir", None) | ("fifo", None)
TEMPLATE: dict[str, Entry] = {}
WORK = ""


def build_template() -> dict[str, Entry]:
    """A real store: two checkpoints of three arrays (64-byte chunks, shared blobs), read into memory."""
    root = tempfile.mkdtemp(prefix="cairn-fuzz-template-")
    store = cairn.Store(root, create=True, chunk_size=64)
    state = {"a": np.arange(10.0), "b": {"c": np.ones((2, 3), dtype=np.float16)}, "l": [1, "x", None]}
    store.save(state, step=1, metrics={"loss": 0.5})
    state["a"] = state["a"] * 2
    store.save(state, step=2, metadata={"note": "fuzz"})
    files: dict[str, Entry] = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, root)
            if not rel.startswith(("locks", "tmp")):
                with open(full, "rb") as f:
                    files[rel] = ("file", f.read())
    shutil.rmtree(root)
    return files


def redigest(data: bytes) -> bytes:
    """Manifest bytes with a recomputed digest (if they are a JSON object; harness errors are ignored)."""
    import blake3

    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            return data
        doc.pop("digest", None)
        doc["digest"] = blake3.blake3(manifest_mod.canonical_json(doc)).hexdigest()
        return manifest_mod.canonical_json(doc)
    except Exception:
        return data


def fuzz_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """A JSON value chosen by the fuzzer."""
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind == 0:
        return fdp.ConsumeIntInRange(-(2**70), 2**70)
    if kind == 1:
        return fdp.ConsumeIntInRange(-3, 70)
    if kind == 2:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind == 4:
        return None if fdp.ConsumeBool() else fdp.ConsumeBool()
    if kind == 5 and depth < 4:
        return [fuzz_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    if kind == 6 and depth < 4:
        n = fdp.ConsumeIntInRange(0, 3)
        return {fdp.ConsumeUnicodeNoSurrogates(8): fuzz_value(fdp, depth + 1) for _ in range(n)}
    return f"{fdp.ConsumeIntInRange(0, 2**256 - 1):064x}"


def json_edit(data: bytes, fdp: atheris.FuzzedDataProvider) -> bytes:
    """Replace one value somewhere inside a JSON document by a fuzzed one."""
    try:
        doc = json.loads(data)
    except Exception:
        return data
    node, steps = doc, fdp.ConsumeIntInRange(0, 8)
    for _ in range(steps):
        children = (
            list(node.items())
            if isinstance(node, dict)
            else list(enumerate(node))
            if isinstance(node, list)
            else []
        )
        if not children:
            break
        key, child = children[fdp.ConsumeIntInRange(0, len(children) - 1)]
        if not isinstance(child, (dict, list)) or fdp.ConsumeIntInRange(0, 3) == 0:
            node[key] = fuzz_value(fdp)
            break
        node = child
    else:
        if isinstance(node, dict):
            node[fdp.ConsumeUnicodeNoSurrogates(10)] = fuzz_value(fdp)
    try:
        return json.dumps(doc, separators=(",", ":")).encode()
    except Exception:
        return data


def mutate(fdp: atheris.FuzzedDataProvider) -> dict[str, Entry]:
    """The template with the input's mutations applied."""
    tree = dict(TEMPLATE)
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        paths = sorted(tree)
        op = fdp.ConsumeIntInRange(0, 8)
        if op == 8:  # a new file at a fuzzed path
            prefix = ["checkpoints/", "blobs/", "", "blobs/00/", "pins/"][fdp.ConsumeIntInRange(0, 4)]
            name = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(1, 70)).replace("\0", "")
            if name and not name.startswith("/") and ".." not in name.split("/"):
                tree[prefix + name] = ("file", fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512)))
            continue
        if not paths:
            break
        path = paths[fdp.ConsumeIntInRange(0, len(paths) - 1)]
        kind, data = tree[path]
        if op == 0:
            tree[path] = ("file", fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048)))
        elif op == 1 and kind == "file":
            tree[path] = ("file", data[: fdp.ConsumeIntInRange(0, len(data))])
        elif op == 2 and kind == "file" and data:
            buf = bytearray(data)
            for _ in range(fdp.ConsumeIntInRange(1, 4)):
                buf[fdp.ConsumeIntInRange(0, len(buf) - 1)] ^= fdp.ConsumeIntInRange(1, 255)
            tree[path] = ("file", bytes(buf))
        elif op == 3:
            del tree[path]
        elif op == 4:
            targets = [
                "/etc/hostname",
                "..",
                "../..",
                paths[fdp.ConsumeIntInRange(0, len(paths) - 1)],
                "/dev/zero",
            ]
            tree[path] = ("link", targets[fdp.ConsumeIntInRange(0, len(targets) - 1)])
        elif op == 5:
            tree[path] = ("dir", None)
        elif op == 6:
            tree[path] = ("fifo", None)
        elif op == 7 and kind == "file":
            edited = json_edit(data, fdp)
            tree[path] = ("file", redigest(edited) if path.startswith("checkpoints/") else edited)
    if fdp.ConsumeBool():
        for path, (kind, data) in list(tree.items()):
            if kind == "file" and path.startswith("checkpoints/"):
                tree[path] = ("file", redigest(data))
    return tree


def materialise(tree: dict[str, Entry], root: str) -> None:
    """Write ``tree`` under ``root`` (entries whose parent cannot be made are skipped)."""
    os.mkdir(root)
    for path, (kind, data) in sorted(tree.items()):
        full = os.path.join(root, path)
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            if kind == "file":
                with open(full, "wb") as f:
                    f.write(data)
            elif kind == "link":
                os.symlink(data, full)
            elif kind == "dir":
                os.makedirs(full, exist_ok=True)
            else:
                os.mkfifo(full)
        except (OSError, ValueError):
            pass


def exercise(root: str) -> None:
    """What a reader does with a store: open, list, load every checkpoint and latest, verify."""
    try:
        store = cairn.Store(root)
    except CairnError:
        return
    infos = store.list(on_damaged=lambda name, err: None)
    for info in infos:
        with contextlib.suppress(CairnError):
            store.load(info.name)
    with contextlib.suppress(CairnError):
        store.load("latest", keys="a")
    store.verify()


def test_one_input(data: bytes) -> None:
    """One input: build the tree, exercise the reader; only CairnError may escape."""
    fdp = atheris.FuzzedDataProvider(data)
    tree = mutate(fdp)
    root = os.path.join(WORK, "store")
    try:
        materialise(tree, root)
        with contextlib.suppress(CairnError):
            exercise(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    """libFuzzer entry point."""
    global TEMPLATE, WORK
    warnings.simplefilter("ignore")  # list() warns about the damaged checkpoints it skips: expected here
    TEMPLATE = build_template()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    WORK = tempfile.mkdtemp(prefix="cairn-fuzz-", dir=base)
    try:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
