"""The verdict rule, the baselines, and the updating-prior (mixture filter) fit on known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import approx_fprime

from llmprobe.bayes.bayes_fit import _Marks
from llmprobe.bayes.updating import (
    UpdatingFit,
    _MixtureFilter,
    held_out_predictions,
    sequence_folds,
)
from llmprobe.bayes.verdict import (
    FIT_KL_BITS,
    Evidence,
    decide,
    frequency_follower,
    never_updating,
    recency,
    score,
)
from tests.bayes.fixtures import mixture_bayesian

GOOD = dict(best_kl_bits=1e-4, exact_kl_bits=2e-4, never_kl_bits=0.3, out_of_sample=True, gamma=1.0,
            gamma_ci=(0.97, 1.0), rejected=False, alpha0_at_bound=False, converged=True)


@pytest.mark.parametrize(("change", "verdict"), [
    ({}, "consistent"),
    ({"best_kl_bits": FIT_KL_BITS * 1.5, "exact_kl_bits": FIT_KL_BITS * 2}, "poor-fit"),
    ({"exact_kl_bits": FIT_KL_BITS * 2}, "poor-fit"),  # gamma = 1 not rejected but exact Bayes fits badly
    ({"never_kl_bits": 5e-4}, "no-updating"),
    ({"never_updates": True, "alpha0_at_bound": True}, "no-updating"),
    ({"gamma_ci": (0.001, 1.0)}, "no-updating"),  # the interval of defect 2
    ({"gamma": 0.85, "gamma_ci": (0.83, 0.87), "rejected": True}, "rejected"),
    ({"gamma": 0.85, "gamma_ci": (0.83, 0.87), "rejected": True, "best_kl_bits": 0.18}, "poor-fit"),
])
def test_verdict_rule(change, verdict):
    assert decide(Evidence(**{**GOOD, **change})).verdict == verdict


def test_verdict_warns_about_in_sample_numbers_and_non_convergence():
    v = decide(Evidence(**{**GOOD, "out_of_sample": False, "converged": False}))
    assert "in sample" in v.sentence and len(v.warnings) == 2


def test_baselines():
    probs = np.array([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1], [0.6, 0.4]])
    np.testing.assert_allclose(never_updating(probs, [0, 0, 1, 1], [0, 1, 0, 1]), probs[[0, 0, 2, 2]])
    freq = frequency_follower([[0, 0], [3, 1]])
    np.testing.assert_allclose(freq, [[0.5, 0.5], [(3 + 0.01) / 4.02, (1 + 0.01) / 4.02]])
    np.testing.assert_allclose(recency([-1, 1], 2), [[0.5, 0.5], [0.01 / 1.02, 1.01 / 1.02]])
    perfect = score(probs, probs)
    assert perfect.kl_bits == pytest.approx(0.0, abs=1e-15) and perfect.tv == 0.0


def test_mixture_filter_gradient_is_exact():
    probs, outcomes, seq, pos, _ = mixture_bayesian(np.array([0.4, 0.6]), np.array([[8.0, 2.0, 1.0], [2.0, 8.0, 3.0]]),
                                                    6, 8, seed=0, gamma=0.8)
    marks = _Marks.build(probs, outcomes, seq, pos, None)
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
