"""Posterior predictive distributions of a Dirichlet (or Dirichlet-mixture) prior after observed counts.

In-context learning read as Bayesian updating: after counts n the next outcome is category k with
probability (alpha_k + n_k) / (alpha_0 + n). Counts may be discounted (a forgetting filter), in
which case the same formulas apply to the real-valued counts.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import logsumexp

from llmprobe.bayes._arrays import as_alpha
from llmprobe.bayes.dirichlet import dirichlet_multinomial_logpmf


def posterior_predictive(alpha: ArrayLike, counts: ArrayLike) -> np.ndarray:
    """(alpha_k + n_k) / (alpha_0 + n) for counts of shape (..., K); ``alpha`` broadcasts against them."""
    a = as_alpha(alpha)
    n = np.asarray(counts, dtype=float)
    updated = a + n
    return updated / updated.sum(axis=-1, keepdims=True)


def mixture_posterior_weights(weights: ArrayLike, alphas: ArrayLike, counts: ArrayLike) -> np.ndarray:
    """Posterior component weights w_j' proportional to w_j B(alpha_j + n) / B(alpha_j), shape (..., J).

    The multinomial coefficient is the same for every component, so it cancels and is left out.
    """
    w = np.asarray(weights, dtype=float)
    a = as_alpha(alphas, "alphas")
    if a.ndim != 2 or w.shape != (a.shape[0],):
        raise ValueError("alphas must be (J, K) and weights (J,)")
    n = np.asarray(counts, dtype=float)[..., None, :]
    with np.errstate(divide="ignore"):
        log_joint = np.log(w) + dirichlet_multinomial_logpmf(n, a, coefficient=False)
    return np.exp(log_joint - logsumexp(log_joint, axis=-1, keepdims=True))


def mixture_posterior_predictive(weights: ArrayLike, alphas: ArrayLike, counts: ArrayLike) -> np.ndarray:
    """sum_j w_j' (alpha_jk + n_k) / (alpha_j0 + n), with w' from :func:`mixture_posterior_weights`."""
    a = as_alpha(alphas, "alphas")
    posterior_weights = mixture_posterior_weights(weights, a, counts)
    per_component = posterior_predictive(a, np.asarray(counts, dtype=float)[..., None, :])
    return (posterior_weights[..., None] * per_component).sum(axis=-2)


def discounted_counts(outcomes: ArrayLike, gamma: float, n_categories: int) -> np.ndarray:
    """Counts a forgetting filter holds before each outcome: c_0 = 0, c_{j+1} = gamma c_j + e_{x_j}.

    ``outcomes`` are category indices, shape (L,) for one sequence or (S, L) for a batch; entries
    < 0 are padding and add nothing (for sequences shorter than L). Returns (L + 1, K) or
    (S, L + 1, K): row j holds the counts after the first j outcomes. gamma = 1 gives plain counts;
    gamma < 1 weighs the outcome i steps back by gamma^i.
    """
    x = np.asarray(outcomes)
    if not np.issubdtype(x.dtype, np.integer) or x.ndim not in (1, 2):
        raise ValueError("outcomes must be an integer array of shape (L,) or (S, L)")
    if np.any(x >= n_categories):
        raise ValueError(f"outcomes must be < n_categories = {n_categories}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    batch = np.atleast_2d(x)
    one_hot = (batch[..., None] == np.arange(n_categories)).astype(float)
    counts = discounted_sums(one_hot, gamma)
    return counts if x.ndim == 2 else counts[0]


def discounted_sums(increments: np.ndarray, gamma: float) -> np.ndarray:
    """s_0 = 0, s_{j+1} = gamma s_j + increments[:, j] along axis 1 of (S, L, K); returns (S, L + 1, K).

    A loop over positions, vectorized over sequences and categories (L is short, S may be large).
    """
    sums = np.zeros((increments.shape[0], increments.shape[1] + 1, increments.shape[2]))
    for j in range(increments.shape[1]):
        sums[:, j + 1] = gamma * sums[:, j] + increments[:, j]
    return sums
