"""Every output gets the permissions the user's umask gives new files (issue 16, item 14), never 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from tests.analysis.test_fits import coin_records, synthetic_trace
from tests.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=[0o002])  # group-writable: neither the 0600 of mkstemp nor the default 022
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_follow_the_umask(umask, tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    trace = synthetic_trace(tmp_path / "coin.parquet", coin_records(sequences=2, n_max=4), np.array([1.0, 1.0]), 1.0)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n")
    commands = {
        "traced.parquet": ["trace", str(prompts), "--model", str(tiny_model_dir), "-o"],
        "coin.jsonl": ["experiment", str(ROOT / "configs/experiments/coin.toml"), "--n-max", "2", "-o"],
        "fit.parquet": ["fit-posterior", str(trace), "--bootstrap", "5", "-o"],
        "fit.csv": ["fit-posterior", str(trace), "--bootstrap", "5", "-o"],
        "prior.json": ["fit-prior", str(trace), "-o"],
        "icl.png": ["plot-icl", str(tmp_path / "fit.parquet"), "-o"],
        "report.html": ["report", str(trace), "-o"],
    }
    for name, args in commands.items():
        code, _, err = run_cli([*args, str(tmp_path / name), "-q"], capsysbinary, monkeypatch)
        assert code == 0, (name, err)
        assert mode(tmp_path / name) == 0o666 & ~umask, f"{name}: {oct(mode(tmp_path / name))}"
