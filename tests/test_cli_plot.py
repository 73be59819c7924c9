"""``cairn plot``: the metrics of a store as a PNG, run as a user runs it (subprocess) and in-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cairn
from cairn import _cli_plot
from cairn._cli_plot import infer_mode
from cairn.cli import main

pytest.importorskip("matplotlib")
from matplotlib.image import imread

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")

# step: (val_loss, val_accuracy, lr or None). Retention (KeepLast(2) | KeepBest("val_loss", n=1)) and a
# pin on step-3 leave step-2 (best val_loss), step-3 (pinned), step-5 (NaN val_loss) and step-6 (newest).
RUN = {
    1: (0.9, 0.50, 0.1),
    2: (0.3, 0.80, None),
    3: (0.5, 0.70, 0.05),
    4: (0.6, 0.85, 0.02),
    5: (NAN, 0.95, None),
    6: (0.4, 0.90, 0.01),
}


def _make(path: Path, run: dict[int, tuple[float, float, float | None]] = RUN) -> Path:
    keep = cairn.KeepLast(2) | cairn.KeepBest("val_loss", n=1)
    with cairn.CheckpointManager(path, save_every=cairn.Every(steps=1), keep=keep) as mgr:
        for step, (loss, acc, lr) in run.items():
            metrics = {"val_loss": loss, "val_accuracy": acc, **({"lr": lr} if lr is not None else {})}
            mgr.save(step, {"w": torch.full((8,), float(step))}, metrics=metrics)
            if step == 3:
                mgr.pin("step-3")
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return _make(tmp_path / "run")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cairn", *args], capture_output=True, text=True, check=False)


def _image(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert len(data) > 0 and data.startswith(PNG_MAGIC)
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    return pixels


def _rows(stdout: str) -> dict[str, list[str]]:
    """The table of the text output, by metric (the lines after the header row)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("METRIC"))
    return {line.split()[0]: line.split() for line in lines[start + 1 :] if line.strip()}


def test_plot_writes_a_png_and_names_the_best_per_metric(store: Path, tmp_path: Path) -> None:
    png = tmp_path / "metrics.png"
    out = _run("plot", str(store), "-o", str(png))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    pixels = _image(png)
    height, width = pixels.shape[:2]
    assert width >= 800 and height > width * 0.8  # three subplots stacked
    assert out.stdout.splitlines()[0] == f"wrote {png}: 4 checkpoints, 3 metrics"
    rows = _rows(out.stdout)
    assert rows["val_loss"][1:5] == ["min", "(policy)", "step-2", "2"]
    assert rows["val_loss"][-1] == "step-5=nan"  # the NaN is reported, not drawn
    assert rows["val_accuracy"][1:5] == ["max", "(name)", "step-5", "5"]
    assert rows["lr"][1:5] == ["min", "(assumed)", "step-6", "6"]
    assert rows["lr"][6] == "2/4"  # lr is missing in step-2 and step-5
    assert "'lr' does not say whether lower or higher is better" in out.stderr
    assert sorted(os.listdir(tmp_path)) == ["metrics.png", "run"]  # no temporary file left


