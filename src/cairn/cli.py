"""The ``cairn`` command: inspect, compare, verify, convert and clean checkpoint stores.

::

    cairn ls PATH                        one row per checkpoint: metrics, sizes, why retention keeps it
    cairn show PATH[@NAME] [--key GLOB] [--stats]   header and state tree (default: latest)
    cairn diff REF REF                   keys added, removed, changed; exit status 1 when they differ
    cairn du PATH                        logical vs stored size, the saving from shared blobs
    cairn verify PATH[@NAME]             hash every blob; exit status 1 on any damage
    cairn export REF OUT                 to .safetensors or a weights-only torch file
    cairn copy SRC DST                   checkpoints to another store, sending only missing blobs
    cairn import FILE PATH               a .safetensors or weights-only torch.save file as a checkpoint
    cairn forget PATH --keep-...         apply a retention policy by hand (--dry-run)
    cairn gc PATH                        reclaim the space of blobs no checkpoint uses
    cairn pin|unpin PATH@NAME            keep a checkpoint forever / let retention decide again
    cairn plot PATH -o OUT.png           the metrics across checkpoints, best and kept marked

Every command takes ``--json``. Exit status: 0 success, 1 damage found, corrupt data or (diff) a
difference, 2 bad usage, a path that is not a store, or a checkpoint that does not exist. Commands that
only read manifests or hash bytes never import torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, NoReturn

from cairn import __version__, _cli_inspect, _cli_plot, _cli_transfer
from cairn._cli_inspect import TensorStats
from cairn._cli_manage import add_manage_commands, kept_by
from cairn._cli_render import (
    Column,
    Entry,
    Output,
    UsageError,
    clean,
    human_size,
    json_number,
    local_time,
    metrics_text,
    progress_bar,
    tree_rows,
    value_text,
    walk,
)
from cairn._info import CheckpointInfo
from cairn._manifest import Manifest, check_name
from cairn._store import MARKER, Store
from cairn._tree import key_matcher
from cairn._verify import VerifyReport
from cairn.errors import CairnError, CheckpointNotFoundError, NotAStoreError

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# ------------------------------------------------------------------------------------------------ refs


def _is_name(text: str) -> bool:
    try:
        check_name(text)
    except ValueError:
        return text == "latest"
    return True


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``PATH@NAME`` into the path and the checkpoint name (None when there is no ``@NAME``).

    The split is at the last ``@`` and only when what follows is a valid checkpoint name or ``latest``,
    so paths that contain ``@`` still work; a store directory whose own name contains ``@`` is always
    taken whole.
    """
    path, at, name = ref.rpartition("@")
    if not at or not path or not _is_name(name):
        return ref, None
    if os.path.isfile(os.path.join(ref, MARKER)) and not os.path.isfile(os.path.join(path, MARKER)):
        return ref, None
    return path, name


def _open(path: str) -> Store:
    try:
        return Store(path)
    except ValueError as e:  # e.g. a URL scheme with no backend
        raise UsageError(str(e)) from None


def _infos(store: Store) -> tuple[list[CheckpointInfo], list[tuple[str, CairnError]]]:
    damaged: list[tuple[str, CairnError]] = []
    infos = store.list(on_damaged=lambda name, e: damaged.append((name, e)))
    return infos, damaged


def _resolve(store: Store, name: str | None) -> str:
    """The checkpoint ``name`` stands for; ``None`` and ``latest`` mean the newest intact one."""
    if name is not None and name != "latest":
        return name
    infos, _ = _infos(store)  # skips damaged manifests quietly, unlike Store.latest() which warns
    if not infos:
        raise CheckpointNotFoundError(f"{store.url} holds no checkpoints yet")
    return infos[-1].name


def _short_error(store: Store, name: str, msg: str) -> str:
    """An error message about checkpoint ``name`` without the manifest path it starts with."""
    prefix = f"{store.url}/checkpoints/{name}.json: "
    return clean(msg.removeprefix(prefix))


# ------------------------------------------------------------------------------------------------ ls


_LS_KEYS = (
    "name",
    "step",
    "time",
    "metrics",
    "metadata",
    "nbytes",
    "new_bytes",
    "num_tensors",
    "num_blobs",
    "kept_by",
)


