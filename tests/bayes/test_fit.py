"""Fitting the discounted Bayesian filter to synthetic predictions with known prior and gamma."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmprobe.bayes import (
    BayesFit,
    ExactBayesTest,
    bootstrap_exact_bayes,
    discounted_counts,
    fit_bayes,
    outcomes_from_running_counts,
    posterior_predictive,
)


def filter_predictions(
    alpha: np.ndarray, gamma: float, n_sequences: int, length: int, seed: int, noise: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Predictions of a forgetting filter at every position of random outcome sequences.

    Each sequence's outcomes are i.i.d. from its own theta ~ Dirichlet(alpha). With ``noise`` the
    predictions are perturbed as p ~ Dirichlet(noise * q), a model that is Bayesian up to noise.
    """
    rng = np.random.default_rng(seed)
    k = alpha.size
    theta = rng.dirichlet(alpha, size=n_sequences)
    below = rng.random((n_sequences, length, 1)) > np.cumsum(theta, axis=1)[:, None, :]
    outcomes = np.minimum(below.sum(axis=2), k - 1)  # inverse-CDF draw from each sequence's theta
    counts = discounted_counts(outcomes, gamma, k)
    probs = posterior_predictive(alpha, counts).reshape(-1, k)
    if noise is not None:
        draws = rng.gamma(noise * probs)
        probs = draws / draws.sum(axis=1, keepdims=True)
    sequence = np.repeat(np.arange(n_sequences), length + 1)
    position = np.tile(np.arange(length + 1), n_sequences)
    return probs, outcomes, sequence, position


BETA_PRIOR = np.array([2.0, 1.0])
DIRICHLET_PRIOR = np.array([1.0, 3.0, 0.5])


@pytest.mark.parametrize("alpha", [BETA_PRIOR, DIRICHLET_PRIOR])
def test_perfectly_bayesian_predictions(alpha: np.ndarray) -> None:
    data = filter_predictions(alpha, 1.0, n_sequences=60, length=20, seed=0)
    verdict = bootstrap_exact_bayes(*data, n_bootstrap=20, seed=0)
    fit = verdict.free
    assert fit.mean_kl_bits < 1e-3
    np.testing.assert_allclose(fit.prior_mean, alpha / alpha.sum(), atol=1e-3)
    assert fit.prior_strength == pytest.approx(alpha.sum(), rel=0.01)
    assert fit.gamma == pytest.approx(1.0, abs=0.01)
    assert not verdict.rejected
    assert verdict.exact.mean_kl_bits < 1e-3 and verdict.exact.gamma == 1.0 and verdict.exact.gamma_fixed


@pytest.mark.parametrize(("alpha", "gamma"), [(BETA_PRIOR, 0.88), (DIRICHLET_PRIOR, 0.88), (BETA_PRIOR, 0.7)])
def test_forgetting_filter_is_recovered_and_exact_bayes_rejected(alpha: np.ndarray, gamma: float) -> None:
    data = filter_predictions(alpha, gamma, n_sequences=60, length=20, seed=1)
    verdict = bootstrap_exact_bayes(*data, n_bootstrap=20, seed=0)
    assert verdict.free.gamma == pytest.approx(gamma, abs=0.02)
    np.testing.assert_allclose(verdict.free.prior_alpha, alpha, rtol=0.02)
    assert verdict.free.mean_kl_bits < 1e-3
    assert verdict.rejected
    assert verdict.gamma_ci[1] < 1.0
    assert verdict.kl_gain_bits > 1e-3  # forcing gamma = 1 costs fit


def test_noisy_bayesian_predictions_are_not_rejected() -> None:
    data = filter_predictions(DIRICHLET_PRIOR, 1.0, n_sequences=60, length=20, seed=2, noise=300.0)
    verdict = bootstrap_exact_bayes(*data, n_bootstrap=30, seed=0)
    assert verdict.free.gamma > 0.99
    assert verdict.free.mean_kl_bits > 1e-3  # the noise is visible ...
    assert not verdict.rejected  # ... but is not mistaken for forgetting
    np.testing.assert_allclose(verdict.free.prior_alpha, DIRICHLET_PRIOR, rtol=0.1)


def test_noisy_forgetting_predictions_are_rejected() -> None:
    data = filter_predictions(DIRICHLET_PRIOR, 0.88, n_sequences=60, length=20, seed=3, noise=300.0)
    verdict = bootstrap_exact_bayes(*data, n_bootstrap=30, seed=0)
    assert verdict.free.gamma == pytest.approx(0.88, abs=0.02)
    assert verdict.gamma_ci[0] < 0.88 < verdict.gamma_ci[1]
    assert verdict.rejected


def test_fixed_gamma_fit_holds_gamma() -> None:
    data = filter_predictions(BETA_PRIOR, 0.88, n_sequences=30, length=15, seed=4)
    held = fit_bayes(*data, gamma=0.88)
    assert held.gamma == 0.88 and held.gamma_fixed
    np.testing.assert_allclose(held.prior_alpha, BETA_PRIOR, rtol=1e-3)
    assert fit_bayes(*data, gamma=1.0).mean_kl_bits > held.mean_kl_bits


