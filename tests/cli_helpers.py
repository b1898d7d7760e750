"""Running ``llmprobe`` in-process, as a user would, and checking the one-line error promise."""

from __future__ import annotations

import io
import sys

import pytest

from llmprobe.cli import main


def run_cli(args: list[str], capture, monkeypatch, stdin: bytes = b"") -> tuple[int, bytes | str, str]:
    """Exit code, stdout and stderr text of ``llmprobe ARGS`` with ``stdin`` as standard input.

    ``capture`` is pytest's ``capsysbinary`` (stdout as bytes) or ``capsys`` (stdout as text).
    """
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    monkeypatch.setattr(sys, "argv", ["llmprobe", *args])
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capture.readouterr()
    return code, out, err.decode() if isinstance(err, bytes) else err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit 2, exactly one ``llmprobe: error:`` line on stderr naming ``needles``, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("llmprobe: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def run_cli_outside_a_test(args: list[str]) -> tuple[int, str, str]:
    """``run_cli`` for a module- or session-scoped fixture, which cannot take capsys and monkeypatch."""
    monkeypatch = pytest.MonkeyPatch()
    capture = _Capture()
    try:
        return run_cli(args, capture, monkeypatch)
    finally:
        capture.restore()
        monkeypatch.undo()


class _Capture:
    """capsys for a fixture: stdout/stderr swapped for buffers while the CLI runs."""

    def __init__(self) -> None:
        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()

    def readouterr(self) -> tuple[str, str]:
        return sys.stdout.getvalue(), sys.stderr.getvalue()

    def restore(self) -> None:
        sys.stdout, sys.stderr = self._saved