def cmd_ls(args: argparse.Namespace, out: Output) -> int:
    store = _open(args.path)
    infos, damaged = _infos(store)
    reasons = kept_by(store, infos)
    fresh = _cli_inspect.new_bytes(store, infos)
    if args.json:
        rows: list[dict[str, Any]] = [
            {
                "name": i.name,
                "step": i.step,
                "time": i.time.isoformat(),
                "metrics": {k: json_number(v) for k, v in i.metrics.items()},
                "metadata": dict(i.metadata),
                "nbytes": i.nbytes,
                "new_bytes": fresh[i.name],
                "num_tensors": i.num_tensors,
                "num_blobs": i.num_blobs,
                "kept_by": list(why),
                "damaged": False,
                "error": None,
            }
            for i, why in zip(infos, reasons, strict=True)
        ]
        for name, e in damaged:
            rows.append({**dict.fromkeys(_LS_KEYS), "name": name, "damaged": True, "error": str(e)})
        out.json({"store": store.url, "checkpoints": rows})
        return EXIT_OK
    if not infos and not damaged:
        print(f"cairn: {clean(store.url)} holds no checkpoints yet", file=sys.stderr)
        return EXIT_OK
    columns = [
        Column("NAME"),
        Column("STEP", right=True),
        Column("TIME"),
        Column("METRICS"),
        Column("SIZE", right=True),
        Column("NEW", right=True),
        Column("TENSORS", right=True),
        Column("KEPT BY"),
    ]
    table = [
        [
            i.name,
            str(i.step),
            local_time(i.time),
            metrics_text(i.metrics),
            human_size(i.nbytes),
            human_size(fresh[i.name]),
            str(i.num_tensors),
            ", ".join(why) or "(deleted by the next retention pass)",
        ]
        for i, why in zip(infos, reasons, strict=True)
    ]
    for name, e in damaged:
        table.append([name, "-", "-", f"DAMAGED: {_short_error(store, name, str(e))}", "-", "-", "-", "-"])
    styles = [None] * len(infos) + ["red"] * len(damaged)
    out.table(columns, table, styles)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ show


def _stats(
    store: Store, m: Manifest, entries: list[Entry], select: Callable[[str], bool] | None
) -> dict[int, TensorStats]:
    """For ``--stats``: the statistics of the tensors among ``entries`` (``walk(m, select)``), by position."""
    rows = [i for i, e in enumerate(entries) if e.type != "object"]
    leaves = _cli_inspect.leaves(m, select)  # the same rows, objects left out
    wanted = [(i, x.tensor) for i, x in zip(rows, leaves, strict=True) if x.tensor is not None]
    with _cli_inspect.reading("reading", sum(t.nbytes for _, t in wanted)) as progress:
        stats = _cli_inspect.tensor_stats(store, m, [t for _, t in wanted], progress)
    return {i: s for (i, _), s in zip(wanted, stats, strict=True)}


def cmd_show(args: argparse.Namespace, out: Output) -> int:
    path, name = parse_ref(args.ref)
    store = _open(path)
    m = store.manifest(_resolve(store, name))
    info = CheckpointInfo.from_manifest(m)
    select = key_matcher(args.key)
    entries = walk(m, select)
    if args.key and not entries:
        patterns = ", ".join(repr(k) for k in args.key)
        raise UsageError(f"no key of checkpoint {m.name!r} matches --key {clean(patterns)}")
    stats = _stats(store, m, entries, select) if args.stats else None
    if args.json:
        docs = [asdict(e) for e in entries]
        if stats is not None:
            for i, doc in enumerate(docs):
                doc["stats"] = stats[i].as_json() if i in stats else None
        out.json(
            {
                "store": store.url,
                "name": info.name,
                "step": info.step,
                "time": info.time.isoformat(),
                "metrics": {k: json_number(v) for k, v in info.metrics.items()},
                "metadata": dict(info.metadata),
                "nbytes": info.nbytes,
                "num_tensors": info.num_tensors,
                "num_blobs": info.num_blobs,
                "entries": docs,
            }
        )
        return EXIT_OK
    meta = " ".join(f"{clean(k)}={value_text(v)}" for k, v in info.metadata.items())
    out.fields(
        [
            ("checkpoint", info.name),
            ("store", clean(store.url)),
            ("step", str(info.step)),
            ("time", local_time(info.time)),
            ("metrics", metrics_text(info.metrics) or "-"),
            ("metadata", meta or "-"),
            ("size", human_size(info.nbytes)),
            ("tensors", str(info.num_tensors)),
            ("blobs", str(info.num_blobs)),
        ]
    )
    out.line()
    columns = [
        Column("KEY"),
        Column("KIND"),
        Column("DTYPE"),
        Column("SHAPE"),
        Column("SIZE", right=True),
        Column("VALUE"),
    ]
    rows = tree_rows(entries)
    if stats is not None:
        columns[5:5] = _cli_inspect.STATS_COLUMNS
        rows = [row[:5] + _cli_inspect.stats_cells(stats.get(i)) + row[5:] for i, row in enumerate(rows)]
    out.table(columns, rows, ["bold" if e.type == "object" else None for e in entries])
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ verify


