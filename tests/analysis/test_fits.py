"""fit-prior / fit-posterior end to end: synthetic traces with known answers, then the real model.

Synthetic traces are written in the real trace schema from real experiment prompts, with the
"model" predictions computed from a known Beta/Dirichlet prior and forgetting factor, so the whole
path — experiment -> trace schema -> category marks -> fits — is checked against the truth.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmprobe.analysis.fit_tables import FIT_META_KEY
from llmprobe.analysis.fits import fit_posterior, fit_prior
from llmprobe.analysis.marks import category_marks
from llmprobe.bayes import discounted_counts
from llmprobe.experiments import generate, load_experiment
from llmprobe.tracing.reader import open_trace
from llmprobe.tracing.schema import encode_metadata, trace_schema
from tests.cli_helpers import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]


def synthetic_trace(path: Path, records: list[dict], alpha: np.ndarray, gamma: float, mass: float = 0.8,
                    model: str = "synthetic") -> Path:
    """A trace whose target scores at each mark are a discounted Bayesian filter's predictions."""
    targets = records[0]["targets"]
    schema = trace_schema(top_k=1, n_targets=len(targets))
    rows = []
    for index, record in enumerate(records):
        counts = discounted_counts(np.asarray(record["outcomes"], dtype=int), gamma, len(targets))
        for mark_index, mark in enumerate(record["marks"]):
            predictive = (alpha + counts[mark["n"]]) / (alpha.sum() + counts[mark["n"]].sum())
            rows.append({
                "prompt_index": index, "prompt_id": record["id"], "position": mark_index, "phase": "prompt",
                "token_id": 0, "token": "x", "next_token_id": None, "next_token": None, "next_logprob": None,
                "next_rank": None, "entropy": 1.0, "topk_ids": [0], "topk_logprobs": [0.0],
                "target_logprobs": np.log(predictive * mass).tolist(),
                "target_seq_logprobs": np.log(predictive * mass).tolist(),
                "mark_index": mark_index, "mark": json.dumps({**mark, "exact": True}),
                "meta": json.dumps({k: v for k, v in record.items() if k not in ("id", "prompt", "marks")}),
            })
    meta = {"model": model, "targets": [{"text": t, "token_ids": [i]} for i, t in enumerate(targets)]}
    table = pa.Table.from_pylist(rows, schema=schema.with_metadata(encode_metadata(meta, None)))
    pq.write_table(table, path)
    return path


def coin_records(sequences=8, n_max=30, seed=5, layout="marks") -> list[dict]:
    experiment = load_experiment(ROOT / "configs/experiments/coin.toml")
    return list(generate(experiment, seed=seed, n_max=n_max, sequences=sequences, layout=layout))


def test_perfectly_bayesian_trace_is_recognised(tmp_path):
    alpha = np.array([2.0, 3.0])
    path = synthetic_trace(tmp_path / "bayes.parquet", coin_records(), alpha, gamma=1.0)
    cm = category_marks(open_trace(path))
    assert cm.categories == ["heads", "tails"]
    np.testing.assert_allclose(cm.mass, 0.8, rtol=1e-6)
    result = fit_posterior(cm, "fit", bootstrap=50, seed=0)
    s = result.summary
    assert s["mean_kl_bits"] < 1e-3
    assert s["forgetting"]["gamma"] == pytest.approx(1.0, abs=0.01)
    assert s["exact_bayes"]["alpha0"] == pytest.approx(alpha.sum(), rel=0.05)
    np.testing.assert_allclose(s["exact_bayes"]["prior_mean"], alpha / alpha.sum(), atol=0.01)
    assert not s["exact_bayes_rejected"]
    # the long table holds the closed-form posterior predictive (alpha_k + n_k) / (alpha_0 + n)
    table = result.table
    fitted_alpha = np.asarray(s["prior"]["alpha"])
    heads = table[table["category"] == "heads"]
    tails = table[table["category"] == "tails"]
    expected = (fitted_alpha[0] + heads["count"].to_numpy()) / (fitted_alpha.sum() + heads["n"].to_numpy())
    np.testing.assert_allclose(heads["bayes_prob"], expected, rtol=1e-9)
    np.testing.assert_allclose(heads["model_prob"].to_numpy() + tails["model_prob"].to_numpy(), 1.0)


