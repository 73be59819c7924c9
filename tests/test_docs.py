"""The documents' code runs as shown.

Every ```python block of README.md and docs/manager.md runs in a fresh interpreter (``python -W error``)
whose working directory is an empty temporary directory, so relative paths like ``"ckpts"`` or
``"runs/exp1"`` land there; it must exit with status 0. Blocks are independent, except that a block whose
first line is ``# continues`` goes on from the block before it in the same file: the two run as one
program. A block holding a ``# doc-test: skip`` line, or right after a ``<!-- doc-test: skip -->`` line,
does not run, and neither do the blocks that continue it.

The ```console blocks of docs/manager.md that run ``$ cairn ...`` are real output: they are run in order
against the store made by the guide's last python block before the first of them, and must print what
the guide shows, times aside.

Each block takes a second or two (mostly importing torch), so without pytest-xdist the blocks are
started together on a small thread pool and each test waits for its own.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import cairn

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/manager.md", "docs/cli.md", "docs/callbacks.md")
GUIDE = "docs/manager.md"
SRC = Path(cairn.__file__).resolve().parents[1]  # the cairn these tests import; the blocks import the same
PYTHON = {"python", "py", "python3"}
SKIP = "# doc-test: skip"
SKIP_BEFORE = "<!-- doc-test: skip -->"
CONTINUES = re.compile(r"#\s*continues\b")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
TIMEOUT = 180
TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


@dataclass(frozen=True)
class Block:
    """A fenced code block of a document."""

    doc: str
    line: int
    """The line of the opening fence (1 first)."""
    lang: str
    source: str
    skip: bool


@dataclass(frozen=True)
class Program:
    """Python blocks that run together: one block and the blocks that continue it."""

    blocks: tuple[Block, ...]

    @property
    def doc(self) -> str:
        return self.blocks[0].doc

    @property
    def id(self) -> str:
        return f"{self.doc}:" + "+".join(str(b.line) for b in self.blocks)

    @property
    def source(self) -> str:
        return "".join(b.source for b in self.blocks)

    def listing(self) -> str:
        """The source with line numbers (as in a traceback) and where each block comes from."""
        out, n = [], 0
        for b in self.blocks:
            out.append(f"    --- {b.doc}, the block at line {b.line} ---")
            for text in b.source.splitlines():
                n += 1
                out.append(f"{n:4}  {text}")
        return "\n".join(out)


def parse_blocks(doc: str, text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order (CommonMark fences: ``` or ~~~, 3 or more)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence = m["fence"]
        closing = re.compile(rf" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*")
        end = i + 1
        while end < len(lines) and not closing.fullmatch(lines[end]):
            end += 1
        body = textwrap.dedent("\n".join(lines[i + 1 : end]))
        source = body + "\n" if body.strip() else ""
        info = m["info"].split()
        skipped = (i > 0 and lines[i - 1].strip() == SKIP_BEFORE) or any(
            line.strip() == SKIP for line in source.splitlines()
        )
        blocks.append(Block(doc, i + 1, info[0].lower() if info else "", source, skipped))
        i = end + 1
    return blocks


def continues(block: Block) -> bool:
    first = next((line.strip() for line in block.source.splitlines() if line.strip()), "")
    return CONTINUES.match(first) is not None


def programs(blocks: list[Block]) -> Iterator[tuple[Program, str | None]]:
    """The programs of one document's blocks, each with the reason it is skipped (None: it runs)."""
    chains: list[list[Block]] = []
    for b in blocks:
        if b.lang not in PYTHON:
            continue
        if continues(b) and chains:
            chains[-1].append(b)
        else:
            chains.append([b])
    for chain in chains:
        cut = next((k for k, b in enumerate(chain) if b.skip), len(chain))
        if cut:
            yield Program(tuple(chain[:cut])), None
        if cut < len(chain):
            yield Program(tuple(chain[cut:])), f"marked {SKIP!r} (or continues a block that is)"


def _doc_blocks(doc: str) -> list[Block]:
    return parse_blocks(doc, (ROOT / doc).read_text(encoding="utf-8"))


ALL = [(p, why) for doc in DOCS for p, why in programs(_doc_blocks(doc))]


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "PYTHONWARNINGS")
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"  # small models; blocks run side by side
    env["MPLBACKEND"] = "Agg"
    return env


