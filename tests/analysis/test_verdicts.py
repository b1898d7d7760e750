"""fit-posterior's verdict on synthetic traces whose answer is known, and its new options' errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmprobe.analysis.fits import fit_posterior
from llmprobe.analysis.marks import category_marks
from llmprobe.tracing.reader import open_trace
from tests.analysis.fixtures import bayesian, records, write_trace
from tests.cli_helpers import assert_one_line_error, run_cli


def posterior(path, prior="fit", **options):
    return fit_posterior(category_marks(open_trace(path)), prior, options.pop("n_bootstrap", 20), 0, **options).summary


def test_exactly_bayesian_under_one_dirichlet_is_consistent(tmp_path):
    path = write_trace(tmp_path / "t.parquet", records("categorical", 12, 15), bayesian([1.0], [[2.0, 5.0, 1.5]]))
    s = posterior(path)
    assert s["verdict"] == "consistent", s["verdict_sentence"]
    assert s["scores"]["exact_bayes"]["kl_bits_out_of_sample"] < 1e-3 and s["scores"]["out_of_sample"]
    np.testing.assert_allclose(s["exact_bayes"]["alphas"][0], [2.0, 5.0, 1.5], rtol=0.02)
    assert s["exact_bayes"]["converged"] and not s["exact_bayes"]["at_bound"]
    # the baselines are scored and are far worse than the filter
    assert s["scores"]["never_updating"]["kl_bits"] > 0.05 and "true_theta" in s["scores"]
    # the exact prior given explicitly reproduces the model; the wrong one does not
    assert posterior(path, "dirichlet:2,5,1.5")["scores"]["reference_prior"]["kl_bits"] < 1e-9
    assert posterior(path, "uniform")["scores"]["reference_prior"]["kl_bits"] > 1e-2


def test_exactly_bayesian_under_a_two_component_mixture_is_consistent(tmp_path):
    truth_w, truth_a = [0.35, 0.65], [[8.0, 2.0], [1.5, 6.0]]
    path = write_trace(tmp_path / "m.parquet", records("coin", 2, 16), bayesian(truth_w, truth_a))
    single = posterior(path, n_bootstrap=5)  # one Dirichlet cannot express the mixture: it looks like forgetting
    assert single["scores"]["exact_bayes"]["kl_bits_out_of_sample"] > 1e-3
    assert single["verdict"] != "rejected" or any("mixture" in w for w in single["verdict_warnings"])
    s = posterior(path, components="auto", max_components=2, n_bootstrap=5)
    assert s["verdict"] == "consistent", s["verdict_sentence"]
    assert [row["n_components"] for row in s["updating_prior"]["selection"]] == [1, 2]
    fit = s["updating_prior"]["exact"]
    assert len(fit["weights"]) == 2 and s["scores"]["exact_bayes"]["kl_bits_out_of_sample"] < 1e-3
    order = np.argsort([a[1] / sum(a) for a in fit["alphas"]])
    np.testing.assert_allclose(np.asarray(fit["weights"])[order], truth_w, atol=0.05)


def test_planted_forgetting_is_rejected(tmp_path):
    path = write_trace(tmp_path / "g.parquet", records("coin", 2, 30), bayesian([1.0], [[1.5, 1.5]], gamma=0.85))
    s = posterior(path)
    assert s["verdict"] == "rejected", s["verdict_sentence"]
    assert s["forgetting"]["gamma"] == pytest.approx(0.85, abs=0.02)
    assert s["gamma_ci"][1] < 1.0 and s["scores"]["forgetting"]["kl_bits_out_of_sample"] < 1e-3


def test_constant_predictions_do_not_update(tmp_path):
    def constant(record, index):
        return np.tile([0.3, 0.7], (len(record["marks"]), 1))

    s = posterior(write_trace(tmp_path / "c.parquet", records("coin", 1, 12), constant))
    assert s["verdict"] == "no-updating", s["verdict_sentence"]
    assert s["exact_bayes"]["at_bound"] and not s["exact_bayes"]["converged"]
    assert any("α0" in w for w in s["verdict_warnings"])


def test_anti_bayesian_predictions_are_a_poor_fit(tmp_path):
    path = write_trace(tmp_path / "a.parquet", records("coin", 1, 20), bayesian([1.0], [[1.0, 1.0]], swap=True))
    s = posterior(path)
    assert s["verdict"] == "poor-fit", s["verdict_sentence"]
    assert s["scores"]["forgetting"]["kl_bits_out_of_sample"] > 0.02


def test_low_mass_marks_are_left_out_and_inexact_marks_flagged(tmp_path, capsys, monkeypatch):
    prompts = records("coin", 1, 8)
    predict = bayesian([1.0], [[2.0, 2.0]])
    path = write_trace(tmp_path / "t.parquet", prompts, predict, exact=lambda n: n != 3)
    # n = 1 gets almost no mass on the categories (as the real coin's n = 1 mark does)
    from tests.analysis.fixtures import write_trace as write

    def low_mass_at_one(record, index):
        p = predict(record, index).copy()
        p[1] *= 1e-3
        return p

    low = write(tmp_path / "low.parquet", prompts, low_mass_at_one)
    s = posterior(low)
    assert s["n_marks_low_mass"] == len(prompts) and s["n_marks_used"] == s["n_marks"] - len(prompts)
    assert s["verdict"] == "consistent"
    assert posterior(low, min_mass=0.0)["n_marks_low_mass"] == 0
    # a sequence with no used mark at all is no data: not drawn by the bootstrap, not dealt into folds
    silent = write(tmp_path / "silent.parquet", prompts, lambda record, index: predict(record, index)
                   * (1e-3 if index == 0 else 1.0))
    s = posterior(silent)
    assert s["n_marks_low_mass"] == len(prompts[0]["marks"]) and s["verdict"] == "consistent"
    assert np.isfinite(s["gamma_ci"]).all()
    code, _, err = run_cli(["fit-posterior", str(path), "--bootstrap", "5"], capsys, monkeypatch)
    assert code == 0, err
    assert "inexact" in err and err.splitlines()[0].startswith("synthetic: Consistent")
    assert posterior(path)["n_marks_inexact"] == len(prompts)


def test_fit_posterior_json_is_an_updating_prior_for_another_run(tmp_path, capsys, monkeypatch):
    """The README pipeline: fit-posterior --json, then --prior that file (not fit-prior's prior over rows)."""
    path = write_trace(tmp_path / "t.parquet", records("categorical", 6, 12), bayesian([1.0], [[2.0, 5.0, 1.5]]))
    code, stdout, err = run_cli(["fit-posterior", str(path), "--json", "--bootstrap", "5"], capsys, monkeypatch)
    assert code == 0, err
    (tmp_path / "updating.json").write_text(stdout)
    s = posterior(path, str(tmp_path / "updating.json"), n_bootstrap=5)
    assert s["prior"]["role"] == "updating prior" and s["scores"]["reference_prior"]["kl_bits"] < 1e-6
    # fit-prior's prior over rows is accepted, but named for what it is
    code, _, err = run_cli(["fit-prior", str(path), "-o", str(tmp_path / "rows.json")], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["fit-posterior", str(path), "--prior", str(tmp_path / "rows.json"), "--bootstrap", "5"],
                           capsys, monkeypatch)
    assert code == 0 and "is a prior over rows" in " ".join(err.split()), err


def test_a_single_sequence_is_scored_in_sample_and_says_so(tmp_path, capsys, monkeypatch):
    path = write_trace(tmp_path / "one.parquet", records("coin", 1, 20)[7:8], bayesian([1.0], [[2.0, 1.0]]))
    s = posterior(path)
    assert not s["scores"]["out_of_sample"] and "in sample" in s["verdict_sentence"]
    assert s["scores"]["exact_bayes"]["kl_bits_out_of_sample"] is None and s["verdict"] == "consistent"
    assert any("in sample" in w for w in s["verdict_warnings"])
    code, _, err = run_cli(["fit-posterior", str(path), "--bootstrap", "5"], capsys, monkeypatch)
    assert code == 0 and "in sample" in err, err
    code, _, err = run_cli(["fit-posterior", str(path), "--prior-components", "auto"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--prior-components", "2 or more sequences")


def test_overlapping_targets_are_refused(tmp_path, capsys, monkeypatch):
    path = write_trace(tmp_path / "o.parquet", records("coin", 1, 3), bayesian([1.0], [[1.0, 1.0]]),
                       token_ids=[[7], [7, 9]])
    code, _, err = run_cli(["fit-posterior", str(path)], capsys, monkeypatch)
    assert_one_line_error(code, err, "overlap", "' heads'", "' tails'")


@pytest.mark.parametrize(("option", "value", "needle"), [
    ("--prior-components", "two", "--prior-components"), ("--prior-components", "0", "--prior-components"),
    ("--min-mass", "1.5", "--min-mass"), ("--min-mass", "0.9999", "--min-mass"), ("--folds", "1", "--folds"),
    ("--max-components", "0", "--max-components"), ("--prior", "dirichlet:2,x", "--prior"),
    ("--prior", "dirichlet:2,5,1", "--prior"), ("--prior", "dirichlet:-1,2", "--prior"),
])
def test_bad_new_options_are_one_line_errors_and_write_nothing(tmp_path, capsys, monkeypatch, option, value, needle):
    path = write_trace(tmp_path / "t.parquet", records("coin", 1, 4), bayesian([1.0], [[1.0, 1.0]]),
                       mass=0.9)
    out = tmp_path / "fit.parquet"
    code, _, err = run_cli(["fit-posterior", str(path), option, value, "-o", str(out), "--bootstrap", "2"], capsys,
                           monkeypatch)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_bad_updating_prior_file_is_one_line(tmp_path, capsys, monkeypatch):
    path = write_trace(tmp_path / "t.parquet", records("coin", 1, 4), bayesian([1.0], [[1.0, 1.0]]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"updating_prior": {"exact": {"weights": [1.0], "alphas": [[1.0, -2.0]]}}}]))
    code, _, err = run_cli(["fit-posterior", str(path), "--prior", str(bad)], capsys, monkeypatch)
    assert_one_line_error(code, err, "bad.json")


@pytest.mark.real_model
def test_real_model_coin_verdict_with_baselines(real_loaded, tmp_path):
    """The default model on a small coin run: a verdict, its evidence and every baseline, mass-aware."""
    from llmprobe.bayes.verdict import VERDICTS
    from tests.plots.fixtures import experiment_records
    from tests.plots.fixtures import write_trace as trace_with

    records = experiment_records(tmp_path, n_max=4, sequences=1)[::2]  # θ_heads = 0, 0.2, ..., 1
    path = trace_with(real_loaded, tmp_path / "coin.parquet", records, top_k=5, targets=[" heads", " tails"])
    s = posterior(path)
    assert s["verdict"] in VERDICTS and s["verdict_sentence"]
    assert s["n_marks"] == 6 * 5 and s["n_marks_used"] + s["n_marks_low_mass"] == s["n_marks"]
    assert {"exact_bayes", "forgetting", "never_updating", "frequency", "recency", "true_theta"} <= set(s["scores"])
    assert s["scores"]["out_of_sample"] and s["scores"]["n_folds"] == 5
    free, exact = s["scores"]["forgetting"], s["scores"]["exact_bayes"]
    assert free["kl_bits_in_sample"] <= exact["kl_bits_in_sample"] + 1e-9  # the robust fit, on real predictions
    assert 0 <= s["tv_theta"]["mean"] <= 1 and s["entropy_mae_bits"] >= 0
