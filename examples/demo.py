"""cairn's demo: train a small network on real data, checkpoint it, list, verify, damage and restore.

Run it with ``make demo`` (which installs what it needs) or ``python examples/demo.py [OUTDIR]``.
The data set is scikit-learn's handwritten digits, which ships inside the package: nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from torch import nn

import cairn

console = Console()


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    store_dir = out / "ckpts"
    torch.manual_seed(0)
    x_train, y_train, x_val, y_val = data()
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    loss_fn = nn.CrossEntropyLoss()

    console.rule("[bold]1. train 8 epochs, one checkpoint per epoch")
    for epoch in range(1, 9):
        model.train()
        for i in range(0, len(x_train), 64):
            opt.zero_grad()
            loss = loss_fn(model(x_train[i : i + 64]), y_train[i : i + 64])
            loss.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            val_loss = float(loss_fn(model.eval()(x_val), y_val))
        acc = accuracy(model, x_val, y_val)
        state = {"model": model, "optim": opt, "sched": sched, "epoch": epoch}
        info = cairn.save(store_dir, state, step=epoch, metrics={"val_loss": val_loss, "val_acc": acc})
        console.print(
            f"epoch {epoch}: val_loss={val_loss:.3f} val_acc={acc:.3f}  saved {info.name} "
            f"({info.nbytes / 1024:.0f} KiB state, {info.bytes_written / 1024:.0f} KiB new) "
            f"in {info.seconds * 1000:.1f} ms"
        )

    console.rule("[bold]2. an unchanged state costs no new bytes")
    state = {"model": model, "optim": opt, "sched": sched, "epoch": 8}
    info = cairn.save(store_dir, state, step=8, name="final")
    console.print(f"saved {info.name}: {info.bytes_written} new bytes of {info.nbytes} (every chunk reused)")

    console.rule("[bold]3. list and verify")
    store = cairn.Store(store_dir)
    table = Table("name", "step", "val_loss", "val_acc", "size")
    for ck in store.list():
        table.add_row(
            ck.name,
            str(ck.step),
            f"{ck.metrics.get('val_loss', float('nan')):.3f}",
            f"{ck.metrics.get('val_acc', float('nan')):.3f}",
            f"{ck.nbytes / 1024:.0f} KiB",
        )
    console.print(table)
    report = store.verify()
    console.print(f"verify: {report.blobs_checked} blobs, {report.bytes_checked} bytes, ok={report.ok}")

    console.rule("[bold]4. restore the best checkpoint into a fresh model")
    best = min(store.list(), key=lambda c: c.metrics.get("val_loss", float("inf")))
    fresh = make_model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=3e-3)
    fresh_sched = torch.optim.lr_scheduler.CosineAnnealingLR(fresh_opt, T_max=8)
    live = {"model": fresh, "optim": fresh_opt, "sched": fresh_sched, "epoch": 0}
    restored = cairn.restore(store_dir, live, best.name)  # strict: every key must fit
    console.print(
        f"restored {restored.checkpoint} (epoch {live['epoch']}): {len(restored.loaded)} keys loaded; "
        f"val_acc {accuracy(fresh, x_val, y_val):.3f} == saved {best.metrics['val_acc']:.3f}"
    )
    assert abs(accuracy(fresh, x_val, y_val) - best.metrics["val_acc"]) < 1e-9

    console.rule("[bold]5. damage is detected, never returned")
    victim = store.manifest("step-8").tensors[0].shards[0].chunks[0].blob
    path = store_dir / "blobs" / victim[:2] / victim
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))  # flip one bit
    try:
        cairn.load(store_dir, "step-8")
    except cairn.BlobCorruptError as e:
        console.print(f"[red]load refused:[/red] {e}")
    report = store.verify()
    console.print(f"verify: ok={report.ok}; damaged checkpoints: {', '.join(report.damaged)}")
    n = len(cairn.load(store_dir, "step-1")["model"])
    console.print(f"the others still load: step-1 has {n} tensors")
    elapsed = time.perf_counter() - START
    console.print(f"\n[green]done[/green] in {elapsed:.1f} s; the store is in {store_dir}")


START = time.perf_counter()

if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-out"))
