"""C8 of the reliability plan: a corpus of hostile manifests and stores, run under a memory cap.

``CORPUS`` is one named list of hostile cases (an id and how the store is built): path traversal in blob
refs and names, symlinks, FIFOs, device files and directories in place of blobs and manifests, bad hash
refs, huge shapes, dtype lies, bad shard offsets, deep nesting, huge numbers, NaN, duplicate and 1 MiB
keys, bad encodings, a manifest over the size limit and 10^6+ tensor entries. Each case is a copy of a
store holding the hostile ``victim`` checkpoint and an intact ``healthy`` one.

The parent builds every store; then ONE child process (this file run as a script) opens them all, with

* ``RLIMIT_AS`` set to its own address space after warm-up plus 512 MiB, so an unbounded allocation fails
  (as a MemoryError, which is not a CairnError: the case fails) instead of the CI machine,
* an audit hook recording every ``open`` (``os.open`` raises it too), ``os.scandir`` and ``os.listdir``:
  no path outside the store root (resolved; opens with ``O_NOFOLLOW`` resolve the parent only) may be
  opened, and no ``pickle.find_class``/``os.system``/``subprocess.Popen``/``exec``-like event may fire,
* a per-call hang guard (``SIGALRM``, 10 s; the plan's 1 s bound is measured and reported, not asserted,
  since CI cores are shared), and the peak RSS growth of each case (``/proc/self/clear_refs`` resets the
  high-water mark, ``ru_maxrss`` reads it), asserted at most the plan's 64 MiB.

Per case: ``Store.load("victim")`` raises the case's typed :class:`cairn.CairnError` naming the checkpoint,
``Store.list`` never lists a hostile manifest (it reports it, or raises a CairnError; a valid manifest whose
blob is hostile is listed, since listing reads manifests only), ``Store.verify`` reports the victim damaged
(or never sees it), and ``healthy`` still loads. The hostile manifests of ``tests/test_hostile.py``
are run through the same bounded child too (``REUSED``), so they gain the memory cap and RSS bound.

Two inputs found a bug and stay as its regression cases in ``PARSE_BOMBS``: JSON that fits under the
64 MiB manifest cap but expanded to gigabytes when parsed whole (1.5 GiB, 7 s; an untyped MemoryError
under a memory cap). The reader now counts arrays/objects and tensor entries in the raw bytes first and
refuses such files before parsing.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import cairn
import test_hostile as hostile
from cairn._manifest import canonical_json
from cairn.errors import (
    BlobCorruptError,
    CairnError,
    CheckpointNotFoundError,
    ManifestError,
)
from reliability.harness import Record

VICTIM = hostile.NAME  # "victim"
HEALTHY = "healthy"
HANG_GUARD_S = 10  # per call: only a hang (or a blow-up) takes this long; the plan's 1 s is reported
PLAN_SECONDS = 1.0
PLAN_RSS_MIB = 64
EXTRA_ADDRESS_SPACE = 512 * 2**20
CHILD_TIMEOUT_S = 300

# ------------------------------------------------------------------------------------------ the cases

Builder = Callable[[Path, Path], None]  # (store root, a scratch directory outside it)


class Unavailable(Exception):
    """The case cannot be built here (e.g. device files need root)."""


@dataclass(frozen=True)
class Case:
    """One hostile input: its id, how its store is built, and what loading the victim must raise."""

    id: str
    build: Builder
    expected: type[CairnError] = ManifestError
    healthy_listed: bool = True  # the intact checkpoint is still listed next to it


def manifest_path(root: Path, name: str = VICTIM) -> Path:
    return root / "checkpoints" / f"{name}.json"


def edit(build: hostile.Build) -> Builder:
    """Rewrite the victim's manifest with a ``tests/test_hostile.py`` builder (``signed``, ``text``...)."""

    def run(root: Path, outside: Path) -> None:
        path = manifest_path(root)
        raw = path.read_bytes()
        hostile.write(path, build(json.loads(raw), raw))

    return run


def signed(mutate: Callable[[dict[str, Any]], Any]) -> Builder:
    return edit(hostile.signed(mutate))


def text(fn: Callable[[bytes], bytes]) -> Builder:
    return edit(hostile.text(fn))


def put(where: Callable[[dict[str, Any]], Any], key: Any, value: Any) -> Builder:
    return signed(hostile.put(where, key, value))


def top(doc: dict[str, Any]) -> dict[str, Any]:
    return doc


