"""read_trace gives columns pandas can use (issue 16, item 13): parsed marks, integer dtypes, labelled targets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.tracing.reader import read_trace
from llmprobe.tracing.schema import META_KEY, trace_schema
from tests.cli_helpers import run_cli


def test_marks_meta_integers_and_targets(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    text = "I just flipped a coin, and it came up heads, then"
    prompts.write_text(json.dumps({"id": "a", "prompt": text, "marks": [{"offset": 27, "n": 1}], "topic": "coin"})
                       + "\n")
    out = tmp_path / "t.parquet"
    code, _, err = run_cli(["trace", str(prompts), "-o", str(out), "--model", str(tiny_model_dir), "-q",
                            "--targets", " heads, tails"], capsysbinary, monkeypatch)
    assert code == 0, err
    frame = read_trace(out)
    marked = frame[frame["mark_index"].notna()]
    assert len(marked) == 1 and {k: marked["mark"].iloc[0][k] for k in ("offset", "n")} == {"offset": 27, "n": 1}
    assert frame["mark"].iloc[0] is None and frame["meta"].iloc[0] == {"topic": "coin"}
    for name in ("prompt_index", "position", "token_id", "next_token_id", "next_rank", "mark_index"):
        assert pd.api.types.is_integer_dtype(frame[name]), (name, frame[name].dtype)
    assert frame["next_rank"].isna().iloc[-1] and frame["next_rank"].iloc[0] >= 1
    lists = np.stack(frame["target_logprobs"])
    np.testing.assert_array_equal(frame["target_logprob[ heads]"], lists[:, 0])
    np.testing.assert_array_equal(frame["target_logprob[ tails]"], lists[:, 1])
    whole = frame["target_seq_logprob[ tails]"]
    assert whole.notna().sum() == 2 and whole.iloc[-1] == frame["target_seq_logprobs"].iloc[-1][1]  # mark + end


def test_traces_written_before_versioning_still_read(tmp_path):
    """No trace_format key, no vocabulary, marks as JSON text: what the first writers produced."""
    schema = trace_schema(top_k=2, n_targets=0)
    row = {"prompt_index": 0, "prompt_id": "1", "position": 0, "phase": "prompt", "token_id": 5, "token": "x",
           "next_token_id": None, "next_token": None, "next_logprob": None, "next_rank": None, "entropy": 1.0,
           "topk_ids": [1, 2], "topk_logprobs": [-0.5, -1.0], "mark_index": 0, "mark": '{"offset": 1}', "meta": None}
    old = pa.Table.from_pylist([row], schema=schema.with_metadata({META_KEY: json.dumps({"model": "m"}).encode()}))
    pq.write_table(old, tmp_path / "old.parquet")
    frame = read_trace(tmp_path / "old.parquet")
    assert frame["mark"].iloc[0] == {"offset": 1} and frame["meta"].iloc[0] is None
    assert list(frame["topk_tokens"].iloc[0]) == ["#1", "#2"]  # no vocabulary: ids stand in for strings
    assert frame.attrs["llmprobe"] == {"model": "m"}
    assert frame["next_rank"].isna().all() and str(frame["next_rank"].dtype) == "Int32"
