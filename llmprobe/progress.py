"""How library code reports progress without knowing who listens.

The trace runner, the martingale sampler and the figure writers take a :class:`Reporter`: the CLI
passes its rich console on stderr (:class:`llmprobe.cli.output.Output`), a notebook passes nothing
and gets :data:`SILENT`. Library code never prints: results are return values, and only the CLI
decides what goes to stdout.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Protocol
from collections.abc import Callable, Iterator


class Reporter(Protocol):
    quiet: bool

    def log(self, message: str) -> None: ...

    def progress(self, description: str, total: int | None) -> AbstractContextManager[Callable[[int], None]]:
        """A context that yields ``advance(n)``."""
        ...


class Silent:
    """A reporter that reports nothing."""

    quiet = True

    def log(self, message: str) -> None:
        pass

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        yield lambda n: None


SILENT = Silent()


def plural(count: int, noun: str) -> str:
    """``1 prompt``, ``2 prompts``: counts in messages read as English."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
