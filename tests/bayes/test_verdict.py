"""The verdict rule, the baselines, and the updating-prior (mixture filter) fit on known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import approx_fprime

from llmprobe.bayes.filter import Marks
from llmprobe.bayes.updating import (
    UpdatingFit,
    _MixtureFilter,
    held_out_predictions,
    sequence_folds,
)
from llmprobe.bayes.verdict import (
    FIT_KL_BITS,
    FORGETTING_BITS,
    GAMMA_UNIDENTIFIED_WIDTH,
    Evidence,
    decide,
    frequency_follower,
    never_updating,
    recency,
    score,
    shared_constant,
)
from tests.bayes.fixtures import mixture_bayesian

GOOD = dict(best_kl_bits=1e-4, exact_kl_bits=2e-4, never_kl_bits=0.3, constant_kl_bits=0.35, out_of_sample=True,
            gamma=1.0, gamma_ci=(0.97, 1.0), rejected=False, alpha0_at_bound=False, converged=True)
RECENCY = dict(gamma=0.001, gamma_ci=(0.001, 0.001), rejected=True, exact_kl_bits=0.26, best_kl_bits=1e-6)
"""The evidence of a model that repeats its last outcome with probability 0.8 (coin, tests/analysis)."""


@pytest.mark.parametrize(("change", "verdict"), [
    ({}, "consistent"),
    # rule 1, no-updating: a predictor that ignores the examples fits and updating gains < NO_UPDATE_BITS
    ({"never_kl_bits": 5e-4}, "no-updating"),
    ({"constant_kl_bits": 5e-4}, "no-updating"),  # the shared constant is the witness (noisy first predictions)
    ({"never_updates": True, "alpha0_at_bound": True}, "no-updating"),  # witness: the γ = 1 filter at α0 → ∞
    # per-sequence constant predictions: no filter fits, each sequence's first prediction explains every mark
    ({"never_kl_bits": 0.0, "best_kl_bits": 0.15, "exact_kl_bits": 0.15}, "no-updating"),
    # a wide γ interval is no-updating only beside a never-updating predictor about as good ...
    ({"gamma_ci": (0.001, 1.0), "never_kl_bits": 5e-4}, "no-updating"),
    # ... alone it says only that γ is not pinned (a warning); updating gains 0.3 bits here
    ({"gamma_ci": (0.001, 1.0)}, "consistent"),
    # the ignoring predictor must itself fit: anti-Bayesian predictions beat no filter, fit nothing
    ({"never_kl_bits": 0.27, "constant_kl_bits": 0.31, "best_kl_bits": 0.31, "exact_kl_bits": 0.31,
      "gamma": 0.001, "gamma_ci": (0.001, 0.001), "rejected": True}, "poor-fit"),
    ({"never_kl_bits": FIT_KL_BITS * 1.01, "best_kl_bits": 0.05, "exact_kl_bits": 0.05}, "poor-fit"),
    # rule 2, rejected: γ's interval below 1 and forgetting gains > FORGETTING_BITS out of sample, filter fits
    ({"gamma": 0.85, "gamma_ci": (0.83, 0.87), "rejected": True, "exact_kl_bits": 0.05}, "rejected"),
    (RECENCY, "rejected"),  # a narrow interval near 0 is strong forgetting, not a failure to update
    ({"gamma": 0.999, "gamma_ci": (0.999, 0.9999), "rejected": True,
      "exact_kl_bits": 1e-4 + FORGETTING_BITS * 1.5}, "rejected"),
    # rule 3, consistent: forgetting not established, the γ = 1 filter fits
    # γ = 1 statistically rejected, but forgetting buys under FORGETTING_BITS: negligible (the mixture control)
    ({"gamma": 0.999, "gamma_ci": (0.999, 0.9999), "rejected": True}, "consistent"),
    ({"exact_kl_bits": 1e-4 + FORGETTING_BITS * 1.5}, "consistent"),  # a gain the bootstrap does not back
    # the forgetting filter may score worse than γ = 1 out of sample (γ overfitted); γ = 1 fitting is the test
    ({"gamma": 0.85, "gamma_ci": (0.83, 0.87), "rejected": True, "best_kl_bits": 0.18}, "consistent"),
    # rule 4, poor-fit: the filter the verdict would rest on does not fit
    ({"best_kl_bits": FIT_KL_BITS * 1.5, "exact_kl_bits": FIT_KL_BITS * 2}, "poor-fit"),
    ({"exact_kl_bits": FIT_KL_BITS * 2}, "poor-fit"),  # gamma = 1 not rejected but exact Bayes fits badly
    ({"gamma": 0.85, "gamma_ci": (0.83, 0.87), "rejected": True, "exact_kl_bits": 0.25, "best_kl_bits": 0.18},
     "poor-fit"),  # forgetting established, but even the forgetting filter fits badly
])
def test_verdict_rule(change, verdict):
    assert decide(Evidence(**{**GOOD, **change})).verdict == verdict


@pytest.mark.parametrize("interval", [(0.001, 0.001), (0.001, 0.3), (0.2, 0.7), (0.45, 1.0), (0.001, 1.0), (0.3, 0.9)])
@pytest.mark.parametrize("base", [GOOD, {**GOOD, "never_kl_bits": 5e-4}, {**GOOD, **RECENCY},
                                  {**GOOD, "exact_kl_bits": 0.05, "rejected": True}])
def test_the_words_match_the_interval(interval, base):
    """'spans more than half of (0, 1]' exactly when the interval is wider than 0.5 (the old sentence said
    it of [0.001, 0.001]); the effective memory and 'the last example outweighs' exactly when gamma < 1/2."""
    gamma = sum(interval) / 2
    v = decide(Evidence(**{**base, "gamma": gamma, "gamma_ci": interval}))
    said = " ".join([v.sentence, *v.warnings])
    assert ("spans more than half of (0, 1]" in said) == (interval[1] - interval[0] > GAMMA_UNIDENTIFIED_WIDTH)
    assert f"[{interval[0]:.3f}, {interval[1]:.3f}]" in said or v.verdict == "no-updating"
    if v.verdict == "rejected":
        assert f"memory of {1 / (1 - gamma):.1f} examples" in v.sentence
        assert ("outweighs all earlier ones" in v.sentence) == (gamma < 0.5)


def test_recency_is_rejected_with_the_numbers_it_rests_on():
    v = decide(Evidence(**{**GOOD, **RECENCY}))
    assert v.verdict == "rejected" and "No updating" not in v.sentence and "spans" not in v.sentence
    assert "from 0.2600 to 0.0000 bits out of sample" in v.sentence and "outweighs all earlier ones" in v.sentence


def test_each_warning_says_what_its_numbers_show():
    """The default model's mapping trace: forgetting established, no filter fits. It once drew 'the interval
    reaches 1: not established' beside an interval [0.530, 0.750]."""
    v = decide(Evidence(**{**GOOD, "gamma": 0.708, "gamma_ci": (0.53, 0.75), "rejected": True, "exact_kl_bits": 0.31,
                            "best_kl_bits": 0.236}))
    assert v.verdict == "poor-fit" and v.sentence.startswith("Poor fit: the model forgets") and not v.warnings
    v = decide(Evidence(**{**GOOD, "exact_kl_bits": 1e-4 + FORGETTING_BITS * 1.5}))
    assert v.verdict == "consistent" and any("reaches 1: not established" in w for w in v.warnings)
    v = decide(Evidence(**{**GOOD, "gamma": 0.999, "gamma_ci": (0.999, 0.9999), "rejected": True}))
    assert [w for w in v.warnings if "negligible" in w] and not [w for w in v.warnings if "reaches 1" in w]