def test_predictive_reproduces_the_filter() -> None:
    probs, outcomes, sequence, position = filter_predictions(DIRICHLET_PRIOR, 0.7, n_sequences=10, length=8, seed=5)
    fit = BayesFit(DIRICHLET_PRIOR / DIRICHLET_PRIOR.sum(), float(DIRICHLET_PRIOR.sum()), 0.7, True, 0.0, 0, 0, 0, True)
    np.testing.assert_allclose(fit.predictive(outcomes, sequence, position), probs, rtol=1e-12)


def test_ragged_outcomes_and_partial_marks() -> None:
    probs, outcomes, sequence, position = filter_predictions(BETA_PRIOR, 0.88, n_sequences=40, length=12, seed=6)
    short = sequence % 2 == 0
    keep = ~short | (position <= 6)  # even sequences stop after 6 outcomes
    ragged = [row[:6] if s % 2 == 0 else row for s, row in enumerate(outcomes)]
    fit = fit_bayes(probs[keep], ragged, sequence[keep], position[keep])
    assert fit.gamma == pytest.approx(0.88, abs=1e-3)
    with pytest.raises(ValueError):
        fit_bayes(probs, ragged, sequence, position)  # marks beyond a sequence's end


def test_mark_weights_equal_duplicated_sequences() -> None:
    # The bootstrap resamples by weighting marks with how often their sequence was drawn.
    probs, outcomes, sequence, position = filter_predictions(
        DIRICHLET_PRIOR, 0.8, n_sequences=20, length=10, seed=9, noise=100.0
    )
    twice = sequence < 5
    duplicated = fit_bayes(
        np.concatenate([probs, probs[twice]]),
        np.concatenate([outcomes, outcomes[:5]]),
        np.concatenate([sequence, sequence[twice] + 20]),
        np.concatenate([position, position[twice]]),
    )
    weighted = fit_bayes(probs, outcomes, sequence, position, weights=np.where(twice, 2.0, 1.0))
    assert weighted.gamma == pytest.approx(duplicated.gamma, abs=1e-6)
    np.testing.assert_allclose(weighted.prior_alpha, duplicated.prior_alpha, rtol=1e-5)
    assert weighted.mean_kl_bits == pytest.approx(duplicated.mean_kl_bits, rel=1e-8)


def test_fit_bayes_rejects_ambiguous_outcomes() -> None:
    probs, outcomes, sequence, position = filter_predictions(BETA_PRIOR, 1.0, n_sequences=3, length=4, seed=10)
    with pytest.raises(ValueError):
        fit_bayes(probs, outcomes[0], sequence, position)  # one sequence must be passed as [sequence]
    with pytest.raises(ValueError):
        fit_bayes(probs, [row.astype(float) for row in outcomes], sequence, position)
    with pytest.raises(ValueError):
        fit_bayes(probs, np.array([[0, -1, 1, 0]] * 3), sequence, position)  # padding inside a sequence
    with pytest.raises(ValueError):
        fit_bayes(probs, outcomes, sequence, position, gamma=1.5)


def test_outcomes_from_running_counts_round_trip() -> None:
    rng = np.random.default_rng(7)
    outcomes = rng.integers(0, 3, size=(4, 6))
    running = discounted_counts(outcomes, 1.0, 3).reshape(-1, 3)
    labels = np.repeat(np.array(["d", "b", "c", "a"]), 7)
    shuffle = rng.permutation(labels.size)
    derived, sequence, position = outcomes_from_running_counts(running[shuffle], labels[shuffle])
    order = np.argsort(["d", "b", "c", "a"])  # sequences are numbered in sorted label order
    np.testing.assert_array_equal(derived, outcomes[order])
    np.testing.assert_array_equal(position, running[shuffle].sum(axis=1))
    np.testing.assert_array_equal(np.array(["a", "b", "c", "d"])[sequence], labels[shuffle])


def test_outcomes_from_running_counts_rejects_gaps() -> None:
    counts = np.array([[0, 0], [1, 0], [2, 1]])
    with pytest.raises(ValueError):
        outcomes_from_running_counts(counts, [0, 0, 0])
    with pytest.raises(ValueError):
        outcomes_from_running_counts(np.array([[1, 0], [1, 1]]), [0, 0])


def test_fits_json_round_trip() -> None:
    data = filter_predictions(BETA_PRIOR, 0.88, n_sequences=20, length=10, seed=8)
    verdict = bootstrap_exact_bayes(*data, n_bootstrap=5, seed=0)
    back = ExactBayesTest.from_dict(json.loads(json.dumps(verdict.to_dict())))
    assert back.to_dict() == verdict.to_dict()
    fit = BayesFit.from_dict(json.loads(json.dumps(verdict.free.to_dict())))
    np.testing.assert_array_equal(fit.prior_mean, verdict.free.prior_mean)
    assert (fit.prior_strength, fit.gamma, fit.mean_kl_bits) == (
        verdict.free.prior_strength,
        verdict.free.gamma,
        verdict.free.mean_kl_bits,
    )
