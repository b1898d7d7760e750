"""The updating prior: the Dirichlet-mixture prior a model's in-context predictions update from.

Not to be confused with the *prior over rows* (:mod:`llmprobe.bayes.mixture`, ``fit-prior``), the
distribution of category distributions across prompts. The updating prior is the prior of the
filter whose posterior predictive best explains the predictions at every mark:

    q_j = sum_c w'_c (alpha_c + c_j) / (alpha_c0 + |c_j|),   w'_c ∝ w_c B(alpha_c + c_j) / B(alpha_c),

with discounted counts c_{j+1} = gamma c_j + e_{x_j} (gamma = 1: exact Bayes; then the mixture
weights are updated by the Dirichlet-multinomial marginal likelihood, as conjugacy demands). With
one component this is the filter of :func:`llmprobe.bayes.fit_bayes`. The objective is the same,
the weighted mean KL(model || filter) over marks, with an analytic gradient in theta = (log
alpha_ck, weight logits u_2..u_C, [gamma]) and the same robust fit (gamma profiled on a grid from
the nested gamma = 1 fit, then refined). Mixture fits are started from the Dirichlet-multinomial
mixture fitted to the sequences' outcome counts (the prior the examples came from) and from
``n_init`` random component means; the best gamma = 1 start is kept.

Held-out scores: sequences are split into folds (:func:`sequence_folds`); a fit on the other folds
gives its marks zero weight, so every fold reuses the cached counts and predicts its own marks.
The number of components is the smallest whose held-out mean KL is within
:data:`COMPONENT_TOLERANCE_BITS` of the best (:func:`select_updating_prior`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import digamma, gammaln

from llmprobe.bayes.filter import (
    LOG_ALPHA_BOUND,
    DirichletFilter,
    FilterObjective,
    Marks,
    Positions,
    Profile,
    Solution,
    at_bound,
    bootstrap_gamma,
    optimize,
    robust_fit,
)
from llmprobe.bayes.mixture import fit_dirichlet_multinomial_mixture
from llmprobe.bayes.posterior import mixture_posterior_predictive
from llmprobe.bayes.verdict import score

COMPONENT_TOLERANCE_BITS = 1e-3
"""More components must lower the held-out mean KL by more than this (bits) to be chosen."""


@dataclass(frozen=True)
class UpdatingPrior:
    """A fitted updating prior sum_c weights[c] Dirichlet(alphas[c]) with forgetting factor gamma.

    ``mean_kl_bits``: the weighted mean KL(model || filter) on the marks it was fitted to
    (in-sample). ``at_bound``: some alpha ran to the optimizer's bound or a component's strength
    beyond :data:`~llmprobe.bayes.filter.ALPHA0_UNBOUNDED`; never ``converged`` then.
    """

    weights: np.ndarray
    alphas: np.ndarray
    gamma: float
    gamma_fixed: bool
    mean_kl_bits: float
    n_marks: int
    n_sequences: int
    iterations: int
    converged: bool
    at_bound: bool

    @property
    def n_components(self) -> int:
        return int(self.weights.size)

    @property
    def strengths(self) -> np.ndarray:
        return self.alphas.sum(axis=1)

    @property
    def prior_mean(self) -> np.ndarray:
        """The prior's mean: the components' means weighted by the component weights."""
        return self.weights @ (self.alphas / self.strengths[:, None])

    @property
    def alpha0(self) -> float:
        """The prior's strength: the components' strengths weighted by the component weights."""
        return float(self.weights @ self.strengths)

    def predictive(
        self, outcomes: ArrayLike | Sequence[ArrayLike], sequence: ArrayLike, position: ArrayLike
    ) -> np.ndarray:
        """The filter's (M, K) predictions at marks, given as :meth:`~llmprobe.bayes.filter.Positions.build`
        takes them."""
        positions = Positions.build(outcomes, sequence, position, self.alphas.shape[1])
        return mixture_posterior_predictive(self.weights, self.alphas, positions.counts(self.gamma))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``kind`` says this is an updating prior (fit-posterior), not a prior over rows."""
        return {
            "kind": "updating prior",
            "weights": self.weights.tolist(),
            "alphas": self.alphas.tolist(),
            "strengths": self.strengths.tolist(),
            "means": (self.alphas / self.strengths[:, None]).tolist(),
            "gamma": self.gamma,
            "gamma_fixed": self.gamma_fixed,
            "mean_kl_bits": self.mean_kl_bits,
            "n_marks": self.n_marks,
            "n_sequences": self.n_sequences,
            "iterations": self.iterations,
            "converged": self.converged,
            "at_bound": self.at_bound,
        }


