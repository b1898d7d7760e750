"""Per-n tables over templates (llmprobe.analysis.protocols) and `fit-posterior --by template --gamma-variant`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmprobe.analysis.marks import CategoryMarks
from llmprobe.analysis.protocols import per_mark_statistics, template_tables
from llmprobe.bayes.peers import decayed_pseudocount_predictive
from llmprobe.experiments import generate, load_experiment
from llmprobe.tracing.schema import encode_metadata, trace_schema
from tests.cli_helpers import assert_one_line_error, run_cli

PEERS = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "peers"


def _marks(probs, theta, n, template) -> CategoryMarks:
    m = len(probs)
    frame = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(m)], "prompt_index": range(m), "position": 0,
                          "sequence": range(m), "n": n, "layout": "per-n", "template": template})
    counts = np.zeros((m, 2))
    return CategoryMarks("synthetic", ["heads", "tails"], frame, np.asarray(probs, float), np.ones(m), counts,
                         np.asarray(theta, float), {}, {})


def test_mean_and_std_over_templates():
    # two templates at n = 1 and θ = (0.7, 0.3): P(heads) 0.6 and 0.9 (template 1 has two marks: 0.8, 1.0)
    probs = [[0.6, 0.4], [0.8, 0.2], [1.0, 0.0], [0.5, 0.5]]
    theta = [[0.7, 0.3]] * 3 + [[0.5, 0.5]]
    cm = _marks(probs, theta, n=[1, 1, 1, 1], template=[0, 1, 1, 0])
    bayes = np.full((4, 2), 0.5)
    per_mark = per_mark_statistics(cm, bayes)
    np.testing.assert_allclose(per_mark["tvd_theta"], [0.1, 0.1, 0.3, 0.0])
    kl = 0.7 * np.log2(0.7 / 0.6) + 0.3 * np.log2(0.3 / 0.4)
    assert per_mark["kl_theta_bits"][0] == pytest.approx(kl)
    assert np.isinf(per_mark["kl_theta_bits"][2])  # θ gives tails 0.3, the model 0
    tables = template_tables(per_mark)
    row = tables["by_theta_n"].set_index("theta").loc["[0.7, 0.3]"]
    assert row["templates"] == 2 and row["marks"] == 3
    assert row["p_first_model_mean"] == pytest.approx((0.6 + 0.9) / 2)
    assert row["p_first_model_std"] == pytest.approx(0.15)  # population std of {0.6, 0.9}
    assert row["tvd_theta_mean"] == pytest.approx((0.1 + 0.2) / 2)
    by_n = tables["by_n"].iloc[0]
    # each template averaged over every θ first: template 0 {0.6, 0.5} -> 0.55, template 1 -> 0.9
    assert by_n["p_first_model_mean"] == pytest.approx((0.55 + 0.9) / 2)
    assert by_n["tvd_bayes_mean"] == pytest.approx(((0.1 + 0.0) / 2 + (0.3 + 0.5) / 2) / 2)


def test_records_without_templates_are_one_template():
    cm = _marks([[0.6, 0.4], [0.7, 0.3]], [[0.5, 0.5]] * 2, n=[0, 0], template=[0, 0])
    cm.marks = cm.marks.drop(columns="template")
    row = template_tables(per_mark_statistics(cm, np.full((2, 2), 0.5)))["by_n"].iloc[0]
    assert row["templates"] == 1 and row["p_first_model_std"] == 0.0


def _filter_trace(path: Path, records: list[dict], gamma: float) -> Path:
    """A trace whose category scores at each mark are Gupta et al.'s decayed-pseudo-count filter."""
    targets = records[0]["targets"]
    rows = []
    for index, record in enumerate(records):
        positions = [m["n"] for m in record["marks"]]
        probs = decayed_pseudocount_predictive([record["outcomes"]], [0] * len(positions), positions, 2, gamma)
        for mark_index, (mark, p) in enumerate(zip(record["marks"], probs)):
            scores = np.log(0.9 * p).tolist()
            rows.append({
                "prompt_index": index, "prompt_id": record["id"], "position": mark_index, "phase": "prompt",
                "token_id": 0, "token": "x", "next_token_id": None, "next_token": None, "next_logprob": None,
                "next_rank": None, "entropy": 1.0, "topk_ids": [0], "topk_logprobs": [0.0],
                "target_logprobs": scores, "target_seq_logprobs": scores,
                "mark_index": mark_index, "mark": json.dumps({**mark, "exact": True}),
                "meta": json.dumps({k: v for k, v in record.items() if k not in ("id", "prompt", "marks")}),
            })
    meta = {"model": "filter", "targets": [{"text": t, "token_ids": [i]} for i, t in enumerate(targets)]}
    schema = trace_schema(top_k=1, n_targets=len(targets))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.with_metadata(encode_metadata(meta, None))), path)
    return path


