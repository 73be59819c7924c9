"""The ``record`` fixture of the reliability suite (see ``harness.py``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import pytest

import cairn._store
import cairn.backends.local
from reliability.harness import REPORT, Record


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Iterator[Record]:
    """A :class:`Record` for the running test; appended to the report file (if any) at teardown."""
    rec = Record(test=request.node.nodeid)
    start = time.perf_counter()
    yield rec
    rec.seconds = round(time.perf_counter() - start, 3)
    if REPORT:
        with open(REPORT, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(rec), default=str) + "\n")


@pytest.fixture
def one_thread_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's writer pool and the local backend's fsync pool with one thread each: the file-system
    calls of a save come in one order, so CrashFS logs (hence crash states and examples) are repeatable,
    and a scheduler can step one saver thread at a time."""

    def serial(max_workers: int | None = None, *args: Any, **kwargs: Any) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, *args, **kwargs)

    monkeypatch.setattr(cairn._store, "ThreadPoolExecutor", serial)
    monkeypatch.setattr(cairn.backends.local, "ThreadPoolExecutor", serial)