@dataclass(frozen=True)
class _MixtureFilter:
    """The C-component filter; theta = (log alpha (C x K, row-major), weight logits u_2..u_C)."""

    marks: Marks
    n_components: int
    first: np.ndarray = field(repr=False)  # the start's theta, chosen by the caller

    def start(self) -> np.ndarray:
        return self.first

    def bounds(self) -> list[tuple[float, float]]:
        n_alpha = self.n_components * self.marks.probs.shape[1]
        return [(-LOG_ALPHA_BOUND, LOG_ALPHA_BOUND)] * (n_alpha + self.n_components - 1)

    def unpack(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weights (C,), alphas (C, K)) from theta (without gamma)."""
        n_categories = self.marks.probs.shape[1]
        n_alpha = self.n_components * n_categories
        alphas = np.exp(theta[:n_alpha]).reshape(self.n_components, n_categories)
        logits = np.concatenate([[0.0], theta[n_alpha:n_alpha + self.n_components - 1]])
        shares = np.exp(logits - logits.max())
        return shares / shares.sum(), alphas

    def __call__(self, theta: np.ndarray, weights: np.ndarray, gamma: float | None) -> tuple[float, np.ndarray]:
        marks = self.marks
        mix, a = self.unpack(theta)
        if gamma is None:
            counts, d_counts = marks.positions.counts_and_derivative(theta[-1])
        else:
            counts = marks.positions.counts(gamma)
        p = marks.probs
        n = counts.sum(axis=1)
        strength = a.sum(axis=1)  # (C,)
        updated = a[None] + counts[:, None, :]  # (M, C, K)
        total = strength[None] + n[:, None]  # (M, C)
        log_marginal = (gammaln(strength)[None] - gammaln(total)
                        + (gammaln(updated) - gammaln(a)[None]).sum(axis=2))
        joint = np.log(mix)[None] + log_marginal
        post = np.exp(joint - joint.max(axis=1, keepdims=True))  # (M, C) posterior weights
        post /= post.sum(axis=1, keepdims=True)
        r = updated / total[:, :, None]
        q = (post[:, :, None] * r).sum(axis=1)
        w = weights / weights.sum()
        with np.errstate(divide="ignore"):
            kl = float(w @ (-marks.entropy - np.where(p > 0, p * np.log(q), 0.0).sum(axis=1)))
        g = p / q
        big_g = (g[:, None, :] * r).sum(axis=2)  # (M, C)
        excess = post * (big_g - 1.0)  # (M, C)
        d_log_marginal = (digamma(strength)[None] - digamma(total))[:, :, None] + digamma(updated) - digamma(a)[None]
        d_alpha = -(excess[:, :, None] * d_log_marginal + post[:, :, None] * (g[:, None, :] - big_g[:, :, None])
                    / total[:, :, None])
        grad_alpha = (np.tensordot(w, d_alpha, axes=1) * a).reshape(-1)
        grad_logits = -(w @ excess)[1:]
        gradient = np.concatenate([grad_alpha, grad_logits])
        if gamma is None:
            d_total = d_counts.sum(axis=1)
            d_marginal = (digamma(updated) * d_counts[:, None, :]).sum(axis=2) - d_total[:, None] * digamma(total)
            gd = (g * d_counts).sum(axis=1)
            d_gamma = -(excess * d_marginal + post * (gd[:, None] - big_g * d_total[:, None]) / total).sum(axis=1)
            gradient = np.append(gradient, float(w @ d_gamma))
        return kl, gradient


def _objective(marks: Marks, n_components: int, seed: int | None, n_init: int) -> FilterObjective:
    """The filter objective for ``n_components``, started from the best of ``n_init`` starts."""
    single = DirichletFilter(marks)
    if n_components == 1:
        return single
    base = optimize(single, marks.weights, 1.0, single.start())
    strength = float(np.clip(np.exp(base.theta).sum(), 0.5, 1e4))
    n_categories = marks.probs.shape[1]
    rng = np.random.default_rng(seed)
    starts = [_data_prior_start(marks, n_components, seed)]
    for _ in range(n_init):
        means = rng.dirichlet(np.ones(n_categories), size=n_components)
        starts.append(np.concatenate([np.log(means * strength).reshape(-1), np.zeros(n_components - 1)]))
    best: tuple[float, np.ndarray] | None = None
    for theta in starts:
        candidate = _MixtureFilter(marks, n_components, theta)
        solution = optimize(candidate, marks.weights, 1.0, theta)
        if best is None or solution.value < best[0]:
            best = (solution.value, solution.theta)
    return _MixtureFilter(marks, n_components, best[1])  # type: ignore[index]  # n_init >= 1


def _data_prior_start(marks: Marks, n_components: int, seed: int | None) -> np.ndarray:
    """A start at the prior the in-context examples were drawn from: the Dirichlet-multinomial mixture
    fitted to each sequence's outcome counts. An exactly Bayesian model updates from that prior, so
    its fit starts at the answer; random starts alone can merge two components into one."""
    counts = marks.positions.one_hot.sum(axis=1)
    data_prior = fit_dirichlet_multinomial_mixture(counts, n_components, seed)
    alphas = np.clip(data_prior.alphas, np.exp(-LOG_ALPHA_BOUND) * 2, np.exp(LOG_ALPHA_BOUND) / 2)
    logits = np.log(np.maximum(data_prior.weights, 1e-6))
    return np.concatenate([np.log(alphas).reshape(-1), logits[1:] - logits[0]])


def _to_prior(objective: FilterObjective, solution: Solution, gamma_fixed: bool, weights: np.ndarray) -> UpdatingPrior:
    marks = objective.marks
    if isinstance(objective, _MixtureFilter):
        mix, alphas = objective.unpack(solution.theta)
    else:
        mix, alphas = np.ones(1), np.exp(solution.theta)[None, :]
    bounded = at_bound(solution.theta, alphas.sum(axis=1))
    return UpdatingPrior(
        weights=mix,
        alphas=alphas,
        gamma=solution.gamma,
        gamma_fixed=gamma_fixed,
        mean_kl_bits=solution.mean_kl_bits,
        n_marks=int(np.count_nonzero(weights)),
        n_sequences=int(np.unique(marks.positions.sequence[weights > 0]).size),
        iterations=solution.iterations,
        converged=solution.success and not bounded,
        at_bound=bounded,
    )


@dataclass(frozen=True)
class UpdatingPriorTest:
    """The exact-Bayes test under a fitted updating prior: free and gamma = 1 fits, gamma's interval."""

    free: UpdatingPrior
    exact: UpdatingPrior
    gamma_ci: tuple[float, float]
    level: float
    rejected: bool
    gamma_samples: np.ndarray = field(repr=False)
    profile: Profile = field(repr=False)
    selection: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "free": self.free.to_dict(),
            "exact": self.exact.to_dict(),
            "gamma_ci": list(self.gamma_ci),
            "level": self.level,
            "rejected": self.rejected,
            "gamma_profile": self.profile.profile_table(),
            "selection": self.selection,
        }


