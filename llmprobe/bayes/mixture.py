"""Finite Dirichlet mixtures fitted by EM: any prior over the simplex, approximated (Dalal & Hall 1983).

The E-step computes responsibilities in log space (logsumexp); the M-step is a weighted Dirichlet
(or Dirichlet-multinomial) MLE per component, warm-started from the previous alphas. Starts are
k-means++ seeds on the rows; each start gets a few EM iterations and the best is run to convergence.
A single Dirichlet is the one-component case, so downstream code handles one type, :class:`MixtureFit`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import gammaln, logsumexp

from llmprobe.bayes._arrays import as_alpha, as_rows, as_weights, log_probabilities
from llmprobe.bayes.dirichlet import (
    DATA_COUNTS,
    DATA_PROBABILITIES,
    DEFAULT_FLOOR,
    DirichletFit,
    as_count_rows,
    dirichlet_multinomial_logpmf,
    fit_dm_rows,
    fit_from_mean_log,
    unique_count_rows,
)

INIT_SMOOTHING = 0.1
"""Share of each row's initial responsibility spread evenly over components, so every component
starts from data that vary (a Dirichlet fitted to one repeated row has no MLE)."""

EMPTY_COMPONENT = 1e-10
"""A component whose responsibility mass falls below this share of the data keeps its alphas."""


@dataclass(frozen=True)
class MixtureFit:
    """sum_j weights[j] Dirichlet(alphas[j]), with the fit's weighted log-likelihood and criteria.

    ``loglik`` is on the data named by ``data`` (as for :class:`DirichletFit`); ``n_obs`` is the sum
    of the frequency weights and is the n in BIC.
    """

    weights: np.ndarray
    alphas: np.ndarray
    loglik: float
    n_obs: float
    iterations: int
    converged: bool
    data: str = DATA_PROBABILITIES

    @property
    def n_components(self) -> int:
        return int(self.weights.size)

    @property
    def n_params(self) -> int:
        """J K alphas plus J - 1 free weights."""
        n_components, n_categories = self.alphas.shape
        return n_components * n_categories + n_components - 1

    @property
    def bic(self) -> float:
        return -2.0 * self.loglik + self.n_params * float(np.log(self.n_obs))

    @property
    def aic(self) -> float:
        return -2.0 * self.loglik + 2.0 * self.n_params

    @property
    def means(self) -> np.ndarray:
        """(J, K) component means alpha_j / alpha_j0."""
        return self.alphas / self.alphas.sum(axis=1, keepdims=True)

    @property
    def concentrations(self) -> np.ndarray:
        """(J,) component strengths alpha_j0."""
        return self.alphas.sum(axis=1)

    @classmethod
    def from_dirichlet(cls, fit: DirichletFit) -> MixtureFit:
        """The one-component mixture equal to ``fit``."""
        alphas = fit.alpha[None, :].copy()
        return cls(np.ones(1), alphas, fit.loglik, fit.n_obs, fit.iterations, fit.converged, fit.data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; derived fields (bic, aic, n_params, means) are for readers, not read back."""
        return {
            "weights": self.weights.tolist(),
            "alphas": self.alphas.tolist(),
            "means": self.means.tolist(),
            "concentrations": self.concentrations.tolist(),
            "loglik": self.loglik,
            "n_obs": self.n_obs,
            "n_params": self.n_params,
            "bic": self.bic,
            "aic": self.aic,
            "iterations": self.iterations,
            "converged": self.converged,
            "data": self.data,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MixtureFit:
        """Inverse of :meth:`to_dict`."""
        alphas = as_alpha(np.atleast_2d(np.asarray(d["alphas"], dtype=float)), "alphas")
        weights = np.asarray(d["weights"], dtype=float)
        if weights.shape != (alphas.shape[0],):
            raise ValueError("weights and alphas disagree on the number of components")
        return cls(
            weights=weights,
            alphas=alphas,
            loglik=float(d["loglik"]),
            n_obs=float(d["n_obs"]),
            iterations=int(d["iterations"]),
            converged=bool(d["converged"]),
            data=str(d.get("data", DATA_PROBABILITIES)),
        )


@dataclass(frozen=True)
class ComponentSelection:
    """Mixtures with 1..max components, their (K, loglik, BIC) table, and the BIC-minimal one."""

    table: list[dict[str, float]]
    fits: list[MixtureFit]
    best: MixtureFit


def _kmeanspp_responsibilities(points: np.ndarray, n_components: int, rng: np.random.Generator) -> np.ndarray:
    """(J, N) smoothed one-hot responsibilities from the nearest k-means++ seed (seeded on <= 10,000 rows)."""
    pool = points[rng.choice(points.shape[0], size=min(points.shape[0], 10_000), replace=False)]
    centers = [pool[rng.integers(pool.shape[0])]]
    nearest = ((pool - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, n_components):
        total = nearest.sum()
        pick = rng.choice(pool.shape[0], p=nearest / total) if total > 0 else rng.integers(pool.shape[0])
        centers.append(pool[pick])
        nearest = np.minimum(nearest, ((pool - pool[pick]) ** 2).sum(axis=1))
    c = np.array(centers)
    distances = (c**2).sum(axis=1)[:, None] - 2.0 * c @ points.T
    one_hot = np.eye(n_components)[:, np.argmin(distances, axis=0)]
    return (1.0 - INIT_SMOOTHING) * one_hot + INIT_SMOOTHING / n_components


@dataclass
class _EMState:
    mix: np.ndarray
    alphas: np.ndarray
    loglik: float = -np.inf
    iterations: int = 0
    converged: bool = False


def _run_em(
    component_loglik: Callable[[np.ndarray], np.ndarray],
    m_step: Callable[[np.ndarray, np.ndarray], np.ndarray],
    state: _EMState,
    weights: np.ndarray,
    *,
    tol: float,
    max_iter: int,
) -> _EMState:
    """Up to ``max_iter`` more EM iterations; converged once the loglik per observation gains < ``tol``.

    ``component_loglik(alphas)`` gives the (J, N) log densities, ``m_step(weighted_resp, alphas)`` the
    new (J, K) alphas. Responsibilities are (J, N) so the logsumexp runs over the short axis 0.
    """
    total = weights.sum()
    mix, alphas, previous = state.mix, state.alphas, -np.inf

    def e_step() -> tuple[np.ndarray, float]:
        with np.errstate(divide="ignore"):
            joint = component_loglik(alphas) + np.log(mix)[:, None]
        row_loglik = logsumexp(joint, axis=0)
        return np.exp(joint - row_loglik) * weights, float(weights @ row_loglik)

    for iteration in range(state.iterations + 1, state.iterations + max_iter + 1):
        weighted, loglik = e_step()
        if loglik - previous < tol * total:
            return _EMState(mix, alphas, loglik, iteration, True)
        previous = loglik
        mix = weighted.sum(axis=1) / total
        alphas = m_step(weighted, alphas)
    return _EMState(mix, alphas, e_step()[1], state.iterations + max_iter, False)


def _best_of_starts(
    component_loglik: Callable[[np.ndarray], np.ndarray],
    m_step: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
    points: np.ndarray,
    weights: np.ndarray,
    n_components: int,
    seed: int | None,
    *,
    n_init: int,
    init_iter: int,
    tol: float,
    max_iter: int,
) -> _EMState:
    """Short EM runs from ``n_init`` k-means++ starts; only the best one is run to convergence.

    This is the "small EM" start of Biernacki, Celeux & Govaert (2003): poor starts show a lower
    log-likelihood within a few iterations, and a full EM run from each would dominate the cost.
    """
    if n_components < 1 or n_init < 1:
        raise ValueError("n_components and n_init must be >= 1")
    rng = np.random.default_rng(seed)
    starts = []
    for _ in range(1 if n_components == 1 else n_init):
        weighted = _kmeanspp_responsibilities(points, n_components, rng) * weights
        start = _EMState(weighted.sum(axis=1) / weights.sum(), m_step(weighted, None))
        starts.append(_run_em(component_loglik, m_step, start, weights, tol=tol, max_iter=min(init_iter, max_iter)))
    best = max(starts, key=lambda state: state.loglik)
    if best.converged or best.iterations >= max_iter:
        return best
    return _run_em(component_loglik, m_step, best, weights, tol=tol, max_iter=max_iter - best.iterations)


def fit_dirichlet_mixture(
    probs: ArrayLike,
    n_components: int,
    seed: int | None = 0,
    *,
    weights: ArrayLike | None = None,
    n_init: int = 4,
    init_iter: int = 10,
    floor: float = DEFAULT_FLOOR,
    tol: float = 1e-7,
    max_iter: int = 500,
) -> MixtureFit:
    """Mixture of ``n_components`` Dirichlets for rows on the simplex (N, K), by EM.

    ``n_init`` starts get ``init_iter`` EM iterations each, the best is continued. ``tol`` is the
    per-observation log-likelihood gain (nats) below which EM stops. Rows are floored as in
    :func:`~llmprobe.bayes.dirichlet.fit_dirichlet`.
    """
    p = as_rows(probs, "probs")
    w = as_weights(weights, p.shape[0])
    log_p = log_probabilities(p, floor)

    def component_loglik(alphas: np.ndarray) -> np.ndarray:
        log_norm = gammaln(alphas.sum(axis=1)) - gammaln(alphas).sum(axis=1)
        return (alphas - 1.0) @ log_p.T + log_norm[:, None]

    def m_step(weighted: np.ndarray, alphas: np.ndarray | None) -> np.ndarray:
        mass = weighted.sum(axis=1)
        # (K, N) @ (N, J): threaded OpenBLAS ran (J, N) @ (N, K) up to 20x slower on a busy 2-core box.
        mean_log_p = (log_p.T @ weighted.T).T / np.maximum(mass, np.finfo(float).tiny)[:, None]
        if alphas is None:
            return np.array([fit_from_mean_log(s, tol=1e-8, max_iter=100)[0] for s in mean_log_p])
        new = alphas.copy()
        for j in np.flatnonzero(mass > EMPTY_COMPONENT * mass.sum()):
            new[j] = fit_from_mean_log(mean_log_p[j], alphas[j], tol=1e-8, max_iter=100)[0]
        return new

    state = _best_of_starts(
        component_loglik, m_step, p, w, n_components, seed,
        n_init=n_init, init_iter=init_iter, tol=tol, max_iter=max_iter,
    )
    return MixtureFit(state.mix, state.alphas, state.loglik, float(w.sum()), state.iterations, state.converged)


def fit_dirichlet_multinomial_mixture(
    counts: ArrayLike,
    n_components: int,
    seed: int | None = 0,
    *,
    weights: ArrayLike | None = None,
    n_init: int = 4,
    init_iter: int = 10,
    tol: float = 1e-7,
    max_iter: int = 500,
) -> MixtureFit:
    """Mixture of ``n_components`` Dirichlet priors fitted to count vectors (N, K), by EM.

    Identical rows are merged first, so the cost scales with the number of distinct count vectors.
    ``loglik`` includes the multinomial coefficients; rows without counts are dropped. Starts and
    stopping as in :func:`fit_dirichlet_mixture`.
    """
    c, w = as_count_rows(counts, weights)
    unique, unique_weights = unique_count_rows(c, w)
    shares = unique / unique.sum(axis=1, keepdims=True)

    def component_loglik(alphas: np.ndarray) -> np.ndarray:
        return np.stack([dirichlet_multinomial_logpmf(unique, a) for a in alphas])

    def m_step(weighted: np.ndarray, alphas: np.ndarray | None) -> np.ndarray:
        if alphas is None:
            return np.array([fit_dm_rows(unique, r, tol=1e-8, max_iter=100)[0] for r in weighted])
        mass = weighted.sum(axis=1)
        new = alphas.copy()
        for j in np.flatnonzero(mass > EMPTY_COMPONENT * mass.sum()):
            new[j] = fit_dm_rows(unique, weighted[j], alphas[j], tol=1e-8, max_iter=100)[0]
        return new

    state = _best_of_starts(
        component_loglik,
        m_step,
        shares,
        unique_weights,
        n_components,
        seed,
        n_init=n_init,
        init_iter=init_iter,
        tol=tol,
        max_iter=max_iter,
    )
    return MixtureFit(
        state.mix, state.alphas, state.loglik, float(w.sum()), state.iterations, state.converged, DATA_COUNTS
    )


def select_components(
    data: ArrayLike,
    max_components: int,
    seed: int | None = 0,
    *,
    counts: bool = False,
    **fit_options: Any,
) -> ComponentSelection:
    """Fits 1..``max_components`` components and picks the lowest BIC.

    ``data`` are probability rows, or count rows when ``counts`` is true (Dirichlet-multinomial
    mixtures). ``fit_options`` go to the mixture fit (``n_init``, ``tol``, ...).
    """
    if max_components < 1:
        raise ValueError("max_components must be >= 1")
    fit = fit_dirichlet_multinomial_mixture if counts else fit_dirichlet_mixture
    fits = [fit(data, j, seed, **fit_options) for j in range(1, max_components + 1)]
    table = [{"n_components": f.n_components, "loglik": f.loglik, "bic": f.bic} for f in fits]
    return ComponentSelection(table, fits, min(fits, key=lambda f: f.bic))
