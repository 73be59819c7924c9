"""F1 of the reliability plan, short: each atheris harness of ``fuzz/`` runs for a while in a subprocess.

A crash (an exception that is not a ``CairnError``), a timeout or an out-of-memory fails the test, with the
crashing input saved under ``tmp_path`` and its traceback shown. Long runs: see ``fuzz/README.md``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reliability.harness import Record, trials
from reliability.workers.syscall_strace import worker_env

pytest.importorskip("atheris", reason="atheris is not installed (pip install -e '.[dev]' on Linux)")

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
SECONDS = int(os.environ.get("CAIRN_FUZZ_SECONDS") or trials(ci=10, soak=3600))
"""Seconds per harness: 10 in CI, an hour in the soak run (``CAIRN_FUZZ_SECONDS`` overrides both)."""


@pytest.mark.parametrize("harness", ["fuzz_manifest", "fuzz_store"])
def test_fuzz(tmp_path: Path, record: Record, harness: str) -> None:
    """F1: ``SECONDS`` of coverage-guided fuzzing; only cairn's typed errors may escape."""
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / harness.removeprefix("fuzz_"), corpus)
    cmd = [
        sys.executable,
        str(FUZZ / f"{harness}.py"),
        str(corpus),
        f"-max_total_time={SECONDS}",
        "-timeout=5",  # the plan's 1 s, with room for a CI machine shared by other jobs
        "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=worker_env(), timeout=SECONDS * 4 + 120, check=False
    )
    out = done.stdout + done.stderr
    runs = re.search(r"Done (\d+) runs in (\d+) second", out)
    execs = int(runs.group(1)) if runs else 0
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    record.trials = 1
    record.inputs = execs
    record.detected = execs if done.returncode == 0 else 0
    record.notes.update(
        harness=harness,
        seconds=SECONDS,
        execs_per_s=round(execs / max(1, int(runs.group(2)) if runs else 1)),
        corpus=len(list(corpus.iterdir())),
        artifacts=crashes,
    )
    assert done.returncode == 0 and not crashes, f"{harness} found a crash {crashes}:\n{out[-6000:]}"
    assert execs > 0, out[-3000:]