class UpdatingFit:
    """Fits of one family (number of components) on one set of marks, reusable across folds.

    ``fit(weights)`` runs the robust fit with those mark weights (zero = held out) and returns
    (the gamma = 1 fit, the free fit, the profile). Every fit starts where the full-data start
    search (``n_init`` random component means at gamma = 1) ended.
    """

    def __init__(self, probs: ArrayLike, outcomes: ArrayLike | Sequence[ArrayLike], sequence: ArrayLike,
                 position: ArrayLike, n_components: int, *, weights: ArrayLike | None = None,
                 seed: int | None = 0, n_init: int = 4) -> None:
        if n_components < 1:
            raise ValueError("n_components must be >= 1")
        self.marks = Marks.build(probs, outcomes, sequence, position, weights)
        self.n_components = n_components
        self.seed = seed
        self.n_init = n_init
        self.objective = _objective(self.marks, n_components, seed, n_init)

    def fit(self, weights: np.ndarray | None = None, warm: Profile | None = None
            ) -> tuple[UpdatingPrior, UpdatingPrior, Profile]:
        w = self.marks.weights if weights is None else weights
        profile = robust_fit(self.objective, w, warm=warm)
        return (_to_prior(self.objective, profile.exact, True, w), _to_prior(self.objective, profile.free, False, w),
                profile)

    def fit_exact(self, weights: np.ndarray | None = None) -> UpdatingPrior:
        """The gamma = 1 fit alone (no profile): what component selection scores."""
        w = self.marks.weights if weights is None else weights
        return _to_prior(self.objective, optimize(self.objective, w, 1.0, self.objective.start()), True, w)

    def predict(self, prior: UpdatingPrior) -> np.ndarray:
        """(M, K) predictions of ``prior`` at every mark (held out or not)."""
        return mixture_posterior_predictive(prior.weights, prior.alphas, self.marks.positions.counts(prior.gamma))

    def test(self, n_bootstrap: int = 200, level: float = 0.95, seed: int | None = 0,
             selection: list[dict[str, float]] | None = None,
             advance: Callable[[int], None] | None = None) -> UpdatingPriorTest:
        """The full-data fits and the bootstrap interval of gamma, rerunning the robust fit per resample
        (``advance(1)`` after each)."""
        exact, free, profile = self.fit()
        samples, interval, rejected = bootstrap_gamma(self.objective, profile, n_bootstrap, level, seed, advance)
        return UpdatingPriorTest(free, exact, interval, level, rejected, samples, profile, selection or [])


