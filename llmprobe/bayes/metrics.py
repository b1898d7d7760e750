"""Distances between a model's next-token distributions and Bayesian predictions, row by row, in bits.

Rows are taken as given (not renormalized); the last axis is the category axis. 0 log 0 = 0, so
categories with p = 0 contribute nothing; KL(p || q) is +inf when q = 0 where p > 0.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import entr, rel_entr

_LN2 = float(np.log(2.0))


def kl_bits(p: ArrayLike, q: ArrayLike) -> np.ndarray:
    """KL(p || q) = sum_k p_k log2(p_k / q_k) per row; +inf where q_k = 0 < p_k."""
    return rel_entr(np.asarray(p, dtype=float), np.asarray(q, dtype=float)).sum(axis=-1) / _LN2


def total_variation(p: ArrayLike, q: ArrayLike) -> np.ndarray:
    """TV(p, q) = (1/2) sum_k |p_k - q_k| per row, in [0, 1]."""
    return 0.5 * np.abs(np.asarray(p, dtype=float) - np.asarray(q, dtype=float)).sum(axis=-1)


def entropy_bits(p: ArrayLike) -> np.ndarray:
    """H(p) = -sum_k p_k log2 p_k per row."""
    return entr(np.asarray(p, dtype=float)).sum(axis=-1) / _LN2


def entropy_gap_bits(model: ArrayLike, bayes: ArrayLike) -> np.ndarray:
    """H(model) - H(bayes) per row: > 0 when the model is less certain than the Bayesian prediction."""
    return entropy_bits(model) - entropy_bits(bayes)


def hellinger(p: ArrayLike, q: ArrayLike) -> np.ndarray:
    """Hellinger distance sqrt(½ Σ (√p − √q)²) along the last axis, in [0, 1]."""
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    return np.sqrt(np.clip(0.5 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(axis=-1), 0.0, 1.0))