def weight_blob(root: Path) -> Path:
    """The file of the victim's ``model.weight`` blob."""
    doc = json.loads(manifest_path(root).read_bytes())
    return hostile.blob_file(root, hostile.chunk(doc)["blob"])


def _symlink_blob(root: Path, outside: Path) -> None:
    blob = weight_blob(root)
    target = outside / "stolen.bin"
    target.write_bytes(blob.read_bytes())  # the right bytes: following the link would "work"
    blob.unlink()
    blob.symlink_to(target)


def _symlink_blob_dir(root: Path, outside: Path) -> None:
    prefix = weight_blob(root).parent
    shutil.copytree(prefix, outside / "prefix")
    shutil.rmtree(prefix)
    prefix.symlink_to(outside / "prefix", target_is_directory=True)


def _symlink_checkpoints(root: Path, outside: Path) -> None:
    shutil.move(root / "checkpoints", outside / "checkpoints")
    (root / "checkpoints").symlink_to(outside / "checkpoints", target_is_directory=True)


def _symlink_manifest(root: Path, outside: Path) -> None:
    path = manifest_path(root)
    shutil.copy(path, outside / "victim.json")
    path.unlink()
    path.symlink_to(outside / "victim.json")


def _fifo(which: Callable[[Path], Path]) -> Builder:
    def run(root: Path, outside: Path) -> None:
        path = which(root)
        path.unlink()
        os.mkfifo(path)  # opening it for reading without O_NONBLOCK blocks forever

    return run


def _char_device(which: Callable[[Path], Path]) -> Builder:
    """``/dev/zero`` (endless bytes) in place of a file: reading it would never stop."""

    def run(root: Path, outside: Path) -> None:
        path = which(root)
        path.unlink()
        try:
            os.mknod(path, stat.S_IFCHR | 0o444, os.makedev(1, 5))
        except PermissionError:
            raise Unavailable("mknod needs root") from None

    return run


def _directory(which: Callable[[Path], Path]) -> Builder:
    def run(root: Path, outside: Path) -> None:
        path = which(root)
        path.unlink()
        path.mkdir()
        (path / "x").write_bytes(b"{}")

    return run


def _lookalike_names(root: Path, outside: Path) -> None:
    """Only files whose names merely look like the victim's: none of them may be taken for it."""
    path = manifest_path(root)
    raw = path.read_bytes()
    path.unlink()
    for stray in ("v\u0456ctim", "VICTIM", "victim ", "%76ictim", "victim.json", "..%2fvictim", "vi\\ctim"):
        (root / "checkpoints" / f"{stray}.json").write_bytes(raw)


def _over_limit(root: Path, outside: Path) -> None:
    path = manifest_path(root)
    path.unlink()
    with open(path, "wb") as f:  # sparse: 64 MiB + 1 of nothing, costs no disk
        f.truncate(64 * 2**20 + 1)


def _tensor_count(entry: Any, count: int) -> Builder:
    """``count`` tensor entries, each ``entry``, in a signed manifest."""

    def run(root: Path, outside: Path) -> None:
        doc = json.loads(manifest_path(root).read_bytes())
        doc.pop("digest")
        doc["tensors"] = []
        listed = b'"tensors":[' + b",".join([canonical_json(entry)] * count) + b"]"
        body = canonical_json(doc).replace(b'"tensors":[]', listed, 1)
        hostile.write(manifest_path(root), _sign_bytes(body))

    return run


def _sign_bytes(body: bytes) -> bytes:
    """Add the digest to canonical body bytes (without re-serialising a huge document)."""
    import blake3

    digest = blake3.blake3(body).hexdigest()
    return b'{"digest":"' + digest.encode() + b'",' + body[1:] + b"\n"


def _json_bloat(root: Path, outside: Path) -> None:
    """About 60 MiB of ``[]`` (under the 64 MiB cap): 21 million empty lists once parsed."""
    hostile.write(manifest_path(root), b'{"metadata":[' + b",".join([b"[]"] * 21_000_000) + b"]}")


def _one_mib_key(doc: dict[str, Any]) -> None:
    key = "k" * 2**20
    hostile.pair(doc, "arr")[0] = key
    hostile.A(doc)["path"] = key


def _shape(value: list[int]) -> Builder:
    return put(hostile.W, "shape", value)


def _blob_ref(value: str) -> Builder:
    return put(hostile.WC, "blob", value)