def test_forgetting_model_recovers_gamma_and_rejects_exact_bayes(tmp_path):
    path = synthetic_trace(tmp_path / "forget.parquet", coin_records(sequences=12), np.array([1.5, 1.5]), gamma=0.85)
    s = fit_posterior(category_marks(open_trace(path)), "uniform", bootstrap=50, seed=0).summary
    assert s["forgetting"]["gamma"] == pytest.approx(0.85, abs=0.02)
    assert s["exact_bayes_rejected"]
    assert s["prior"]["kind"] == "uniform"


def test_unresponsive_model_flags_gamma_as_unidentifiable(tmp_path):
    """A model that ignores the examples fits an infinitely strong prior; its gamma means nothing."""
    records = coin_records(sequences=4, n_max=10)
    path = synthetic_trace(tmp_path / "flat.parquet", records, np.array([3e9, 7e9]), gamma=1.0)
    s = fit_posterior(category_marks(open_trace(path)), "fit", bootstrap=10, seed=0).summary
    assert not s["gamma_identifiable"]
    np.testing.assert_allclose(s["exact_bayes"]["prior_mean"], [0.3, 0.7], atol=1e-3)
    bayesian = synthetic_trace(tmp_path / "b.parquet", records, np.array([2.0, 2.0]), gamma=1.0)
    assert fit_posterior(category_marks(open_trace(bayesian)), "fit", 10, 0).summary["gamma_identifiable"]


def test_uniform_prior_predictive_is_laplace_rule(tmp_path):
    path = synthetic_trace(tmp_path / "t.parquet", coin_records(sequences=3, n_max=5), np.array([1.0, 1.0]), 1.0)
    result = fit_posterior(category_marks(open_trace(path)), "uniform", bootstrap=10, seed=0)
    heads = result.table[result.table["category"] == "heads"]
    np.testing.assert_allclose(heads["bayes_prob"], (1 + heads["count"]) / (2 + heads["n"]))
    assert result.summary["mean_kl_bits"] < 1e-9


def test_fit_prior_recovers_a_dirichlet_from_die_predictions(tmp_path):
    die = load_experiment(ROOT / "configs/experiments/die.toml")
    records = list(generate(die, seed=1, n_max=0, sequences=1))
    rng = np.random.default_rng(0)
    alpha = np.array([2.0, 1.0, 1.5, 3.0, 0.8, 1.2])
    samples = rng.dirichlet(alpha, size=3000)
    rows = []
    for i, _p in enumerate(samples):
        record = {**records[0], "id": f"d{i}", "sequence": i}
        rows.append(record)
    path = synthetic_trace(tmp_path / "die.parquet", rows, alpha, 1.0)
    # overwrite the predictions with the Dirichlet samples themselves: fit-prior must recover alpha
    table = pq.read_table(path)
    lp = pa.array(np.log(samples).astype(np.float32).tolist(), table.schema.field("target_seq_logprobs").type)
    table = table.set_column(table.schema.get_field_index("target_seq_logprobs"), "target_seq_logprobs", lp)
    pq.write_table(table, path)
    result = fit_prior(category_marks(open_trace(path)), "1", 3, False, None, 0)
    np.testing.assert_allclose(result["mixture"]["alphas"][0], alpha, rtol=0.08)
    assert result["categories"] == ["1", "2", "3", "4", "5", "6"]


