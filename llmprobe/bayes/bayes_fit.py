"""The one-Dirichlet filter as a public API: ``fit_bayes`` (prior mean, strength and gamma) and
``bootstrap_exact_bayes`` (the test of gamma = 1), with their results ``BayesFit`` and ``ExactBayesTest``.

A thin layer over :mod:`llmprobe.bayes.filter`, which holds the model, the objective, the robust fit
and the bootstrap (docs/statistics.md, sections 5 and 6). It is the one-component case of the updating
prior (:class:`llmprobe.bayes.updating.UpdatingFit` with ``n_components=1`` runs the same objective and
the same fits); this API reports it as a prior mean and a strength, and also fits any fixed gamma.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from llmprobe.bayes.filter import (
    DirichletFilter,
    Marks,
    Positions,
    Solution,
    at_bound,
    bootstrap_gamma,
    optimize,
    robust_fit,
)



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
    at_bound: bool = False

    @property
    def prior_alpha(self) -> np.ndarray:
        return self.prior_strength * self.prior_mean

    def predictive(
        self, outcomes: ArrayLike | Sequence[ArrayLike], sequence: ArrayLike, position: ArrayLike
    ) -> np.ndarray:
        """The filter's (M, K) predictions at marks given as for :func:`fit_bayes`."""
        positions = Positions.build(outcomes, sequence, position, self.prior_mean.size)
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
            "at_bound": self.at_bound,
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
            at_bound=bool(d.get("at_bound", False)),
        )


@dataclass(frozen=True)
class ExactBayesTest:
    """Bootstrap test of gamma = 1: the free and the exact (gamma = 1) fit, and the CI for gamma.

    ``rejected`` is true when the upper end of the ``level`` percentile interval is below
    1 - :data:`~llmprobe.bayes.filter.GAMMA_ONE_TOLERANCE`. ``kl_gain_bits`` = exact.mean_kl_bits - free.mean_kl_bits is
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


def _to_fit(marks: Marks, solution: Solution, gamma_fixed: bool) -> BayesFit:
    alpha = np.exp(solution.theta)
    bounded = at_bound(solution.theta, alpha.sum())
    return BayesFit(
        prior_mean=alpha / alpha.sum(),
        prior_strength=float(alpha.sum()),
        gamma=solution.gamma,
        gamma_fixed=gamma_fixed,
        mean_kl_bits=solution.mean_kl_bits,
        n_marks=int(marks.probs.shape[0]),
        n_sequences=marks.n_sequences,
        iterations=solution.iterations,
        converged=solution.success and not bounded,
        at_bound=bounded,
    )


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
    how many of its outcomes precede the mark. ``gamma=1.0`` fits exact Bayes; a free gamma is
    fitted robustly (:func:`~llmprobe.bayes.filter.robust_fit`), so it is never worse than the
    gamma = 1 fit.
    """
    marks = Marks.build(probs, outcomes, sequence, position, weights)
    objective = DirichletFilter(marks)
    if gamma is not None:
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        return _to_fit(marks, optimize(objective, marks.weights, gamma, objective.start()), True)
    return _to_fit(marks, robust_fit(objective).free, False)


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
    """Fits gamma free (robustly) and gamma = 1, and a percentile bootstrap CI for gamma over sequences.

    Every resample runs the same robust fit as the full data
    (:func:`~llmprobe.bayes.filter.bootstrap_gamma`). Inputs as in :func:`fit_bayes`.
    """
    if n_bootstrap < 1 or not 0.0 < level < 1.0:
        raise ValueError("n_bootstrap must be >= 1 and level in (0, 1)")
    marks = Marks.build(probs, outcomes, sequence, position, weights)
    objective = DirichletFilter(marks)
    profile = robust_fit(objective)
    samples, interval, rejected = bootstrap_gamma(objective, profile, n_bootstrap, level, seed)
    return ExactBayesTest(_to_fit(marks, profile.free, False), _to_fit(marks, profile.exact, True), interval,
                          level, rejected, samples)
