"""cairn's demo: a training process is killed with SIGKILL at a random step, resumes, and finishes with
weights bit-identical to an uninterrupted run's. Then: the checkpoints, a plot, and what it cost.

Run it with ``make demo`` (which installs what it needs) or ``python examples/demo.py [OUTDIR]``. The
training is ``examples/train_loop.py`` (a plain PyTorch loop with a CheckpointManager) on
scikit-learn's handwritten digits, which ship inside the package: nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import cairn

HERE = Path(__file__).resolve().parent
console = Console(highlight=False)


def run_training(store: Path, *extra: str, kill_at: int | None = None, log: Path | None = None) -> str:
    """Run train_loop.py to the end (or until SIGKILL at step ``kill_at``); returns its last line."""
    cmd = [sys.executable, str(HERE / "train_loop.py"), "--dir", str(store), *extra]
    if log is not None:
        cmd += ["--log", str(log)]
    if kill_at is None:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[-1]
    child = subprocess.Popen([*cmd, "--report"], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    for line in child.stdout:
        if line.strip() == f"step {kill_at}":
            child.send_signal(signal.SIGKILL)  # no cleanup, no atexit, no flush: a power cut for the process
            break
    child.communicate()
    return f"killed with SIGKILL at step {kill_at} (exit status {child.returncode})"


def compare(a: Any, b: Any, path: str, rows: dict[str, list[float]]) -> None:
    """Compare two loaded trees leaf by leaf; ``rows[group] = [leaves, identical, max_abs_diff]``."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            compare(a[k], b[k], f"{path}.{k}" if path else str(k), rows)
        return
    if isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            compare(x, y, f"{path}.{i}", rows)
        return
    row = rows.setdefault(path.split(".")[0], [0, 0, 0.0])
    row[0] += 1
    if isinstance(a, torch.Tensor | np.ndarray):
        ta, tb = torch.as_tensor(a), torch.as_tensor(b)
        same = ta.dtype == tb.dtype and ta.shape == tb.shape and bool(torch.equal(ta, tb))
        if ta.is_floating_point() and ta.shape == tb.shape:
            row[2] = max(row[2], float((ta.double() - tb.double()).abs().max()) if ta.numel() else 0.0)
    else:
        same = a == b
    row[1] += int(same)


def plot(store: Path, log: Path, kill_at: int, resumed_from: int, out: Path) -> None:
    """val_loss at every evaluation, with the kept, best and deleted checkpoints and the crash marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = {e["step"]: e["val_loss"] for e in map(json.loads, log.read_text().splitlines())}
    steps = sorted(evals)
    kept = cairn.Store(store).list()
    kept_steps = {c.step for c in kept}
    best = min(kept, key=lambda c: c.metrics.get("val_loss", math.inf))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(steps, [evals[s] for s in steps], color="#4c72b0", lw=1.5, label="val_loss at each save")
    gone = [s for s in steps if s not in kept_steps]
    ax.scatter(gone, [evals[s] for s in gone], marker="x", color="#999999", label="deleted by retention")
    ax.scatter(sorted(kept_steps), [evals[s] for s in sorted(kept_steps)], s=60, color="#55a868", zorder=3,
               label="kept checkpoint")  # fmt: skip
    ax.scatter([best.step], [evals[best.step]], s=260, marker="*", color="#dd8452", zorder=4,
               label=f"best ({best.name})")  # fmt: skip
    ax.axvline(kill_at, color="#c44e52", ls="--", lw=1)
    ax.text(kill_at, 0.6, f" SIGKILL at step {kill_at}\n resumed from step {resumed_from}",
            color="#c44e52", va="center", fontsize=9, transform=ax.get_xaxis_transform())  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("digits MLP: checkpoints kept by KeepLast(3) | KeepBest(val_loss, 2) | KeepEvery(100)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(out: Path) -> None:
    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    reference, crashed, plain = out / "reference", out / "crashed", out / "no-checkpoints"
    kill_at = random.Random().randrange(25, 270)  # random each run: any step must work

    console.rule("[bold]1. an uninterrupted run")
    ref_line = run_training(reference)
    console.print(f"reference: {ref_line}")

    console.rule("[bold]2. the same run, killed with SIGKILL at a random step, then restarted")
    log = out / "crashed-evals.jsonl"
    console.print(run_training(crashed, kill_at=kill_at, log=log))
    latest = cairn.Store(crashed).latest()
    resumed_from = latest.step if latest else 0
    console.print(f"newest checkpoint on disk: step {resumed_from}; restarting the same command...")
    console.print(f"resumed run: {run_training(crashed, '--progress', log=log)}")

    console.rule("[bold]3. the resumed run's final state vs the uninterrupted run's")
    a, b = cairn.load(reference, "step-282"), cairn.load(crashed, "step-282")
    rows: dict[str, list[float]] = {}
    compare(a, b, "", rows)
    table = Table("state", "leaves", "bit-identical", "max |difference|")
    for group, (n, same, diff) in rows.items():
        table.add_row(group, str(n), f"{same}/{n}", f"{diff:g}")
    console.print(table)
    identical = all(same == n for n, same, _ in rows.values())
    verdict = "[green]IDENTICAL[/green]" if identical else "[red]DIFFERENT[/red]"
    console.print(f"final weights, optimizer, RNG and data-loader state: {verdict}")

    console.rule("[bold]4. the checkpoints left on disk (retention applied after every save)")
    subprocess.run([sys.executable, "-m", "cairn", "ls", str(crashed)], check=True)
    report = cairn.Store(crashed).verify()
    console.print(
        f"verify: {report.blobs_checked} blobs, {report.bytes_checked:,} bytes hashed, ok={report.ok}"
    )
    png = out / "val_loss.png"
    plot(crashed, log, kill_at, resumed_from, png)
    console.print(f"plot of the metric across checkpoints: {png}")

    console.rule("[bold]5. what checkpointing cost this training loop")
    plain_line = run_training(plain, "--save-every", "0")
    with_ck, saving = (float(x) for x in ref_line.split(" in ")[1].replace(" s saving)", "").split(" s ("))
    without = float(plain_line.split(" in ")[1].split(" s")[0])
    console.print(
        f"with a checkpoint every 20 steps: {with_ck:.2f} s, of which {saving:.2f} s in mgr.save "
        f"({100 * saving / with_ck:.1f}%); without checkpoints: {without:.2f} s"
    )
    console.print(f"\n[green]done[/green] in {time.perf_counter() - started:.0f} s; everything is in {out}/")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-out"))
