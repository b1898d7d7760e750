"""Fit the discounted Bayesian filter that best explains a model's predictions, and test gamma = 1.

Model: before outcome j of a sequence the filter predicts q_j = (alpha_0 m + c_j) / (alpha_0 + |c_j|)
with discounted counts c_0 = 0, c_{j+1} = gamma c_j + e_{x_j}. Parameters: prior mean m on the
simplex, prior strength alpha_0 > 0 (how many examples the prior is worth) and forgetting factor
gamma in (0, 1]; gamma = 1 is exact Bayesian updating with a Dirichlet(alpha_0 m) prior.

Objective: the weighted mean over marks of KL(model || filter). Its parameter-dependent part is the
cross-entropy -sum_k p_k log q_k, i.e. the expected log-loss of the filter on tokens drawn from the
model, so minimizing it is maximum likelihood for samples of the model's own predictions. It is 0
exactly when the model is the filter, needs no floor for zeros in the model's distribution (0 log 0
= 0; q > 0 always), and is reported in bits.

Test of gamma = 1: bootstrap over sequences (marks in one sequence share outcomes and are not
independent). Each resample refits gamma; exact Bayes is rejected when the percentile interval
lies below 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize
from scipy.special import entr

from llmprobe.bayes._arrays import as_rows, as_weights
from llmprobe.bayes.posterior import discounted_sums

GAMMA_MIN = 1e-3
"""Lower bound of gamma in the optimizer (gamma = 0 would make the filter see only the last outcome)."""

GAMMA_ONE_TOLERANCE = 1e-4
"""Estimates of gamma within this of 1 count as 1: the optimizer's resolution at the bound."""

_LN2 = float(np.log(2.0))


