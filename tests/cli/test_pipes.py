"""Pipes (issue 16, item 9): a reader that leaves early ends llmprobe quietly; progress shows rate and ETA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
SIGPIPE_STATUS = 141  # what a shell shows for a tool stopped by a closed pipe


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmprobe", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _first_line_then_close(args: list[str]) -> tuple[int, bytes, str]:
    """Run the CLI, read one line of its stdout and close the pipe, as ``| head -1`` does."""
    process = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
    first = process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read().decode()
    return process.wait(timeout=120), first, err


def test_trace_into_a_closed_pipe_stops_quietly(tiny_model_dir, tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"Once upon a time there was prompt {i}\n" for i in range(60)))
    code, first, err = _first_line_then_close(["trace", str(prompts), "--model", str(tiny_model_dir), "-o", "-",
                                               "--format", "jsonl", "--batch-size", "2"])
    assert code == SIGPIPE_STATUS, err
    assert json.loads(first)  # what was written before the reader left is whole
    assert "Traceback" not in err and "Exception ignored" not in err and "error" not in err
    assert "tracing" not in err  # no frozen progress bar left behind


def test_inspect_into_a_closed_pipe_stops_quietly(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    trace = tmp_path / "t.parquet"
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\nOnce upon a time\n")
    code, _, err = run_cli(["trace", str(prompts), "-o", str(trace), "--model", str(tiny_model_dir), "-q"],
                           capsysbinary, monkeypatch)
    assert code == 0, err
    code, first, err = _first_line_then_close(["inspect", str(trace)])
    assert code == SIGPIPE_STATUS and err == "", err
    assert b"prompt 1" in first


def test_progress_shows_rate_and_time_left(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\nOnce upon a time\nI just flipped a coin\n")
    code, _, err = run_cli(["trace", str(prompts), "-o", str(tmp_path / "t.parquet"), "--model", str(tiny_model_dir),
                            "--batch-size", "1"], capsysbinary, monkeypatch)
    assert code == 0, err
    bar = next(line for line in err.splitlines() if line.startswith("tracing"))
    assert re.search(r"3/3 [\d.]+(/s| s/it) \d+:\d\d:\d\d eta \d+:\d\d:\d\d", bar), bar
