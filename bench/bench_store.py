#!/usr/bin/env python
"""Benchmark cairn's store against torch.save/torch.load, safetensors and the disk's own ceiling.

    python bench/bench_store.py [--size-gb 1.0] [--repeats 3] [--dir DIR] [--json OUT] [--seed 0]

The state is a GPT-2-small-shaped model state dict plus AdamW-like ``exp_avg``/``exp_avg_sq`` tensors
(float32, seeded random data), scaled to about ``--size-gb`` GB (10**9 bytes). Every save is durable when
its timer stops: cairn fsyncs by itself, the peers get an fsync of their file and of its directory.
Every load ends by reading one float from each 4 KiB page of every tensor, so lazily mapped tensors are
paid for in full. Each operation runs in a fresh directory; the table shows the median of ``--repeats``.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import cairn
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import cairn

try:
    import safetensors
    import safetensors.torch as st
except ImportError:  # the safetensors rows are then left out
    safetensors = None
    st = None

GB = 10**9
MiB = 2**20
BLOCK = 64 * MiB
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

N_EMBD, N_CTX, VOCAB, N_LAYER = 768, 1024, 50257, 12
Shape = tuple[int, ...]

NO_DROP = "page cache could not be dropped: warm loads only"


# -- the state ----------------------------------------------------------------------------------------


def model_shapes(n_layer: int, vocab: int) -> list[tuple[str, Shape]]:
    """GPT-2 (Hugging Face names and Conv1D layouts) with ``n_layer`` blocks and ``vocab`` embedding rows."""
    d = N_EMBD
    out: list[tuple[str, Shape]] = []
    if vocab:
        out.append(("transformer.wte.weight", (vocab, d)))
    out.append(("transformer.wpe.weight", (N_CTX, d)))
    for i in range(n_layer):
        h = f"transformer.h.{i}"
        out += [
            (f"{h}.ln_1.weight", (d,)),
            (f"{h}.ln_1.bias", (d,)),
            (f"{h}.attn.c_attn.weight", (d, 3 * d)),
            (f"{h}.attn.c_attn.bias", (3 * d,)),
            (f"{h}.attn.c_proj.weight", (d, d)),
            (f"{h}.attn.c_proj.bias", (d,)),
            (f"{h}.ln_2.weight", (d,)),
            (f"{h}.ln_2.bias", (d,)),
            (f"{h}.mlp.c_fc.weight", (d, 4 * d)),
            (f"{h}.mlp.c_fc.bias", (4 * d,)),
            (f"{h}.mlp.c_proj.weight", (4 * d, d)),
            (f"{h}.mlp.c_proj.bias", (d,)),
        ]
    out += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return out


def nbytes_of(shapes: list[tuple[str, Shape]]) -> int:
    return 4 * sum(math.prod(s) for _, s in shapes)


def plan_state(target: int) -> tuple[list[tuple[str, str, Shape]], str]:
    """(group, key, shape) for every tensor of a state of about ``target`` bytes, and how it was scaled.

    Groups are ``model``, ``exp_avg`` and ``exp_avg_sq``. Below the size of the full GPT-2-small model
    (0.50 GB) the optimizer state is dropped and the model shrunk (fewer blocks, fewer vocabulary rows);
    between that and model + both Adam moments (1.49 GB) Adam tensors are added in order (all of
    ``exp_avg`` first) while that brings the total closer to the target; above it blocks are repeated.
    """
    model_bytes = nbytes_of(model_shapes(N_LAYER, VOCAB))
    if target < model_bytes:
        n_layer = max(1, min(N_LAYER, round(N_LAYER * target / model_bytes)))
        rest = nbytes_of(model_shapes(n_layer, 0))
        vocab = max(1, min(VOCAB, (target - rest) // (4 * N_EMBD)))
        entries = [("model", k, s) for k, s in model_shapes(n_layer, vocab)]
        return entries, f"model only: {n_layer} blocks, {vocab} vocabulary rows, no optimizer state"
    block_bytes = nbytes_of(model_shapes(1, 0)) - nbytes_of(model_shapes(0, 0))
    if target >= 3 * model_bytes:
        n_layer = N_LAYER + round((target - 3 * model_bytes) / (3 * block_bytes))
        params = model_shapes(n_layer, VOCAB)
        entries = [(g, k, s) for g in ("model", "exp_avg", "exp_avg_sq") for k, s in params]
        return entries, f"model ({n_layer} blocks, full vocabulary) + exp_avg + exp_avg_sq"
    params = model_shapes(N_LAYER, VOCAB)
    entries = [("model", k, s) for k, s in params]
    total = nbytes_of(params)
    added = {"exp_avg": 0, "exp_avg_sq": 0}
    for g, k, s in [(g, k, s) for g in added for k, s in params]:
        b = 4 * math.prod(s)
        if abs(total + b - target) >= abs(total - target):
            break
        entries.append((g, k, s))
        total += b
        added[g] += 1
    optim = ", ".join(f"{g} for {n} of {len(params)} tensors" for g, n in added.items() if n)
    return entries, f"model ({N_LAYER} blocks, full vocabulary)" + (
        f" + {optim}" if optim else ", no optimizer state"
    )


def build_state(
    entries: list[tuple[str, str, Shape]], seed: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The nested state (for cairn and torch.save) and the same tensors flat (for safetensors)."""
    g = torch.Generator().manual_seed(seed)
    flat: dict[str, torch.Tensor] = {}
    for group, key, shape in entries:
        t = torch.randn(shape, generator=g)
        if group == "model":
            t.mul_(0.02)
        elif group == "exp_avg":
            t.mul_(1e-3)
        else:
            t.square_().mul_(1e-6)
        flat[f"{group}.{key}"] = t
    return nest(flat), flat


