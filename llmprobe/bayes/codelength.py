"""Excess code length: how many more bits the model needs than exact Bayes to encode the actual outcomes.

Prequential (Dawid 1984) reading of a predictor: encode a sequence x_1..x_L outcome by outcome, each with
the predictive given the outcomes before it; the code length is the cumulative log-loss. For the model
(p) and the exact Bayesian predictor under a prior (q), per sequence and number of outcomes coded n,

    E_s(n) = sum_{j < n} [ -log2 p_j(x_{j+1}) + log2 q_j(x_{j+1}) ]    (bits),

the model's cumulative log-loss on the outcomes that actually came next minus Bayes's. E = 0 for a model
that is exact Bayes under that prior; E < 0 means the model coded the actual outcomes better (a model that
knows θ beats every prior); a model that forgets pays a per-example toll that never shrinks, so E grows
linearly in n, while one that is Bayes under another prior pays a bounded (logarithmic) amount. The growth
is the least-squares slope of the mean over sequences of E_s(n) against n (bits per example); the total is
the mean over sequences of E_s at their last coded outcome. Positions left out by the caller (e.g. marks
with too little mass on the categories) are left out of both sums. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

_LN2 = float(np.log(2.0))


@dataclass(frozen=True)
class ExcessCodeLength:
    """Excess code length of the model over exact Bayes (module docstring); ``by_n``: n (outcomes coded),
    the mean over sequences of E_s(n) in bits, and how many sequences reach n."""

    n_sequences: int
    n_predictions: int
    mean_bits_per_sequence: float
    bits_per_prediction: float  # total excess over total predictions
    slope_bits_per_example: float | None  # least-squares growth of the mean cumulative excess in n (None: one n)
    intercept_bits: float | None
    by_n: np.ndarray  # (N, 3): n, mean cumulative excess bits, sequences

    def to_dict(self) -> dict[str, Any]:
        return {"n_sequences": self.n_sequences, "n_predictions": self.n_predictions,
                "mean_bits_per_sequence": self.mean_bits_per_sequence,
                "bits_per_prediction": self.bits_per_prediction,
                "slope_bits_per_example": self.slope_bits_per_example, "intercept_bits": self.intercept_bits,
                "by_n": [{"n": int(n), "mean_excess_bits": float(e), "sequences": int(s)} for n, e, s in self.by_n]}


def excess_code_length(model_prob: ArrayLike, bayes_prob: ArrayLike, sequence: ArrayLike,
                       position: ArrayLike) -> ExcessCodeLength | None:
    """Per prediction: the model's and Bayes's probability of the outcome that came next (both > 0), its
    sequence and its position j (outcomes before it). None when there is no prediction."""
    p, q = np.asarray(model_prob, dtype=float), np.asarray(bayes_prob, dtype=float)
    if p.size == 0:
        return None
    excess = (np.log(q) - np.log(p)) / _LN2
    seq, pos = np.asarray(sequence), np.asarray(position)
    order = np.lexsort((pos, seq))
    seq, pos, excess = seq[order], pos[order], excess[order]
    starts = np.r_[True, seq[1:] != seq[:-1]]
    cumulative = np.cumsum(excess)
    cumulative -= np.repeat(cumulative[starts] - excess[starts], np.diff(np.r_[np.flatnonzero(starts), seq.size]))
    coded = pos + 1  # after predicting x_{j+1}, j + 1 outcomes have been coded
    ns, where = np.unique(coded, return_inverse=True)
    sequences = np.bincount(where).astype(float)
    mean = np.bincount(where, weights=cumulative) / sequences
    ends = np.r_[np.flatnonzero(starts)[1:] - 1, seq.size - 1]
    slope, intercept = np.polyfit(ns.astype(float), mean, 1) if ns.size >= 2 else (None, None)
    return ExcessCodeLength(
        n_sequences=int(starts.sum()), n_predictions=int(p.size), mean_bits_per_sequence=float(cumulative[ends].mean()),
        bits_per_prediction=float(excess.mean()),
        slope_bits_per_example=None if slope is None else float(slope),
        intercept_bits=None if intercept is None else float(intercept),
        by_n=np.column_stack([ns, mean, sequences]))
