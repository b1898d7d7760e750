"""The discounted Dirichlet(-mixture) filter fitted to a model's predictions: its inputs, its fit, gamma's bootstrap.

Model: before outcome j of a sequence a filter with prior Dirichlet(alpha) predicts
q_j = (alpha + c_j) / (alpha_0 + |c_j|) with discounted counts c_0 = 0, c_{j+1} = gamma c_j + e_{x_j};
gamma in (0, 1], and gamma = 1 is exact Bayesian updating. A Dirichlet-mixture prior also reweights
its components (:mod:`llmprobe.bayes.updating` holds that objective; :class:`DirichletFilter` here is
the one-component one). Both families share everything in this module:

* **Inputs.** :class:`Marks`: the model's distributions over K categories at M marks (rows
  renormalized, entropies precomputed), frequency weights, and :class:`Positions`: each mark's
  sequence and how many of its outcomes precede it. Counts at a fixed gamma do not depend on the
  parameters or the weights, so they are cached per gamma (the profile and every bootstrap resample
  reuse them). :func:`outcomes_from_running_counts` recovers outcome sequences from per-mark counts.
* **Objective** (:class:`FilterObjective`): the weighted mean over marks of KL(model || filter) in
  nats, with its analytic gradient. Its parameter-dependent part is the cross-entropy
  -sum_k p_k log q_k, the expected log-loss of the filter on tokens drawn from the model, so
  minimizing it is maximum likelihood for samples of the model's own predictions. It is 0 exactly
  when the model is the filter and needs no floor (0 log 0 = 0; q > 0 always).
* **Robust fit** (:func:`robust_fit`): the objective in (alpha, gamma) has plateaus (a huge alpha_0
  makes gamma irrelevant), so a local optimizer started anywhere can stop far from the optimum and
  even above the nested gamma = 1 fit. gamma is profiled over :data:`GAMMA_GRID` (alpha fitted at
  each fixed gamma, warm-started from its neighbour, starting with the nested gamma = 1 fit), then
  (alpha, gamma) are refined jointly from the best grid point, and the best of all of them is kept;
  a free fit no better than gamma = 1 (by :data:`TIE_NATS`) is the gamma = 1 fit. By construction
  it is never worse than the gamma = 1 fit or any other grid point.
* **Test of gamma = 1** (:func:`bootstrap_gamma`): bootstrap over sequences (marks in one sequence
  share outcomes and are not independent); each resample reruns the same robust fit, and exact
  Bayes is rejected when the percentile interval lies below 1.
* **Flags** (:func:`at_bound`): alpha ran to the optimizer's bound (log alpha_k = +-30) or a
  strength beyond :data:`ALPHA0_UNBOUNDED`, where the predictions no longer move with the counts
  and alpha_0 is a lower bound rather than an estimate; such a fit is never reported ``converged``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

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

GAMMA_GRID = (1.0, 0.9, 0.75, 0.5, 0.25, GAMMA_MIN)
"""The fixed values of gamma the free fit profiles before refining, from the nested gamma = 1 down."""

TIE_NATS = 1e-12
"""A free fit must lower the mean KL by more than this (nats) below the gamma = 1 fit to be kept."""

LOG_ALPHA_BOUND = 30.0
"""The optimizer keeps every log alpha_k in [-30, 30]."""

ALPHA0_UNBOUNDED = 1e6
"""A filter whose prior is worth more than a million examples does not move with the counts at any
resolution the data have: the fit is heading for alpha_0 -> infinity (never updating), and its
alpha_0 is a lower bound, not an estimate. Such fits are flagged ``at_bound``, never ``converged``."""

LN2 = float(np.log(2.0))


def _as_outcomes(outcomes: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
    """(S, L) int outcomes padded with -1 at the end, from a 2-D array or a list of 1-D sequences."""
    if isinstance(outcomes, np.ndarray):
        if outcomes.ndim != 2:
            raise ValueError("an outcomes array must be (S, L); pass a single sequence as [sequence]")
        padded = outcomes
    else:
        rows = [np.asarray(row) for row in cast(Sequence[ArrayLike], outcomes)]
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
class Positions:
    """Where each mark sits: its sequence's one-hot outcomes (S, L, K) and how many precede it.

    Counts at a fixed gamma do not depend on the parameters or the weights, so they are computed
    once per gamma and cached (the profile and every bootstrap resample reuse them).
    """

    one_hot: np.ndarray
    sequence: np.ndarray
    position: np.ndarray
    cache: dict[float, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls, outcomes: ArrayLike | Sequence[ArrayLike], sequence: ArrayLike, position: ArrayLike, n_categories: int
    ) -> Positions:
        """``outcomes``: an (S, L) int array padded with -1 or a list of 1-D arrays; ``sequence`` (M,):
        which sequence each mark belongs to; ``position`` (M,): how many of its outcomes precede it."""
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
        """(M, K) discounted counts at the marks (cached per gamma)."""
        key = float(gamma)
        if key not in self.cache:
            self.cache[key] = discounted_sums(self.one_hot, key)[self.sequence, self.position]
        return self.cache[key]

    def counts_and_derivative(self, gamma: float) -> tuple[np.ndarray, np.ndarray]:
        """(M, K) discounted counts at the marks and their derivative in gamma.

        d c_{j+1} / d gamma = c_j + gamma d c_j / d gamma: the same filter run on the counts.
        """
        all_counts = discounted_sums(self.one_hot, gamma)
        derivative = discounted_sums(all_counts[:, :-1], gamma)
        return all_counts[self.sequence, self.position], derivative[self.sequence, self.position]


@dataclass(frozen=True)
class Marks:
    """Validated marks: the model's distributions, their entropies (nats), weights and positions."""

    probs: np.ndarray
    entropy: np.ndarray
    weights: np.ndarray
    positions: Positions

    @classmethod
    def build(
        cls,
        probs: ArrayLike,
        outcomes: ArrayLike | Sequence[ArrayLike],
        sequence: ArrayLike,
        position: ArrayLike,
        weights: ArrayLike | None,
    ) -> Marks:
        """``probs`` (M, K): the model's distribution over the K categories at each mark (rows are
        renormalized); the rest as for :meth:`Positions.build`; ``weights`` (M,) or None (all 1)."""
        p = as_rows(probs, "probs")
        if np.any(p.sum(axis=1) <= 0):
            raise ValueError("every probability row needs positive mass")
        p = p / p.sum(axis=1, keepdims=True)
        positions = Positions.build(outcomes, sequence, position, p.shape[1])
        if positions.sequence.size != p.shape[0]:
            raise ValueError("sequence and position need one entry per row of probs")
        return cls(p, entr(p).sum(axis=1), as_weights(weights, p.shape[0]), positions)

    @property
    def n_sequences(self) -> int:
        return int(np.unique(self.positions.sequence).size)