def test_no_updating_names_its_witness_and_poor_fit_the_rivals():
    v = decide(Evidence(**{**GOOD, "never_kl_bits": 0.0, "best_kl_bits": 0.15, "exact_kl_bits": 0.15}))
    assert "each sequence's own first prediction" in v.sentence and "0.1500 bits" in v.sentence
    v = decide(Evidence(**{**GOOD, "constant_kl_bits": 4e-4, "gamma_ci": (0.001, 1.0)}))
    assert "one constant prediction" in v.sentence and "γ is not identifiable" in v.sentence
    v = decide(Evidence(**{**GOOD, "exact_kl_bits": 0.05}))
    assert v.verdict == "poor-fit" and "0.0500 bits" in v.sentence
    assert "ignoring the examples scores 0.3000" in v.sentence


def test_negligible_forgetting_is_consistent_with_a_warning():
    v = decide(Evidence(**{**GOOD, "gamma": 0.999, "gamma_ci": (0.999, 0.9999), "rejected": True}))
    assert v.verdict == "consistent" and any("negligible" in w for w in v.warnings)


def test_verdict_warns_about_in_sample_numbers_and_non_convergence():
    v = decide(Evidence(**{**GOOD, "out_of_sample": False, "converged": False}))
    assert "in sample" in v.sentence and len(v.warnings) == 2


