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

eps = :data:`BASELINE_SMOOTHING` keeps KL finite; it changes TV by at most K eps. One more
predictor that ignores the examples is fitted, like the filters, out of sample: the **shared
constant** (:func:`shared_constant`), one prediction for every mark, the alpha_0 -> infinity member
of the filter family. It, not each sequence's first prediction, is the fair never-updating rival
when that first prediction is as noisy as the rest.

The verdict (:func:`decide`) rests each word on the comparison that defines it, in this order
(thresholds are module constants; the table with planted-model results is in docs/statistics.md):

1. ``no-updating``: a predictor that ignores the examples -- each sequence's first prediction, the
   shared constant, or the gamma = 1 filter when its one component's alpha_0 ran to infinity --
   explains the predictions (mean KL <= :data:`FIT_KL_BITS`) and the forgetting filter does not beat
   it by more than :data:`NO_UPDATE_BITS`: updating buys nothing.
2. ``rejected``: forgetting is established -- the bootstrap interval of gamma lies below 1 *and*
   forgetting lowers the out-of-sample mean KL by more than :data:`FORGETTING_BITS` -- and the
   forgetting filter explains the predictions (<= :data:`FIT_KL_BITS`). However low gamma is: a
   narrow interval near 0 is strong forgetting (the last example outweighs all earlier ones), not
   a failure to update.
3. ``consistent``: forgetting is not established and the gamma = 1 filter explains the predictions
   (<= :data:`FIT_KL_BITS`).
4. ``poor-fit``: the filter the verdict would rest on (the forgetting filter when forgetting is
   established, else the gamma = 1 filter) does not explain the predictions, and by rule 1 neither
   does any predictor that ignores the examples.

A gamma interval wider than :data:`GAMMA_UNIDENTIFIED_WIDTH` says only that the data do not pin gamma:
it is reported (in the no-updating sentence, else as a warning), never a rule of its own.
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

GAMMA_UNIDENTIFIED_WIDTH = 0.5
"""A gamma interval wider than this spans more than half of (0, 1]: the data do not identify gamma."""

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


def shared_constant(probs: ArrayLike, weights: ArrayLike, fold: ArrayLike | None = None) -> np.ndarray:
    """(M, K): one prediction for every mark, the weighted mean of the model's (renormalized) rows --
    the constant that minimizes the mean KL(model || constant). With ``fold`` (per mark), each fold's
    marks get the constant fitted on the other folds (out of sample), as the filters do."""
    p = np.asarray(probs, dtype=float)
    p = p / p.sum(axis=1, keepdims=True)
    w = np.asarray(weights, dtype=float)
    if fold is None:
        return np.tile(w @ p / w.sum(), (p.shape[0], 1))
    folds = np.asarray(fold)
    out = np.empty_like(p)
    for held in np.unique(folds):
        inside = folds == held
        other = np.where(inside, 0.0, w)
        out[inside] = other @ p / other.sum()
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
        kl = np.maximum(np.where(p > 0, p * np.log(p / q), 0.0).sum(axis=1), 0.0) / _LN2  # >= 0 despite rounding
    tv = 0.5 * np.abs(p - q).sum(axis=1)
    return Score(float(w @ kl / w.sum()), float(w @ tv / w.sum()))