def _run(program: Program, where: Path) -> subprocess.CompletedProcess[str]:
    """Run ``program`` as a script, with ``where/cwd`` (empty) as the working directory."""
    script, cwd = where / "doc_block.py", where / "cwd"
    cwd.mkdir()
    script.write_text(program.source, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def run_program(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[Program], subprocess.CompletedProcess[str]]]:
    pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)))
    started: dict[str, Future[subprocess.CompletedProcess[str]]] = {}

    def start(p: Program) -> Future[subprocess.CompletedProcess[str]]:
        if p.id not in started:
            started[p.id] = pool.submit(_run, p, tmp_path_factory.mktemp("doc-block"))
        return started[p.id]

    if "PYTEST_XDIST_WORKER" not in os.environ:  # (under xdist, the workers are the parallelism)
        for item in request.session.items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if item.module is request.module and "program" in params and not item.get_closest_marker("skip"):
                start(params["program"])
    yield lambda p: start(p).result()
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize(
    "program",
    [pytest.param(p, id=p.id, marks=[pytest.mark.skip(reason=why)] if why else []) for p, why in ALL],
)
def test_block_runs(
    program: Program, run_program: Callable[[Program], subprocess.CompletedProcess[str]]
) -> None:
    try:
        done = run_program(program)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{program.id} ran for more than {TIMEOUT} s:\n{program.listing()}", pytrace=False)
    if done.returncode != 0:
        pytest.fail(
            f"{program.id} exited with status {done.returncode}:\n{program.listing()}\n"
            f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-6000:]}",
            pytrace=False,
        )


def test_the_guide_runs_whole() -> None:
    """docs/manager.md is tested completely: many programs, none skipped, no dangling ``# continues``."""
    blocks = _doc_blocks(GUIDE)
    runs = [p for p, why in programs(blocks) if why is None]
    assert len(runs) >= 10 and all(why is None for _, why in programs(blocks))
    for doc in DOCS:
        python = [b for b in _doc_blocks(doc) if b.lang in PYTHON]
        assert python, f"{doc} has no python block"
        assert not continues(python[0]), f"{doc}:{python[0].line} continues nothing"


def _normalize(text: str) -> str:
    lines = [TIME.sub("YYYY-MM-DD HH:MM:SS", line).rstrip() for line in text.splitlines()]
    return "\n".join(lines).strip("\n")


def _sessions(block: Block) -> list[tuple[str, str]]:
    """The ``$ command`` lines of a console block, each with the output shown after it."""
    out: list[tuple[str, list[str]]] = []
    for line in block.source.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
    return [(cmd, "\n".join(shown)) for cmd, shown in out]


def test_the_guides_cli_output_is_real(tmp_path: Path) -> None:
    blocks = _doc_blocks(GUIDE)
    consoles = [
        b
        for b in blocks
        if b.lang == "console" and any(s.startswith("$ cairn ") for s in b.source.splitlines())
    ]
    assert consoles, f"{GUIDE} shows no cairn command"
    before = [p for p, _ in programs(blocks) if p.blocks[-1].line < consoles[0].line]
    setup = _run(before[-1], tmp_path)
    assert setup.returncode == 0, setup.stderr
    for block in consoles:
        for command, shown in _sessions(block):
            args = shlex.split(command)
            assert args[0] == "cairn", f"{GUIDE}:{block.line}: {command}"
            done = subprocess.run(
                [sys.executable, "-m", "cairn", *args[1:]],
                cwd=tmp_path / "cwd",
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
            assert _normalize(done.stdout) == _normalize(shown), (
                f"{GUIDE}, the console block at line {block.line}: `{command}` printed\n{done.stdout}"
            )


def test_the_block_parser() -> None:
    text = textwrap.dedent(
        """\
        ```python
        a = 1
        ```
        ```python
        # continues
        assert a == 1
        ```
        - in a list:

          ````python
          ```
          b = 2
          ````
        ~~~sh
        echo hello
        ~~~
        <!-- doc-test: skip -->
        ```python
        undefined_name
        ```
        ```python
        # continues
        undefined_name_too
        ```
        ```py
        # doc-test: skip
        ```
        """
    )
    blocks = parse_blocks("x.md", text)
    assert [(b.line, b.lang, b.skip) for b in blocks] == [
        (1, "python", False),
        (4, "python", False),
        (10, "python", False),
        (14, "sh", False),
        (18, "python", True),
        (21, "python", False),
        (25, "py", True),
    ]
    assert blocks[2].source == "```\nb = 2\n"
    found = list(programs(blocks))
    assert [(p.id, why is None) for p, why in found] == [
        ("x.md:1+4", True),
        ("x.md:10", True),
        ("x.md:18+21", False),
        ("x.md:25", False),
    ]
    assert found[0][0].source == "a = 1\n# continues\nassert a == 1\n"
