"""Formatting for the ``cairn`` command: sizes, metrics, times, and tables for terminals and pipes.

On a terminal tables are drawn by rich; when the output is piped they are plain text, columns aligned
with spaces, no box drawing and no colour, one row per line (never folded), so that ``grep``/``awk`` work.
Everything shown comes from untrusted manifests, so control characters are escaped before printing.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cairn._manifest import Manifest
from cairn._tree import format_path

__all__ = [
    "Column",
    "Entry",
    "Output",
    "UsageError",
    "clean",
    "human_size",
    "json_number",
    "local_time",
    "metrics_text",
    "number_text",
    "progress_bar",
    "shorten",
    "tree_nodes",
    "tree_rows",
    "value_text",
    "walk",
]

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_size(nbytes: int) -> str:
    """``nbytes`` in binary units: ``'512 B'``, ``'1.5 KiB'``, ``'3.2 GiB'``."""
    if nbytes < 1024:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def clean(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (``\\x1b``, ``\\n``), so a hostile
    manifest cannot move the cursor or recolour the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shorten(text: str, width: int = 60) -> str:
    """``text`` cut to ``width`` characters, ending in ``...`` when cut."""
    return text if len(text) <= width else text[: width - 3] + "..."


def local_time(t: datetime) -> str:
    """A checkpoint time in the local time zone, to the second."""
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def number_text(v: float | int | str | None) -> str:
    """A metric, statistic or difference in a table cell: ints exactly, floats to 4 significant digits,
    ``-`` for none, non-finite as JSON spells it."""
    if v is None:
        return "-"
    if isinstance(v, str):  # a non-finite float, as JSON spells it
        return v
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4g}"


def metrics_text(metrics: Mapping[str, float | int]) -> str:
    """Metrics as ``val_loss=0.21 acc=0.9`` (floats to 4 significant digits)."""
    return " ".join(f"{clean(k)}={number_text(v)}" for k, v in metrics.items())


def value_text(value: Any, width: int = 60) -> str:
    """A metadata value for a header line: strings as they are, anything else as compact JSON."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return shorten(clean(text), width)


def json_number(v: float | int) -> float | int | str:
    """A metric for ``--json``: numbers as they are, non-finite floats as ``"nan"``/``"inf"``/``"-inf"``
    (strict JSON has no NaN), the same spelling manifests use."""
    if isinstance(v, float) and not math.isfinite(v):
        return number_text(v)
    return v


class UsageError(Exception):
    """Bad command-line input found after parsing (exit status 2)."""


@dataclass(frozen=True)
class Column:
    """A table column: its header and whether its cells are right-aligned (numbers)."""

    header: str
    right: bool = False


class Output:
    """Where a command's result goes: stdout, as rich tables on a terminal and plain text in a pipe."""

    def __init__(self) -> None:
        self.console = Console(force_terminal=None, highlight=False, soft_wrap=False)

    @property
    def rich(self) -> bool:
        """True when stdout is a terminal (tables drawn, colour allowed)."""
        return self.console.is_terminal

    def line(self, text: str = "", style: str | None = None) -> None:
        """One line of text (never interpreted as markup)."""
        if self.rich:
            self.console.print(Text(text, style=style or ""), soft_wrap=True)
        else:
            print(text)

    def json(self, doc: Any) -> None:
        """``doc`` as indented JSON, always plain."""
        print(json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False))

    def fields(self, pairs: Sequence[tuple[str, str]]) -> None:
        """A header block of ``label  value`` lines."""
        if self.rich:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold")
            grid.add_column()
            for label, value in pairs:
                grid.add_row(Text(label), Text(value))
            self.console.print(grid)
            return
        width = max((len(label) for label, _ in pairs), default=0)
        for label, value in pairs:
            print(f"{label:<{width}}  {value}".rstrip())

    def table(
        self,
        columns: Sequence[Column],
        rows: Sequence[Sequence[str]],
        styles: Sequence[str | None] | None = None,
        title: str | None = None,
    ) -> None:
        """A table; ``styles`` gives each row a rich style (terminal only)."""
        if self.rich:
            table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", header_style="bold")
            for c in columns:
                table.add_column(c.header, justify="right" if c.right else "left", overflow="fold")
            for i, row in enumerate(rows):
                style = styles[i] if styles else None
                table.add_row(*(Text(cell) for cell in row), style=style or "")
            self.console.print(table)
            return
        if title:
            print(title)
        widths = [len(c.header) for c in columns]
        for row in rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

        def fmt(cells: Sequence[str]) -> str:
            parts = [
                cell.rjust(w) if c.right else cell.ljust(w)
                for c, cell, w in zip(columns, cells, widths, strict=True)
            ]
            return "  ".join(parts).rstrip()

        print(fmt([c.header for c in columns]))
        for row in rows:
            print(fmt(row))


