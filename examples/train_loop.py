"""A plain, hand-written PyTorch training loop checkpointed by cairn's CheckpointManager.

Kill it at any moment (even ``kill -9``, even in the middle of a save), run the same command again, and
it continues from the newest good checkpoint as if nothing had happened: the final weights are
bit-identical to an uninterrupted run's. ``examples/demo.py`` proves it.

    python examples/train_loop.py --dir runs/digits            # train (or resume) 6 epochs
    python examples/train_loop.py --dir runs/digits --progress # with a progress bar

The data set is scikit-learn's handwritten digits, which ships inside the package.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import cairn


def make_data() -> tuple[torch.utils.data.TensorDataset, torch.Tensor, torch.Tensor]:
    """Train set (1500 images) and validation tensors (297 images), in a fixed split."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    return torch.utils.data.TensorDataset(x[:1500], y[:1500]), x[1500:], y[1500:]


def make_model(hidden: int) -> nn.Module:
    """A small MLP with dropout (so the run depends on the RNG, and exact resume has to restore it)."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 10))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Validation loss and accuracy (no RNG is used: dropout is off in eval mode)."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = float(nn.functional.cross_entropy(logits, y))
        acc = float((logits.argmax(1) == y).float().mean())
    model.train()
    return {"val_loss": loss, "val_acc": acc}


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume) to ``args.epochs`` epochs; returns timings."""
    # One thread: bit-for-bit reproducible arithmetic. (With several, the math library may use fewer of
    # them when the machine is busy, which changes the order of additions and so the last bits.)
    torch.set_num_threads(1)
    random.seed(args.seed)  # every RNG a run may use is seeded, and RNGState saves all of them
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    train_set, x_val, y_val = make_data()
    model = make_model(args.hidden)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    loader = cairn.resumable_loader(train_set, batch_size=32, shuffle=True, seed=args.seed)
    state = {"model": model, "optim": optim, "rng": cairn.RNGState(), "data": loader}
    total = args.epochs * len(loader)
    keep = cairn.KeepLast(3) | cairn.KeepBest("val_loss", mode="min", n=2) | cairn.KeepEvery(steps=100)
    save_every = cairn.Every(steps=args.save_every) if args.save_every else None
    saving = 0.0
    started = time.perf_counter()
    with cairn.CheckpointManager(args.dir, save_every=save_every, keep=keep) as mgr:
        step = mgr.restore(state)
        if step:
            print(f"resumed from step {step}", flush=True)
        bar = _progress(args.progress, total, step)
        while step < total:
            for x, y in loader:  # a resumed loader continues mid-epoch, in the same order
                loss = nn.functional.cross_entropy(model(x), y)
                optim.zero_grad()
                loss.backward()
                optim.step()
                step += 1
                if args.report:
                    print(f"step {step}", flush=True)
                metrics = None
                if args.save_every and (step % args.save_every == 0 or step == total or mgr.preempted):
                    metrics = evaluate(model, x_val, y_val)
                    if args.log:
                        with open(args.log, "a") as f:
                            f.write(json.dumps({"step": step, **metrics}) + "\n")
                t0 = time.perf_counter()
                mgr.save(step, state, metrics=metrics, force=step == total and bool(args.save_every))
                saving += time.perf_counter() - t0
                bar(step, loss.item())
                if mgr.preempted:  # SIGTERM / SIGUSR1: the save above already happened
                    print(f"preempted: saved at step {step}", flush=True)
                    return {"seconds": time.perf_counter() - started, "saving": saving, "step": step}
                if step >= total:
                    break
        bar(None, 0.0)
    return {"seconds": time.perf_counter() - started, "saving": saving, "step": step}


def _progress(enabled: bool, total: int, start: int) -> Any:
    if not enabled:
        return lambda step, loss: None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("training"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(),
    )  # fmt: skip
    task = progress.add_task("train", total=total, completed=start, loss=float("nan"))
    progress.start()

    def update(step: int | None, loss: float) -> None:
        if step is None:
            progress.stop()
        else:
            progress.update(task, completed=step, loss=loss)

    return update


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="the checkpoint directory (resumed if it holds checkpoints)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--save-every", type=int, default=20, help="steps between checkpoints (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.add_argument("--report", action="store_true", help="print every step (for a supervising process)")
    p.add_argument("--log", help="append every evaluation to this JSON-lines file")
    return p.parse_args(argv)


if __name__ == "__main__":
    result = train(parse_args())
    print(f"done: step {result['step']} in {result['seconds']:.2f} s ({result['saving']:.2f} s saving)")
    sys.exit(0)
