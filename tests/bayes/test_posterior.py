"""Posterior predictives and discounted counts against hand-computed closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import betaln

from llmprobe.bayes import (
    discounted_counts,
    mixture_posterior_predictive,
    mixture_posterior_weights,
    posterior_predictive,
)


def test_beta_binomial_predictive_by_hand() -> None:
    # Beta(2, 3) prior, 4 successes and 1 failure: P(success) = (2 + 4) / (5 + 5).
    np.testing.assert_allclose(posterior_predictive([2.0, 3.0], [4, 1]), [0.6, 0.4])
    np.testing.assert_allclose(posterior_predictive([2.0, 3.0], [0, 0]), [0.4, 0.6])


def test_posterior_predictive_is_vectorized_over_rows() -> None:
    alpha = np.array([0.5, 1.0, 2.5])
    counts = np.array([[0, 0, 0], [1, 2, 3], [10, 0, 0]])
    expected = np.array([[0.5, 1.0, 2.5], [1.5, 3.0, 5.5], [10.5, 1.0, 2.5]]) / np.array([[4.0], [10.0], [14.0]])
    np.testing.assert_allclose(posterior_predictive(alpha, counts), expected)


def test_mixture_predictive_by_hand() -> None:
    # 0.4 Beta(1, 1) + 0.6 Beta(5, 1), after one sequence with 3 of category 0 and 1 of category 1:
    # marginal likelihoods B(4, 2)/B(1, 1) = 1/20 and B(8, 2)/B(5, 1) = 5/72, so w' = (12/37, 25/37)
    # and P(category 0) = 12/37 * 4/6 + 25/37 * 8/10 = 28/37.
    weights, alphas, counts = [0.4, 0.6], [[1.0, 1.0], [5.0, 1.0]], [3, 1]
    np.testing.assert_allclose(mixture_posterior_weights(weights, alphas, counts), [12 / 37, 25 / 37])
    np.testing.assert_allclose(mixture_posterior_predictive(weights, alphas, counts), [28 / 37, 9 / 37])


def test_mixture_predictive_equals_weighted_sum_with_beta_function_weights() -> None:
    weights = np.array([0.2, 0.5, 0.3])
    alphas = np.array([[0.5, 4.0], [2.0, 2.0], [7.0, 1.5]])
    counts = np.array([[0, 0], [2, 5], [6, 1], [1, 0]])
    got = mixture_posterior_predictive(weights, alphas, counts)
    for row, n in zip(got, counts):
        log_marginal = betaln(alphas[:, 0] + n[0], alphas[:, 1] + n[1]) - betaln(alphas[:, 0], alphas[:, 1])
        posterior = weights * np.exp(log_marginal)
        posterior /= posterior.sum()
        per_component = (alphas + n) / (alphas.sum(axis=1) + n.sum())[:, None]
        np.testing.assert_allclose(row, posterior @ per_component, rtol=1e-12)


def test_one_component_mixture_is_the_plain_predictive() -> None:
    counts = np.array([[1, 2, 0], [4, 0, 4]])
    np.testing.assert_allclose(
        mixture_posterior_predictive([1.0], [[1.0, 2.0, 3.0]], counts), posterior_predictive([1.0, 2.0, 3.0], counts)
    )


def test_discounted_counts_with_gamma_one_are_running_counts() -> None:
    outcomes = np.random.default_rng(0).integers(0, 4, size=(5, 12))
    counts = discounted_counts(outcomes, 1.0, 4)
    one_hot = np.eye(4)[outcomes]
    assert counts.shape == (5, 13, 4)
    np.testing.assert_array_equal(counts[:, 0], 0.0)
    np.testing.assert_allclose(counts[:, 1:], np.cumsum(one_hot, axis=1))


def test_discounted_counts_with_gamma_half_by_hand() -> None:
    expected = [[0, 0], [1, 0], [0.5, 1], [0.25, 1.5], [1.125, 0.75]]
    np.testing.assert_allclose(discounted_counts(np.array([0, 1, 1, 0]), 0.5, 2), expected)


def test_discounted_counts_padding_adds_nothing() -> None:
    padded = discounted_counts(np.array([[0, 1, -1, -1], [1, 1, 1, 0]]), 0.5, 2)
    np.testing.assert_allclose(padded[0, :3], [[0, 0], [1, 0], [0.5, 1]])
    np.testing.assert_allclose(padded[0, 3:], [[0.25, 0.5], [0.125, 0.25]])


def test_discounted_counts_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        discounted_counts(np.array([0.0, 1.0]), 1.0, 2)
    with pytest.raises(ValueError):
        discounted_counts(np.array([0, 2]), 1.0, 2)
    with pytest.raises(ValueError):
        discounted_counts(np.array([0, 1]), 1.5, 2)