class FilterObjective(Protocol):
    """A family of filters: parameters theta (without gamma), their bounds, a start and the objective.

    ``__call__(theta, weights, gamma)`` returns the weighted mean KL(model || filter) in nats and
    its gradient; with ``gamma=None`` the last entry of theta is gamma and the gradient includes it.
    """

    @property
    def marks(self) -> Marks: ...

    def start(self) -> np.ndarray: ...

    def bounds(self) -> list[tuple[float, float]]: ...

    def __call__(self, theta: np.ndarray, weights: np.ndarray, gamma: float | None) -> tuple[float, np.ndarray]: ...


@dataclass(frozen=True)
class DirichletFilter:
    """The one-Dirichlet filter; theta = log alpha_k."""

    marks: Marks

    def start(self) -> np.ndarray:
        """Prior mean from the weighted marks with no examples yet (else all weighted marks), strength 2."""
        weights = self.marks.weights
        first = (self.marks.positions.position == 0) & (weights > 0)
        rows = first if np.any(first) else weights > 0
        mean = weights[rows] @ self.marks.probs[rows] / weights[rows].sum()
        return np.log(np.maximum(mean, 1e-6) * 2.0)

    def bounds(self) -> list[tuple[float, float]]:
        return [(-LOG_ALPHA_BOUND, LOG_ALPHA_BOUND)] * self.marks.probs.shape[1]

    def __call__(self, theta: np.ndarray, weights: np.ndarray, gamma: float | None) -> tuple[float, np.ndarray]:
        """With p rows summing to 1: KL = -H(p) - sum_k p_k log(alpha_k + c_k) + log(alpha_0 + |c|)."""
        marks = self.marks
        n_categories = marks.probs.shape[1]
        alpha = np.exp(theta[:n_categories])
        if gamma is None:
            counts, d_counts = marks.positions.counts_and_derivative(float(theta[n_categories]))
        else:
            counts = marks.positions.counts(gamma)
        updated = alpha + counts
        total = updated.sum(axis=1)
        ratio = marks.probs / updated
        w = weights / weights.sum()
        kl = float(w @ (np.log(total) - marks.entropy - (marks.probs * np.log(updated)).sum(axis=1)))
        gradient = alpha * (float(w @ (1.0 / total)) - w @ ratio)
        if gamma is None:
            grad_gamma = float(w @ (d_counts.sum(axis=1) / total - (ratio * d_counts).sum(axis=1)))
            gradient = np.append(gradient, grad_gamma)
        return kl, gradient


@dataclass(frozen=True)
class Solution:
    """One optimizer result: theta without gamma, gamma, the objective (nats) and the optimizer's word."""

    theta: np.ndarray
    gamma: float
    value: float
    iterations: int
    success: bool

    @property
    def mean_kl_bits(self) -> float:
        """The objective in bits (never below 0: the optimizer may land a rounding error under it)."""
        return max(self.value, 0.0) / LN2


