"""fit-prior on traces mixing marked and unmarked prompts (defect 6) and on empty counts (defect 8)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.analysis.fits import fit_prior
from llmprobe.analysis.marks import category_marks
from llmprobe.tracing.reader import open_trace
from tests.analysis.fixtures import bayesian, records, write_trace
from tests.cli_helpers import assert_one_line_error, run_cli


def with_unmarked_prompts(path, probs: np.ndarray) -> None:
    """Append one unmarked prompt per row of ``probs``: a marked-less last position with target scores."""
    table = pq.read_table(path)
    first = table.slice(0, 1).to_pylist()[0]
    start = max(table.column("prompt_index").to_pylist()) + 1
    rows = [{**first, "prompt_index": start + i, "prompt_id": f"plain-{i}", "position": 3, "mark_index": None,
             "mark": None, "meta": None, "target_seq_logprobs": np.log(p).tolist(),
             "target_logprobs": np.log(p).tolist()} for i, p in enumerate(probs)]
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist(rows, schema=table.schema)]), path)


def test_unmarked_prompts_are_kept_beside_marked_ones(tmp_path):
    path = write_trace(tmp_path / "t.parquet", records("coin", 1, 3), bayesian([1.0], [[2.0, 2.0]]))
    plain = np.random.default_rng(0).dirichlet([3.0, 1.0], size=40)
    with_unmarked_prompts(path, plain)
    cm = category_marks(open_trace(path))
    assert len(cm) == 11 * 4 + 40
    assert set(cm.marks["prompt_id"]) >= {f"plain-{i}" for i in range(40)}
    result = fit_prior(cm, "1", 1, False, None, 0)
    assert result["n_rows"] == 11 * 4 + 40


def test_from_counts_at_n_zero_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    path = write_trace(tmp_path / "t.parquet", records("coin", 1, 3), bayesian([1.0], [[2.0, 2.0]]))
    code, _, err = run_cli(["fit-prior", str(path), "--from-counts", "--n", "0"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--n", "n >= 1")
    code, stdout, err = run_cli(["fit-prior", str(path), "--from-counts", "--n", "3", "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(stdout)["data"] == "counts"
