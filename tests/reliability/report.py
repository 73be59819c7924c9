"""Turn the records of a reliability run into the markdown table of ``docs/reliability.md``.

Usage::

    CAIRN_RELIABILITY_REPORT=run.jsonl pytest tests/reliability     # (what ``make soak`` does)
    python tests/reliability/report.py run.jsonl                     # the table, on stdout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("trials", "faults", "inputs", "detected", "data_lost", "seconds")


def table(lines: list[str]) -> str:
    """A markdown table with one row per test, and a total row."""
    records = [json.loads(line) for line in lines if line.strip()]
    records.sort(key=lambda r: r["test"])
    head = "| test | trials | faults injected | inputs | detected | data lost | seconds |"
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    totals = dict.fromkeys(COLUMNS, 0.0)
    for r in records:
        name = r["test"].removeprefix("tests/reliability/")
        rows.append(f"| `{name}` | " + " | ".join(_cell(r.get(c, 0)) for c in COLUMNS) + " |")
        for c in COLUMNS:
            totals[c] += r.get(c, 0) or 0
    rows.append("| **total** | " + " | ".join(f"**{_cell(totals[c])}**" for c in COLUMNS) + " |")
    return "\n".join(rows)


def _cell(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def main(argv: list[str]) -> int:
    """Print the table of the report file ``argv[0]``."""
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(table(Path(argv[0]).read_text(encoding="utf-8").splitlines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