def test_cli_fit_prior_and_posterior_with_prior_file(tmp_path, capsysbinary, monkeypatch):
    trace = synthetic_trace(tmp_path / "t.parquet", coin_records(sequences=6, n_max=10), np.array([2.0, 2.0]), 1.0)
    prior = tmp_path / "prior.json"
    code, stdout, err = run_cli(["fit-prior", str(trace), "--components", "auto", "--max-components", "2", "-o",
                            str(prior)], capsysbinary, monkeypatch)
    assert code == 0, err
    assert "BIC" in stdout.decode() and "BIC" not in err  # -o given: the tables are the result (issue 16)
    document = json.loads(prior.read_text())
    assert document["categories"] == ["heads", "tails"] and document["mixture"]["weights"]
    out = tmp_path / "fit.parquet"
    code, stdout, err = run_cli(["fit-posterior", str(trace), "--prior", str(prior), "-o", str(out), "--json",
                                 "--bootstrap", "20"], capsysbinary, monkeypatch)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary[0]["prior"]["kind"] == "file"
    frame = read_fit(out)
    assert {"trace", "prompt_id", "sequence", "n", "category", "count", "theta", "model_prob", "bayes_prob",
            "mass", "tv", "kl_bits", "entropy_model_bits", "entropy_bayes_bits"} <= set(frame.columns)
    assert json.loads(pq.read_schema(out).metadata[FIT_META_KEY])[0]["trace"] == "synthetic"


def read_fit(path):
    return pq.read_table(path).to_pandas()


def test_cli_compares_several_traces(tmp_path, capsysbinary, monkeypatch):
    records = coin_records(sequences=4, n_max=8)
    a = synthetic_trace(tmp_path / "a.parquet", records, np.array([2.0, 2.0]), 1.0, model="model-a")
    b = synthetic_trace(tmp_path / "b.parquet", records, np.array([2.0, 2.0]), 0.7, model="model-b")
    code, stdout, err = run_cli(["fit-posterior", str(a), str(b), "--json", "--bootstrap", "20"], capsysbinary,
                                monkeypatch)
    assert code == 0, err
    assert "side by side" in err and "model-a" in err and "model-b" in err
    gammas = [s["forgetting"]["gamma"] for s in json.loads(stdout)]
    assert gammas[0] > 0.98 and gammas[1] == pytest.approx(0.7, abs=0.03)


def test_fit_errors_are_one_line(tmp_path, tiny_model_dir, capsysbinary, monkeypatch):
    plain = tmp_path / "plain.parquet"
    run_cli(["trace", str(ROOT / "configs/prompts/demo.txt"), "-o", str(plain), "--model", str(tiny_model_dir),
             "-q"], capsysbinary, monkeypatch)
    code, _, err = run_cli(["fit-posterior", str(plain)], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "target_seq_logprobs")
    trace = synthetic_trace(tmp_path / "t.parquet", coin_records(sequences=2, n_max=3), np.array([1.0, 1.0]), 1.0)
    code, _, err = run_cli(["fit-posterior", str(trace), "--prior", str(tmp_path / "none.json")], capsysbinary,
                           monkeypatch)
    assert_one_line_error(code, err, "none.json", "no such prior file")
    code, _, err = run_cli(["fit-prior", str(trace), "--components", "two"], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "--components")
    code, _, err = run_cli(["experiment", str(tmp_path / "missing.toml")], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "missing.toml")


@pytest.mark.real_model
def test_real_model_coin_pipeline(tmp_path, real_loaded):
    """experiment | trace - | fit-posterior -, as pipes between real processes on the default model."""
    import subprocess

    from llmprobe.model.sources import cache_dir

    env_cache = {"LLMPROBE_CACHE": str(cache_dir())}
    import os

    env = {**os.environ, **env_cache}
    cli = [sys.executable, "-m", "llmprobe"]
    experiment = subprocess.run([*cli, "experiment", str(ROOT / "configs/experiments/coin.toml"), "--n-max", "8",
                                 "--sequences", "1"], capture_output=True, env=env, check=True)
    traced = subprocess.run([*cli, "trace", "-", "-o", "-", "-q"], input=experiment.stdout, capture_output=True,
                            env=env)
    assert traced.returncode == 0, traced.stderr.decode()
    fitted = subprocess.run([*cli, "fit-posterior", "-", "--json", "--bootstrap", "20"], input=traced.stdout,
                            capture_output=True, env=env)
    assert fitted.returncode == 0, fitted.stderr.decode()
    summary = json.loads(fitted.stdout)[0]
    assert summary["trace"] == "SmolLM2-135M-Instruct"
    assert summary["n_marks"] == 11 * 9  # 11 biases x 1 sequence x (8 + 1) marks
    assert 0 < summary["mean_mass"] <= 1 and summary["mean_tv"] >= 0
    assert "model vs Bayes" in fitted.stderr.decode()
