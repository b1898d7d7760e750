"""The project's static checks run in the suite (so CI runs them): ruff over every Python file with the
project's configuration (pyproject.toml, [tool.ruff]), and mypy over the rooms whose types are checked.

Both tools are pinned in the ``test`` extra, so a version bump that adds a rule is a deliberate change.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TYPED = ["llmprobe/bayes", "llmprobe/files.py", "llmprobe/tracing", "llmprobe/compare.py"]
"""Checked by mypy (--follow-imports=silent: the modules they import are read, not reported)."""


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_is_clean():
    result = run("ruff", "check", "--no-cache", "llmprobe", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean_on_the_typed_rooms():
    result = run("mypy", "--follow-imports=silent", "--no-incremental", *TYPED)
    assert result.returncode == 0, result.stdout + result.stderr