@dataclass(frozen=True)
class Evidence:
    """What the verdict rests on (KL in bits; ``*_kl_bits`` out of sample when ``out_of_sample``)."""

    best_kl_bits: float  # the forgetting filter (free gamma) under the fitted updating prior
    exact_kl_bits: float  # the gamma = 1 filter under the fitted updating prior
    never_kl_bits: float  # the never-updating baseline (each sequence's first prediction)
    constant_kl_bits: float  # the shared constant (fitted like the filters)
    out_of_sample: bool
    gamma: float
    gamma_ci: tuple[float, float]
    rejected: bool
    alpha0_at_bound: bool  # some alpha_0 ran to the bound (a warning; with one component: never updating)
    converged: bool
    never_updates: bool = False  # the gamma = 1 filter is the alpha_0 -> infinity limit (one component at bound)
    components_chosen: bool = True  # False: one component was imposed, not chosen by held-out fit

    @property
    def forgetting_gain_bits(self) -> float:
        """How much forgetting lowers the mean KL: the gamma = 1 filter's minus the forgetting filter's."""
        return self.exact_kl_bits - self.best_kl_bits

    @property
    def forgets(self) -> bool:
        """Forgetting is established: gamma's interval lies below 1 and forgetting buys more than
        :data:`FORGETTING_BITS` (out of sample when ``out_of_sample``)."""
        return self.rejected and self.forgetting_gain_bits > FORGETTING_BITS

    def ignoring_examples(self) -> tuple[float, str]:
        """The best predictor that ignores the examples: (its mean KL, what it is)."""
        candidates = [(self.never_kl_bits, "each sequence's own first prediction, kept at every mark"),
                      (self.constant_kl_bits, "one constant prediction for every mark")]
        if self.never_updates:
            candidates.append((self.exact_kl_bits, "the γ = 1 filter, whose α0 ran to ∞"))
        return min(candidates, key=lambda candidate: candidate[0])


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
    unidentified = high - low > GAMMA_UNIDENTIFIED_WIDTH
    warnings = []
    if not e.out_of_sample:
        warnings.append("every KL(model‖filter) here is in sample: there were too few sequences to hold some out")
    if not e.converged:
        warnings.append("a filter fit did not converge; its numbers are where the optimizer stopped")
    if e.never_updates:
        warnings.append("the γ = 1 filter's α0 ran to its bound (α0 → ∞, never updating): it is a lower bound,"
                        " not an estimate")
    elif e.alpha0_at_bound:
        warnings.append("a component's α0 ran to its bound (a point-mass component): a lower bound, not an estimate")
    still_kl, still = e.ignoring_examples()
    gain = e.forgetting_gain_bits
    if still_kl <= FIT_KL_BITS and still_kl - e.best_kl_bits < NO_UPDATE_BITS:
        pinned = (f"; {interval} spans more than half of (0, 1]: γ is not identifiable" if unidentified else "")
        return Verdict("no-updating", f"No updating: a predictor that ignores the examples ({still}) explains"
                                      f" the predictions (KL(model‖·) {still_kl:.4f} bits) and the forgetting filter"
                                      f" does no better ({e.best_kl_bits:.4f} bits {where}; updating must gain more"
                                      f" than {NO_UPDATE_BITS:g} bits){pinned}.", warnings)
    if unidentified:
        warnings.append(f"{interval} spans more than half of (0, 1]: the data do not pin the forgetting factor")
    if e.forgets and e.best_kl_bits <= FIT_KL_BITS:
        if not e.components_chosen:
            warnings.append("the updating prior had one component imposed: exact Bayes under a Dirichlet-mixture"
                            " prior can look like forgetting under one Dirichlet; choose the components"
                            " (--prior-components auto) before reading this as forgetting")
        # the last example's weight 1 exceeds all earlier ones' gamma / (1 - gamma) exactly when gamma < 1/2
        recent = "; the last example outweighs all earlier ones together" if e.gamma < 0.5 else ""
        memory = 1.0 / (1.0 - e.gamma)
        return Verdict("rejected", f"Exact Bayes rejected: the model forgets, {interval} (an effective memory of"
                                   f" {memory:.1f} examples{recent}); forgetting lowers KL(model‖filter) from"
                                   f" {e.exact_kl_bits:.4f} to {e.best_kl_bits:.4f} bits {where}, and that filter"
                                   " fits.", warnings)
    if e.rejected and not e.forgets:
        warnings.append(f"γ = 1 lies outside the interval {interval}, but forgetting gains only {gain:.1e} bits"
                        f" (≤ {FORGETTING_BITS:g}): a negligible deviation")
    elif not e.rejected and gain > FORGETTING_BITS:
        warnings.append(f"forgetting gains {gain:.1e} bits, but the interval {interval} reaches 1: not established")
    if not e.forgets and e.exact_kl_bits <= FIT_KL_BITS:
        return Verdict("consistent", f"Consistent with exact Bayesian updating under the fitted updating prior"
                                     f" ({interval}; KL(model‖filter) {e.exact_kl_bits:.4f} bits {where}).", warnings)
    ignoring = f"ignoring the examples scores {still_kl:.4f} bits"
    if e.forgets:
        return Verdict("poor-fit", f"Poor fit: the model forgets ({interval}; γ = 1 costs {gain:.4f} bits), but even"
                                   f" the forgetting filter explains the predictions poorly (KL(model‖filter)"
                                   f" {e.best_kl_bits:.4f} bits {where} > {FIT_KL_BITS}), and {ignoring}.", warnings)
    return Verdict("poor-fit", f"Poor fit: no Bayesian filter explains the predictions (exact Bayes's"
                               f" KL(model‖filter) {e.exact_kl_bits:.4f} bits {where} > {FIT_KL_BITS}, forgetting's"
                               f" {e.best_kl_bits:.4f}), and {ignoring}, whatever γ says ({interval}).", warnings)
