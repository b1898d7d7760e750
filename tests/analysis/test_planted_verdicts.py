"""The verdict's decision table (docs/statistics.md, section 6b), row by row, on planted models whose answer
is known (tests/analysis/fixtures.py: ``PLANTED``; benchmarks/verdict_table.py prints the same models' numbers).

Each planted model names the wrong rule it catches (``Planted.catches``): the old rule (γ's interval below 0.5
→ no-updating; poor-fit decided before the never-updating baseline), or an obviously wrong one (consistent
decided before rejected; no-updating judged without the shared constant, or without asking the predictor that
ignores the examples to fit; rejection on the bootstrap alone; rejection without the forgetting filter fitting;
no threshold on the fit level). The bootstrap is small (10 resamples): no verdict here hinges on it.
"""

from __future__ import annotations

import numpy as np
import pytest

from llmprobe.analysis.fits import fit_posterior
from llmprobe.analysis.marks import category_marks
from llmprobe.bayes.verdict import FIT_KL_BITS, FORGETTING_BITS, NO_UPDATE_BITS
from llmprobe.tracing.reader import open_trace
from tests.analysis.fixtures import PLANTED, Planted

BY_NAME = {planted.name: planted for planted in PLANTED}


@pytest.fixture(scope="module")
def summaries(tmp_path_factory):
    """fit-posterior's summary of each planted model, fitted once for every test of this module."""
    root = tmp_path_factory.mktemp("planted")
    made: dict[str, dict] = {}

    def summary(name: str) -> dict:
        if name not in made:
            path = BY_NAME[name].write(root / f"{len(made)}.parquet")
            made[name] = fit_posterior(category_marks(open_trace(path)), "fit", 10, 0).summary
        return made[name]

    return summary


def out_of_sample(s: dict, name: str) -> float:
    return s["scores"][name]["kl_bits_out_of_sample"]


@pytest.mark.parametrize("planted", PLANTED, ids=[p.name for p in PLANTED])
def test_each_planted_model_gets_its_verdict(summaries, planted: Planted):
    s = summaries(planted.name)
    assert s["verdict"] == planted.verdict, f"{s['verdict_sentence']} (a rule that fails here: {planted.catches})"


@pytest.mark.parametrize("repeat", [0.6, 0.8, 0.95])
def test_following_the_last_example_is_forgetting_not_no_updating(summaries, repeat):
    """Issue 25, kind 1: γ pinned near 0 with a narrow interval is strong forgetting. The old rule read the
    interval's lower end (< 0.5) as 'no-updating' and said it 'spans most of (0, 1]'."""
    s = summaries(f"recency: repeats the last outcome w.p. {repeat:g}")
    low, high = s["gamma_ci"]
    assert s["forgetting"]["gamma"] < 0.01 and high - low < 0.01 and s["exact_bayes_rejected"]
    forgetting, exact = out_of_sample(s, "forgetting"), out_of_sample(s, "exact_bayes")
    assert forgetting < 1e-4 and exact - forgetting > 10 * FORGETTING_BITS
    assert s["scores"]["never_updating"]["kl_bits"] - forgetting > FIT_KL_BITS  # never updating is much worse
    sentence = s["verdict_sentence"]
    assert "spans" not in sentence and "outweighs all earlier ones" in sentence
    assert f"[{low:.3f}, {high:.3f}]" in sentence and f"from {exact:.4f} to {forgetting:.4f} bits" in sentence


@pytest.mark.parametrize("name", [p.name for p in PLANTED if p.name.startswith("per-sequence constants")])
def test_per_sequence_constants_are_no_updating_whatever_their_spread(summaries, name):
    """Issue 25, kind 2: every filter shares one prior mean, so none explains sequences that each keep their
    own prediction; each sequence's first prediction explains every mark (exactly, without noise)."""
    s = summaries(name)
    never = s["scores"]["never_updating"]["kl_bits"]
    assert never <= FIT_KL_BITS and never < out_of_sample(s, "forgetting") + NO_UPDATE_BITS
    assert "each sequence's own first prediction" in s["verdict_sentence"]
    if "noise" not in name:
        assert never < 1e-9


