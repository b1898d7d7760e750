"""Synthetic predictors with known answers, shared by the robust-fit, updating-prior and verdict tests."""

from __future__ import annotations

import numpy as np

from llmprobe.bayes import (
    discounted_counts,
    mixture_posterior_predictive,
    posterior_predictive,
)


def random_outcomes(thetas: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """(S, length) category draws, sequence s i.i.d. from thetas[s] (inverse CDF)."""
    below = rng.random((thetas.shape[0], length, 1)) > np.cumsum(thetas, axis=1)[:, None, :]
    return np.minimum(below.sum(axis=2), thetas.shape[1] - 1)


def marks_of(outcomes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sequence and position of a mark before every outcome and after the last one."""
    n_sequences, length = outcomes.shape
    return np.repeat(np.arange(n_sequences), length + 1), np.tile(np.arange(length + 1), n_sequences)


def mixture_bayesian(weights: np.ndarray, alphas: np.ndarray, n_sequences: int, length: int, seed: int,
                     gamma: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An exactly Bayesian (gamma = 1) or forgetting predictor under a Dirichlet-mixture prior.

    Each sequence's theta is drawn from the prior; returns (probs, outcomes, sequence, position, theta per mark).
    """
    rng = np.random.default_rng(seed)
    labels = rng.choice(weights.size, size=n_sequences, p=weights)
    thetas = np.array([rng.dirichlet(alphas[j]) for j in labels])
    outcomes = random_outcomes(thetas, length, rng)
    counts = discounted_counts(outcomes, gamma, alphas.shape[1]).reshape(-1, alphas.shape[1])
    probs = mixture_posterior_predictive(weights, alphas, counts)
    sequence, position = marks_of(outcomes)
    return probs, outcomes, sequence, position, thetas[sequence]


def dirichlet_bayesian(alpha: np.ndarray, n_sequences: int, length: int, seed: int, gamma: float = 1.0):
    """:func:`mixture_bayesian` with a single Dirichlet prior."""
    return mixture_bayesian(np.ones(1), alpha[None, :], n_sequences, length, seed, gamma)


def plateau(seed: int = 0, templates: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Defect 1 rebuilt: many templates of one nested sequence (theta 0.75 then 0.25, n = 0..100).

    The predictions are a weakly updating Bayesian (alpha_0 = 1000) with a per-template bias and
    Dirichlet(20 q) noise; an optimizer started at alpha_0 = 2, gamma = 0.9 runs onto the plateau
    alpha_0 -> infinity, where gamma no longer matters, and stops above the gamma = 1 fit.
    """
    rng = np.random.default_rng(seed)
    outcomes = np.concatenate([(rng.random(50) >= 0.75), (rng.random(50) >= 0.25)]).astype(int)
    q = posterior_predictive(np.array([500.0, 500.0]), discounted_counts(outcomes, 1.0, 2))
    probs = []
    for _ in range(templates):
        shifted = q * np.exp([rng.normal(0.0, 0.3), 0.0])
        shifted /= shifted.sum(axis=1, keepdims=True)
        draws = rng.gamma(20.0 * shifted)
        probs.append(draws / draws.sum(axis=1, keepdims=True))
    sequence, position = marks_of(np.tile(outcomes, (templates, 1)))
    return np.concatenate(probs), np.tile(outcomes, (templates, 1)), sequence, position


SCALING_PLANTED = (  # (prior, per-example task probabilities, ICL efficiency K) of curves made by the law
    ((0.8, 0.2), (0.5, 0.9), 0.5),
    ((0.9, 0.1), (0.55, 0.95), 0.3),
    ((0.95, 0.05), (0.6, 0.8), 2.0),
)
"""Curves y(n), n = 0..40, made by the Bayesian scaling law (tests/bayes/test_scorecard_statistics.py)."""
