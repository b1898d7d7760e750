"""Running ``llmprobe`` in-process, as a user would, and checking the one-line error promise."""

from __future__ import annotations

import io
import sys

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
