"""Trial budgets and result records of the reliability suite (``docs/reliability.md``).

Trial counts come from :func:`trials`: the CI count by default, the soak count when ``CAIRN_SOAK=1``
(``make soak``). Every trial-based test fills in the ``record`` fixture (a :class:`Record`); when
``CAIRN_RELIABILITY_REPORT`` names a file, one JSON line per test is appended to it, and
``tests/reliability/report.py`` turns that file into the table of ``docs/reliability.md``.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from multiprocessing.context import ForkServerContext

import cairn

SOAK = os.environ.get("CAIRN_SOAK", "") not in ("", "0")
REPORT = os.environ.get("CAIRN_RELIABILITY_REPORT")


def trials(ci: int, soak: int) -> int:
    """How many trials to run: ``ci`` normally, ``soak`` under ``CAIRN_SOAK=1``."""
    return soak if SOAK else ci


@dataclass
class Record:
    """What one reliability test did: filled in by the test, written out when it ends."""

    test: str
    trials: int = 0  # independent runs (processes killed, crash states built, files tried...)
    faults: int = 0  # faults injected (kills, dropped writes, flipped bits, ENOSPC/EIO...)
    inputs: int = 0  # distinct hostile/fuzzed inputs tried
    detected: int = 0  # faults or inputs caught as they must be (typed error, rollback, clean state...)
    data_lost: int = 0  # acknowledged checkpoints that could not be restored bit-identically: must be 0
    notes: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0


def on_disk_blobs(store: cairn.Store) -> set[str]:
    """Every blob file under ``blobs/``, by hash."""
    return {p.rpartition("/")[2] for p in store.backend.list("blobs")}


def referenced_blobs(store: cairn.Store) -> set[str]:
    """Every blob some committed manifest names."""
    out: set[str] = set()
    for name in store.names():
        out |= store.manifest(name).blobs()
    return out


FORKSERVER_PRELOAD = [
    "pytest",  # Python 3.11's forkserver re-runs the main script in every child: make that cheap
    "torch",
    "numpy",
    "cairn",
    "reliability.states",
    "reliability.workers.kill_child",
    "reliability.workers.concurrency_child",
]
"""What the forkserver imports once (one list: the server is shared by every test that forks)."""


def forkserver() -> ForkServerContext:
    """A forkserver context whose server has torch, cairn and the child modules imported."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx
