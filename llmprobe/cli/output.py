"""One object decides where output goes: results to stdout, everything else for people to stderr.

A command's result (the table of ``inspect``, ``models``, ``fit-prior``, ``fit-posterior``,
``continuity``, ``martingale``) goes to stdout, so ``llmprobe inspect t.parquet > t.txt`` keeps it.
Progress bars, logs, hints and warnings go to stderr (or nowhere with ``--quiet``). When stdout
already carries data (``-o -``, ``--json``, a prior JSON piped on), the command builds its
:class:`Output` with ``stdout_is_data=True`` and the human tables move to stderr, so pipelines
(`llmprobe experiment ... | llmprobe trace - ... | llmprobe fit-posterior -`) still see nothing but
data. It is the CLI's :class:`llmprobe.progress.Reporter`.

Off a terminal (a pipe, a file) tables are laid out at full width: rich would otherwise fit them to
80 columns and cut numbers to ``0.06…``.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

if TYPE_CHECKING:
    import pandas as pd

UNLIMITED_WIDTH = 100_000  # columns a table may take off a terminal: never cut


class Output:
    def __init__(self, quiet: bool = False, *, stdout_is_data: bool = False) -> None:
        self.quiet = quiet
        self.err = _console(stderr=True, quiet=quiet)
        self.results = self.err if stdout_is_data else _console(stderr=False, quiet=False)

    def log(self, message: str) -> None:
        self.err.print(message)

    def show(self, renderable: object) -> None:
        """A command's result for people: stdout, unless stdout carries data (then stderr)."""
        self.results.print(renderable)

    def data_text(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def data_tsv(self, frame: pd.DataFrame) -> None:
        """``--format tsv``: the table's columns as a header line, then one line per row (:func:`tsv_text`)."""
        self.data_text(tsv_text(frame))

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