def test_baselines():
    probs = np.array([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1], [0.6, 0.4]])
    np.testing.assert_allclose(never_updating(probs, [0, 0, 1, 1], [0, 1, 0, 1]), probs[[0, 0, 2, 2]])
    freq = frequency_follower([[0, 0], [3, 1]])
    np.testing.assert_allclose(freq, [[0.5, 0.5], [(3 + 0.01) / 4.02, (1 + 0.01) / 4.02]])
    np.testing.assert_allclose(recency([-1, 1], 2), [[0.5, 0.5], [0.01 / 1.02, 1.01 / 1.02]])
    np.testing.assert_allclose(shared_constant(probs, [1, 1, 1, 1]), np.tile(probs.mean(axis=0), (4, 1)))
    held_out = shared_constant(probs, [1, 1, 1, 0], [0, 0, 1, 1])  # fold 1 from fold 0's rows; fold 0 from row 2
    np.testing.assert_allclose(held_out, [probs[2], probs[2], probs[:2].mean(axis=0), probs[:2].mean(axis=0)])
    perfect = score(probs, probs)
    assert perfect.kl_bits == pytest.approx(0.0, abs=1e-15) and perfect.tv == 0.0


def test_mixture_filter_gradient_is_exact():
    probs, outcomes, seq, pos, _ = mixture_bayesian(np.array([0.4, 0.6]), np.array([[8.0, 2.0, 1.0], [2.0, 8.0, 3.0]]),
                                                    6, 8, seed=0, gamma=0.8)
    marks = Marks.build(probs, outcomes, seq, pos, None)
    rng = np.random.default_rng(1)
    theta, weights = rng.normal(0.0, 1.0, 7), rng.random(probs.shape[0])
    objective = _MixtureFilter(marks, 2, theta)
    for gamma, t in ((0.7, theta), (None, np.append(theta, 0.83))):
        numeric = approx_fprime(t, lambda x: objective(x, weights, gamma)[0], 1e-7)
        np.testing.assert_allclose(objective(t, weights, gamma)[1], numeric, atol=1e-6)


def test_exactly_bayesian_mixture_is_recovered_out_of_sample():
    truth_w, truth_a = np.array([0.3, 0.7]), np.array([[6.0, 1.5], [1.0, 4.0]])
    probs, outcomes, seq, pos, _ = mixture_bayesian(truth_w, truth_a, 30, 15, seed=2)
    model = UpdatingFit(probs, outcomes, seq, pos, 2)
    exact, free, _ = model.fit()
    assert exact.mean_kl_bits < 1e-6 and free.mean_kl_bits <= exact.mean_kl_bits
    order = np.argsort(exact.alphas[:, 1] / exact.strengths)
    np.testing.assert_allclose(exact.weights[order], truth_w, atol=0.05)
    held_exact, _ = held_out_predictions(model, sequence_folds(seq, 3, 0))
    assert score(probs, held_exact).kl_bits < 1e-3