def test_plot_json_in_process(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "out.png"
    assert main(["plot", str(store), "-o", str(png), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    _image(png)
    assert doc["png"] == str(png) and doc["store"] == str(store) and doc["checkpoints"] == 4
    by = {m["metric"]: m for m in doc["metrics"]}
    assert list(by) == ["lr", "val_accuracy", "val_loss"]
    assert by["val_loss"] | {"non_finite": None} == {
        "metric": "val_loss",
        "mode": "min",
        "mode_from": "policy",
        "best": "step-2",
        "best_step": 2,
        "best_value": 0.3,
        "points": 3,
        "missing": 0,
        "non_finite": None,
    }
    assert by["val_loss"]["non_finite"] == [{"name": "step-5", "step": 5, "value": "nan"}]
    assert (by["val_accuracy"]["best"], by["val_accuracy"]["mode"], by["val_accuracy"]["best_value"]) == (
        "step-5",
        "max",
        0.95,
    )
    assert (by["lr"]["mode_from"], by["lr"]["points"], by["lr"]["missing"]) == ("assumed", 2, 2)


def test_mode_and_metric_options(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "out.png"
    args = ["plot", str(store), "-o", str(png), "--metric", "val_loss", "--metric", "lr", "--json"]
    assert main([*args, "--metric", "val_loss", "--mode", "max"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(m["metric"], m["mode"], m["mode_from"], m["best"]) for m in doc["metrics"]] == [
        ("val_loss", "max", "--mode", "step-3"),
        ("lr", "max", "--mode", "step-3"),
    ]
    assert main([*args, "--mode", "min"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [m["best"] for m in doc["metrics"]] == ["step-2", "step-6"]
    one = _image(png)
    assert main(["plot", str(store), "-o", str(png), "--metric", "val_loss"]) == 0
    assert _image(png).shape[0] < one.shape[0]  # one subplot instead of two


def test_the_image_shows_the_data(tmp_path: Path) -> None:
    """The same data draws the same pixels; other data, at the same path, different ones."""
    path = tmp_path / "run"
    a, again, b = tmp_path / "a.png", tmp_path / "again.png", tmp_path / "b.png"
    _make(path)
    assert main(["plot", str(path), "-o", str(a)]) == 0
    assert main(["plot", str(path), "-o", str(again)]) == 0
    shutil.rmtree(path)
    _make(path, {**RUN, 6: (0.35, 0.99, 0.001)})
    assert main(["plot", str(path), "-o", str(b)]) == 0
    assert np.array_equal(_image(a), _image(again))
    pa, pb = _image(a), _image(b)
    assert pa.shape == pb.shape and not np.array_equal(pa, pb)
    differ = np.any(pa != pb, axis=2)
    assert differ.sum() > 100  # a line moved, not a pixel of text


def test_infer_mode_from_names() -> None:
    assert [infer_mode(m) for m in ("val_loss", "train/loss", "error_rate", "perplexity", "nll")] == [
        "min"
    ] * 5
    assert [infer_mode(m) for m in ("val_accuracy", "top1_acc", "f1", "eval/bleu", "Accuracy")] == ["max"] * 5
    assert [infer_mode(m) for m in ("lr", "grad_norm", "epoch_time")] == [None] * 3


def test_usage_errors_exit_2_without_traceback(store: Path, tmp_path: Path) -> None:
    png = str(tmp_path / "out.png")
    unknown = _run("plot", str(store), "-o", png, "--metric", "val_loss", "--metric", "bleu")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("cairn: error: ") and "'bleu'" in unknown.stderr
    assert "(it has: lr, val_accuracy, val_loss)" in unknown.stderr
    empty = tmp_path / "empty"
    cairn.Store(empty, create=True)
    nothing = _run("plot", str(empty), "-o", png)
    assert nothing.returncode == 2
    assert nothing.stderr == f"cairn: error: {empty} holds no checkpoints: nothing to plot\n"
    cairn.save(tmp_path / "plain", {"a": torch.zeros(2)})
    no_metrics = _run("plot", str(tmp_path / "plain"), "-o", png)
    assert no_metrics.returncode == 2 and "records any metrics: nothing to plot" in no_metrics.stderr
    for bad in (
        _run("plot", str(tmp_path / "nowhere"), "-o", png),  # not a store
        _run("plot", str(store), "-o", str(tmp_path / "out.svg")),
        _run("plot", str(store), "-o", str(tmp_path / "no-such-dir" / "out.png")),
        _run("plot", str(store), "-o", png, "--mode", "sideways"),
        _run("plot", str(store)),  # no -o
    ):
        assert bad.returncode == 2 and bad.stderr.startswith("cairn: error: "), bad.stderr
        assert "Traceback" not in bad.stderr
    assert not os.path.exists(png)


def test_without_matplotlib(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None; from cairn.cli import main; "
        f"sys.exit(main(['plot', {str(store)!r}, '-o', {str(tmp_path / 'x.png')!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert out.stderr == "cairn: error: cairn plot needs matplotlib: pip install matplotlib\n"
    assert not (tmp_path / "x.png").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # in-process too
    assert main(["plot", str(store), "-o", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == "cairn: error: cairn plot needs matplotlib: pip install matplotlib\n"
    assert not (tmp_path / "x.png").exists()


def test_a_failed_write_leaves_the_old_png(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "out.png"
    png.write_bytes(b"the old picture")

    def full_disk(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_cli_plot.os, "replace", full_disk)
    assert main(["plot", str(store), "-o", str(png)]) == 2
    assert capsys.readouterr().err == f"cairn: error: cannot write {png}: No space left on device\n"
    assert png.read_bytes() == b"the old picture"
    assert sorted(os.listdir(tmp_path)) == ["out.png", "run"]  # the temporary file is gone


def test_a_damaged_checkpoint_is_skipped_with_a_note(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (store / "checkpoints" / "step-3.json").write_text("garbage")
    png = tmp_path / "out.png"
    assert main(["plot", str(store), "-o", str(png), "--metric", "val_loss", "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["checkpoints"] == 3 and doc["damaged"] == ["step-3"]
    assert doc["metrics"][0]["best"] == "step-2"
    assert "cairn: note: skipped damaged checkpoint step-3" in captured.err
    _image(png)


def test_plot_imports_neither_torch_nor_pyplot(store: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from cairn.cli import main; "
        f"rc = main(['plot', {str(store)!r}, '-o', {str(tmp_path / 'x.png')!r}]); "
        "assert 'torch' not in sys.modules and 'matplotlib.pyplot' not in sys.modules, 'imported'; "
        "sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    _image(tmp_path / "x.png")