def _verify(store: Store, name: str | None) -> VerifyReport:
    if not sys.stderr.isatty():
        return store.verify(name)
    with progress_bar("verifying") as update:
        return store.verify(name, progress=update)


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    path, name = parse_ref(args.ref)
    store = _open(path)
    if name is not None:
        name = _resolve(store, name)
    report = _verify(store, name)
    status = EXIT_OK if report.ok else EXIT_FAILED
    if args.json:
        out.json(
            {
                "store": store.url,
                "ok": report.ok,
                "checkpoints": report.checkpoints,
                "blobs_checked": report.blobs_checked,
                "bytes_checked": report.bytes_checked,
                "damaged": report.damaged,
                "problems": [
                    {"checkpoint": p.checkpoint, "key": p.key, "blob": p.blob, "message": p.message}
                    for p in report.problems
                ],
            }
        )
        return status
    n = len(report.checkpoints)
    out.line(
        f"checked {n} checkpoint{'s' * (n != 1)}, {report.blobs_checked} blob"
        f"{'s' * (report.blobs_checked != 1)}, {human_size(report.bytes_checked)}"
    )
    if report.ok:
        out.line("OK: no problems found", style="green")
        return status
    damaged = report.damaged
    out.line(
        f"DAMAGED: {len(report.problems)} problem{'s' * (len(report.problems) != 1)} in "
        f"{len(damaged)} checkpoint{'s' * (len(damaged) != 1)}: {', '.join(damaged)}",
        style="bold red",
    )
    out.line()
    columns = [Column("CHECKPOINT"), Column("KEY"), Column("BLOB"), Column("PROBLEM")]
    rows = []
    for p in sorted(report.problems, key=lambda p: (p.checkpoint, p.key or "", p.blob or "")):
        message = _short_error(store, p.checkpoint, p.message.removeprefix(f"blob {p.blob} "))
        rows.append([p.checkpoint, clean(p.key or "-"), p.blob or "-", message])
    out.table(columns, rows)
    return status


def cmd_import(args: argparse.Namespace, out: Output) -> int:
    from cairn._interop import import_file

    if not os.path.isfile(args.file):
        raise UsageError(f"{args.file}: no such file")
    try:
        store = Store(args.path, create=True)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        info = import_file(args.file, store, step=args.step, name=args.name)
    except ValueError as e:  # a bad --name or --step
        raise UsageError(str(e)) from None
    if args.json:
        out.json(
            {
                "store": store.url,
                "name": info.name,
                "step": info.step,
                "tensors": info.num_tensors,
                "bytes": info.nbytes,
                "bytes_written": info.bytes_written,
            }
        )
    else:
        out.line(
            f"imported {args.file} as {store.url}@{info.name}: {info.num_tensors} tensors, "
            f"{human_size(info.nbytes)} ({human_size(info.bytes_written or 0)} new)"
        )
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ main


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"cairn: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cairn`` command."""
    parser = _Parser(
        prog="cairn",
        description="Inspect, compare, verify, convert and clean cairn checkpoint stores.",
        epilog="exit status: 0 ok, 1 damage found or (diff) a difference, 2 bad usage or not found",
    )
    parser.add_argument("--version", action="version", version=f"cairn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON to stdout")

    ls = sub.add_parser("ls", parents=[common], help="list the checkpoints of a store")
    ls.add_argument("path", metavar="PATH", help="the store directory")
    ls.set_defaults(func=cmd_ls)

    show = sub.add_parser("show", parents=[common], help="show one checkpoint's header and state tree")
    show.add_argument("ref", metavar="PATH[@NAME]", help="the store, and the checkpoint (default: latest)")
    show.add_argument(
        "--key",
        metavar="GLOB",
        action="append",
        help="only keys matching this glob over dotted keys (or below it); may be repeated",
    )
    show.add_argument(
        "--stats",
        action="store_true",
        help="read the tensors (verified) and show min, max, mean, std and NaN/Inf counts of each",
    )
    show.set_defaults(func=cmd_show)

    verify = sub.add_parser("verify", parents=[common], help="check every byte of a store or one checkpoint")
    verify.add_argument("ref", metavar="PATH[@NAME]", help="the store, and one checkpoint (default: all)")
    verify.set_defaults(func=cmd_verify)

    imp = sub.add_parser(
        "import", parents=[common], help="save a .safetensors or weights-only torch.save file as a checkpoint"
    )
    imp.add_argument("file", metavar="FILE", help="a .safetensors file or a torch.save file of tensors")
    imp.add_argument("path", metavar="PATH", help="the store directory (created if new)")
    imp.add_argument("--name", help="the checkpoint's name (default: step-STEP)")
    imp.add_argument("--step", type=int, help="the checkpoint's step (default: one past the latest)")
    imp.set_defaults(func=cmd_import)
    add_manage_commands(sub, common)
    for module in (_cli_inspect, _cli_transfer, _cli_plot):
        module.add_commands(sub, common)
    return parser


def _dispatch(args: argparse.Namespace, out: Output) -> int:
    if hasattr(args, "store_command"):
        return int(args.store_command(args, out, _open(args.path)))
    if hasattr(args, "pin_command"):
        path, name = parse_ref(args.ref)
        if name is None:
            raise UsageError(f"{args.command} needs PATH@NAME, the checkpoint to {args.command}")
        store = _open(path)
        return int(args.pin_command(args, out, store, _resolve(store, name)))
    return int(args.func(args, out))


def _fail(message: str) -> None:
    print(f"cairn: error: {clean(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cairn`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    out = Output()
    try:
        status: int = _dispatch(args, out)
        sys.stdout.flush()
        return status
    except (UsageError, NotAStoreError, CheckpointNotFoundError) as e:
        _fail(str(e))
        return EXIT_USAGE
    except CairnError as e:
        _fail(str(e))
        return EXIT_FAILED
    except ValueError as e:  # e.g. Store.list() meeting a stray file with an invalid checkpoint name
        _fail(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("cairn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`cairn ls | head`): no traceback, no flush error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
