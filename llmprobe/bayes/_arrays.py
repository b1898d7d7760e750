"""Input checks shared by the fits, so every public function rejects bad shapes the same way."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def as_rows(data: ArrayLike, name: str, *, min_columns: int = 2) -> np.ndarray:
    """``data`` as a finite float (N, K) array with N >= 1 and K >= ``min_columns``."""
    rows = np.asarray(data, dtype=float)
    if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] < min_columns:
        raise ValueError(f"{name} must be an (N, K) array with N >= 1 and K >= {min_columns}, got shape {rows.shape}")
    if not np.all(np.isfinite(rows)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if np.any(rows < 0):
        raise ValueError(f"{name} contains negative values")
    return rows


def as_weights(weights: ArrayLike | None, n_rows: int) -> np.ndarray:
    """Non-negative frequency weights of length ``n_rows`` (all ones when ``None``)."""
    if weights is None:
        return np.ones(n_rows)
    w = np.asarray(weights, dtype=float)
    if w.shape != (n_rows,):
        raise ValueError(f"weights must have shape ({n_rows},), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w


def as_alpha(alpha: ArrayLike, name: str = "alpha") -> np.ndarray:
    """Dirichlet parameters: a float array whose entries are all finite and > 0."""
    a = np.asarray(alpha, dtype=float)
    if a.ndim == 0 or a.shape[-1] < 2 or not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"{name} must have a last axis of length >= 2 with finite entries > 0")
    return a


def log_probabilities(probs: np.ndarray, floor: float) -> np.ndarray:
    """log of rows clipped below at ``floor`` and renormalized, so exact zeros get a finite log."""
    if not 0 < floor < 1:
        raise ValueError(f"floor must be in (0, 1), got {floor}")
    clipped = np.maximum(probs, floor)
    totals = clipped.sum(axis=1, keepdims=True)
    if np.any(totals <= probs.shape[1] * floor):
        raise ValueError("every probability row needs mass above the floor")
    log_p = np.log(clipped, out=clipped)
    log_p -= np.log(totals)
    return log_p