@dataclass(frozen=True)
class Profile:
    """The robust fit: the nested gamma = 1 solution, the free one, and the profile over the grid."""

    exact: Solution
    free: Solution
    grid: dict[float, Solution]

    def profile_table(self) -> list[dict[str, float]]:
        """gamma and the best mean KL (bits) with gamma held there, for reports."""
        return [{"gamma": g, "mean_kl_bits": s.mean_kl_bits} for g, s in sorted(self.grid.items())]


def optimize(objective: FilterObjective, weights: np.ndarray, gamma: float | None, start: np.ndarray) -> Solution:
    """L-BFGS-B on theta at a fixed ``gamma``, or on (theta, gamma in [GAMMA_MIN, 1]) when ``gamma`` is None."""
    bounds = objective.bounds() + ([] if gamma is not None else [(GAMMA_MIN, 1.0)])
    result = minimize(
        objective,
        start,
        args=(weights, gamma),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-9},
    )
    if gamma is None:
        return Solution(result.x[:-1], float(result.x[-1]), float(result.fun), int(result.nit), bool(result.success))
    return Solution(result.x, float(gamma), float(result.fun), int(result.nit), bool(result.success))


def robust_fit(
    objective: FilterObjective, weights: np.ndarray | None = None, warm: Profile | None = None
) -> Profile:
    """Profile gamma over :data:`GAMMA_GRID` (warm-started down the grid from the gamma = 1 fit), then
    refine gamma jointly from the best grid point; the free solution is the best of all of them.

    ``warm``: an earlier profile (the full-data fit, for bootstrap resamples) whose grid solutions
    start each fixed-gamma fit.
    """
    w = objective.marks.weights if weights is None else weights
    grid: dict[float, Solution] = {}
    previous = objective.start()
    for gamma in GAMMA_GRID:
        start = warm.grid[gamma].theta if warm is not None else previous
        grid[gamma] = optimize(objective, w, gamma, start)
        previous = grid[gamma].theta
    best = min(grid.values(), key=lambda s: s.value)
    refined = optimize(objective, w, None, np.append(best.theta, best.gamma))
    free = refined if refined.value < best.value else best
    if free.value > grid[1.0].value - TIE_NATS:
        free = grid[1.0]  # forgetting that buys nothing (a flat profile, alpha_0 -> infinity) is not reported
    return Profile(grid[1.0], free, grid)


def at_bound(theta: np.ndarray, strengths: np.ndarray) -> bool:
    """Some log alpha sits on the optimizer's bound, or some prior is worth more than :data:`ALPHA0_UNBOUNDED`."""
    return bool(np.any(np.abs(theta) >= LOG_ALPHA_BOUND - 1e-6) or np.any(strengths > ALPHA0_UNBOUNDED))


def bootstrap_gamma(
    objective: FilterObjective, full: Profile, n_bootstrap: int, level: float, seed: int | None,
    advance: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, tuple[float, float], bool]:
    """Percentile bootstrap of the robust free gamma over sequences: (samples, interval, rejected).

    Each resample draws the observed sequences with replacement (a sequence drawn r times gets its
    marks' weights multiplied by r) and reruns :func:`robust_fit`, warm-started from ``full``.
    ``advance(1)`` is called after each resample (progress for long bootstraps).
    """
    if n_bootstrap < 1 or not 0.0 < level < 1.0:
        raise ValueError("n_bootstrap must be >= 1 and level in (0, 1)")
    marks = objective.marks
    rng = np.random.default_rng(seed)
    sequences, mark_to_sequence = np.unique(marks.positions.sequence, return_inverse=True)
    mark_to_sequence = mark_to_sequence.reshape(-1)
    # only sequences with weighted marks are drawn (a sequence whose marks all carry weight 0 is not data)
    eligible = np.flatnonzero(np.bincount(mark_to_sequence, weights=marks.weights, minlength=sequences.size) > 0)
    samples = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        draws = np.zeros(sequences.size)
        draws[eligible] = np.bincount(rng.integers(eligible.size, size=eligible.size), minlength=eligible.size)
        resampled = marks.weights * draws[mark_to_sequence]
        samples[b] = robust_fit(objective, resampled, warm=full).free.gamma
        if advance is not None:
            advance(1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return samples, (float(low), float(high)), bool(high < 1.0 - GAMMA_ONE_TOLERANCE)


def outcomes_from_running_counts(
    counts: ArrayLike, sequence_id: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outcome sequences from the running (undiscounted) category counts recorded at each mark.

    ``counts`` (M, K) are the integer counts of the examples before each mark, ``sequence_id`` (M,)
    any labels of the sequences. Each sequence needs a mark at every position 0..n (the count
    vectors must grow by one outcome per step), else the order of outcomes is unknown. Returns
    (outcomes (S, L) padded with -1, sequence (M,), position (M,)) as :meth:`Marks.build` takes them.
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
