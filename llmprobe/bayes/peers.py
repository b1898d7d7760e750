"""The peers' own statistics, so their numbers can be reproduced next to llmprobe's.

Gupta et al. (2025), "Enough coin flips can make LLMs act Bayesian", fit a forgetting factor γ on
their posterior-chain runs with a filter that differs from llmprobe's (:mod:`llmprobe.bayes.filter`):

* **their filter** starts from Beta(1, 1) — Dirichlet(1, ..., 1) for K categories — and decays the
  *pseudo-counts*, prior included: a_0 = 1, a_{j+1} = γ a_j + e_{x_j}, so
  a_j = γ^j · 1 + Σ_{t<j} γ^{j-1-t} e_{x_t}, and it predicts q_j = a_j / Σ_k a_jk;
* **their fit** is L1: γ minimizes the mean over positions j of |p̄_j − q̄_j| on P(heads), where p̄_j is
  the model's P(heads) after j examples averaged over templates and q̄_j the filter's, averaged the
  same way (with K categories: half the summed absolute difference, which is the same for K = 2).

llmprobe's filter fits the prior α (not fixed at 1) and discounts only the evidence, by minimising the
mean KL(model ‖ filter) per mark; its γ therefore answers a different question, and the two need not
agree on the same trace: with a prior that is not decayed, early flips move the prediction less.

γ is found on a grid (step 0.01 over [0, 1]) and refined by bounded Brent search around the best point;
L1 is piecewise smooth in γ, so the grid guards against local minima. numpy/scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar

GRID_STEP = 0.01
GRID_CHUNK = 16  # γ values filtered at once (memory: chunk × marks' sequences × length × K)

__all__ = ["GuptaFit", "decayed_pseudocount_predictive", "fit_gupta_gamma", "position_means"]


@dataclass(frozen=True)
class GuptaFit:
    gamma: float
    mean_abs_error: float  # the L1 objective at gamma: mean over positions of |Δ P(category 0)| for K = 2
    n_positions: int  # distinct numbers of examples the fit averaged over
    n_marks: int

    def to_dict(self) -> dict[str, float | int | str]:
        return {"variant": "gupta", "gamma": self.gamma, "mean_abs_error": self.mean_abs_error,
                "n_positions": self.n_positions, "n_marks": self.n_marks}


def decayed_pseudocount_predictive(outcomes: Sequence[ArrayLike], sequence: ArrayLike, position: ArrayLike,
                                   k: int, gamma: float) -> np.ndarray:
    """(M, K) predictions of the decayed Beta(1,1)/Dirichlet(1) filter at each mark.

    Mark i belongs to outcome sequence ``sequence[i]`` and comes after its first ``position[i]`` outcomes.
    """
    return _Chains.build(outcomes, sequence, position, k).predictive(np.array([gamma]))[0]


@dataclass(frozen=True)
class _Chains:
    """Outcome sequences padded into one array, so the filter runs over all sequences (and γs) at once."""

    onehot: np.ndarray  # (S, N, K) indicator of each outcome (0 past a sequence's end)
    sequence: np.ndarray  # (M,)
    position: np.ndarray  # (M,)

    @classmethod
    def build(cls, outcomes: Sequence[ArrayLike], sequence: ArrayLike, position: ArrayLike, k: int) -> _Chains:
        sequence = np.asarray(sequence, dtype=np.int64)
        position = np.asarray(position, dtype=np.int64)
        arrays = [np.asarray(o, dtype=np.int64) for o in outcomes]
        if len(sequence) and np.any(position > np.array([len(a) for a in arrays])[sequence]):
            raise ValueError("a mark comes after more examples than its sequence has outcomes")
        onehot = np.zeros((len(arrays), int(position.max(initial=0)), k))
        for s, a in enumerate(arrays):
            a = a[: onehot.shape[1]]
            onehot[s, np.arange(len(a)), a] = 1.0
        return cls(onehot, sequence, position)

    def predictive(self, gammas: np.ndarray) -> np.ndarray:
        """(G, M, K): a_0 = 1, a_{j+1} = γ a_j + e_{x_j}, normalized, at every mark, for every γ."""
        n_seq, n, k = self.onehot.shape
        a = np.ones((len(gammas), n_seq, k))
        states = np.empty((n + 1, len(gammas), n_seq, k))
        states[0] = a
        g = gammas[:, None, None]
        for j in range(n):
            a = g * a + self.onehot[None, :, j]
            states[j + 1] = a
        picked = states[self.position, :, self.sequence]  # (M, G, K)
        return np.moveaxis(picked / picked.sum(axis=-1, keepdims=True), 1, 0)


def position_means(values: np.ndarray, position: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The distinct positions and the mean of ``values`` (rows) at each: the template mean per j."""
    position = np.asarray(position, dtype=np.int64)
    keys, inverse = np.unique(position, return_inverse=True)
    sums = np.zeros((len(keys), values.shape[1]))
    np.add.at(sums, inverse, values)
    return keys, sums / np.bincount(inverse)[:, None]


def fit_gupta_gamma(probs: ArrayLike, outcomes: Sequence[ArrayLike], sequence: ArrayLike,
                    position: ArrayLike) -> GuptaFit:
    """Gupta et al.'s γ: L1 between the position-wise means of the model's and the filter's predictions."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError("probs must be a non-empty (marks, categories) array")
    k = probs.shape[1]
    keys, model_mean = position_means(probs, position)
    chains = _Chains.build(outcomes, sequence, position, k)

    def losses(gammas: np.ndarray) -> np.ndarray:
        out = []
        for chunk in np.array_split(gammas, max(1, len(gammas) // GRID_CHUNK)):
            for filt in chains.predictive(chunk):
                _, filt_mean = position_means(filt, position)
                out.append(0.5 * np.abs(model_mean - filt_mean).sum(axis=1).mean())
        return np.array(out)

    grid = np.linspace(0.0, 1.0, int(round(1 / GRID_STEP)) + 1)
    on_grid = losses(grid)
    best = int(np.argmin(on_grid))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    refined = minimize_scalar(lambda g: float(losses(np.array([g]))[0]), bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-7})
    gamma, value = ((float(refined.x), float(refined.fun)) if refined.fun < on_grid[best]
                    else (float(grid[best]), float(on_grid[best])))
    return GuptaFit(gamma=gamma, mean_abs_error=value, n_positions=len(keys), n_marks=probs.shape[0])