@dataclass(frozen=True)
class BayesFit:
    """A fitted filter: prior Dirichlet(prior_strength * prior_mean), forgetting factor gamma.

    ``mean_kl_bits`` is the weighted mean over marks of KL(model || filter) in bits; ``gamma_fixed``
    says gamma was held (gamma = 1: exact Bayes) rather than fitted.
    """

    prior_mean: np.ndarray
    prior_strength: float
    gamma: float
    gamma_fixed: bool
    mean_kl_bits: float
    n_marks: int
    n_sequences: int
    iterations: int
    converged: bool

    @property
    def prior_alpha(self) -> np.ndarray:
        return self.prior_strength * self.prior_mean

    def predictive(
        self, outcomes: ArrayLike | Sequence[ArrayLike], sequence: ArrayLike, position: ArrayLike
    ) -> np.ndarray:
        """The filter's (M, K) predictions at marks given as for :func:`fit_bayes`."""
        positions = _Positions.build(outcomes, sequence, position, self.prior_mean.size)
        updated = self.prior_alpha + positions.counts(self.gamma)
        return updated / updated.sum(axis=1, keepdims=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``prior_alpha`` is included for readers, not read back."""
        return {
            "prior_mean": self.prior_mean.tolist(),
            "prior_strength": self.prior_strength,
            "prior_alpha": self.prior_alpha.tolist(),
            "gamma": self.gamma,
            "gamma_fixed": self.gamma_fixed,
            "mean_kl_bits": self.mean_kl_bits,
            "n_marks": self.n_marks,
            "n_sequences": self.n_sequences,
            "iterations": self.iterations,
            "converged": self.converged,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BayesFit:
        """Inverse of :meth:`to_dict`."""
        return cls(
            prior_mean=np.asarray(d["prior_mean"], dtype=float),
            prior_strength=float(d["prior_strength"]),
            gamma=float(d["gamma"]),
            gamma_fixed=bool(d["gamma_fixed"]),
            mean_kl_bits=float(d["mean_kl_bits"]),
            n_marks=int(d["n_marks"]),
            n_sequences=int(d["n_sequences"]),
            iterations=int(d["iterations"]),
            converged=bool(d["converged"]),
        )


@dataclass(frozen=True)
class ExactBayesTest:
    """Bootstrap test of gamma = 1: the free and the exact (gamma = 1) fit, and the CI for gamma.

    ``rejected`` is true when the upper end of the ``level`` percentile interval is below
    1 - :data:`GAMMA_ONE_TOLERANCE`. ``kl_gain_bits`` = exact.mean_kl_bits - free.mean_kl_bits is
    what forgetting buys, per mark.
    """

    free: BayesFit
    exact: BayesFit
    gamma_ci: tuple[float, float]
    level: float
    rejected: bool
    gamma_samples: np.ndarray = field(repr=False)

    @property
    def kl_gain_bits(self) -> float:
        return self.exact.mean_kl_bits - self.free.mean_kl_bits

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, bootstrap samples included."""
        return {
            "free": self.free.to_dict(),
            "exact": self.exact.to_dict(),
            "gamma_ci": list(self.gamma_ci),
            "level": self.level,
            "rejected": self.rejected,
            "kl_gain_bits": self.kl_gain_bits,
            "gamma_samples": self.gamma_samples.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExactBayesTest:
        """Inverse of :meth:`to_dict`."""
        low, high = d["gamma_ci"]
        return cls(
            free=BayesFit.from_dict(d["free"]),
            exact=BayesFit.from_dict(d["exact"]),
            gamma_ci=(float(low), float(high)),
            level=float(d["level"]),
            rejected=bool(d["rejected"]),
            gamma_samples=np.asarray(d["gamma_samples"], dtype=float),
        )


def _as_outcomes(outcomes: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
    """(S, L) int outcomes padded with -1 at the end, from a 2-D array or a list of 1-D sequences."""
    if isinstance(outcomes, np.ndarray):
        if outcomes.ndim != 2:
            raise ValueError("an outcomes array must be (S, L); pass a single sequence as [sequence]")
        padded = outcomes
    else:
        rows = [np.asarray(row) for row in outcomes]
        if any(r.ndim != 1 or (r.size > 0 and not np.issubdtype(r.dtype, np.integer)) for r in rows):
            raise ValueError("each outcome sequence must be a 1-D array of integer category indices")
        padded = np.full((len(rows), max((r.size for r in rows), default=0)), -1, dtype=np.int64)
        for i, row in enumerate(rows):
            padded[i, : row.size] = row
    if not np.issubdtype(padded.dtype, np.integer):
        raise ValueError("outcomes must be integer category indices")
    valid = padded >= 0
    lengths = valid.sum(axis=1)
    if np.any(valid != (np.arange(padded.shape[1]) < lengths[:, None])):
        raise ValueError("outcomes may be padded with negative values only after a sequence ends")
    return padded


@dataclass(frozen=True)
class _Positions:
    """Where each mark sits: its sequence's one-hot outcomes (S, L, K) and how many precede it."""

    one_hot: np.ndarray
    sequence: np.ndarray
    position: np.ndarray

    @classmethod
    def build(
        cls, outcomes: ArrayLike | Sequence[ArrayLike], sequence: ArrayLike, position: ArrayLike, n_categories: int
    ) -> _Positions:
        x = _as_outcomes(outcomes)
        if np.any(x >= n_categories):
            raise ValueError(f"outcomes must be < the number of categories, {n_categories}")
        seq = np.asarray(sequence)
        pos = np.asarray(position)
        if seq.ndim != 1 or pos.shape != seq.shape:
            raise ValueError("sequence and position must be 1-D arrays of the same length")
        if not (np.issubdtype(seq.dtype, np.integer) and np.issubdtype(pos.dtype, np.integer)):
            raise ValueError("sequence and position must be integer arrays")
        if np.any(seq < 0) or np.any(seq >= x.shape[0]):
            raise ValueError(f"sequence must index the {x.shape[0]} outcome sequences")
        if np.any(pos < 0) or np.any(pos > (x >= 0).sum(axis=1)[seq]):
            raise ValueError("position must be between 0 and the length of the mark's sequence")
        return cls((x[..., None] == np.arange(n_categories)).astype(float), seq, pos)

    def counts(self, gamma: float) -> np.ndarray:
        """(M, K) discounted counts at the marks."""
        return discounted_sums(self.one_hot, gamma)[self.sequence, self.position]

    def counts_and_derivative(self, gamma: float) -> tuple[np.ndarray, np.ndarray]:
        """(M, K) discounted counts at the marks and their derivative in gamma.

        d c_{j+1} / d gamma = c_j + gamma d c_j / d gamma: the same filter run on the counts.
        """
        all_counts = discounted_sums(self.one_hot, gamma)
        derivative = discounted_sums(all_counts[:, :-1], gamma)
        return all_counts[self.sequence, self.position], derivative[self.sequence, self.position]


@dataclass(frozen=True)
class _Marks:
    """Validated marks: the model's distributions, their entropies (nats), weights and positions."""

    probs: np.ndarray
    entropy: np.ndarray
    weights: np.ndarray
    positions: _Positions

    @classmethod
    def build(
        cls,
        probs: ArrayLike,
        outcomes: ArrayLike | Sequence[ArrayLike],
        sequence: ArrayLike,
        position: ArrayLike,
        weights: ArrayLike | None,
    ) -> _Marks:
        p = as_rows(probs, "probs")
        if np.any(p.sum(axis=1) <= 0):
            raise ValueError("every probability row needs positive mass")
        p = p / p.sum(axis=1, keepdims=True)
        positions = _Positions.build(outcomes, sequence, position, p.shape[1])
        if positions.sequence.size != p.shape[0]:
            raise ValueError("sequence and position need one entry per row of probs")
        return cls(p, entr(p).sum(axis=1), as_weights(weights, p.shape[0]), positions)

    @property
    def n_sequences(self) -> int:
        return int(np.unique(self.positions.sequence).size)


def _mean_kl_and_gradient(
    theta: np.ndarray, marks: _Marks, weights: np.ndarray, fixed_gamma: float | None
) -> tuple[float, np.ndarray]:
    """Weighted mean KL(model || filter) in nats and its gradient in theta = (log alpha_k, [gamma]).

    With p rows summing to 1: KL = -H(p) - sum_k p_k log(alpha_k + c_k) + log(alpha_0 + |c|).
    """
    n_categories = marks.probs.shape[1]
    alpha = np.exp(theta[:n_categories])
    if fixed_gamma is None:
        counts, d_counts = marks.positions.counts_and_derivative(theta[n_categories])
    else:
        counts = marks.positions.counts(fixed_gamma)
    updated = alpha + counts
    total = updated.sum(axis=1)
    ratio = marks.probs / updated
    w = weights / weights.sum()
    kl = float(w @ (np.log(total) - marks.entropy - (marks.probs * np.log(updated)).sum(axis=1)))
    gradient = alpha * (float(w @ (1.0 / total)) - w @ ratio)
    if fixed_gamma is None:
        grad_gamma = float(w @ (d_counts.sum(axis=1) / total - (ratio * d_counts).sum(axis=1)))
        gradient = np.append(gradient, grad_gamma)
    return kl, gradient


def _initial_theta(marks: _Marks, gamma: float | None) -> np.ndarray:
    """Prior mean from the marks with no examples yet (else all marks), strength 2, gamma 0.9."""
    first = marks.positions.position == 0
    rows = first if np.any(first) else np.ones_like(first)
    mean = marks.weights[rows] @ marks.probs[rows] / marks.weights[rows].sum()
    log_alpha = np.log(np.maximum(mean, 1e-6) * 2.0)
    return log_alpha if gamma is not None else np.append(log_alpha, 0.9)


def _minimize(
    marks: _Marks, weights: np.ndarray, gamma: float | None, start: np.ndarray
) -> tuple[np.ndarray, float, int, bool]:
    """L-BFGS-B on theta; gamma, when free, is bounded to [GAMMA_MIN, 1]."""
    n_categories = marks.probs.shape[1]
    bounds = [(-30.0, 30.0)] * n_categories + ([] if gamma is not None else [(GAMMA_MIN, 1.0)])
    result = minimize(
        _mean_kl_and_gradient,
        start,
        args=(marks, weights, gamma),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10},
    )
    return result.x, float(result.fun), int(result.nit), bool(result.success)


def _to_fit(
    marks: _Marks, theta: np.ndarray, gamma: float | None, mean_kl_nats: float, iterations: int, converged: bool
) -> BayesFit:
    n_categories = marks.probs.shape[1]
    alpha = np.exp(theta[:n_categories])
    return BayesFit(
        prior_mean=alpha / alpha.sum(),
        prior_strength=float(alpha.sum()),
        gamma=float(theta[n_categories]) if gamma is None else float(gamma),
        gamma_fixed=gamma is not None,
        mean_kl_bits=max(mean_kl_nats, 0.0) / _LN2,
        n_marks=int(marks.probs.shape[0]),
        n_sequences=marks.n_sequences,
        iterations=iterations,
        converged=converged,
    )


def _fit_marks(marks: _Marks, gamma: float | None) -> tuple[BayesFit, np.ndarray]:
    """The fit and its optimizer parameters theta (to warm-start refits)."""
    if gamma is not None and not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    theta, value, iterations, converged = _minimize(marks, marks.weights, gamma, _initial_theta(marks, gamma))
    return _to_fit(marks, theta, gamma, value, iterations, converged), theta


def fit_bayes(
    probs: ArrayLike,
    outcomes: ArrayLike | Sequence[ArrayLike],
    sequence: ArrayLike,
    position: ArrayLike,
    *,
    gamma: float | None = None,
    weights: ArrayLike | None = None,
) -> BayesFit:
    """Fits prior mean, prior strength and (unless ``gamma`` is given) the forgetting factor.

    ``probs`` (M, K): the model's distribution over the K categories at each mark (rows are
    renormalized). ``outcomes``: the category sequences, an (S, L) int array padded with -1 or a
    list of 1-D arrays. ``sequence`` (M,): which sequence each mark belongs to; ``position`` (M,):
    how many of its outcomes precede the mark. ``gamma=1.0`` fits exact Bayes.
    """
    return _fit_marks(_Marks.build(probs, outcomes, sequence, position, weights), gamma)[0]


def bootstrap_exact_bayes(
    probs: ArrayLike,
    outcomes: ArrayLike | Sequence[ArrayLike],
    sequence: ArrayLike,
    position: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    n_bootstrap: int = 200,
    level: float = 0.95,
    seed: int | None = 0,
) -> ExactBayesTest:
    """Fits gamma free and gamma = 1, and a percentile bootstrap CI for gamma over sequences.

    Each resample draws the observed sequences with replacement (a sequence drawn r times gets its
    marks' weights multiplied by r) and refits from the full-data estimate. Inputs as in
    :func:`fit_bayes`.
    """
    if n_bootstrap < 1 or not 0.0 < level < 1.0:
        raise ValueError("n_bootstrap must be >= 1 and level in (0, 1)")
    marks = _Marks.build(probs, outcomes, sequence, position, weights)
    free, free_theta = _fit_marks(marks, None)
    exact = _fit_marks(marks, 1.0)[0]
    rng = np.random.default_rng(seed)
    sequences, mark_to_sequence = np.unique(marks.positions.sequence, return_inverse=True)
    samples = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        draws = np.bincount(rng.integers(sequences.size, size=sequences.size), minlength=sequences.size)
        resampled = marks.weights * draws[mark_to_sequence]
        samples[b] = _minimize(marks, resampled, None, free_theta)[0][-1]
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    rejected = bool(high < 1.0 - GAMMA_ONE_TOLERANCE)
    return ExactBayesTest(free, exact, (float(low), float(high)), level, rejected, samples)


def outcomes_from_running_counts(
    counts: ArrayLike, sequence_id: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outcome sequences from the running (undiscounted) category counts recorded at each mark.

    ``counts`` (M, K) are the integer counts of the examples before each mark, ``sequence_id`` (M,)
    any labels of the sequences. Each sequence needs a mark at every position 0..n (the count
    vectors must grow by one outcome per step), else the order of outcomes is unknown. Returns
    (outcomes (S, L) padded with -1, sequence (M,), position (M,)) as :func:`fit_bayes` takes them.
    """
    c = np.asarray(counts, dtype=float)
    if c.ndim != 2 or np.any(c < 0) or np.any(c != np.round(c)):
        raise ValueError("counts must be an (M, K) array of non-negative integers")
    c = c.astype(np.int64)
    labels = np.asarray(sequence_id)
    if labels.shape != (c.shape[0],):
        raise ValueError("sequence_id needs one entry per mark")
    _, sequence = np.unique(labels, return_inverse=True)
    sequence = sequence.reshape(-1)
    position = c.sum(axis=1)
    order = np.lexsort((position, sequence))
    seq, pos, cnt = sequence[order], position[order], c[order]
    starts = np.ones(seq.size, dtype=bool)
    starts[1:] = seq[1:] != seq[:-1]
    if np.any(pos[starts] != 0):
        raise ValueError("every sequence needs a mark with no examples before it (all counts 0)")
    step = cnt[1:] - cnt[:-1]
    within = ~starts[1:]
    advance = pos[1:] - pos[:-1]
    if np.any(within & (advance > 1)) or np.any(within & (advance == 0) & np.any(step != 0, axis=1)):
        raise ValueError("counts skip a position or disagree at the same position; outcome order is unknown")
    if np.any(within[:, None] & (advance == 1)[:, None] & (step < 0)):
        raise ValueError("running counts decrease within a sequence")
    moves = within & (advance == 1)
    outcomes = np.full((int(sequence.max()) + 1, int(position.max())), -1, dtype=np.int64)
    outcomes[seq[1:][moves], pos[:-1][moves]] = np.argmax(step[moves], axis=1)
    return outcomes, sequence, position
