"""Maximum-likelihood Dirichlet fits (Minka 2000), from probability vectors or from count vectors.

Both fits use Newton's method on the exact Hessian, which has the form diag(q) + z 1 1^T and so
inverts in O(K) (Minka 2000, section 1 and 4). Each step is backtracked until the log-likelihood
does not decrease, which makes the Dirichlet fit (a concave problem) globally convergent. The
Dirichlet-multinomial likelihood is not concave, so when the Newton direction is not an ascent
direction that fit falls back to Minka's fixed-point update, which never decreases it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import digamma, gammaln, polygamma, xlogy

from llmprobe.bayes._arrays import as_alpha, as_rows, as_weights, log_probabilities

DEFAULT_FLOOR = 1e-10
"""Probabilities below this are raised to it (then rows renormalized) before taking logs.

A Dirichlet density is zero or infinite at an exact 0, so traces with categories outside the
top-k would otherwise have no likelihood. Fits on data with many floored entries depend on the
floor: they push that category's alpha towards 0. Report the floor with such fits.
"""

ALPHA0_UNBOUNDED = 1e8
"""A fitted alpha_0 beyond this is the limit alpha_0 -> infinity (rows that do not vary, up to float
rounding), not an estimate: such fits are reported unconverged whatever the iteration did."""

DATA_PROBABILITIES = "probabilities"
DATA_COUNTS = "counts"


@dataclass(frozen=True)
class DirichletFit:
    """A fitted Dirichlet(alpha): the prior over a row's category distribution.

    ``loglik`` is the weighted log-likelihood of the data it was fit on: Dirichlet log densities
    of the floored rows when ``data == "probabilities"``, Dirichlet-multinomial log probabilities of
    the count vectors, multinomial coefficient included, when ``data == "counts"``. ``n_obs`` is the
    sum of the frequency weights (the number of rows when unweighted).
    """

    alpha: np.ndarray
    loglik: float
    n_obs: float
    iterations: int
    converged: bool
    data: str = DATA_PROBABILITIES

    @property
    def concentration(self) -> float:
        """alpha_0 = sum(alpha): how many observations the prior is worth."""
        return float(self.alpha.sum())

    @property
    def mean(self) -> np.ndarray:
        """alpha / alpha_0: the expected category distribution."""
        return self.alpha / self.alpha.sum()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``mean`` and ``concentration`` are included for readers, not read back."""
        return {
            "alpha": self.alpha.tolist(),
            "mean": self.mean.tolist(),
            "concentration": self.concentration,
            "loglik": self.loglik,
            "n_obs": self.n_obs,
            "iterations": self.iterations,
            "converged": self.converged,
            "data": self.data,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DirichletFit:
        """Inverse of :meth:`to_dict`."""
        return cls(
            alpha=as_alpha(d["alpha"]),
            loglik=float(d["loglik"]),
            n_obs=float(d["n_obs"]),
            iterations=int(d["iterations"]),
            converged=bool(d["converged"]),
            data=str(d.get("data", DATA_PROBABILITIES)),
        )


def dirichlet_logpdf(probs: ArrayLike, alpha: ArrayLike) -> np.ndarray:
    """log Dirichlet(p | alpha) for each row of ``probs``; exact (no floor), so a 0 gives -inf or +inf."""
    p = np.asarray(probs, dtype=float)
    a = as_alpha(alpha)
    return gammaln(a.sum(axis=-1)) - gammaln(a).sum(axis=-1) + xlogy(a - 1.0, p).sum(axis=-1)


def dirichlet_multinomial_logpmf(counts: ArrayLike, alpha: ArrayLike, *, coefficient: bool = True) -> np.ndarray:
    """log P(counts | alpha) under the Dirichlet-multinomial (Polya) distribution, per row.

    With ``coefficient=True`` this is the probability of the count vector (any order of outcomes);
    with ``coefficient=False`` it is the probability of one particular sequence with those counts,
    i.e. the marginal likelihood B(alpha + n) / B(alpha) used to update mixture weights. Counts may
    be non-integer (discounted counts); the Gamma-function formula is used as is.
    """
    n = np.asarray(counts, dtype=float)
    a = as_alpha(alpha)
    a0 = a.sum(axis=-1)
    n_total = n.sum(axis=-1)
    log_marginal = gammaln(a0) - gammaln(a0 + n_total) + (gammaln(a + n) - gammaln(a)).sum(axis=-1)
    if coefficient:
        log_marginal = log_marginal + gammaln(n_total + 1.0) - gammaln(n + 1.0).sum(axis=-1)
    return log_marginal


def _sherman_morrison_step(g: np.ndarray, q: np.ndarray, z: float) -> np.ndarray:
    """H^{-1} g for H = diag(q) + z 1 1^T, in O(K); z = 0 (a trigamma difference lost to rounding at a
    huge alpha_0) is the diagonal limit."""
    b = 0.0 if z == 0 else (g / q).sum() / (1.0 / z + (1.0 / q).sum())
    return (g - b) / q


def _backtrack(
    objective: Callable[[np.ndarray], float], alpha: np.ndarray, value: float, step: np.ndarray
) -> tuple[np.ndarray, float] | None:
    """Largest alpha - t * step (t = 1, 1/2, ...) that stays positive and does not lower the objective."""
    slack = 1e-13 * (1.0 + abs(value))
    t = 1.0
    for _ in range(60):
        candidate = alpha - t * step
        if np.all(candidate > 0):
            candidate_value = objective(candidate)
            if candidate_value >= value - slack:
                return candidate, candidate_value
        t *= 0.5
    return None


def _initial_alpha_from_mean_log(mean_log_p: np.ndarray) -> np.ndarray:
    """Minka's start: mean ~ normalized geometric mean, alpha_0 ~ (K-1) / (-2 sum m (E log p - log m))."""
    mean = np.exp(mean_log_p - mean_log_p.max())
    mean /= mean.sum()
    spread = -(mean * (mean_log_p - np.log(mean))).sum()
    alpha0 = (mean.size - 1) / (2.0 * spread) if spread > 0 else 1.0
    return mean * float(np.clip(alpha0, 1e-3, 1e6))


def fit_from_mean_log(
    mean_log_p: np.ndarray,
    alpha_start: np.ndarray | None = None,
    *,
    tol: float = 1e-10,
    max_iter: int = 500,
) -> tuple[np.ndarray, int, bool]:
    """Dirichlet MLE from its sufficient statistic, the (weighted) mean of log p per category.

    Returns (alpha, iterations, converged). Converged means the last Newton step changed every
    alpha_k by less than ``tol`` relative and alpha_0 <= :data:`ALPHA0_UNBOUNDED`. The MLE does not
    exist when the rows do not vary (alpha grows without bound); the fit is then unconverged.
    """
    s = np.asarray(mean_log_p, dtype=float)

    def objective(a: np.ndarray) -> float:
        return float(gammaln(a.sum()) - gammaln(a).sum() + ((a - 1.0) * s).sum())

    alpha = _initial_alpha_from_mean_log(s) if alpha_start is None else np.array(alpha_start, dtype=float)
    value = objective(alpha)
    for iteration in range(1, max_iter + 1):
        alpha0 = alpha.sum()
        gradient = digamma(alpha0) - digamma(alpha) + s
        # Without an MLE alpha runs off to ~1e16, where the Hessian loses all precision: stop there.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            step = _sherman_morrison_step(gradient, -polygamma(1, alpha), float(polygamma(1, alpha0)))
            accepted = _backtrack(objective, alpha, value, step) if np.all(np.isfinite(step)) else None
        if accepted is None:
            return alpha, iteration, False
        new_alpha, value = accepted
        change = np.max(np.abs(new_alpha - alpha) / alpha)
        alpha = new_alpha
        if change < tol:
            return alpha, iteration, bool(alpha.sum() <= ALPHA0_UNBOUNDED)
    return alpha, max_iter, False


def fit_dirichlet(
    probs: ArrayLike,
    weights: ArrayLike | None = None,
    *,
    floor: float = DEFAULT_FLOOR,
    tol: float = 1e-10,
    max_iter: int = 500,
) -> DirichletFit:
    """MLE of alpha from rows on the simplex (N, K), optionally with frequency ``weights``.

    Rows are clipped below at ``floor`` and renormalized (see :data:`DEFAULT_FLOOR`). The data enter
    only through the weighted mean of log p, so the cost is one pass over the array.
    """
    p = as_rows(probs, "probs")
    w = as_weights(weights, p.shape[0])
    log_p = log_probabilities(p, floor)
    total = float(w.sum())
    mean_log_p = w @ log_p / total
    alpha, iterations, converged = fit_from_mean_log(mean_log_p, tol=tol, max_iter=max_iter)
    loglik = total * float(gammaln(alpha.sum()) - gammaln(alpha).sum() + ((alpha - 1.0) * mean_log_p).sum())
    return DirichletFit(alpha, loglik, total, iterations, converged, DATA_PROBABILITIES)


def _initial_alpha_from_counts(counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Method of moments for the Polya distribution: Var(n_k/n) = m_k(1-m_k)(n+a0)/(n(1+a0))."""
    n = counts.sum(axis=1)
    shares = counts / n[:, None]
    total = weights.sum()
    mean = weights @ shares / total
    variance = weights @ (shares - mean) ** 2 / total
    n_bar = weights @ n / total
    spread = float(np.mean(variance * n_bar / (mean * (1.0 - mean))))
    alpha0 = (n_bar - spread) / (spread - 1.0) if spread > 1.0 else 1e3
    return np.maximum(mean, 1e-6) * float(np.clip(alpha0, 1e-2, 1e4))


def fit_dm_rows(
    counts: np.ndarray,
    weights: np.ndarray,
    alpha_start: np.ndarray | None = None,
    *,
    tol: float = 1e-10,
    max_iter: int = 2000,
) -> tuple[np.ndarray, int, bool]:
    """Dirichlet-multinomial MLE for validated count rows (each with n > 0) and frequency weights.

    Returns (alpha, iterations, converged), converged as in :func:`fit_from_mean_log` (so the
    multinomial limit alpha_0 -> infinity is never converged). Newton with
    backtracking where the Hessian gives an ascent direction, else Minka's fixed point
    alpha_k <- alpha_k sum w (psi(n_ik + alpha_k) - psi(alpha_k)) / sum w (psi(n_i + a0) - psi(a0)).
    """
    n = counts.sum(axis=1)

    def objective(a: np.ndarray) -> float:
        a0 = a.sum()
        per_row = gammaln(a0) - gammaln(n + a0) + (gammaln(counts + a) - gammaln(a)).sum(axis=1)
        return float(weights @ per_row)

    alpha = _initial_alpha_from_counts(counts, weights) if alpha_start is None else np.array(alpha_start, dtype=float)
    value = objective(alpha)
    for iteration in range(1, max_iter + 1):
        alpha0 = alpha.sum()
        if alpha0 > ALPHA0_UNBOUNDED:  # underdispersed rows: heading for the multinomial limit, where the
            return alpha, iteration, False  # digamma and trigamma differences are lost to rounding
        per_category = weights @ (digamma(counts + alpha) - digamma(alpha))
        per_total = float(weights @ (digamma(n + alpha0) - digamma(alpha0)))
        gradient = per_category - per_total
        q = weights @ (polygamma(1, counts + alpha) - polygamma(1, alpha))
        z = float(weights @ (polygamma(1, alpha0) - polygamma(1, n + alpha0)))
        step = _sherman_morrison_step(gradient, q, z)
        accepted = _backtrack(objective, alpha, value, step) if gradient @ step < 0 else None
        if accepted is None:
            fixed_point = alpha * per_category / per_total
            accepted = fixed_point, objective(fixed_point)
        new_alpha, value = accepted
        change = np.max(np.abs(new_alpha - alpha) / alpha)
        alpha = new_alpha
        if change < tol:
            return alpha, iteration, bool(alpha.sum() <= ALPHA0_UNBOUNDED)
    return alpha, max_iter, False


def unique_count_rows(counts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows and their summed weights: count vectors repeat a lot, and each costs digammas."""
    unique, inverse = np.unique(counts, axis=0, return_inverse=True)
    return unique, np.bincount(inverse.reshape(-1), weights=weights, minlength=unique.shape[0])


def as_count_rows(counts: ArrayLike, weights: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    """Validated count rows and weights, without the rows that hold no observation."""
    c = as_rows(counts, "counts")
    w = as_weights(weights, c.shape[0])
    keep = (c.sum(axis=1) > 0) & (w > 0)
    if not np.any(keep):
        raise ValueError("counts hold no observations")
    c, w = c[keep], w[keep]
    if np.any(w @ c <= 0):
        raise ValueError("every category needs at least one count; drop categories never observed")
    return c, w


def fit_dirichlet_multinomial(
    counts: ArrayLike,
    weights: ArrayLike | None = None,
    *,
    tol: float = 1e-10,
    max_iter: int = 2000,
) -> DirichletFit:
    """MLE of alpha from count vectors (N, K), each the category counts of one row's draws.

    Rows with no counts carry no information and are dropped; identical rows are merged first. The
    reported ``loglik`` includes the multinomial coefficient. ``n_obs`` is the summed weight of the
    rows that had counts. Counts no more dispersed than multinomial draws have their MLE at
    alpha_0 = infinity; the fit then stops at a very large alpha_0 (the multinomial limit).
    """
    c, w = as_count_rows(counts, weights)
    unique, unique_weights = unique_count_rows(c, w)
    alpha, iterations, converged = fit_dm_rows(unique, unique_weights, tol=tol, max_iter=max_iter)
    loglik = float(unique_weights @ dirichlet_multinomial_logpmf(unique, alpha))
    return DirichletFit(alpha, loglik, float(w.sum()), iterations, converged, DATA_COUNTS)
