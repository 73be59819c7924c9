#!/usr/bin/env python
"""What checkpointing every N steps costs a CPU training loop: none, torch.save + fsync, cairn sync, cairn
async.

    python bench/bench_training.py [--steps 200] [--every 20] [--batch 64] [--repeats 3] [--threads T]
                                   [--quick] [--dir DIR] [--json OUT] [--seed 0]

The model is a 16.8M-parameter MLP (4096→2048→2048→2048→16, ReLU) trained with AdamW on a fixed random
batch; a checkpoint is the model and the optimizer (about 0.2 GB). Each mode runs ``--steps`` timed steps
(after ``--warmup`` untimed ones), saving every ``--every`` steps and keeping the last two checkpoints;
a run ends when its last checkpoint is durable. The modes are interleaved (rotated each repeat) and
the table shows the median steps/s and the slowdown against no checkpointing. See bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import (
    GB,
    cairn,
    fmt,
    fsync_tree,
    log,
    machine_info,
    machine_lines,
    markdown,
    median,
    scratch_dir,
    write_json,
)

WIDTHS = [4096, 2048, 2048, 2048, 16]
MODES = [
    "no checkpointing",
    "torch.save + fsync",
    "cairn async (CheckpointManager)",
    "cairn sync (CheckpointManager)",
]
KEEP = 2


def make_model(seed: int) -> torch.nn.Sequential:
    """The MLP: 16,815,744 parameters."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(WIDTHS):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


class Saver:
    """Checkpoints ``state`` every ``every`` steps in one of the modes; ``finish()`` waits until durable."""

    def __init__(self, mode: str, d: Path, every: int, state: dict[str, Any]) -> None:
        self.mode, self.dir, self.every, self.state = mode, d, every, state
        self.blocking: list[float] = []
        self.mgr: cairn.CheckpointManager | None = None
        if mode.startswith("cairn"):
            self.mgr = cairn.CheckpointManager(
                d,
                save_every=cairn.Every(steps=every),
                keep=cairn.KeepLast(KEEP),
                async_save="async" in mode,
                preemption_signals=(),
            )
            self.mgr.restore(state)  # as a run starts (a fresh directory: nothing to load)
        elif mode.startswith("torch"):
            d.mkdir()

    def step(self, step: int) -> None:
        t0 = time.perf_counter()
        if self.mgr is not None:
            if not self.mgr.save(step, self.state):
                return
        elif self.mode.startswith("torch") and step % self.every == 0:
            path = self.dir / f"step-{step}.pt"
            torch.save({k: v.state_dict() for k, v in self.state.items()}, path)
            fsync_tree(path)
            old = self.dir / f"step-{step - KEEP * self.every}.pt"
            old.unlink(missing_ok=True)
        else:
            return
        self.blocking.append(time.perf_counter() - t0)

    def finish(self) -> None:
        if self.mgr is not None:
            self.mgr.close()


def run(mode: str, d: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One training run; its steps/s and what its saves blocked."""
    model = make_model(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = (
        torch.randn(args.batch, WIDTHS[0], generator=gen),
        torch.randn(args.batch, WIDTHS[-1], generator=gen),
    )

    def train_step() -> None:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        train_step()
    saver = Saver(mode, d, args.every, {"model": model, "optim": opt})
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        train_step()
        if mode != MODES[0]:
            saver.step(step)
    saver.finish()
    elapsed = time.perf_counter() - t0
    shutil.rmtree(d, ignore_errors=True)
    return {
        "mode": mode,
        "seconds": elapsed,
        "steps_per_s": args.steps / elapsed,
        "saves": len(saver.blocking),
        "save_blocking_s": saver.blocking,
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="timed steps per run; default 200")
    p.add_argument("--every", type=int, default=20, help="save every this many steps; default 20")
    p.add_argument("--batch", type=int, default=64, help="batch size; default 64")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each run; default 3")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode, interleaved; default 3")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads; default all"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 6 steps, save every 3, batch 4, 1 repeat")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default bench/results/tmp)")
    p.add_argument("--json", type=Path, default=None, help="write every run and the medians here")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the batch; default 0")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.batch, args.warmup, args.repeats = 6, 3, 4, 1, 1
    if min(args.steps, args.every, args.batch, args.repeats, args.threads) < 1 or args.warmup < 0:
        p.error("--steps, --every, --batch, --repeats and --threads must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    params = sum(p.numel() for p in make_model(args.seed).parameters())
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    with scratch_dir(args.dir, "bench-training-") as root:
        info = machine_info(root)
        for r in range(args.repeats):
            for i in range(len(MODES)):
                mode = MODES[(i + r) % len(MODES)]  # rotated: no mode always runs first or last
                out = run(mode, root / f"run-{r}-{i}", args)
                runs.append({"repeat": r, **out})
                log(f"{r + 1}/{args.repeats} {mode}: {out['steps_per_s']:.2f} steps/s, {out['saves']} saves")
    elapsed = time.perf_counter() - started

    rows, records = [], []
    base = median([x["steps_per_s"] for x in runs if x["mode"] == MODES[0]])
    for mode in MODES:
        mine = [x for x in runs if x["mode"] == mode]
        sps = median([x["steps_per_s"] for x in mine])
        blocking = median([b for x in mine for b in x["save_blocking_s"]])
        slowdown = (base / sps - 1) * 100 if base and sps else None
        records.append(
            {"mode": mode, "steps_per_s": sps, "slowdown_pct": slowdown, "save_blocking_s": blocking}
        )
        rows.append(
            [
                mode,
                fmt(sps, ".2f"),
                fmt(slowdown, "+.1f", " %"),
                str(median([x["saves"] for x in mine])),
                fmt(blocking),
                ", ".join(f"{x['steps_per_s']:.2f}" for x in mine),
            ]
        )
    ckpt = params * 4 * 3  # weights + exp_avg + exp_avg_sq, float32
    print(f"# Training-loop benchmark: median of {args.repeats}, {elapsed / 60:.1f} min in all\n")
    print(
        f"- model: MLP {'→'.join(map(str, WIDTHS))}, {params:,} parameters, AdamW; batch {args.batch}; "
        f"checkpoint about {ckpt / GB:.2f} GB every {args.every} steps (last {KEEP} kept); "
        f"{args.steps} timed steps per run after {args.warmup} warm-up steps; torch threads {args.threads}"
    )
    print("\n".join(machine_lines(info)) + "\n")
    header = [
        "mode",
        "steps/s",
        "slowdown vs none",
        "saves per run",
        "median save blocking s",
        "each run, steps/s",
    ]
    print(markdown(header, rows))
    print(
        "\nslowdown: extra wall time per step over no checkpointing; "
        "a run ends when its last save is durable."
    )
    if args.json:
        doc = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": info,
            "params": params,
            "elapsed_s": elapsed,
            "rows": records,
            "runs": runs,
        }
        write_json(args.json, doc)
        print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
