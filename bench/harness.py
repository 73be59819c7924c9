"""What both benchmark scripts share: durability, the page cache, peak RSS, checks, machine facts, tables.

Imported by ``bench_store.py`` and ``bench_training.py`` (run as scripts, so ``bench/`` is on the path).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import cairn as cairn  # re-exported for the scripts
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import cairn as cairn

GB = 10**9
MiB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
NO_DROP = "page cache could not be dropped: warm loads only"


# -- durability ---------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync one file or directory."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (a file or a directory), every directory in it, and its parent."""
    if path.is_file():
        fsync_path(path)
    else:
        for d, _, fs in os.walk(path):
            for f in fs:
                fsync_path(Path(d) / f)
            fsync_path(Path(d))
    fsync_path(path.parent)


def files_under(path: Path) -> list[Path]:
    """The regular files at or under ``path``."""
    if path.is_file():
        return [path]
    return [Path(d) / f for d, _, fs in os.walk(path) for f in fs]


def tree_size(path: Path) -> int:
    """Total apparent size of the files at or under ``path`` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in files_under(path)) if path.exists() else 0


# -- the page cache -----------------------------------------------------------------------------------


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
    """Empty the whole page cache (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fadvise_dontneed(paths: list[Path]) -> None:
    """Ask the kernel to drop the (clean) cached pages of ``paths``."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


Evictor = Callable[[list[Path]], None]


def find_evictor(root: Path) -> tuple[Evictor | None, str]:
    """How to empty the page cache of given files: drop_caches (root), else per-file fadvise, else none.

    Each method is tried on a probe file and kept only if mincore then shows (almost) none of it cached,
    or if mincore is unavailable and the method raised no error.
    """
    probe = root / "cache-probe"
    probe.write_bytes(np.random.default_rng(1).bytes(8 * MiB))
    fsync_tree(probe)
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


# -- peak RSS -----------------------------------------------------------------------------------------

if LIBC is not None:  # a fixed mmap threshold: big buffers go back to the kernel when freed, so each
    with contextlib.suppress(AttributeError):  # operation's peak RSS is not hidden by reused heap memory
        LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (also turns off glibc's dynamic threshold)


def _status_kib(field_name: str) -> int | None:
    with contextlib.suppress(OSError):
        m = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) * 1024 if m else None
    return None


def reset_peak_rss() -> int | None:
    """Reset the process's peak RSS (VmHWM) to its current RSS; the current RSS, or None if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


@dataclass
class Sample:
    """One measured run of one operation."""

    seconds: float
    blocking: float | None = None  # seconds the caller was blocked (None: the same as ``seconds``)
    bytes_written: int | None = None
    rss_added: int | None = None  # peak RSS during the operation minus RSS just before it
    extra: dict[str, Any] = field(default_factory=dict)


def measured(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run ``fn`` after a garbage collection; (its result, the peak RSS it added or None)."""
    gc.collect()
    before = reset_peak_rss()
    out = fn()
    peak = _status_kib("VmHWM")
    return out, None if before is None or peak is None else max(0, peak - before)


# -- checking loads -----------------------------------------------------------------------------------


def leaves(tree: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a tree of dicts, lists and tuples."""
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


def same_checksum(got: tuple[int, float], expected: tuple[int, float]) -> bool:
    """Whether two :func:`touch` results agree (float64 sums in any order)."""
    return got[0] == expected[0] and abs(got[1] - expected[1]) <= 1e-9 * max(1.0, abs(expected[1]))


# -- statistics and reports ---------------------------------------------------------------------------


def median(xs: Sequence[float | None]) -> float | None:
    """The median of the values that are not None (None if there are none)."""
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def fmt(x: float | None, spec: str = ".3f", suffix: str = "") -> str:
    """``x`` formatted, or an empty cell."""
    return "" if x is None else f"{x:{spec}}{suffix}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table with padded columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as indented JSON, creating the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def log(msg: str) -> None:
    """Progress to stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def package_version(name: str) -> str | None:
    """The version of an importable package, or None."""
    try:
        return str(__import__(name).__version__)
    except (ImportError, AttributeError):
        return None


def machine_info(root: Path) -> dict[str, Any]:
    """CPU, memory, OS, library versions and the file system holding ``root``."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": package_version("safetensors"),
        "blake3": package_version("blake3"),
        "cairn": getattr(cairn, "__version__", None),
        "torch_threads": torch.get_num_threads(),
        "dir": str(root),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, KeyError):
        mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        info["mem_total_gb"] = int(mem["MemTotal"].split()[0]) * 1024 / GB
        info["mem_available_gb"] = int(mem["MemAvailable"].split()[0]) * 1024 / GB
    vfs = os.statvfs(root)
    info["disk_free_gb"] = vfs.f_bavail * vfs.f_frsize / GB
    with contextlib.suppress(OSError):  # the mount holding root: longest mount point that is a prefix
        best = ("", "", "")
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (str(root) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[1]):
                best = (dev, mnt, fstype)
        info["fs"] = f"{best[2]} on {best[0]} (mounted at {best[1]})"
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    return info


def machine_lines(info: dict[str, Any]) -> list[str]:
    """The machine as markdown bullet lines."""
    return [
        f"- machine: {info['cpu_count']} CPUs ({info['cpu']}), {info.get('mem_total_gb', 0):.1f} GB memory "
        f"({info.get('mem_available_gb', 0):.1f} GB available), {info['platform']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in info.get('load_average', ()))}",
        f"- software: Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads), "
        f"numpy {info['numpy']}, safetensors {info['safetensors']}, blake3 {info['blake3']}, "
        f"cairn {info['cairn']}",
        f"- disk: {info.get('fs', '?')}; {info['disk_free_gb']:.1f} GB free; files under {info['dir']}",
    ]


@contextlib.contextmanager
def scratch_dir(base: Path | None, prefix: str) -> Iterator[Path]:
    """A new temporary directory under ``base`` (default bench/results/tmp), removed with every directory
    this had to create."""
    base = (base or Path(__file__).resolve().parent / "results" / "tmp").resolve()
    made = [d for d in (base, *base.parents) if not d.exists()]
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=base)).resolve()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for d in made:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