def test_cli_by_template_and_gupta_gamma_on_the_posterior_chain(tmp_path, capsysbinary, monkeypatch):
    records = list(generate(load_experiment(PEERS / "coin_chain.toml")))
    trace = _filter_trace(tmp_path / "chain.parquet", records, gamma=0.8)
    code, stdout, err = run_cli(["fit-posterior", str(trace), "--by", "template", "--gamma-variant", "gupta",
                                 "--prior", "uniform", "--bootstrap", "5", "--json"], capsysbinary, monkeypatch)
    assert code == 0, err
    summary = json.loads(stdout)[0]
    assert summary["gamma_variants"]["gupta"]["gamma"] == pytest.approx(0.8, abs=1e-3)
    by_n = summary["by_template"]["by_n"]
    assert [row["n"] for row in by_n] == list(range(61)) and all(row["templates"] == 3 for row in by_n)
    assert all(row["p_first_model_std"] < 1e-6 for row in by_n)  # shared flips: every template the same
    heads_after_0 = by_n[0]
    assert heads_after_0["p_first_model_mean"] == pytest.approx(0.5) and heads_after_0["tvd_theta_mean"] == pytest.approx(0.25)


def test_cli_bad_choices_are_one_line(tmp_path, capsysbinary, monkeypatch):
    code, _, err = run_cli(["fit-posterior", "missing.parquet", "--by", "prompt"], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "--by", "template")
    code, _, err = run_cli(["fit-posterior", "missing.parquet", "--gamma-variant", "falck"], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "--gamma-variant", "gupta")


def test_independent_per_n_prompts_each_fit_as_their_own_sequence(tmp_path, capsysbinary, monkeypatch):
    """coin_icl.toml: n = 0 prompts are sequences without outcomes; the laplace-rule model matches Bayes."""
    records = list(generate(load_experiment(PEERS / "coin_icl.toml")))
    trace = _filter_trace(tmp_path / "icl.parquet", records, gamma=1.0)
    code, stdout, err = run_cli(["fit-posterior", str(trace), "--by", "template", "--prior", "uniform",
                                 "--bootstrap", "5", "--json"], capsysbinary, monkeypatch)
    assert code == 0, err
    summary = json.loads(stdout)[0]
    assert summary["n_sequences"] == len(records) == 165
    by_n = summary["by_template"]["by_n"]
    assert [row["n"] for row in by_n] == [0, 1, 3, 10, 20]
    assert all(row["tvd_bayes_mean"] < 1e-6 and row["marks"] == 33 for row in by_n)
    by_theta_n = summary["by_template"]["by_theta_n"]
    assert len(by_theta_n) == 11 * 5 and {row["templates"] for row in by_theta_n} == {3}


def test_the_python_api_takes_by_and_gamma_variant_as_the_cli_does(tmp_path, capsysbinary, monkeypatch):
    """``llmprobe.fit_posterior(trace, by="template", gamma_variant="gupta")`` is ``--by template
    --gamma-variant gupta``."""
    import llmprobe

    records = list(generate(load_experiment(PEERS / "coin_chain.toml")))[:6]
    trace = _filter_trace(tmp_path / "chain.parquet", records, gamma=0.8)
    code, stdout, err = run_cli(["fit-posterior", str(trace), "--by", "template", "--gamma-variant", "gupta",
                                 "--prior", "uniform", "--bootstrap", "3", "--json", "-q"], capsysbinary, monkeypatch)
    assert code == 0, err
    fit = llmprobe.fit_posterior(trace, by="template", gamma_variant="gupta", prior="uniform", bootstrap=3)
    assert fit.summary == json.loads(stdout)[0]
    assert fit.peers.gamma.gamma == pytest.approx(0.8, abs=1e-3)
    assert fit.peers.by_template["by_n"]["templates"].tolist() == [3] * 61
    assert "by_template" not in llmprobe.fit_posterior(trace, prior="uniform", bootstrap=3).summary
