"""``cairn export`` (a checkpoint's tensors to a ``.safetensors`` or ``torch.save`` file) and ``cairn copy``
(checkpoints into another store, sending only the blobs it lacks)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from cairn._cli_render import Column, Output, UsageError, clean, human_size, progress_bar
from cairn._store import Store
from cairn._transfer import (
    SAFETENSORS_SUFFIXES,
    TORCH_SUFFIXES,
    CopyReport,
    copy_checkpoints,
    export_checkpoint,
    export_format,
)
from cairn.errors import CorruptCheckpointError, UnsupportedVersionError

__all__ = ["add_commands"]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


@contextmanager
def _progress(what: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress callback drawing a bar on stderr when it is a terminal, else None."""
    if not sys.stderr.isatty():
        yield None
        return
    with progress_bar(what) as update:
        yield update


# ------------------------------------------------------------------------------------------------ export


def cmd_export(args: argparse.Namespace, out: Output) -> int:
    from cairn.cli import _open, _resolve, parse_ref

    try:
        fmt = export_format(args.out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if os.path.isdir(args.out):
        raise UsageError(f"{args.out} is a directory; give the file to write")
    directory = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(directory):
        raise UsageError(f"{args.out}: the directory {directory} does not exist")
    path, name = parse_ref(args.ref)
    store = _open(path)
    name = _resolve(store, name)
    with _progress("exporting") as progress:
        try:
            report = export_checkpoint(
                store, name, args.out, keys=args.key, strip_prefix=args.strip_prefix, progress=progress
            )
        except ValueError as e:  # a --key matching no tensor, a --strip-prefix matching no key, ...
            raise UsageError(str(e)) from None
    in_file = fmt == "safetensors"
    if args.json:
        out.json(
            {
                "store": report.store,
                "checkpoint": report.checkpoint,
                "step": report.step,
                "out": report.path,
                "format": report.format,
                "prefix": report.prefix,
                "num_tensors": len(report.tensors),
                "nbytes": report.nbytes,
                "file_bytes": report.file_bytes,
                "tensors": report.tensors,
                "values": report.values if in_file else [],
                "values_left_out": [] if in_file else report.values,
            }
        )
        return 0
    out.line(
        f"exported {clean(report.store)}@{report.checkpoint} (step {report.step}) to {clean(report.path)}: "
        f"{_plural(len(report.tensors), 'tensor')}, {human_size(report.nbytes)}"
    )
    if report.prefix:
        out.line(f"names without the prefix {clean(report.prefix)!r} (--strip-prefix '' keeps full keys)")
    if report.values and in_file:
        out.line(f"{_plural(len(report.values), 'plain value')} in the metadata, as JSON under cairn.values")
    elif report.values:
        out.line(
            f"{_plural(len(report.values), 'plain value')} left out: a torch.save export holds tensors only"
        )
    return 0


# -------------------------------------------------------------------------------------------------- copy


def _copy_json(report: CopyReport) -> dict[str, Any]:
    return {
        "src": report.src,
        "dst": report.dst,
        "ok": report.ok,
        "copied": report.copied,
        "skipped": report.skipped,
        "failed": report.failed,
        "blobs_sent": report.blobs_sent,
        "bytes_sent": report.bytes_sent,
        "nbytes": report.nbytes,
        "checkpoints": [
            {
                "name": c.name,
                "step": c.step,
                "status": c.status,
                "nbytes": c.nbytes,
                "blobs_sent": c.blobs_sent,
                "bytes_sent": c.bytes_sent,
                "error": None if c.problem is None else c.problem.message,
            }
            for c in report.checkpoints
        ],
        "problems": [
            {"checkpoint": p.checkpoint, "key": p.key, "blob": p.blob, "message": p.message}
            for p in report.problems
        ],
    }


def cmd_copy(args: argparse.Namespace, out: Output) -> int:
    from cairn.cli import _open, _resolve, parse_ref

    path, name = parse_ref(args.src)
    src = _open(path)
    names: list[str] | None = None
    if name is not None:
        names = [_resolve(src, name)]
        with suppress(CorruptCheckpointError, UnsupportedVersionError):  # reported by the copy
            src.manifest(names[0])  # a name that does not exist is bad usage: fail before creating DST
    elif not src.names():
        print(f"cairn: {clean(src.url)} holds no checkpoints yet; nothing to copy", file=sys.stderr)
        return 0
    try:
        dst = Store(args.dst, create=True, chunk_size=src.config.chunk_size)
    except ValueError as e:  # a URL scheme with no backend
        raise UsageError(str(e)) from None
    if dst.url == src.url:
        raise UsageError(f"{src.url}: the source and the destination are the same store")
    with _progress("copying") as progress:
        report = copy_checkpoints(src, dst, names, progress=progress)
    status = 0 if report.ok else 1
    if args.json:
        out.json(_copy_json(report))
        return status
    rows, styles = [], []
    for c in report.checkpoints:
        sent = f"{human_size(c.bytes_sent)} in {_plural(c.blobs_sent, 'blob')}" if c.blobs_sent else "-"
        step = "-" if c.step is None else str(c.step)
        result = "FAILED" if c.status == "failed" else c.status
        rows.append([c.name, step, result, human_size(c.nbytes) if c.step is not None else "-", sent])
        styles.append("red" if c.status == "failed" else None)
    columns = [Column("NAME"), Column("STEP", right=True), Column("RESULT"), Column("SIZE", right=True)]
    out.table([*columns, Column("SENT")], rows, styles)
    out.line()
    copied = _plural(len(report.copied), "checkpoint")
    parts = [f"copied {copied} ({human_size(report.nbytes)}) to {clean(report.dst)}"]
    if report.skipped:
        parts.append(f"{len(report.skipped)} already there")
    if report.failed:
        parts.append(f"{len(report.failed)} failed")
    out.line(
        f"{', '.join(parts)}: sent {_plural(report.blobs_sent, 'blob')}, {human_size(report.bytes_sent)}"
    )
    sys.stdout.flush()
    for p in report.problems:
        print(f"cairn: error: {clean(p.message)}", file=sys.stderr)
    return status


# ------------------------------------------------------------------------------------------------ parser


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``export`` and ``copy`` on the ``cairn`` parser."""
    suffixes = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
    export = sub.add_parser(
        "export",
        parents=[common],
        help="write a checkpoint's tensors to a .safetensors or weights-only torch.save file",
    )
    export.add_argument("ref", metavar="PATH[@NAME]", help="the store, and the checkpoint (default: latest)")
    export.add_argument(
        "out", metavar="OUT", help=f"the file to write; its suffix picks the format ({suffixes})"
    )
    export.add_argument(
        "--key",
        metavar="GLOB",
        action="append",
        help="only keys matching this glob over dotted keys (or below it); may be repeated",
    )
    export.add_argument(
        "--strip-prefix",
        metavar="PREFIX",
        help="remove PREFIX. from the names that start with it ('' keeps full keys; default: the one "
        "--key KEY, when it selects a single subtree)",
    )
    export.set_defaults(func=cmd_export)

    copy = sub.add_parser(
        "copy", parents=[common], help="copy checkpoints into another store, sending only the blobs it lacks"
    )
    copy.add_argument("src", metavar="SRC[@NAME]", help="the source store, and one checkpoint (default: all)")
    copy.add_argument("dst", metavar="DST", help="the destination store directory (created if new)")
    copy.set_defaults(func=cmd_copy)