def sequence_folds(sequence: ArrayLike, n_folds: int, seed: int | None = 0) -> np.ndarray:
    """(M,) fold number of every mark: sequences dealt at random into ``n_folds`` folds (>= 2)."""
    seq = np.asarray(sequence)
    unique, inverse = np.unique(seq, return_inverse=True)
    if n_folds < 2 or unique.size < n_folds:
        raise ValueError(f"need >= 2 folds and at least as many sequences ({unique.size}) as folds ({n_folds})")
    order = np.random.default_rng(seed).permutation(unique.size)
    fold_of_sequence = np.empty(unique.size, dtype=np.int64)
    fold_of_sequence[order] = np.arange(unique.size) % n_folds
    return fold_of_sequence[inverse.reshape(-1)]


def held_out_predictions(model: UpdatingFit, folds: np.ndarray, warm: Profile | None = None,
                         advance: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(exact, free) (M, K) predictions at every mark by robust fits on the other folds' sequences
    (each profile point warm-started from ``warm``, the full-data profile, when given; ``advance(1)``
    after each fold)."""
    exact = np.empty_like(model.marks.probs)
    free = np.empty_like(model.marks.probs)
    for fold in np.unique(folds):
        held = folds == fold
        fitted_exact, fitted_free, _ = model.fit(np.where(held, 0.0, model.marks.weights), warm)
        exact[held] = model.predict(fitted_exact)[held]
        free[held] = model.predict(fitted_free)[held]
        if advance is not None:
            advance(1)
    return exact, free


def select_updating_prior(
    probs: ArrayLike, outcomes: ArrayLike | Sequence[ArrayLike], sequence: ArrayLike, position: ArrayLike,
    max_components: int, folds: np.ndarray, *, weights: ArrayLike | None = None, seed: int | None = 0,
    advance: Callable[[int], None] | None = None,
) -> tuple[UpdatingFit, list[dict[str, float]]]:
    """1..``max_components`` components scored by held-out mean KL of the gamma = 1 fit; the smallest
    within :data:`COMPONENT_TOLERANCE_BITS` of the best wins. Returns it and the table. ``advance(1)``
    after each (components, fold) fit."""
    if max_components < 1:
        raise ValueError("max_components must be >= 1")
    table, models = [], []
    for n_components in range(1, max_components + 1):
        model = UpdatingFit(probs, outcomes, sequence, position, n_components, weights=weights, seed=seed)
        exact = np.empty_like(model.marks.probs)
        for fold in np.unique(folds):
            held = folds == fold
            exact[held] = model.predict(model.fit_exact(np.where(held, 0.0, model.marks.weights)))[held]
            if advance is not None:
                advance(1)
        table.append({"n_components": n_components,
                      "held_out_kl_bits": score(model.marks.probs, exact, model.marks.weights).kl_bits})
        models.append(model)
    best = min(row["held_out_kl_bits"] for row in table)
    chosen = next(i for i, row in enumerate(table) if row["held_out_kl_bits"] <= best + COMPONENT_TOLERANCE_BITS)
    return models[chosen], table

