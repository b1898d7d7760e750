"""Running ``llmprobe`` in-process, as a user would, and checking the one-line error promise."""

from __future__ import annotations

import io
import sys

from llmprobe.cli import main


def run_cli(args: list[str], capsysbinary, monkeypatch, stdin: bytes = b"") -> tuple[int, bytes, str]:
    """Exit code, stdout bytes and stderr text of ``llmprobe ARGS`` with ``stdin`` as standard input."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    monkeypatch.setattr(sys, "argv", ["llmprobe", *args])
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit 2, exactly one ``llmprobe: error:`` line on stderr naming ``needles``, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("llmprobe: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
