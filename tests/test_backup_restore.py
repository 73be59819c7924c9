"""BackupAndRestore, the hard way: ``fit`` in a real process is killed with SIGKILL mid-epoch, ``fit`` is
called again, and the run ends exactly as an uninterrupted one: same weights and optimizer state, same
history, same early-stopping epoch and learning-rate decisions (the other callbacks' state came back)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import cairn

WORKER = textwrap.dedent(
    """
    import random, sys
    import numpy as np, torch
    from sklearn.datasets import load_digits
    import cairn
    from cairn.callbacks import (BackupAndRestore, EarlyStopping, LambdaCallback, ModelCheckpoint,
                                 ReduceLROnPlateau)

    out, backup = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)  # bit-reproducible arithmetic, whatever the load on the machine
    random.seed(0); np.random.seed(0); torch.manual_seed(0)
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    train = torch.utils.data.TensorDataset(x[:1200], y[:1200])
    val = list(zip(x[1200:].split(200), y[1200:].split(200)))
    loader = cairn.resumable_loader(train, batch_size=100, shuffle=True, seed=0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    early = EarlyStopping(monitor="val_loss", patience=2, min_delta=0.02, restore_best_weights=True)
    report = LambdaCallback(on_train_batch_end=lambda b, logs: print("batch", flush=True))
    history = cairn.fit(model, loader, epochs=12, optimizer=opt, loss=torch.nn.CrossEntropyLoss(),
                        metrics=["accuracy"], validation_data=val, verbose=0,
                        callbacks=[report, BackupAndRestore(backup, save_freq=5), early,
                                   ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1),
                                   ModelCheckpoint(out + "/best/model", save_best_only=True)])
    cairn.save(out + "/final", {"model": model, "optim": opt, "history": history.history,
                                "stopped_epoch": early.stopped_epoch, "best_epoch": early.best_epoch})
    print("done", flush=True)
    """
)


def _run(out: Path, kill_after: int | None = None) -> None:
    cmd = [sys.executable, "-c", WORKER, str(out), str(out / "backup")]
    if kill_after is None:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    batches = 0
    for line in child.stdout:
        batches += line.strip() == "batch"
        if batches == kill_after:
            child.send_signal(signal.SIGKILL)
            break
    child.communicate()
    assert child.returncode == -signal.SIGKILL


def _same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("reference")
    _run(out)
    assert not (out / "backup").exists()  # delete_checkpoint=True removes it after a finished fit
    return cairn.load(out / "final")


BATCHES_PER_EPOCH = 12  # 1200 samples, batch_size=100; BackupAndRestore(save_freq=5) in WORKER
AT_AN_EPOCHS_END = 60  # a backup taken after the last batch of an epoch (lcm of 12 and 5)


@pytest.mark.parametrize("trial", ["epoch-end-backup", "random"])
def test_killed_fit_resumes_mid_epoch_exactly(reference: Any, tmp_path: Path, trial: str) -> None:
    assert reference["stopped_epoch"] > 0  # the run really stops early: the patience state matters
    epochs_run = len(reference["history"]["loss"])
    assert BATCHES_PER_EPOCH * epochs_run > AT_AN_EPOCHS_END + 2
    if trial == "epoch-end-backup":  # resumes at "epoch 4, 12 batches done": the epoch's end, not epoch 5
        kill_after = AT_AN_EPOCHS_END + 2
    else:  # anywhere, mid-epoch included
        kill_after = random.Random().randrange(8, BATCHES_PER_EPOCH * epochs_run - 2)
    _run(tmp_path, kill_after)
    assert (tmp_path / "backup").exists()
    _run(tmp_path)
    _same(reference, cairn.load(tmp_path / "final"))
    best = cairn.Store(tmp_path / "best")
    assert [i.name for i in best.list()] == ["model"]