def _weight_of(root: Path) -> Path:
    return weight_blob(root)


def _victim_of(root: Path) -> Path:
    return manifest_path(root)


B = BlobCorruptError
CORPUS: list[Case] = [
    # -- path traversal in the only thing that becomes a path: blob refs ---------------------------------
    Case("blob-ref-dotdot", _blob_ref("../../x")),
    Case("blob-ref-dotdot-64-chars", _blob_ref("../" * 21 + "x")),
    Case("blob-ref-absolute", _blob_ref("/etc/passwd")),
    Case("blob-ref-percent-2e", _blob_ref("%2e%2e%2f" * 7 + "x")),
    Case("blob-ref-backslashes", _blob_ref("..\\" * 21 + "x")),
    Case("blob-ref-nul", _blob_ref("ab" * 16 + "\x00" + "ab" * 15 + "a")),
    Case("blob-ref-cyrillic-a", signed(hostile.blob_name(lambda b: b.replace("a", "\u0430")))),
    Case("blob-ref-fullwidth-digits", signed(hostile.blob_name(lambda b: "\uff11" * 64))),
    # -- ... and in names --------------------------------------------------------------------------------
    Case("name-dotdot", put(top, "name", "../../x")),
    Case("name-absolute", put(top, "name", "/etc/passwd")),
    Case("name-percent-2e", put(top, "name", "%2e%2e%2fvictim")),
    Case("name-backslash", put(top, "name", "..\\victim")),
    Case("name-nul", put(top, "name", "victim\x00")),
    Case("name-cyrillic-i", put(top, "name", "v\u0456ctim")),
    Case("file-names-that-look-like-the-victim", _lookalike_names, CheckpointNotFoundError),
    # -- the file system: links, FIFOs, devices, directories ---------------------------------------------
    Case("blob-symlink-outside", _symlink_blob, B),
    Case("blob-dir-symlink-outside", _symlink_blob_dir, B),
    Case("checkpoints-dir-symlink-outside", _symlink_checkpoints, healthy_listed=False),
    Case("manifest-symlink-outside", _symlink_manifest),
    Case("blob-fifo", _fifo(_weight_of), B),
    Case("manifest-fifo", _fifo(_victim_of)),
    Case("blob-char-device", _char_device(_weight_of), B),
    Case("manifest-char-device", _char_device(_victim_of)),
    Case("blob-directory", _directory(_weight_of), B),
    Case("manifest-directory", _directory(_victim_of)),
    # -- bad hash refs -------------------------------------------------------------------------------------
    Case("blob-ref-non-hex", _blob_ref("g" * 64)),
    Case("blob-ref-63-chars", signed(hostile.blob_name(lambda b: b[:63]))),
    Case("blob-ref-65-chars", signed(hostile.blob_name(lambda b: b + "a"))),
    Case("blob-ref-uppercase", signed(hostile.blob_name(str.upper))),
    # -- huge shapes ---------------------------------------------------------------------------------------
    Case("shape-2**32-cubed", _shape([2**32] * 3)),
    Case("shape-negative-dim", _shape([-1, 4])),
    Case("shape-rank-10000", _shape([1] * 10_000)),
    Case("shape-product-overflows-int64", _shape([2**32, 2**32, 4])),  # numpy.prod wraps this to 0
    Case("shape-dim-2**63", _shape([2**63])),
    # -- dtype lies ----------------------------------------------------------------------------------------
    Case("dtype-lie-numel-x-itemsize", put(hostile.WC, "nbytes", 8)),
    Case("dtype-lie-F64-over-F32-bytes", put(hostile.W, "dtype", "F64")),
    Case("dtype-unknown", put(hostile.W, "dtype", "F128")),
    Case("dtype-object", put(hostile.W, "dtype", "object")),
    Case("dtype-numpy-O", put(hostile.W, "dtype", "|O")),
    # -- shard offsets -------------------------------------------------------------------------------------
    Case(
        "shards-overlapping",
        signed(
            hostile.arr_shards(lambda b: [hostile.shard([0, 0], [1, 3], b), hostile.shard([0, 0], [1, 3], b)])
        ),
    ),
    Case(
        "shard-offset-out-of-range", signed(hostile.arr_shards(lambda b: [hostile.shard([5, 0], [2, 3], b)]))
    ),
    Case("chunk-offset-out-of-range", put(hostile.WC, "offset", 2**40)),
    # -- nesting and numbers -------------------------------------------------------------------------------
    Case("json-arrays-100000-deep", text(lambda raw: b'{"tree":' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
    Case("tree-100000-deep", text(hostile.deep_dict_text(100_000))),
    Case("int-5000-digits", text(hostile.set_step_text(b"9" * 5000))),
    Case("float-NaN", text(hostile.replace_once(b'["epoch",3]', b'["epoch",NaN]'))),
    Case("float-Infinity", text(hostile.replace_once(b'["epoch",3]', b'["epoch",Infinity]'))),
    Case("float-minus-Infinity", text(hostile.replace_once(b'["epoch",3]', b'["epoch",-Infinity]'))),
    # -- keys ----------------------------------------------------------------------------------------------
    Case("json-duplicate-key", text(hostile.dup_json_key)),
    Case("tree-duplicate-key", put(hostile.node("epoch"), 1, {"dict": [["a", 1], ["a", 2]]})),
    Case("tensor-key-1-MiB", signed(_one_mib_key)),
    # -- encodings -----------------------------------------------------------------------------------------
    Case("non-utf8", text(hostile.replace_once(b'"name":"victim"', b'"name":"vic\xfftim"'))),
    Case("utf16-with-bom", text(lambda raw: raw.decode().encode("utf-16"))),
    Case("lone-surrogate-escape", text(hostile.replace_once(b'["epoch",3]', b'["epoch","\\udc00"]'))),
    Case(
        "lone-surrogate-bytes", text(hostile.replace_once(b'"name":"victim"', b'"name":"vic\xed\xa0\x80tim"'))
    ),
    # -- sizes ---------------------------------------------------------------------------------------------
    Case("manifest-over-64-MiB", _over_limit),
    Case("tensors-1000001-entries", _tensor_count(0, 1_000_001)),
    Case("manifest-is-a-pickle", text(lambda raw: b"\x80\x04\x95" + b"\x00" * 8 + b"cos\nsystem\n.")),
]

# inputs under the manifest cap whose parse takes far more than the plan's 64 MiB / 1 s (see the module doc)
_ENTRY = {"dtype": "U8", "kind": "numpy", "path": "t", "shape": [0], "shards": []}
PARSE_BOMBS: list[Case] = [
    Case("tensors-1000001-real-entries-61-MiB", _tensor_count(_ENTRY, 1_000_001)),
    Case("json-60-MiB-of-empty-arrays", _json_bloat),
]

# negative controls run in the same child: each must be flagged, proving the harness can see that failure
CONTROLS = ("open-outside", "allocate-past-the-cap", "touch-100-MiB")

# what the child runs before taking its baseline: lazy imports and thread pools of each kind of failure
WARMUP = [c for c in CORPUS if c.id in ("blob-ref-dotdot", "blob-symlink-outside", "manifest-fifo")]

REUSED: list[Case] = [
    Case(f"test_hostile:{p.id}", edit(p.values[0]), p.values[1])  # type: ignore[attr-defined]
    for p in hostile.CASES
]

# ------------------------------------------------------------------------------------------ building


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with the victim (tests/test_hostile.py's state) and a healthy checkpoint in other fan-outs."""
    root = tmp_path_factory.mktemp("corpus") / "template"
    cairn.save(root, hostile.STATE, step=7, name=VICTIM, metrics={"loss": 0.5})
    prefixes = {p.name for p in (root / "blobs").iterdir()}
    value = 0
    while True:  # a healthy tensor whose blob shares no fan-out directory with the victim's
        healthy = torch.arange(3, dtype=torch.float64) + value
        import blake3

        if blake3.blake3(healthy.numpy().tobytes()).hexdigest()[:2] not in prefixes:
            break
        value += 1
    cairn.save(root, {"h": healthy}, step=1, name=HEALTHY)
    return root


def build_cases(cases: list[Case], template: Path, base: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Build one store per case under ``base``; the child's plan, and the ids that cannot be built here."""
    plan, unavailable = [], []
    for i, case in enumerate(cases):
        root = base / f"case-{i}" / "store"
        outside = base / f"case-{i}" / "outside"
        outside.mkdir(parents=True)
        shutil.copytree(template, root)
        try:
            case.build(root, outside)
        except Unavailable:
            unavailable.append(case.id)
            continue
        plan.append(
            {
                "id": case.id,
                "root": str(root),
                "expected": case.expected.__name__,
                "healthy_listed": case.healthy_listed,
            }
        )
    return plan, unavailable


def run_child(plan: list[dict[str, Any]], template: Path, work: Path) -> list[dict[str, Any]]:
    """Run the plan in one bounded child process; its per-case results (after a header line)."""
    warmup, _ = build_cases(WARMUP, template, work / "warmup")
    plan_file, out_file = work / "plan.json", work / "results.jsonl"
    document = {"template": str(template), "warmup": [c["root"] for c in warmup], "cases": plan}
    plan_file.write_text(json.dumps(document))
    tests = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    env["MALLOC_ARENA_MAX"] = "2"  # every thread's malloc arena reserves 64 MiB of address space
    proc = subprocess.run(
        [sys.executable, __file__, str(plan_file), str(out_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    lines = out_file.read_text().splitlines() if out_file.exists() else []
    results = [json.loads(line) for line in lines]
    done = {r["id"] for r in results if "id" in r}
    missing = [c["id"] for c in plan if c["id"] not in done]
    assert proc.returncode == 0 and not missing, (
        f"child exited {proc.returncode}; cases not finished: {missing[:5]}\n{proc.stderr[-3000:]}"
    )
    return results


def problems(result: dict[str, Any]) -> list[str]:
    """What is wrong with one case's outcome (empty when it passed)."""
    out = []
    load = result["load"]
    if not load["expected"]:
        out.append(f"load raised {load['type']} ({load['message'][:200]}), not {result['expected']}")
    elif VICTIM not in load["message"]:
        out.append(f"the error does not name the checkpoint: {load['message'][:200]}")
    for op in ("list", "verify"):
        if result[op]["type"] is not None and not result[op]["cairn"]:
            out.append(f"{op} raised {result[op]['type']}: {result[op]['message'][:200]}")
    # a hostile blob behind a valid manifest is found by load and verify; list reads manifests only
    if result["listed_victim"] and result["expected"] != BlobCorruptError.__name__:
        out.append("list() returned the hostile checkpoint")
    if result["verify_ok_victim"]:
        out.append("verify() passed the hostile checkpoint")
    if result["healthy_listed"] and not result["healthy_ok"] and not result["load_only"]:
        out.append(f"the healthy checkpoint was not listed and loaded: {result['healthy_error']}")
    if result.get("control_error"):
        out.append(f"control raised {result['control_error']}")
    if result["outside"]:
        out.append(f"opened outside the store: {result['outside'][:3]}")
    if result["forbidden"]:
        out.append(f"code-running events: {result['forbidden'][:3]}")
    if result["seconds"] >= HANG_GUARD_S:
        out.append(f"took {result['seconds']:.1f} s (hang guard)")
    if result["rss_growth_mib"] > PLAN_RSS_MIB:
        out.append(f"peak RSS grew by {result['rss_growth_mib']:.0f} MiB")
    return out


# ------------------------------------------------------------------------------------------ the tests


def test_corpus_is_large_and_distinct() -> None:
    ids = [c.id for c in CORPUS]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    assert len({c.id for c in CORPUS + PARSE_BOMBS + REUSED}) == len(CORPUS + PARSE_BOMBS + REUSED)


def test_c8_hostile_corpus_bounded(template: Path, tmp_path: Path, record: Record) -> None:
    """C8: every case raises a typed CairnError, in bounded time and memory, opening nothing outside."""
    cases = CORPUS + REUSED
    plan, unavailable = build_cases(cases, template, tmp_path)
    controls, _ = build_cases(
        [Case(f"control:{c}", CORPUS[0].build) for c in CONTROLS], template, tmp_path / "c"
    )
    for control, what in zip(controls, CONTROLS, strict=True):
        control["control"] = what
        control["outside_file"] = str(template / "cairn.json")  # the template store is outside the case's
    results = run_child(plan + controls, template, tmp_path)
    header, per_case = results[0], [r for r in results[1:] if not r["id"].startswith("control:")]
    # test-the-test: the harness sees an open outside the store, a blown memory cap and an RSS spike
    flagged = {r["id"]: problems(r) for r in results[1:] if r["id"].startswith("control:")}
    assert any("outside the store" in p for p in flagged["control:open-outside"]), flagged
    assert any("MemoryError" in p for p in flagged["control:allocate-past-the-cap"]), flagged
    assert any("peak RSS" in p for p in flagged["control:touch-100-MiB"]), flagged
    failures = {r["id"]: p for r in per_case if (p := problems(r))}
    own = [r for r in per_case if not r["id"].startswith("test_hostile:")]
    record.trials = 1  # one bounded child process
    record.inputs = len(per_case)
    record.detected = len(per_case) - len(failures)
    record.notes.update(
        corpus=len(CORPUS),
        corpus_run=len(own),
        reused_from_test_hostile=len(per_case) - len(own),
        unavailable=unavailable,
        child=header,
        max_seconds=round(max(r["seconds"] for r in per_case), 3),
        cases_over_plan_1s=[r["id"] for r in per_case if r["seconds"] > PLAN_SECONDS],
        max_rss_growth_mib=round(max(r["rss_growth_mib"] for r in per_case), 1),
        import_opens_outside_root=sorted({p for r in per_case for p in r["import_opens"]}),
        per_case={
            r["id"]: [round(r["seconds"], 3), round(r["rss_growth_mib"], 1), r["load"]["type"]] for r in own
        },
    )
    assert not failures, failures
    assert len(own) >= 40, (len(own), unavailable)
    assert header["rlimit_as_mib"] > 0


def test_c8_manifest_parse_is_memory_bounded(template: Path, tmp_path: Path, record: Record) -> None:
    """Inputs within every size limit whose parse blows up: they must still fail typed and bounded."""
    plan, _ = build_cases(PARSE_BOMBS, template, tmp_path)
    for case in plan:
        case["load_only"] = True
    results = run_child(plan, template, tmp_path)
    per_case = results[1:]
    record.trials = 1
    record.inputs = len(per_case)
    record.detected = sum(not problems(r) for r in per_case)
    record.notes.update(
        per_case={
            r["id"]: [round(r["seconds"], 3), round(r["rss_growth_mib"], 1), r["load"]["type"]]
            for r in per_case
        },
        problems={r["id"]: problems(r) for r in per_case},
    )
    assert all(not problems(r) for r in per_case), record.notes["problems"]


# ------------------------------------------------------------------------------------------ the child

_WATCHED = ("open", "os.scandir", "os.listdir")
_FORBIDDEN = (
    "pickle.find_class",
    "marshal.loads",
    "exec",
    "compile",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "subprocess.Popen",
)


class Hang(BaseException):
    """Raised by the SIGALRM hang guard; a BaseException so that no ``except OSError`` swallows it."""


def _status() -> dict[str, int]:
    """VmPeak, VmSize, VmHWM and VmRSS of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmPeak", "VmSize", "VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS that ru_maxrss reports
        return True
    except OSError:
        return False


def _resolve(path: str, flags: int | None) -> str:
    if flags is not None and flags & os.O_NOFOLLOW:  # the final component is never followed
        return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    return os.path.realpath(path)


def _child(plan_file: str, out_file: str) -> None:
    """Run every case of the plan (see the module doc); one JSON line per case into ``out_file``."""
    plan = json.loads(Path(plan_file).read_text())
    events: list[tuple[str, tuple[Any, ...], bool]] = []
    recording = [False]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if recording[0] and (event in _WATCHED or event.startswith(_FORBIDDEN)):
            importing = False
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_code.co_filename.startswith("<frozen importlib"):
                    importing = True
                    break
                frame = frame.f_back  # type: ignore[assignment]
            events.append((event, args, importing))

    sys.addaudithook(hook)

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no answer in {HANG_GUARD_S} s")

    signal.signal(signal.SIGALRM, alarm)

    def call(fn: Callable[[], Any]) -> tuple[Any, BaseException | None, float]:
        start = time.perf_counter()
        signal.alarm(HANG_GUARD_S)
        try:
            return fn(), None, time.perf_counter() - start
        except BaseException as e:  # reported to the parent, whatever it is
            return None, e, time.perf_counter() - start
        finally:
            signal.alarm(0)

    def run_case(case: dict[str, Any]) -> dict[str, Any]:
        root = case["root"]
        expected = getattr(cairn.errors, case["expected"])
        damaged: list[tuple[str, str]] = []
        _, load_error, t_load = call(lambda: cairn.Store(root).load(VICTIM))
        if case.get("load_only"):  # a known blow-up: once is enough (and each try costs seconds)
            listed = report = healthy = list_error = verify_error = healthy_error = None
            t_list = t_verify = t_healthy = 0.0
        else:
            listed, list_error, t_list = call(
                lambda: cairn.Store(root).list(on_damaged=lambda n, e: damaged.append((n, type(e).__name__)))
            )
            report, verify_error, t_verify = call(lambda: cairn.Store(root).verify())
            healthy, healthy_error, t_healthy = call(lambda: cairn.Store(root).load(HEALTHY))
        control_error = None
        if case.get("control") == "open-outside":
            open(case["outside_file"], "rb").close()
        elif case.get("control") == "allocate-past-the-cap":
            _, e, _ = call(lambda: bytearray(EXTRA_ADDRESS_SPACE + 2**20))
            control_error = None if e is None else type(e).__name__
        elif case.get("control") == "touch-100-MiB":
            _, e, _ = call(lambda: bytearray(100 * 2**20))  # zero-filled pages: all resident
            control_error = None if e is None else type(e).__name__
        names = [i.name for i in listed] if listed is not None else []
        return {
            "load": _outcome(load_error, expected),
            "list": _outcome(list_error, CairnError),
            "verify": _outcome(verify_error, CairnError),
            "listed_victim": VICTIM in names,
            "reported_damaged": damaged,
            "verify_ok_victim": report is not None
            and VICTIM in report.checkpoints
            and VICTIM not in report.damaged,
            "healthy_ok": HEALTHY in names
            and healthy_error is None
            and torch.equal(healthy["h"], reference[0]),
            "healthy_error": repr(healthy_error)[:200] if healthy_error else None,
            "seconds": max(t_load, t_list, t_verify, t_healthy),
            "control_error": control_error,
        }

    reference = [cairn.load(plan["template"], HEALTHY)["h"]]
    out = open(out_file, "w")  # noqa: SIM115 - one line per case, flushed as it goes
    # warm-up: every entry point once on the valid template and on each kind of failure, so lazy imports
    # and thread pools exist before the baseline is taken
    for root in [plan["template"], *plan["warmup"]]:
        run_case({"root": root, "expected": "CairnError", "healthy_listed": True})
    base = _status()
    limit = base["VmSize"] * 1024 + EXTRA_ADDRESS_SPACE
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    peak_resets = _reset_peak()
    header = {
        "baseline_vm_peak_mib": base["VmPeak"] // 1024,
        "baseline_vm_size_mib": base["VmSize"] // 1024,
        "baseline_rss_mib": base["VmRSS"] // 1024,
        "rlimit_as_mib": limit // 2**20,
        "peak_reset": peak_resets,
    }
    out.write(json.dumps(header) + "\n")
    out.flush()
    for case in plan["cases"]:
        real_root = os.path.realpath(case["root"]) + os.sep
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if peak_resets:
            _reset_peak()
        before = _status()
        events.clear()
        recording[0] = True
        result = run_case(case)
        recording[0] = False
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        after = _status()
        outside, import_opens, forbidden = [], [], []
        for event, args, importing in events:
            if event.startswith(_FORBIDDEN):
                if not importing:
                    forbidden.append(f"{event} {str(args)[:100]}")
                continue
            target = args[0] if args else None
            if not isinstance(target, str | bytes | os.PathLike):
                continue  # a file descriptor
            flags = args[2] if event == "open" and len(args) > 2 else None
            path = _resolve(os.fsdecode(target), flags)
            if not (path + os.sep).startswith(real_root):
                if importing:
                    import_opens.append(path)
                else:
                    outside.append(f"{event} {path}")
        result.update(
            id=case["id"],
            expected=case["expected"],
            healthy_listed=case["healthy_listed"],
            load_only=bool(case.get("load_only")),
            # the peak RSS of the case over the RSS it started with (the high-water mark reset before it)
            rss_growth_mib=(after["VmHWM"] - before["VmRSS"]) / 1024 if peak_resets else 0.0,
            # ru_maxrss is the process's high-water mark: it grows only when a case sets a new peak
            ru_maxrss_growth_kib=maxrss_after - maxrss_before,
            outside=outside,
            import_opens=import_opens,
            forbidden=forbidden,
        )
        out.write(json.dumps(result, default=str) + "\n")
        out.flush()
    out.close()


def _outcome(error: BaseException | None, expected: type[BaseException]) -> dict[str, Any]:
    return {
        "type": None if error is None else type(error).__name__,
        "cairn": isinstance(error, CairnError),
        "expected": isinstance(error, expected),
        "message": "" if error is None else str(error)[:500],
    }


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