# ------------------------------------------------------------------------------------ the state tree


@dataclass(frozen=True)
class Entry:
    """One row of ``cairn show``: a tensor, a plain value, or an object saved through ``state_dict()``."""

    key: str
    type: str
    """``"tensor"``, ``"value"`` or ``"object"``."""
    kind: str | None = None
    """For a tensor: ``torch``, ``numpy`` or ``numpy-scalar``."""
    dtype: str | None = None
    shape: list[int] | None = None
    nbytes: int | None = None
    value_type: str | None = None
    """For a value: its Python type name."""
    repr: str | None = None
    """For a value: its ``repr``, cut to 60 characters."""
    object: str | None = None
    """For an object: the type name it was saved from."""


def _value(key: str, value_type: str, text: str) -> Entry:
    return Entry(key, "value", value_type=value_type, repr=shorten(clean(text)))


def _bytes_repr(b64: str) -> str:
    head = base64.b64decode(b64[:88])  # enough for 60 characters; never decodes a large value whole
    nbytes = len(b64) // 4 * 3 - b64[-2:].count("=")
    return repr(head) + ("" if nbytes <= len(head) else f"... ({nbytes} bytes)")


def tree_nodes(tree: Any, select: Callable[[str], bool] | None = None) -> Iterator[tuple[bool, str, Any]]:
    """``(is_object, dotted key, node)`` for the leaves of a (validated) manifest tree in order, each
    object node announced before its state's leaves; with ``select`` only the leaves whose key it accepts
    (and the objects holding them). Leaves are plain values, tensor references and empty containers."""

    def keep(path: str) -> bool:
        return select is None or select(path)

    def visit(node: Any, path: tuple[str | int, ...]) -> Iterator[tuple[bool, str, Any]]:
        key = format_path(path)
        if isinstance(node, dict):
            if "object" in node:
                inner = list(visit(node["state"], path))
                if inner or keep(key):
                    yield True, key, node
                yield from inner
                return
            for tag in ("dict", "list", "tuple"):
                if node.get(tag):
                    children = node[tag] if tag == "dict" else enumerate(node[tag])
                    for k, child in children:
                        yield from visit(child, (*path, k))
                    return
        if keep(key):
            yield False, key, node

    return visit(tree, ())


def walk(m: Manifest, select: Callable[[str], bool] | None = None) -> list[Entry]:
    """Every leaf of ``m``'s state tree in order (objects announced before their state), read from the
    manifest alone; with ``select`` only the leaves whose dotted key it accepts (objects with them)."""
    return [
        Entry(key, "object", object=str(node["object"])) if is_object else _leaf_entry(m, key, node)
        for is_object, key, node in tree_nodes(m.tree, select)
    ]


_EMPTY = {"dict": "{}", "list": "[]", "tuple": "()"}


def _leaf_entry(m: Manifest, key: str, node: Any) -> Entry:
    if not isinstance(node, dict):
        return _value(key, "None" if node is None else type(node).__name__, repr(node))
    for tag, empty in _EMPTY.items():
        if tag in node:
            return _value(key, tag, empty)
    if "tensor" in node:
        t = m.tensors[node["tensor"]]
        return Entry(key, "tensor", kind=t.kind, dtype=t.dtype, shape=list(t.shape), nbytes=t.nbytes)
    if "int" in node:
        digits = node["int"]
        return _value(key, "int", str(int(digits, 16)) if len(digits) <= 40 else digits)
    if "float" in node:
        return _value(key, "float", node["float"])
    return _value(key, "bytes", _bytes_repr(node["bytes"]))


def tree_rows(entries: Sequence[Entry]) -> list[list[str]]:
    """The table rows of ``cairn show``: KEY, KIND, DTYPE, SHAPE, SIZE, VALUE."""
    rows: list[list[str]] = []
    for e in entries:
        key = clean(e.key) or "<root>"
        if e.type == "tensor":
            assert e.kind and e.dtype and e.shape is not None and e.nbytes is not None
            shape = "[" + ", ".join(map(str, e.shape)) + "]"
            rows.append([key, e.kind, e.dtype, shape, human_size(e.nbytes), ""])
        elif e.type == "object":
            rows.append([key, "object", "", "", "", clean(e.object or "")])
        else:
            rows.append([key, e.value_type or "", "", "", "", e.repr or ""])
    return rows


# ------------------------------------------------------------------------------------------- progress


@contextmanager
def progress_bar(what: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr; yields the ``progress(done, total)`` callback (bytes)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn(what),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update
