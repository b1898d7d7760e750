"""User-facing errors.

Anything the user can fix (a bad path, a malformed line, an impossible option) is raised as
:class:`UsageError`. The CLI prints it as one line on stderr and exits non-zero without a traceback;
everything else is a bug and keeps its traceback. A bad argument of a library function is a
:class:`ParameterError` naming the parameter (``min_mass: must be in [0, 1)``), as a notebook user
wrote it; the CLI shows the flag that sets it instead (``--min-mass: ...``, :mod:`llmprobe.cli.options`).
"""

from __future__ import annotations


class UsageError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (its name when it has none), for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ParameterError(UsageError):
    """A library function's argument the user can fix; ``parameter`` is its name in the function's signature."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message, where=parameter)
        self.parameter = parameter
        self.message = message


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` on every supported Python (3.10 has ``__notes__`` only by convention): the
    command line's one error line ends with the notes (how to resume, what was kept)."""
    exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]
