"""The ``record`` fixture of the reliability suite (see ``harness.py``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict

import pytest

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
