"""One object decides where output goes: data to stdout, everything for humans to stderr.

Pipelines (`llmprobe experiment ... | llmprobe trace - ... | llmprobe fit-posterior -`) rely on stdout
carrying nothing but data, so progress bars, tables meant for people, logs and warnings all go
through :class:`Output`, which writes them to stderr (or nowhere with ``--quiet``). It is the CLI's
:class:`llmprobe.progress.Reporter`.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Output:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.err = Console(stderr=True, quiet=quiet, highlight=False)

    def log(self, message: str) -> None:
        self.err.print(message)

    def show(self, renderable: object) -> None:
        """A table or panel for people: stderr, so stdout stays data."""
        self.err.print(renderable)

    def data_text(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """A progress bar on stderr; yields ``advance(n)``."""
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.err,
            disable=self.quiet,
            transient=False,
        )
        with progress:
            task = progress.add_task(description, total=total)
            yield lambda n: progress.advance(task, n)


def error_line(message: str) -> None:
    """The single stderr line for a user error."""
    sys.stderr.write(f"llmprobe: error: {message}\n")
    sys.stderr.flush()