def nest(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[str, Any] = {"model": {}, "optim": {"exp_avg": {}, "exp_avg_sq": {}, "step": 1000}}
    for name, t in flat.items():
        group, key = name.split(".", 1)
        (state["model"] if group == "model" else state["optim"][group])[key] = t
    return state


def change_some(flat: dict[str, torch.Tensor], fraction: float, seed: int) -> tuple[dict[str, Any], int]:
    """The state with ``fraction`` of its tensors (chosen at random, seeded) replaced; the bytes changed."""
    names = sorted(random.Random(seed).sample(sorted(flat), max(1, round(fraction * len(flat)))))
    changed = dict(flat)
    for name in names:
        changed[name] = flat[name] + 1.0
    return nest(changed), sum(flat[n].nbytes for n in names)


def leaves(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, dict):
        for v in tree.values():
            yield from leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from leaves(v)
    elif isinstance(tree, torch.Tensor):
        yield tree


def touch(tree: Any) -> tuple[int, float]:
    """Read one element of every page of every tensor (forces mapped tensors in); (count, checksum)."""
    n, total = 0, 0.0
    for t in leaves(tree):
        step = max(1, PAGE // t.element_size())
        total += float(t.reshape(-1)[::step].double().sum())
        n += 1
    return n, total


# -- durability and the page cache ----------------------------------------------------------------------


def fsync_file_and_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [Path(d) / f for d, _, fs in os.walk(path) for f in fs]


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


try:
    LIBC = _libc() if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    LIBC = None


def resident_fraction(paths: list[Path]) -> float | None:
    """The fraction of the files' pages in the page cache (mincore), or None if it cannot be told."""
    if LIBC is None:
        return None
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = LIBC.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                pages = (size + PAGE - 1) // PAGE
                vec = np.zeros(pages, dtype=np.uint8)
                if LIBC.mincore(addr, size, vec.ctypes.data) != 0:
                    return None
                resident += int((vec & 1).sum())
                total += pages
            finally:
                LIBC.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


def drop_caches(paths: list[Path]) -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fadvise_dontneed(paths: list[Path]) -> None:
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def find_evictor(root: Path) -> tuple[Callable[[list[Path]], None] | None, str]:
    """How to empty the page cache of given files: drop_caches (root), else per-file fadvise, else none.

    Each method is tried on a probe file and kept only if mincore then shows (almost) none of it cached,
    or if mincore is unavailable and the method raised no error.
    """
    probe = root / "cache-probe"
    data = np.random.default_rng(1).bytes(8 * MiB)
    with open(probe, "wb") as f:
        f.write(data)
    fsync_file_and_dir(probe)
    notes = []
    try:
        for name, method in (("drop_caches", drop_caches), ("posix_fadvise(DONTNEED)", fadvise_dontneed)):
            try:
                method([probe])
            except (OSError, AttributeError) as e:
                notes.append(f"{name}: {e}")
                continue
            left = resident_fraction([probe])
            if left is None or left < 0.05:
                return method, name if left is not None else f"{name} (unverified: no mincore)"
            notes.append(f"{name}: {left:.0%} still cached")
        return None, f"{NO_DROP} ({'; '.join(notes)})"
    finally:
        probe.unlink()


# -- timing -------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, root: Path, state: dict[str, Any], flat: dict[str, torch.Tensor], args: Any) -> None:
        self.root = root
        self.state, self.flat = state, flat
        self.nbytes = sum(t.nbytes for t in flat.values())
        self.args = args
        self.times: dict[str, list[float]] = {}
        self.written: dict[str, list[int]] = {}
        self.cached_at_start: dict[str, list[float | None]] = {}
        self.evict, self.cache_method = find_evictor(root)
        self.expected = touch(state)
        self.changed_state, self.changed_bytes = change_some(flat, 0.10, args.seed + 1)
        blocks = min(4, -(-self.nbytes // BLOCK))  # distinct random blocks the disk ceiling cycles through
        self.pool = [np.random.default_rng(args.seed + 2 + i).bytes(BLOCK) for i in range(blocks)]
        self.read_buffer = memoryview(bytearray(min(BLOCK, self.nbytes)))  # allocated (and zeroed) once
        self.repeat = 0

    def log(self, msg: str) -> None:
        print(f"[{self.repeat + 1}/{self.args.repeats}] {msg}", file=sys.stderr, flush=True)

    def record(self, op: str, seconds: float, written: int | None = None) -> None:
        self.times.setdefault(op, []).append(seconds)
        if written is not None:
            self.written.setdefault(op, []).append(written)
        extra = "" if written is None else f", {written / GB:.3f} GB written"
        self.log(f"{op}: {seconds:.3f} s{extra}")

    def timed(self, op: str, fn: Callable[[], Any]) -> Any:
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        self.record(op, time.perf_counter() - t0)
        return out

    def load(self, op: str, files: Path, fn: Callable[[], Any]) -> None:
        """Time ``fn`` (a load) plus touching every page of its result, cold (if possible) then warm."""

        def run() -> tuple[Any, tuple[int, float]]:
            tree = fn()
            return tree, touch(tree)

        def once(label: str) -> None:
            tree, got = self.timed(label, run)
            del tree  # freed (mappings unmapped) outside the timer
            self.check(op, got)
            gc.collect()

        if self.evict is not None:
            paths = files_under(files)
            self.evict(paths)
            self.cached_at_start.setdefault(f"{op}, cold", []).append(resident_fraction(paths))
            once(f"{op}, cold")
        once(f"{op}, warm")

    def check(self, op: str, got: tuple[int, float]) -> None:
        n, total = self.expected
        if got[0] != n or not math.isclose(got[1], total, rel_tol=1e-9, abs_tol=1e-9):
            raise SystemExit(f"{op} returned different tensors: {got} != {self.expected}")

    # -- one repeat: every operation in a fresh directory -------------------------------------------

    def run_once(self, run_dir: Path) -> None:
        self.bench_ceiling(run_dir / "disk")
        self.bench_cairn(run_dir / "cairn")
        self.bench_torch(run_dir / "torch")
        if st is not None:
            self.bench_safetensors(run_dir / "safetensors")

    def bench_ceiling(self, d: Path) -> None:
        d.mkdir()
        path = d / "ceiling.bin"

        def write() -> None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                left, i = self.nbytes, 0
                while left:
                    view = memoryview(self.pool[i % len(self.pool)])[: min(BLOCK, left)]
                    while view.nbytes:
                        n = os.write(fd, view)
                        view, left = view[n:], left - n
                    i += 1
            finally:
                os.close(fd)
            fsync_file_and_dir(path)

        def read() -> None:
            view = self.read_buffer
            fd = os.open(path, os.O_RDONLY)
            try:
                total = 0
                while n := os.readv(fd, [view]):
                    total += n
            finally:
                os.close(fd)
            assert total == self.nbytes, (total, self.nbytes)

        self.timed("disk: write + fsync", write)
        if self.evict is not None:
            self.evict([path])
            self.cached_at_start.setdefault("disk: read, cold", []).append(resident_fraction([path]))
            self.timed("disk: read, cold", read)
        self.timed("disk: read, warm", read)
        shutil.rmtree(d)

    def bench_cairn(self, store: Path) -> None:
        for op, state, step in (
            ("cairn.save, new store", self.state, 0),
            ("cairn.save, unchanged", self.state, 1),
            ("cairn.save, 10% of tensors changed", self.changed_state, 2),
        ):
            gc.collect()
            t0 = time.perf_counter()
            info = cairn.save(store, state, step=step)
            self.record(op, time.perf_counter() - t0, info.bytes_written)
        self.load("cairn.load (verify=True)", store, lambda: cairn.load(store, "step-0"))
        self.load("cairn.load (verify=False)", store, lambda: cairn.load(store, "step-0", verify=False))
        shutil.rmtree(store)

    def bench_torch(self, d: Path) -> None:
        d.mkdir()
        path = d / "state.pt"

        def save() -> None:
            torch.save(self.state, path)
            fsync_file_and_dir(path)

        self.timed("torch.save + fsync", save)
        self.load("torch.load", path, lambda: torch.load(path, weights_only=True, mmap=False))
        shutil.rmtree(d)

    def bench_safetensors(self, d: Path) -> None:
        assert st is not None
        d.mkdir()
        path = d / "state.safetensors"

        def save() -> None:
            st.save_file(self.flat, path)
            fsync_file_and_dir(path)

        self.timed("safetensors.save_file + fsync", save)
        self.load("safetensors.load_file", path, lambda: st.load_file(path))
        shutil.rmtree(d)


# -- the report ---------------------------------------------------------------------------------------

SAVES = ["cairn.save, new store", "cairn.save, unchanged", "cairn.save, 10% of tensors changed"]
SAVE_PEERS = ["torch.save + fsync", "safetensors.save_file + fsync"]
LOADS = ["cairn.load (verify=True)", "cairn.load (verify=False)"]
LOAD_PEERS = ["torch.load", "safetensors.load_file"]


def sections(cold: bool) -> list[tuple[str, list[str], list[str], str]]:
    """(title, operations, peers, disk ceiling) for each group of rows."""
    out = [("save (durable)", [*SAVES, *SAVE_PEERS], SAVE_PEERS, "disk: write + fsync")]
    for temp in ("cold", "warm") if cold else ("warm",):
        ops = [f"{op}, {temp}" for op in [*LOADS, *LOAD_PEERS]]
        out.append((f"load, {temp} cache", ops, ops[len(LOADS) :], f"disk: read, {temp}"))
    return out


def table(bench: Bench) -> tuple[str, list[dict[str, Any]]]:
    med = {op: statistics.median(ts) for op, ts in bench.times.items()}
    header = ["operation", "seconds", "GB/s", "time vs best peer", "time vs disk", "bytes written"]
    rows: list[list[str]] = []
    records: list[dict[str, Any]] = []
    for title, ops, peers, ceiling in sections(bench.evict is not None):
        ceil = med.get(ceiling)
        if ceil is not None:
            rows.append(
                [f"*{ceiling}* (ceiling)", f"{ceil:.3f}", f"{bench.nbytes / ceil / GB:.2f}", "", "1.00×", ""]
            )
        best = min((med[p] for p in peers if p in med), default=None)
        for op in ops:
            if op not in med:
                continue
            s = med[op]
            written = bench.written.get(op)
            w = statistics.median(written) if written else None
            rows.append(
                [
                    op,
                    f"{s:.3f}",
                    f"{bench.nbytes / s / GB:.2f}",
                    "" if best is None else f"{s / best:.2f}×",
                    "" if ceil is None else f"{s / ceil:.2f}×",
                    "" if w is None else f"{int(w):,} ({w / bench.nbytes:.1%})",
                ]
            )
            records.append(
                {
                    "section": title,
                    "operation": op,
                    "seconds": s,
                    "gb_per_s": bench.nbytes / s / GB,
                    "vs_best_peer": None if best is None else s / best,
                    "vs_disk": None if ceil is None else s / ceil,
                    "bytes_written": w,
                }
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    return "\n".join(out), records


def machine_info(root: Path) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": getattr(safetensors, "__version__", None),
        "cairn": getattr(cairn, "__version__", None),
        "torch_threads": torch.get_num_threads(),
        "dir": str(root),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        info["mem_total_gb"] = int(mem["MemTotal"].split()[0]) * 1024 / GB
        info["mem_available_gb"] = int(mem["MemAvailable"].split()[0]) * 1024 / GB
    vfs = os.statvfs(root)
    info["disk_free_gb"] = vfs.f_bavail * vfs.f_frsize / GB
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["fs_stat_f"] = subprocess.run(
            ["stat", "-f", "-c", "%T", str(root)], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    with contextlib.suppress(OSError):  # the mount holding root: longest mount point that is a prefix
        best = ("", "", "")
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (str(root) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[1]):
                best = (dev, mnt, fstype)
        info["fs"] = f"{best[2]} on {best[0]} (mounted at {best[1]})"
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="state size in GB (10**9 bytes); default 1.0")
    p.add_argument("--repeats", type=int, default=3, help="runs per operation, median reported; default 3")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default bench/results/tmp)")
    p.add_argument("--json", type=Path, default=None, help="write every raw timing here as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the random state; default 0")
    args = p.parse_args(argv)
    if args.size_gb <= 0 or args.repeats < 1:
        p.error("--size-gb must be positive and --repeats at least 1")

    base = (args.dir or Path(__file__).resolve().parent / "results" / "tmp").resolve()
    made = [d for d in (base, *base.parents) if not d.exists()]  # removed again at the end if empty
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-store-", dir=base)).resolve()
    try:
        entries, how = plan_state(int(args.size_gb * GB))
        t0 = time.perf_counter()
        state, flat = build_state(entries, args.seed)
        nbytes = sum(t.nbytes for t in flat.values())
        info = machine_info(root)
        need = 2.5 * nbytes / GB
        if info.get("mem_available_gb", need) < need:
            print(f"warning: about {need:.1f} GB of memory is needed", file=sys.stderr)
        if info["disk_free_gb"] < 1.3 * nbytes / GB:
            raise SystemExit(f"not enough free disk in {root}: {info['disk_free_gb']:.1f} GB")
        print(
            f"state: {nbytes / GB:.3f} GB ({nbytes / MiB:.1f} MiB) in {len(flat)} float32 tensors; {how}; "
            f"built in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        bench = Bench(root, state, flat, args)
        for r in range(args.repeats):
            bench.repeat = r
            run_dir = root / f"run-{r}"
            run_dir.mkdir()
            bench.run_once(run_dir)
            shutil.rmtree(run_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for d in made:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()

    text, records = table(bench)
    print(f"# cairn store benchmark: {nbytes / GB:.3f} GB state, median of {args.repeats}\n")
    print(f"- state: {len(flat)} float32 tensors, {nbytes:,} bytes ({nbytes / MiB:.1f} MiB); {how}")
    print(f"- 10% change: {round(0.1 * len(flat))} tensors, {bench.changed_bytes:,} bytes")
    print(
        f"- machine: {info['cpu_count']} CPUs ({info['cpu']}), "
        f"{info.get('mem_total_gb', 0):.1f} GB memory ({info.get('mem_available_gb', 0):.1f} GB available), "
        f"{info['platform']}"
    )
    print(
        f"- software: Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads), "
        f"numpy {info['numpy']}, safetensors {info['safetensors']}, cairn {info['cairn']}"
    )
    print(
        f"- disk: {info.get('fs', '?')}; stat -f: {info.get('fs_stat_f', '?')}; "
        f"{info['disk_free_gb']:.1f} GB free"
    )
    print(f"- cold loads: {bench.cache_method}")
    cached = [x for xs in bench.cached_at_start.values() for x in xs if x is not None]
    if cached:
        print(f"- page cache left before cold loads (mincore): at most {max(cached):.1%}")
    print()
    print(text)
    print()
    print(
        "GB/s is the state's logical size over the time (so incremental saves can exceed the disk); "
        "'time vs' columns are time ratios (below 1.00× is faster)."
    )
    if bench.evict is None:
        print(f"\n**{NO_DROP}**")

    if args.json:
        doc = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": info,
            "state": {
                "bytes": nbytes,
                "tensors": len(flat),
                "scaling": how,
                "changed_tensors": round(0.1 * len(flat)),
                "changed_bytes": bench.changed_bytes,
            },
            "cold_loads": bench.cache_method,
            "cache_dropped": bench.evict is not None,
            "page_cache_left_before_cold": bench.cached_at_start,
            "seconds": bench.times,
            "bytes_written": bench.written,
            "median": records,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nraw timings: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
