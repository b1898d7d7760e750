"""One object decides where output goes: results to stdout, everything else for people to stderr.

A command's result (the table of ``inspect``, ``models``, ``fit-prior``, ``fit-posterior``,
``continuity``, ``martingale``) goes to stdout, so ``llmprobe inspect t.parquet > t.txt`` keeps it.
Progress bars, logs, hints and warnings go to stderr (or nowhere with ``--quiet``). It is the CLI's
:class:`llmprobe.progress.Reporter`.

One output path: such a command builds a :class:`View` of its result (:mod:`llmprobe.cli.views`) and
hands it to :meth:`Output.result`, which writes it in the ``format`` the app parsed once from
``--format table|tsv|json`` / ``--json`` (:data:`llmprobe.cli.options.RESULT`): tables for people,
TSV rows (:func:`tsv_text`) or the JSON document. When stdout carries data (tsv, json), whatever
the view still shows people (:meth:`View.beside_data`) moves to stderr, so pipelines
(`llmprobe experiment ... | llmprobe trace - ... | llmprobe fit-posterior -`) see nothing but data.

Off a terminal (a pipe, a file) tables are laid out at full width: rich would otherwise fit them to
80 columns and cut numbers to ``0.06…``.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol
from collections.abc import Callable, Iterable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

if TYPE_CHECKING:
    import pandas as pd

UNLIMITED_WIDTH = 100_000  # columns a table may take off a terminal: never cut


class View(Protocol):
    """A command's result in every format it is written in."""

    def tables(self) -> Iterable[object]:
        """What people read (``--format table``): rich renderables or lines, in order."""

    def beside_data(self, fmt: str) -> Iterable[object]:
        """What people still read, on stderr, when stdout carries ``fmt`` (tsv or json) data."""

    def rows(self) -> pd.DataFrame:
        """``--format tsv``: one table, every number at full precision."""

    def json(self) -> Iterable[str]:
        """``--format json`` / ``--json``: the JSON document, or JSON lines, in pieces written as they come."""


class Output:
    """``format``: how :meth:`result` writes a result, ``table``, ``tsv`` or ``json``; anything but ``table``
    puts data on stdout and moves what people read to stderr."""

    def __init__(self, quiet: bool = False, *, format: str = "table") -> None:
        self.quiet = quiet
        self.format = format
        self.err = _console(stderr=True, quiet=quiet)
        self.results = self.err if format != "table" else _console(stderr=False, quiet=False)

    def result(self, view: View) -> None:
        """The one place a command's result is written, in :attr:`format`."""
        if self.format == "table":
            for renderable in view.tables():
                self.show(renderable)
            return
        for renderable in view.beside_data(self.format):
            self.show(renderable)
        for text in view.json() if self.format == "json" else [tsv_text(view.rows())]:
            self.data_text(text)

    def log(self, message: str) -> None:
        self.err.print(message)

    def show(self, renderable: object) -> None:
        """A command's result for people: stdout, unless stdout carries data (then stderr)."""
        self.results.print(renderable)

    def data_text(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """A progress bar on stderr with count, rate and time left; yields ``advance(n)``."""
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.err,
            disable=self.quiet,
            transient=False,
        )
        with progress:
            task = progress.add_task(description, total=total)
            try:
                yield lambda n: progress.advance(task, n)
            except BrokenPipeError:  # the reader left (`| head`): no failure to show, so the bar goes away
                progress.live.transient = True
                raise


class RateColumn(ProgressColumn):
    """Items (prompts, states) per second, or seconds per item when slower than one a second."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("-/s", style="progress.data.speed")
        return Text(f"{speed:.1f}/s" if speed >= 1 else f"{1 / speed:.1f} s/it", style="progress.data.speed")


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """rich would exit 1 itself; the CLI's one handler (:func:`llmprobe.cli.app.main`) stops quietly."""
        self.quiet = True
        raise BrokenPipeError


def _console(*, stderr: bool, quiet: bool) -> Console:
    console = _Console(stderr=stderr, quiet=quiet, highlight=False)
    if not console.is_terminal:
        console.width = UNLIMITED_WIDTH
    return console


def tsv_text(frame: pd.DataFrame) -> str:
    """Tab-separated values at full precision: floats as Python's shortest round-trip repr, missing values
    empty, booleans ``true``/``false``, lists and dicts as JSON, and in text ``\\``, tab, newline and carriage
    return escaped as ``\\\\``, ``\\t``, ``\\n``, ``\\r``, other control characters and line separators
    as ``\\uXXXX`` (so every row is one line with one tab between cells, however lines are split)."""
    lines = ["\t".join(_tsv_cell(str(c)) for c in frame.columns)]
    lines += ["\t".join(_tsv_cell(v) for v in row) for row in frame.itertuples(index=False, name=None)]
    return "\n".join(lines) + "\n"


def _tsv_cell(value: Any) -> str:
    if hasattr(value, "tolist"):  # numpy arrays and scalars: Python lists and numbers
        value = value.tolist()
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)  # ASCII: no raw line separator inside a cell
    if value is None or type(value).__name__ == "NAType" or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return "".join(TSV_ESCAPES.get(ch) or (f"\\u{ord(ch):04x}" if _breaks_lines(ch) else ch) for ch in str(value))


TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _breaks_lines(ch: str) -> bool:
    """Control characters and the Unicode line separators (str.splitlines splits on several of them)."""
    return ord(ch) < 0x20 or 0x7f <= ord(ch) <= 0x9f or ch in "\u2028\u2029"


def error_line(message: str) -> None:
    """The single stderr line for a user error."""
    sys.stderr.write(f"llmprobe: error: {message}\n")
    sys.stderr.flush()
