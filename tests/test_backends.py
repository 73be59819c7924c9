"""One conformance suite that every backend passes, plus the local backend's own safety rules."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import mmap
import os
import platform
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cairn
from cairn.backends import Backend, LocalBackend, MemoryBackend, _mapping, check_path, local, open_backend
from cairn.errors import BackendError


@pytest.fixture(params=["memory", "local"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend()
    else:
        yield LocalBackend(tmp_path / "root")


def test_is_a_backend(backend: Backend) -> None:
    assert isinstance(backend, Backend)
    assert backend.properties.atomic_create


def test_create_is_write_once(backend: Backend) -> None:
    assert backend.create("checkpoints/a.json", b"first")
    assert not backend.create("checkpoints/a.json", b"second")
    backend.flush()
    assert backend.read("checkpoints/a.json") == b"first"
    assert backend.size("checkpoints/a.json") == 5


def test_create_accepts_any_buffer(backend: Backend) -> None:
    backend.create("blobs/aa/x", memoryview(bytearray(b"abcdef"))[2:])
    backend.create("blobs/aa/empty", b"")
    assert backend.read("blobs/aa/x") == b"cdef"
    assert backend.read("blobs/aa/empty") == b""


def test_missing_files(backend: Backend) -> None:
    assert backend.size("blobs/00/nothing") is None
    with pytest.raises(FileNotFoundError):
        backend.read("blobs/00/nothing")
    with pytest.raises(FileNotFoundError):
        backend.readinto("blobs/00/nothing", memoryview(bytearray(4)))
    backend.delete("blobs/00/nothing")  # deleting what is not there is fine
    assert list(backend.list("checkpoints")) == []


def test_readinto_reads_a_prefix_and_tells_the_size(backend: Backend) -> None:
    backend.create("blobs/ab/f", b"0123456789")
    buf = bytearray(4)
    assert backend.readinto("blobs/ab/f", memoryview(buf)) == 10  # longer than the buffer: its size
    assert buf == b"0123"
    big = bytearray(20)
    assert backend.readinto("blobs/ab/f", memoryview(big)) == 10


def test_list_is_recursive_and_relative(backend: Backend) -> None:
    for p in ["blobs/aa/1", "blobs/bb/2", "checkpoints/c.json", "cairn.json"]:
        backend.create(p, b"x")
    assert sorted(backend.list("blobs")) == ["blobs/aa/1", "blobs/bb/2"]
    assert list(backend.list("checkpoints")) == ["checkpoints/c.json"]


def test_delete(backend: Backend) -> None:
    backend.create("checkpoints/a.json", b"x")
    backend.delete("checkpoints/a.json")
    backend.flush()
    assert backend.size("checkpoints/a.json") is None
    assert backend.create("checkpoints/a.json", b"again")


@pytest.mark.parametrize(
    "bad", ["", "/etc/passwd", "../x", "blobs/../../x", "a//b", "a/./b", "a\\b", "a/b/", ".hidden", "a/\x00"]
)
def test_unsafe_paths_are_refused(backend: Backend, bad: str) -> None:
    with pytest.raises(BackendError):
        backend.create(bad, b"x")
    with pytest.raises(BackendError):
        backend.size(bad)


def test_concurrent_creates_have_one_winner(backend: Backend) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        results.append(backend.create("checkpoints/race.json", f"writer {i}".encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert backend.read("checkpoints/race.json").startswith(b"writer ")


def test_check_path_accepts_store_paths() -> None:
    assert check_path("blobs/ab/" + "ab" * 32) == "blobs/ab/" + "ab" * 32
    assert check_path("checkpoints/step-10.json")


def test_open_backend() -> None:
    assert isinstance(open_backend("memory://x"), MemoryBackend)
    assert isinstance(open_backend("some/dir"), LocalBackend)
    with pytest.raises(ValueError, match="URL scheme"):
        open_backend("s3://bucket/prefix")


# -- the local backend's own rules --------------------------------------------------------------------


def test_local_files_are_read_only_and_leave_no_temp_files(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    b.create("blobs/ab/f", b"data")
    b.flush()
    mode = os.stat(tmp_path / "blobs/ab/f").st_mode
    assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert os.listdir(tmp_path / "tmp") == []


def test_local_refuses_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    root = tmp_path / "root"
    b = LocalBackend(root)
    b.create("cairn.json", b"{}")
    os.symlink(outside / "secret", root / "link")
    with pytest.raises(BackendError, match="symlink"):
        b.read("link")
    with pytest.raises(BackendError):
        b.size("link")
    os.symlink(outside, root / "blobs")  # a linked directory is refused too
    with pytest.raises(BackendError, match="not a directory"):
        b.read("blobs/secret")
    with pytest.raises(BackendError):
        b.create("blobs/new", b"x")
    assert sorted(os.listdir(outside)) == ["secret"]


def test_local_reader_checks_sibling_directories_in_one_listing(tmp_path: Path) -> None:
    """A reading handle lists a directory's subdirectories once instead of checking each: linked ones
    are still refused, and ones made after the listing are still found."""
    root = tmp_path / "root"
    writer = LocalBackend(root)
    for prefix in ("aa", "bb"):
        writer.create(f"blobs/{prefix}/f", prefix.encode())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"secret")
    os.symlink(outside, root / "blobs" / "cc")
    reader = LocalBackend(root)
    assert reader.read("blobs/aa/f") == b"aa"  # lists blobs/
    assert reader.read("blobs/bb/f") == b"bb"
    with pytest.raises(BackendError, match="not a directory"):
        reader.read("blobs/cc/f")
    writer.create("blobs/dd/f", b"dd")  # made after the listing
    assert reader.read("blobs/dd/f") == b"dd"
    assert reader.size("blobs/ee/f") is None


def test_local_map_is_private(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    b.create("blobs/ab/f", b"abcd")
    view = b.map("blobs/ab/f")
    assert view is not None and bytes(view) == b"abcd"
    view[0] = ord("z")  # copy-on-write: the file is untouched
    assert b.read("blobs/ab/f") == b"abcd"
    b.create("blobs/ab/empty", b"")
    assert b.map("blobs/ab/empty") is None


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_local_write_errors_are_final_and_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    b = LocalBackend(tmp_path)
    b.create("checkpoints/old.json", b"kept")
    err = errno.ENOSPC if failing == "write" else errno.EIO

    def fail(*args: object) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(BackendError) as info:
        b.create("blobs/ab/x", b"data")
    monkeypatch.undo()
    assert info.value.errno == err
    if failing == "write":
        assert "disk is full" in str(info.value)
    assert b.size("blobs/ab/x") is None  # the name never appears for data that is not durable
    assert os.listdir(tmp_path / "tmp") == []
    assert b.read("checkpoints/old.json") == b"kept"
    if failing == "fsync":  # fsync errors are final: this handle refuses to write on
        with pytest.raises(BackendError, match="earlier fsync failed"):
            b.create("blobs/ab/y", b"more")


def test_local_dir_fsync_failure_is_final(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = LocalBackend(tmp_path)
    b.create("blobs/ab/x", b"data")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(BackendError):
        b.flush()
    monkeypatch.undo()
    with pytest.raises(BackendError, match="earlier fsync failed"):
        b.flush()


def test_local_reused_names_are_made_durable(tmp_path: Path) -> None:
    LocalBackend(tmp_path).create("blobs/ab/x", b"data")  # another writer, which never flushed
    b = LocalBackend(tmp_path)
    assert not b.create("blobs/ab/x", b"data")
    assert {str(tmp_path / "blobs" / "ab"), str(tmp_path / "blobs"), str(tmp_path)} <= b._dirty


def test_local_flush_syncs_only_what_is_not_yet_durable(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    b.create("blobs/ab/x", b"data")
    b.flush()
    assert not b.create("blobs/ab/x", b"data") and b._dirty == set()  # made durable by our own flush
    b.create("blobs/ab/y", b"more")
    assert b._dirty == {str(tmp_path / "blobs" / "ab")}  # its parents are known durable
    b.create("blobs/cd/z", b"new dir")
    assert str(tmp_path / "blobs") in b._dirty  # a new directory's entry must be synced too


_LARGE_SIZES = [2**20 - 1, 2**20, 2**20 + 1, 8 * 2**20 + 4097, 16 * 2**20 + 3, 3 * 8 * 2**20]


@pytest.mark.parametrize("direct_io", [True, False])
def test_local_large_files_are_exact(tmp_path: Path, direct_io: bool) -> None:
    """Large files go through O_DIRECT (padded to whole blocks, then truncated): every size comes back
    byte for byte, read-only, with no temp file left."""
    b = LocalBackend(tmp_path, direct_io=direct_io)
    rng = np.random.default_rng(0)
    for i, size in enumerate(_LARGE_SIZES):
        data = rng.integers(0, 256, size, dtype=np.uint8)
        assert b.create(f"blobs/ab/{i}", memoryview(data)[1:] if i == 0 else data)  # odd alignment too
        expected = data[1:] if i == 0 else data
        assert b.size(f"blobs/ab/{i}") == expected.nbytes
        assert b.read(f"blobs/ab/{i}") == expected.tobytes()
        assert not os.stat(tmp_path / "blobs" / "ab" / str(i)).st_mode & 0o222
    assert os.listdir(tmp_path / "tmp") == []


def _spy_fcntl(monkeypatch: pytest.MonkeyPatch, refuse: bool) -> list[int]:
    """Record the O_DIRECT requests of the local backend (and refuse them with EINVAL if asked)."""
    real, asked = fcntl.fcntl, []

    def spy(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            asked.append(fd)
            if refuse:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(local.fcntl, "fcntl", spy)
    return asked


def test_local_uses_o_direct_only_for_large_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _spy_fcntl(monkeypatch, refuse=False)
    b = LocalBackend(tmp_path)
    b.create("blobs/ab/small", b"x" * (2**20 - 1))
    assert asked == []
    b.create("blobs/ab/large", b"y" * 2**20)
    assert len(asked) == 1
    LocalBackend(tmp_path / "other", direct_io=False).create("blobs/ab/large", b"y" * 2**20)
    assert len(asked) == 1


def test_local_falls_back_when_o_direct_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _spy_fcntl(monkeypatch, refuse=True)
    b = LocalBackend(tmp_path)
    data = os.urandom(3 * 2**20 + 5)
    b.create("blobs/ab/x", data)
    b.create("blobs/ab/y", data[::-1])
    assert b.read("blobs/ab/x") == data and b.read("blobs/ab/y") == data[::-1]
    assert len(asked) == 1  # refused once: the backend stops asking


def test_local_short_direct_write_finishes_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short O_DIRECT write (a disk filling up) is finished through the page cache, which then
    reports the real error, or succeeds: never a file with a hole."""
    real_write, calls = os.write, []

    def short_once(fd: int, data: Any) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, memoryview(data)[: len(data) // 2])
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", short_once)
    b = LocalBackend(tmp_path)
    data = os.urandom(5 * 2**20 + 123)
    b.create("blobs/ab/x", data)
    monkeypatch.undo()
    assert len(calls) >= 2 and b.read("blobs/ab/x") == data


def test_local_o_direct_write_error_is_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = LocalBackend(tmp_path)

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(BackendError, match="disk is full") as info:
        b.create("blobs/ab/x", os.urandom(2**21))
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert b.size("blobs/ab/x") is None and os.listdir(tmp_path / "tmp") == []


def test_local_map_concat_is_one_private_region(tmp_path: Path) -> None:
    """Chunk files mapped back to back make one zero-copy, copy-on-write view; parts that are not whole
    pages cannot be placed back to back, so the caller is told to read instead."""
    b = LocalBackend(tmp_path)
    page = mmap.PAGESIZE
    parts = [os.urandom(page * 3), os.urandom(page), os.urandom(123)]
    for i, data in enumerate(parts):
        b.create(f"blobs/ab/{i}", data)
    view = b.map_concat(["blobs/ab/0", "blobs/ab/1", "blobs/ab/2"])
    assert view is not None and bytes(view) == b"".join(parts)
    view[0] = view[0] ^ 0xFF  # private: the file does not change
    assert b.read("blobs/ab/0") == parts[0]
    assert b.map_concat(["blobs/ab/2", "blobs/ab/0"]) is None  # 123 bytes is not whole pages
    with pytest.raises(FileNotFoundError):
        b.map_concat(["blobs/ab/0", "blobs/ab/missing"])
    del view
    gc.collect()  # the region is unmapped with its last view (no crash, no leak of the mapping)


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _mapping_of(view: memoryview) -> list[dict[str, str]]:
    """The ``/proc/self/smaps`` entries of the mappings that ``view`` spans (one per mapped file)."""
    address = _address(view)
    end = address + view.nbytes
    entries: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = {"range": head} if lo < end and hi > address else None
                if current is not None:
                    entries.append(current)
            elif current is not None:
                key, _, value = line.partition(":")
                current[key] = value.strip()
    return entries


huge_pages = pytest.mark.skipif(
    not _mapping.HUGE_PAGE or not os.path.exists("/proc/self/smaps"),
    reason="needs Linux with transparent huge pages",
)


@huge_pages
def test_large_maps_start_on_a_huge_page_and_are_advised_huge(tmp_path: Path) -> None:
    """A map of at least one huge page starts on a huge-page boundary and carries ``MADV_HUGEPAGE``
    (``hg`` in smaps), so the page cache reads and maps it in huge pages; a smaller one is left alone.
    Copy-on-write still holds inside a huge page."""
    b = LocalBackend(tmp_path)
    huge = _mapping.HUGE_PAGE
    one = os.urandom(2 * huge + mmap.PAGESIZE)
    parts = [os.urandom(huge), os.urandom(huge), os.urandom(5000)]
    b.create("blobs/ab/one", one)
    for i, data in enumerate(parts):
        b.create(f"blobs/ab/{i}", data)
    b.create("blobs/ab/small", os.urandom(huge // 2))
    for view, expected, files in [
        (b.map("blobs/ab/one"), one, 1),
        (b.map_concat(["blobs/ab/0", "blobs/ab/1", "blobs/ab/2"]), b"".join(parts), 3),
    ]:
        assert view is not None and bytes(view) == expected
        assert _address(view) % huge == 0
        entries = _mapping_of(view)
        assert len(entries) == files and all("hg" in e["VmFlags"].split() for e in entries)
        view[huge + 7] ^= 0xFF  # private: the file does not change, the view does
        assert view[huge + 7] == expected[huge + 7] ^ 0xFF
    assert b.read("blobs/ab/one") == one and b.read("blobs/ab/1") == parts[1]
    small = b.map("blobs/ab/small")
    assert small is not None and "hg" not in _mapping_of(small)[0]["VmFlags"].split()


@huge_pages
def test_a_map_the_kernel_places_off_a_huge_page_is_moved_onto_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernel does not place a file's map on a huge-page boundary (file systems without
    huge-page placement), an aligned region is reserved and the file mapped into it."""
    monkeypatch.setattr(_mapping, "_map_one", lambda fd, size, align: None)
    b = LocalBackend(tmp_path)
    data = os.urandom(_mapping.HUGE_PAGE + 3)
    b.create("blobs/ab/f", data)
    view = b.map("blobs/ab/f")
    assert view is not None and bytes(view) == data
    assert _address(view) % _mapping.HUGE_PAGE == 0
    assert "hg" in _mapping_of(view)[0]["VmFlags"].split()


@pytest.mark.skipif(
    not os.path.exists("/proc/self/smaps") or tuple(map(int, platform.release().split(".")[:2])) < (5, 14),
    reason="needs Linux 5.14+ (MADV_POPULATE_READ)",
)
def test_an_unverified_load_reads_mapped_tensors_in(tmp_path: Path) -> None:
    """``verify=False`` still maps large tensors, and the load's threads read their pages in before it
    returns (in parallel, and in huge pages where the system has them), instead of leaving every page to
    fault in one by one when first used."""
    state = {
        "one": np.random.default_rng(0).random(3 << 18),
        "multi": np.random.default_rng(1).random(5 << 20),
    }
    cairn.save(tmp_path / "s", state, step=1)  # 6 MiB in one chunk, 40 MiB in three
    loaded = cairn.load(tmp_path / "s", verify=False)
    for key, array in loaded.items():
        entries = _mapping_of(memoryview(array).cast("B"))  # before anything reads the array
        assert entries and all(e["Rss"] == e["Size"] for e in entries), (key, entries)
        np.testing.assert_array_equal(array, state[key])


@pytest.mark.parametrize("size", [4096, 2**20, 8 * 2**20 + 4097, 3 * 8 * 2**20 - 1])
def test_local_page_aligned_data_is_written_in_place_exactly(tmp_path: Path, size: int) -> None:
    """Page-aligned data (an async save's staging buffer) goes to the disk without the bounce copy; the
    unaligned tail still goes through it; the file is exact."""
    aligned = mmap.mmap(-1, size)
    aligned[:] = os.urandom(size)
    b = LocalBackend(tmp_path)
    assert b.create("blobs/ab/x", memoryview(aligned))
    assert b.read("blobs/ab/x") == aligned[:]


def test_populate_takes_any_buffer() -> None:
    """Reading pages in is advice: a read-only view, an empty one or memory that is not a file map is
    fine (another backend's ``map`` may return any of them)."""
    data = os.urandom(3 * mmap.PAGESIZE + 5)
    _mapping.populate(memoryview(data))  # read-only, not page-aligned
    _mapping.populate(memoryview(b""))
    _mapping.populate(memoryview(bytearray(data))[7:])
    assert bytes(memoryview(data)) == data
