"""``cairn plot``: the metrics of a store's checkpoints as a PNG, best and retained checkpoints marked.

::

    cairn plot PATH [--metric M]... -o OUT.png [--mode min|max] [--json]

One subplot per metric, stacked, sharing the ``step`` axis. Each metric is a line across the checkpoints
that have a finite value of it; the best one is a star, pinned checkpoints are diamonds, checkpoints kept
by a ``KeepBest`` of that metric are ringed. matplotlib is optional: it is imported only here, drawn
with the Agg canvas (no GUI, no change to the global backend), and its absence is a usage error.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cairn._atomic import atomic_file
from cairn._cli_manage import kept_by
from cairn._cli_render import Column, Output, UsageError, clean, json_number, number_text, shorten
from cairn._info import CheckpointInfo
from cairn._manager import stored_policy
from cairn._store import Store
from cairn.errors import BackendError, CairnError, CheckpointNotFoundError
from cairn.policies import KeepAny, KeepBest, RetentionPolicy

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["add_commands"]

MISSING_MATPLOTLIB = "cairn plot needs matplotlib: pip install matplotlib"

# words of a metric's name that say which way is better ("val_loss" -> min, "top1_acc" -> max)
# fmt: off
_MIN_WORDS = frozenset({"loss", "error", "err", "perplexity", "ppl", "wer", "cer", "mse", "mae", "rmse",
                        "nll"})
_MAX_WORDS = frozenset({"acc", "accuracy", "top1", "top5", "f1", "auc", "auroc", "precision", "recall",
                        "bleu", "rouge", "iou", "map", "dice", "reward", "return", "score"})
# fmt: on

_BEST_REASON = re.compile(r"best \d+ by (?P<metric>.+) \((?P<mode>min|max)\)")

# colours of examples/demo.py (seaborn "deep")
_LINE, _BEST, _KEPT, _PIN, _BAD = "#4c72b0", "#dd8452", "#55a868", "#8172b3", "#c44e52"


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Series:
    """One metric across the checkpoints: what is drawn and reported."""

    metric: str
    mode: str
    """``"min"`` or ``"max"``."""
    mode_from: str
    """Where the direction came from: ``"--mode"``, ``"policy"`` (a recorded ``KeepBest``), ``"name"``
    (inferred from the metric's name) or ``"assumed"`` (nothing said: min)."""
    points: list[tuple[CheckpointInfo, float]] = field(default_factory=list)
    """The checkpoints with a finite value, oldest step first."""
    non_finite: list[tuple[CheckpointInfo, float]] = field(default_factory=list)
    missing: int = 0
    """Checkpoints without this metric."""
    best: tuple[CheckpointInfo, float | int] | None = None


def _words(metric: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", metric.lower()) if w]


def infer_mode(metric: str) -> str | None:
    """``"min"`` for loss/error-like names, ``"max"`` for accuracy-like names, None when the name says
    nothing (``val_loss`` → min, ``top1_acc`` → max, ``lr`` → None)."""
    words = _words(metric)
    name = metric.lower()
    if name.endswith(("loss", "error")) or (words and words[-1] in _MIN_WORDS):
        return "min"
    if any(w in _MAX_WORDS or w.startswith("accura") for w in words):
        return "max"
    if any(w in _MIN_WORDS for w in words):
        return "min"
    return None


def _keep_bests(policy: RetentionPolicy | None) -> Iterator[KeepBest]:
    if isinstance(policy, KeepBest):
        yield policy
    elif isinstance(policy, KeepAny):
        for p in policy.policies:
            yield from _keep_bests(p)


def direction(metric: str, forced: str | None, policy: RetentionPolicy | None) -> tuple[str, str]:
    """``(mode, source)`` for ``metric``: ``--mode``, else the recorded ``KeepBest`` of that metric,
    else inferred from the name, else min (source ``"assumed"``)."""
    if forced is not None:
        return forced, "--mode"
    for kb in _keep_bests(policy):
        if kb.metric == metric:
            return kb.mode, "policy"
    inferred = infer_mode(metric)
    if inferred is not None:
        return inferred, "name"
    return "min", "assumed"


def collect(
    infos: Sequence[CheckpointInfo],
    metrics: Sequence[str],
    forced: str | None,
    policy: RetentionPolicy | None,
) -> list[Series]:
    """The series to draw: per metric its finite points, its non-finite values and its best checkpoint
    (chosen like ``KeepBest.best``, newest on ties, among the finite values)."""
    out = []
    for metric in metrics:
        mode, source = direction(metric, forced, policy)
        s = Series(metric, mode, source)
        for info in infos:
            if metric not in info.metrics:
                s.missing += 1
                continue
            value = float(info.metrics[metric])
            (s.points if math.isfinite(value) else s.non_finite).append((info, value))
        best = KeepBest(metric, mode=mode).best([info for info, _ in s.points])
        if best is not None:
            s.best = (best, best.metrics[metric])
        out.append(s)
    return out


def _choose_metrics(infos: Sequence[CheckpointInfo], wanted: Sequence[str] | None, url: str) -> list[str]:
    found = sorted({m for info in infos for m in info.metrics})
    if not found:
        raise UsageError(
            f"no checkpoint of {url} records any metrics: nothing to plot "
            "(save them with metrics={'val_loss': ...})"
        )
    if not wanted:
        return found
    unknown = [m for m in dict.fromkeys(wanted) if m not in found]
    if unknown:
        names = ", ".join(repr(m) for m in unknown)
        raise UsageError(
            f"no checkpoint of {url} has the metric{'s' * (len(unknown) > 1)} {names} "
            f"(it has: {', '.join(found)})"
        )
    return list(dict.fromkeys(wanted))


# ------------------------------------------------------------------------------------------------ drawing


def _tex_safe(text: str) -> str:
    """``text`` for a matplotlib label: control characters escaped, ``$`` not read as mathtext."""
    return clean(text).replace("$", r"\$")


def _mode_text(s: Series) -> str:
    better = "lower" if s.mode == "min" else "higher"
    why = {
        "--mode": "as --mode says",
        "policy": "as the KeepBest policy says",
        "name": "judged from the name",
        "assumed": "assumed: the name does not say (use --mode)",
    }
    return f"{better} is better ({s.mode}), {why[s.mode_from]}"


def _draw_series(ax: Axes, s: Series, reasons: dict[str, tuple[str, ...]]) -> None:
    from matplotlib.collections import PathCollection
    from matplotlib.transforms import blended_transform_factory

    n = len(s.points)
    dot = 4.5 if n <= 60 else (3.0 if n <= 250 else 1.5)
    steps = [info.step for info, _ in s.points]
    values = [v for _, v in s.points]
    if s.points:
        ax.plot(steps, values, color=_LINE, lw=1.6, marker="o", ms=dot, zorder=2, label="by step")
    kept_label = ""
    kept: list[tuple[int, float]] = []
    pinned: list[tuple[int, float]] = []
    for info, value in s.points:
        why = reasons.get(info.name, ())
        if "pinned" in why:
            pinned.append((info.step, value))
        for reason in why:
            m = _BEST_REASON.fullmatch(reason)
            if m and m["metric"] == s.metric:
                kept.append((info.step, value))
                kept_label = f"kept: {reason}"
                break
    if kept:
        xs, ys = zip(*kept, strict=True)
        ax.scatter(
            xs,
            ys,
            s=560,
            facecolors="none",
            edgecolors=_KEPT,
            linewidths=2.2,
            zorder=3,
            label=_tex_safe(kept_label),
        )
    if pinned:
        xs, ys = zip(*pinned, strict=True)
        ax.scatter(
            xs, ys, s=55, marker="D", color=_PIN, edgecolors="white", linewidths=0.8, zorder=6, label="pinned"
        )
    if s.best is not None:
        info, value = s.best
        ax.scatter(
            [info.step],
            [value],
            s=250,
            marker="*",
            color=_BEST,
            edgecolors="#7a3b12",
            linewidths=0.8,
            zorder=5,
            label=_tex_safe(f"best: {info.name} = {number_text(value)}"),
        )
    if s.non_finite:
        # there is no value to draw: a dotted line at their step and a cross on the step axis
        edge = blended_transform_factory(ax.transData, ax.transAxes)
        xs_bad = [info.step for info, _ in s.non_finite]
        for x in xs_bad:
            ax.axvline(x, color=_BAD, lw=0.9, ls=":", alpha=0.6, zorder=1)
        ax.scatter(
            xs_bad,
            [0.0] * len(xs_bad),
            transform=edge,
            marker="x",
            s=50,
            color=_BAD,
            lw=2.0,
            zorder=7,
            clip_on=False,
            label="nan/inf here (not drawn)",
        )
    if not s.points:
        ax.set_yticks([])
        ax.text(
            0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center", color="#777777"
        )
    ax.set_title(f"{_tex_safe(s.metric)}:  {_mode_text(s)}", loc="left", fontsize=10)
    ax.margins(x=0.04, y=0.18)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)
    ax.set_ylabel(_tex_safe(shorten(s.metric, 28)))
    ax.grid(True, color="#e5e5e5", lw=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    legend = ax.legend(
        loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, borderaxespad=0.0
    )
    for handle in legend.legend_handles:  # the ring is drawn large to circle the star; not in the legend
        if isinstance(handle, PathCollection):
            handle.set_sizes([min(float(handle.get_sizes()[0]), 160.0)])


def render(series: Sequence[Series], reasons: dict[str, tuple[str, ...]], title: str) -> bytes:
    """The PNG bytes of the plot of ``series`` (drawn off screen, on the Agg canvas)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UsageError(MISSING_MATPLOTLIB) from None
    fig: Figure = Figure(figsize=(10, 0.9 + 2.8 * len(series)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, s in zip(axes, series, strict=True):
        _draw_series(ax, s, reasons)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    fig.suptitle(_tex_safe(title), fontsize=11, fontweight="bold")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(MISSING_MATPLOTLIB) from None


# ------------------------------------------------------------------------------------------------ output


def _check_output(path: str) -> None:
    if not path.lower().endswith(".png"):
        raise UsageError(f"-o {clean(path)}: cairn plot writes PNG images; name the file *.png")
    if os.path.isdir(path):
        raise UsageError(f"-o {clean(path)} is a directory; give a file name ending in .png")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"-o {clean(path)}: no such directory {clean(parent)}")


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``, so
    that ``path`` is either the old file or the whole new one, never half written."""
    try:
        with atomic_file(path) as f:
            f.write(data)
    except BackendError as e:
        raise UsageError(clean(e.strerror or str(e))) from None  # "cannot write PATH: reason"


def _non_finite_text(s: Series, limit: int = 3) -> str:
    if not s.non_finite:
        return "-"
    shown = [f"{info.name}={number_text(v)}" for info, v in s.non_finite[:limit]]
    more = len(s.non_finite) - limit
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def _notes(series: Sequence[Series], damaged: Sequence[tuple[str, CairnError]]) -> None:
    """Notes on stderr, after the result (stdout flushed first, so a terminal shows them in order)."""
    sys.stdout.flush()
    for s in series:
        if s.mode_from == "assumed":
            print(
                f"cairn: note: the name '{clean(s.metric)}' does not say whether lower or higher is better; "
                "assumed lower (min). Use --mode max if higher is better.",
                file=sys.stderr,
            )
    for name, _ in damaged:
        print(
            f"cairn: note: skipped damaged checkpoint {clean(name)} (`cairn verify` says more)",
            file=sys.stderr,
        )


def _json(store: Store, path: str, n: int, damaged: list[str], series: Sequence[Series]) -> dict[str, Any]:
    return {
        "store": store.url,
        "png": os.path.abspath(path),
        "checkpoints": n,
        "damaged": damaged,
        "metrics": [
            {
                "metric": s.metric,
                "mode": s.mode,
                "mode_from": s.mode_from,
                "best": s.best[0].name if s.best else None,
                "best_step": s.best[0].step if s.best else None,
                "best_value": json_number(s.best[1]) if s.best else None,
                "points": len(s.points),
                "missing": s.missing,
                "non_finite": [
                    {"name": info.name, "step": info.step, "value": json_number(v)}
                    for info, v in s.non_finite
                ],
            }
            for s in series
        ],
    }


def _table(out: Output, n: int, series: Sequence[Series]) -> None:
    columns = [
        Column("METRIC"),
        Column("MODE"),
        Column("BEST"),
        Column("STEP", right=True),
        Column("VALUE", right=True),
        Column("POINTS", right=True),
        Column("NOT DRAWN (NON-FINITE)"),
    ]
    rows = [
        [
            clean(s.metric),
            f"{s.mode} ({s.mode_from})",
            s.best[0].name if s.best else "-",
            str(s.best[0].step) if s.best else "-",
            number_text(s.best[1]) if s.best else "-",
            f"{len(s.points)}/{n}",
            _non_finite_text(s),
        ]
        for s in series
    ]
    out.table(columns, rows)


def _tail(text: str, width: int) -> str:
    """``text`` cut from the left to ``width`` characters (the end of a path says the most)."""
    return text if len(text) <= width else "..." + text[len(text) - width + 3 :]


def cmd_plot(args: argparse.Namespace, out: Output, store: Store) -> int:
    """Draw the store's metrics into ``args.output``; report the best checkpoint per metric."""
    _check_output(args.output)
    _check_matplotlib()
    damaged: list[tuple[str, CairnError]] = []
    infos = store.list(on_damaged=lambda name, e: damaged.append((name, e)))
    if not infos:
        what = f" ({len(damaged)} damaged: `cairn verify` says more)" if damaged else ""
        raise CheckpointNotFoundError(f"{store.url} holds no checkpoints{what}: nothing to plot")
    metrics = _choose_metrics(infos, args.metric, store.url)
    reasons = dict(zip((i.name for i in infos), kept_by(store, infos), strict=True))
    series = collect(infos, metrics, args.mode, stored_policy(infos))
    n = len(infos)
    title = f"{_tail(store.url, 90)}: {n} checkpoint{'s' * (n != 1)}"
    write_atomic(args.output, render(series, reasons, title))
    if args.json:
        out.json(_json(store, args.output, n, [name for name, _ in damaged], series))
    else:
        metrics_n = f"{len(series)} metric{'s' * (len(series) != 1)}"
        out.line(f"wrote {clean(args.output)}: {n} checkpoint{'s' * (n != 1)}, {metrics_n}")
        out.line()
        _table(out, n, series)
    _notes(series, damaged)
    return 0


# ------------------------------------------------------------------------------------------------ parser


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``cairn plot`` on the ``cairn`` parser."""
    plot = sub.add_parser(
        "plot",
        parents=[common],
        help="draw the metrics across a store's checkpoints as a PNG (needs matplotlib)",
        description="Draw each metric across the store's checkpoints by step, one subplot per metric; "
        "the best checkpoint is a star, pinned ones are diamonds, those kept by a KeepBest of the metric "
        "are ringed.",
    )
    plot.add_argument("path", metavar="PATH", help="the store directory")
    plot.add_argument("-o", "--output", required=True, metavar="OUT.png", help="the PNG file to write")
    plot.add_argument(
        "--metric",
        action="append",
        metavar="M",
        help="a metric to draw; may be repeated (default: every metric of the checkpoints)",
    )
    plot.add_argument(
        "--mode",
        choices=("min", "max"),
        help="which way is better for every metric (default: the recorded KeepBest policy's, else "
        "inferred from the name: *loss/*error min, accuracy-like max, otherwise min)",
    )
    plot.set_defaults(store_command=cmd_plot)
