"""Does a model update like a Bayesian? Baseline predictors and the verdict rule, with its thresholds.

Every predictor is scored the same way: the weighted mean over marks of KL(model || predictor) in
bits (the filter fit's objective, finite because every predictor here is positive) and of the
total variation. The fitted filters are scored out of sample (fitted on other folds of sequences)
and in sample; the baselines have nothing fitted to the predictions, so one number serves both:

* **never updating**: at every mark, the model's own prediction at the first mark (n = 0) of the
  same sequence, i.e. a model that ignores the examples (the mean n = 0 prediction when a sequence
  has no first mark);
* **frequency follower**: alpha_0 -> 0, the empirical frequencies (n_k + eps) / (n + K eps);
* **recency**: the last outcome, (e_last + eps) / (1 + K eps) (uniform before any example);
* **true theta**: (theta + eps) / (1 + K eps), where the experiment knows theta.

eps = :data:`BASELINE_SMOOTHING` keeps KL finite; it changes TV by at most K eps.

The verdict, in this order (thresholds are module constants, documented in docs/statistics.md):

1. ``poor-fit``: the best filter (free gamma under the fitted updating prior) has an out-of-sample
   mean KL above :data:`FIT_KL_BITS`: no filter in the family explains the predictions, whatever
   gamma says.
2. ``no-updating``: the never-updating baseline is within :data:`NO_UPDATE_BITS` of the best
   filter, or the one-component gamma = 1 filter's alpha_0 ran off to infinity (``at_bound``; a
   mixture whose components are point masses still updates its weights), or gamma's interval reaches below
   :data:`GAMMA_IDENTIFIABLE_LOW`: the predictions do not respond to the examples enough to
   identify gamma.
3. ``rejected``: the bootstrap interval of gamma lies below 1, the forgetting filter fits well, and
   forgetting matters: the gamma = 1 filter's out-of-sample mean KL exceeds the forgetting filter's
   by more than :data:`FORGETTING_BITS`.
4. ``consistent``: the gamma = 1 filter's out-of-sample mean KL is at most :data:`FIT_KL_BITS` and
   gamma = 1 is not rejected, or rejected only by a deviation too small to matter (forgetting gains
   at most :data:`FORGETTING_BITS`; a warning says so).
5. otherwise ``poor-fit``: gamma = 1 is not rejected, but the exact-Bayes filter does not explain
   the predictions well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

FIT_KL_BITS = 0.02
"""A filter 'explains the model well' when its mean KL(model || filter) is at most this (bits).
By Pinsker's inequality the mean TV is then at most sqrt(0.02 ln 2 / 2) = 0.083."""

NO_UPDATE_BITS = 1e-3
"""Updating must beat the never-updating baseline by more than this mean KL (bits)."""

FORGETTING_BITS = 1e-3
"""Forgetting must improve the out-of-sample fit by more than this mean KL (bits) to reject exact Bayes:
a gamma interval just below 1 (0.999 over 50 examples) that buys less is a statistically detectable
but practically negligible deviation (the Bayesian wind tunnel's precision is about 1e-3 bits)."""

GAMMA_IDENTIFIABLE_LOW = 0.5
"""A gamma interval reaching below this cannot tell forgetting from not updating at all."""

BASELINE_SMOOTHING = 0.01
"""eps added to every category of the frequency, recency and true-theta baselines."""

VERDICTS = ("consistent", "rejected", "poor-fit", "no-updating")

_LN2 = float(np.log(2.0))


def _smoothed(rows: np.ndarray) -> np.ndarray:
    shifted = rows + BASELINE_SMOOTHING
    return shifted / shifted.sum(axis=1, keepdims=True)


def never_updating(probs: ArrayLike, sequence: ArrayLike, position: ArrayLike) -> np.ndarray:
    """(M, K): each mark gets the model's prediction at its sequence's n = 0 mark."""
    p = np.asarray(probs, dtype=float)
    p = p / p.sum(axis=1, keepdims=True)
    seq, pos = np.asarray(sequence), np.asarray(position)
    first = pos == 0
    fallback = p[first].mean(axis=0) if np.any(first) else p.mean(axis=0)
    out = np.tile(fallback, (p.shape[0], 1))
    starts = dict(zip(seq[first].tolist(), np.flatnonzero(first).tolist()))
    for s, row in starts.items():
        out[seq == s] = p[row]
    return out


def frequency_follower(counts: ArrayLike) -> np.ndarray:
    """(n_k + eps) / (n + K eps): the alpha_0 -> 0 limit of the Bayesian predictor."""
    return _smoothed(np.asarray(counts, dtype=float))


def recency(last_outcome: ArrayLike, n_categories: int) -> np.ndarray:
    """The last outcome (-1: none yet, uniform), smoothed."""
    last = np.asarray(last_outcome)
    one_hot = (last[:, None] == np.arange(n_categories)).astype(float)
    one_hot[last < 0] = 1.0
    return _smoothed(one_hot)


def true_theta(theta: ArrayLike) -> np.ndarray:
    """The experiment's true category distribution, smoothed."""
    return _smoothed(np.asarray(theta, dtype=float))