def test_a_noisy_constant_is_caught_by_the_shared_constant(summaries):
    """Each sequence's first prediction carries its own noise (twice the noise at every later mark); the
    constant fitted on other sequences does not, and is as good as any filter."""
    s = summaries("one constant (0.3, 0.7), noise σ = 0.1")
    shared, never = s["scores"]["shared_constant"]["kl_bits"], s["scores"]["never_updating"]["kl_bits"]
    assert shared < never - NO_UPDATE_BITS and shared < out_of_sample(s, "forgetting") + NO_UPDATE_BITS
    assert s["scores"]["shared_constant"]["out_of_sample"] and "one constant prediction" in s["verdict_sentence"]


@pytest.mark.parametrize(("name", "gamma"), [("forgetting γ = 0.3, Dir(1.5, 1.5)", 0.3),
                                             ("forgetting γ = 0.5, Dir(1.5, 1.5)", 0.5),
                                             ("forgetting γ = 0.95, Dir(1.5, 1.5)", 0.95),
                                             ("forgetting γ = 0.7, categorical Dir(2, 5, 1.5)", 0.7)])
def test_planted_forgetting_is_recovered(summaries, name, gamma):
    s = summaries(name)
    assert s["forgetting"]["gamma"] == pytest.approx(gamma, abs=0.02) and s["gamma_ci"][1] < 1.0
    assert out_of_sample(s, "exact_bayes") - out_of_sample(s, "forgetting") > FORGETTING_BITS
    assert ("outweighs all earlier ones" in s["verdict_sentence"]) == (gamma < 0.5)


@pytest.mark.parametrize(("name", "alpha"), [("frequency follower: exact Bayes, Dir(0.05, 0.05)", [0.05, 0.05]),
                                             ("frequency follower: exact Bayes, Dir(0.1, 0.1, 0.1)", [0.1] * 3)])
def test_a_frequency_follower_is_exact_bayes_with_a_tiny_prior(summaries, name, alpha):
    s = summaries(name)
    np.testing.assert_allclose(s["exact_bayes"]["alphas"][0], alpha, rtol=0.05)
    assert s["exact_bayes"]["converged"] and out_of_sample(s, "exact_bayes") < 1e-6


@pytest.mark.parametrize("prior", ["Dir(2, 3)", "Dir(2, 5, 1.5)"])
def test_noisy_exact_bayes_on_both_sides_of_the_fit_threshold(summaries, prior):
    """Multiplicative noise σ = 0.1 stays under FIT_KL_BITS (consistent; where the bootstrap puts γ = 1 outside
    its interval, the gain is negligible and a warning says so); σ = 0.4 goes over it (poor-fit)."""
    quiet, loud = summaries(f"exact Bayes {prior}, noise σ = 0.1"), summaries(f"exact Bayes {prior}, noise σ = 0.4")
    assert out_of_sample(quiet, "exact_bayes") < FIT_KL_BITS < out_of_sample(loud, "exact_bayes")
    if quiet["exact_bayes_rejected"]:
        assert any("negligible" in w for w in quiet["verdict_warnings"])
    assert out_of_sample(loud, "exact_bayes") - out_of_sample(loud, "forgetting") <= FORGETTING_BITS


def test_forgetting_that_no_filter_fits_is_a_poor_fit_that_says_it_forgets(summaries):
    s = summaries("forgetting γ = 0.5, noise σ = 0.4")
    assert s["exact_bayes_rejected"] and out_of_sample(s, "forgetting") > FIT_KL_BITS
    assert s["verdict_sentence"].startswith("Poor fit: the model forgets")


def test_anti_bayesian_predictions_beat_every_filter_by_ignoring_the_examples_but_fit_nothing(summaries):
    """The predictor that ignores the examples scores better than any filter here: no-updating must also ask it
    to explain the predictions, or anti-Bayesian updating would be called no updating."""
    s = summaries("anti-Bayesian (counts reversed), Dir(5, 5)")
    never = s["scores"]["never_updating"]["kl_bits"]
    assert never < out_of_sample(s, "forgetting") and never > FIT_KL_BITS
