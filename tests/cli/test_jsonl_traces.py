"""JSONL traces read back like Parquet (issue 16, item 5): a header record carries metadata and vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from llmprobe.tracing.reader import read_trace
from tests.cli_helpers import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def coin_prompts(tmp_path, capsysbinary, monkeypatch) -> bytes:
    code, stdout, err = run_cli(["experiment", str(ROOT / "configs/experiments/coin.toml"), "--n-max", "3",
                                 "--sequences", "1"], capsysbinary, monkeypatch)
    assert code == 0, err
    return stdout


def traced(fmt: str, prompts: bytes, model: Path, capsysbinary, monkeypatch) -> bytes:
    code, stdout, err = run_cli(["trace", "-", "-o", "-", "--format", fmt, "--model", str(model), "--top-k", "4",
                                 "-q"], capsysbinary, monkeypatch, stdin=prompts)
    assert code == 0, err
    return stdout


def test_jsonl_trace_pipes_into_fit_posterior(coin_prompts, tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    jsonl = traced("jsonl", coin_prompts, tiny_model_dir, capsysbinary, monkeypatch)
    parquet = traced("parquet", coin_prompts, tiny_model_dir, capsysbinary, monkeypatch)
    fits = []
    for data in (jsonl, parquet):
        code, stdout, err = run_cli(["fit-posterior", "-", "--json", "--bootstrap", "10", "--min-mass", "0", "-q"], capsysbinary,
                                    monkeypatch, stdin=data)
        assert code == 0, err
        fits.append(json.loads(stdout))
    assert fits[0] == fits[1]
    (tmp_path / "t.jsonl").write_bytes(jsonl)
    (tmp_path / "t.parquet").write_bytes(parquet)
    from_jsonl, from_parquet = read_trace(tmp_path / "t.jsonl"), read_trace(tmp_path / "t.parquet")
    assert from_jsonl.attrs["llmprobe"]["targets"] == from_parquet.attrs["llmprobe"]["targets"]
    pd.testing.assert_frame_equal(from_jsonl, from_parquet)  # token strings come from the header's vocabulary
    code, stdout, err = run_cli(["inspect", str(tmp_path / "t.jsonl"), "--prompt", "coin-s0000"], capsysbinary,
                                monkeypatch)
    assert code == 0 and b"coin-s0000" in stdout, err


def test_traces_that_cannot_be_read_back_are_refused_clearly(coin_prompts, tiny_model_dir, tmp_path, capsysbinary,
                                                            monkeypatch):
    csv = traced("csv", coin_prompts, tiny_model_dir, capsysbinary, monkeypatch)
    code, _, err = run_cli(["fit-posterior", "-"], capsysbinary, monkeypatch, stdin=csv)
    assert_one_line_error(code, err, "<stdin>", "CSV trace cannot be read back", "--format jsonl")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt_index": 0}\n')
    code, _, err = run_cli(["inspect", str(rows)], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "rows.jsonl", "no header record")