@dataclass(frozen=True)
class Score:
    """Mean KL(model || predictor) in bits and mean TV over marks."""

    kl_bits: float
    tv: float

    def to_dict(self) -> dict[str, float]:
        return {"kl_bits": self.kl_bits, "tv": self.tv}


def score(probs: ArrayLike, predictions: ArrayLike, weights: ArrayLike | None = None) -> Score:
    """Weighted means over marks of KL(model || predictions) (bits) and TV; model rows renormalized."""
    p = np.asarray(probs, dtype=float)
    p = p / p.sum(axis=1, keepdims=True)
    q = np.asarray(predictions, dtype=float)
    w = np.ones(p.shape[0]) if weights is None else np.asarray(weights, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * np.log(p / q), 0.0).sum(axis=1) / _LN2
    tv = 0.5 * np.abs(p - q).sum(axis=1)
    return Score(float(w @ kl / w.sum()), float(w @ tv / w.sum()))


@dataclass(frozen=True)
class Evidence:
    """What the verdict rests on (KL in bits; ``*_kl_bits`` out of sample when ``out_of_sample``)."""

    best_kl_bits: float  # the forgetting filter (free gamma) under the fitted updating prior
    exact_kl_bits: float  # the gamma = 1 filter under the fitted updating prior
    never_kl_bits: float  # the never-updating baseline
    out_of_sample: bool
    gamma: float
    gamma_ci: tuple[float, float]
    rejected: bool
    alpha0_at_bound: bool  # some alpha_0 ran to the bound (a warning; with one component: never updating)
    converged: bool
    never_updates: bool = False  # the gamma = 1 filter is the alpha_0 -> infinity limit (one component at bound)
    components_chosen: bool = True  # False: one component was imposed, not chosen by held-out fit


@dataclass(frozen=True)
class Verdict:
    verdict: str
    sentence: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "sentence": self.sentence, "warnings": self.warnings}


def decide(e: Evidence) -> Verdict:
    """The verdict by the rule in the module docstring, with a one-sentence reason and warnings."""
    where = "out of sample" if e.out_of_sample else "in sample (too few sequences to hold any out)"
    low, high = e.gamma_ci
    interval = f"γ = {e.gamma:.3f} [{low:.3f}, {high:.3f}]"
    warnings = []
    if not e.out_of_sample:
        warnings.append("every KL(model‖filter) here is in sample: there were too few sequences to hold some out")
    if not e.converged:
        warnings.append("a filter fit did not converge; its numbers are where the optimizer stopped")
    if e.never_updates:
        warnings.append("α0 ran to its bound (α0 → ∞, never updating): it is a lower bound, not an estimate")
    elif e.alpha0_at_bound:
        warnings.append("a component's α0 ran to its bound (a point-mass component): a lower bound, not an estimate")
    if e.best_kl_bits > FIT_KL_BITS:
        return Verdict("poor-fit", f"Poor fit: no Bayesian filter explains the predictions (best filter's KL(model‖filter)"
                                   f" {e.best_kl_bits:.4f} bits {where} > {FIT_KL_BITS}), whatever γ says.", warnings)
    if e.never_kl_bits - e.best_kl_bits < NO_UPDATE_BITS or e.never_updates or low < GAMMA_IDENTIFIABLE_LOW:
        reason = ("α0 → ∞" if e.never_updates else
                  f"{interval} spans most of (0, 1]" if low < GAMMA_IDENTIFIABLE_LOW else
                  f"never updating scores {e.never_kl_bits:.4f} bits vs the best filter's {e.best_kl_bits:.4f}")
        return Verdict("no-updating", f"No updating: the predictions barely respond to the examples ({reason}),"
                                      " so γ is not identifiable.", warnings)
    negligible = e.rejected and e.exact_kl_bits - e.best_kl_bits <= FORGETTING_BITS
    if negligible:
        warnings.append(f"γ = 1 lies outside the interval {interval}, but forgetting improves the fit by only"
                        f" {e.exact_kl_bits - e.best_kl_bits:.1e} bits (≤ {FORGETTING_BITS:g}): a negligible deviation")
    if e.rejected and not negligible:
        if not e.components_chosen:
            warnings.append("the updating prior had one component imposed: exact Bayes under a Dirichlet-mixture"
                            " prior can look like forgetting under one Dirichlet; choose the components"
                            " (--prior-components auto) before reading this as forgetting")
        return Verdict("rejected", f"Exact Bayes rejected: the model forgets, {interval}, and that filter fits"
                                   f" (KL(model‖filter) {e.best_kl_bits:.4f} bits {where}).", warnings)
    if e.exact_kl_bits <= FIT_KL_BITS:
        return Verdict("consistent", f"Consistent with exact Bayesian updating under the fitted updating prior"
                                     f" ({interval}; KL(model‖filter) {e.exact_kl_bits:.4f} bits {where}).", warnings)
    return Verdict("poor-fit", f"Poor fit: γ = 1 is not rejected ({interval}) but the exact-Bayes filter explains"
                               f" the predictions poorly (KL(model‖filter) {e.exact_kl_bits:.4f} bits {where} > {FIT_KL_BITS}).",
                   warnings)
