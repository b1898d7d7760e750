"""The Bayesian scaling law of in-context learning and the laws it is compared with, fitted to an ICL curve.

Arora, Jurafsky, Potts & Goodman ("Bayesian scaling laws for in-context learning", arXiv 2410.16531) model
the probability a Bayesian in-context learner gives the next example after n examples of a task as

    y(n) = sum_j rho_j P_j^(K n + 1) / sum_j rho_j P_j^(K n),

with a prior rho over M latent tasks, P_j the probability of one example of the task under latent task j,
and an ICL efficiency K: each in-context example counts as K examples of evidence (K = 1 for exact
Bayesian updating of this task prior). With the posterior w_j(n) ∝ rho_j P_j^(K n), y(n) = sum_j w_j(n) P_j:
the curve starts at the prior's average per-example probability and moves towards the best task's P_j as
the evidence accumulates, at a rate set by K. Their baselines are laws of the negative log-likelihood
NLL(n) = -log y(n):

* power law: NLL = C n^(-alpha) + E (undefined at n = 0, so fitted on n >= 1);
* bounded power law: NLL = C (1 + n / n_c)^(-alpha) + E;
* logistic: NLL = L / (1 + (n / x_0)^s) + E.

Every law here is fitted the same way (this module's choice, as their "mse_prob" loss): least squares on
y(n) in probability, on the fitting points only, from a small grid of starts (the lowest residual wins),
with positive parameters fitted in logs and probabilities in logits. Out of sample: the RMSE of y on the
held-out points (their extrapolation test: fit on the first part of the curve, score the rest). numpy and
scipy only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import least_squares
from scipy.special import expit, logsumexp

BAYESIAN = "bayesian"
BASELINES = ("power", "bounded_power", "logistic")
LAWS = (BAYESIAN, *BASELINES)
LAW_NAMES = {BAYESIAN: "Bayesian law (Arora et al.)", "power": "power law", "bounded_power": "bounded power law",
             "logistic": "logistic"}
_LOGIT_BOUND = 30.0
_LOG_BOUND = 20.0


def bayesian_law(n: ArrayLike, prior: ArrayLike, task_probs: ArrayLike, efficiency: float) -> np.ndarray:
    """y(n) = sum_j rho_j P_j^(K n + 1) / sum_j rho_j P_j^(K n), computed in log space."""
    log_p = np.log(np.asarray(task_probs, dtype=float))
    with np.errstate(divide="ignore"):
        log_prior = np.log(np.asarray(prior, dtype=float))
    evidence = log_prior + efficiency * np.asarray(n, dtype=float)[:, None] * log_p
    return np.exp(logsumexp(evidence + log_p, axis=1) - logsumexp(evidence, axis=1))


def power_law(n: ArrayLike, scale: float, exponent: float, floor: float) -> np.ndarray:
    """y = exp(-(C n^-alpha + E)), n >= 1."""
    return np.exp(-(scale * np.asarray(n, dtype=float) ** -exponent + floor))


def bounded_power_law(n: ArrayLike, scale: float, exponent: float, knee: float, floor: float) -> np.ndarray:
    """y = exp(-(C (1 + n / n_c)^-alpha + E))."""
    return np.exp(-(scale * (1.0 + np.asarray(n, dtype=float) / knee) ** -exponent + floor))


def logistic_law(n: ArrayLike, height: float, midpoint: float, steepness: float, floor: float) -> np.ndarray:
    """y = exp(-(L / (1 + (n / x_0)^s) + E))."""
    x = np.asarray(n, dtype=float)
    with np.errstate(divide="ignore"):
        power = np.where(x > 0, np.exp(np.clip(steepness * (np.log(np.maximum(x, 1e-300)) - np.log(midpoint)),
                                               -700, 700)), 0.0)
    return np.exp(-(height / (1.0 + power) + floor))


@dataclass(frozen=True)
class LawFit:
    """One law fitted to the fitting points: its parameters, its RMSE there and on the held-out points
    (None: nothing held out), and its prediction at every n of the curve (NaN where it is undefined)."""

    law: str
    parameters: dict[str, Any]
    n_parameters: int
    rmse_fit: float
    rmse_held_out: float | None
    predictions: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"law": self.law, "name": LAW_NAMES[self.law], "parameters": self.parameters,
                "n_parameters": self.n_parameters, "rmse_fit": self.rmse_fit, "rmse_held_out": self.rmse_held_out}


@dataclass(frozen=True)
class ScalingComparison:
    """Every law fitted to the curve y(n) on the points ``fitted`` and scored on the rest."""

    n: np.ndarray
    y: np.ndarray
    fitted: np.ndarray  # bool per point: used to fit (True) or held out
    tasks: int
    fits: dict[str, LawFit]

    @property
    def law(self) -> LawFit:
        return self.fits[BAYESIAN]

    @property
    def efficiency(self) -> float:
        """K of the Bayesian law."""
        return float(self.law.parameters["efficiency"])

    @property
    def best_baseline(self) -> LawFit:
        """The baseline with the lowest held-out RMSE (fitting RMSE when nothing is held out)."""
        return min((self.fits[name] for name in BASELINES), key=_held_or_fit)

    @property
    def error_ratio(self) -> float | None:
        """Held-out RMSE of the Bayesian law over the best baseline's (< 1: the law extrapolates better)."""
        law, base = self.law.rmse_held_out, self.best_baseline.rmse_held_out
        if law is None or base is None:
            return None
        return law / base if base > 0 else (1.0 if law == 0 else float("inf"))

    def to_dict(self) -> dict[str, Any]:
        ratio = self.error_ratio
        return {"tasks": self.tasks, "n_points": int(self.n.size), "n_fitted": int(self.fitted.sum()),
                "fit_through_n": int(self.n[self.fitted].max()), "efficiency": self.efficiency,
                "best_baseline": self.best_baseline.law,
                "error_ratio": None if ratio is None or not np.isfinite(ratio) else ratio,
                "laws": {name: fit.to_dict() for name, fit in self.fits.items()}}


def _held_or_fit(fit: LawFit) -> float:
    return fit.rmse_fit if fit.rmse_held_out is None else fit.rmse_held_out


@dataclass(frozen=True)
class _Law:
    """A law as least squares sees it: unconstrained parameters, their bounds, starts, and the curve."""

    name: str
    curve: Callable[[np.ndarray, np.ndarray], np.ndarray]
    bounds: tuple[np.ndarray, np.ndarray]
    starts: list[np.ndarray]
    describe: Callable[[np.ndarray], dict[str, Any]]
    defined: Callable[[np.ndarray], np.ndarray]  # where the law is defined (n >= 1 for the power law)


def _bayesian(tasks: int, y: np.ndarray) -> _Law:
    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        logits = np.r_[0.0, theta[: tasks - 1]]
        prior = np.exp(logits - logsumexp(logits))
        return prior, expit(theta[tasks - 1: 2 * tasks - 1]), float(np.exp(theta[-1]))

    def describe(theta: np.ndarray) -> dict[str, Any]:
        prior, probs, efficiency = unpack(theta)
        order = np.argsort(probs)
        return {"prior": prior[order].tolist(), "task_probs": probs[order].tolist(), "efficiency": efficiency}

    low, high = float(np.clip(y.min(), 0.01, 0.98)), float(np.clip(y.max(), 0.02, 0.999))
    probs = np.linspace(low, max(high, low + 1e-3), tasks)
    starts = []
    for first, efficiency in itertools.product((0.5, 0.95), (0.1, 1.0, 10.0)):
        prior = np.r_[first, np.full(tasks - 1, (1 - first) / max(tasks - 1, 1))] if tasks > 1 else np.ones(1)
        starts.append(np.r_[np.log(prior[1:] / prior[0]), np.log(probs / (1 - probs)), np.log(efficiency)])
    size = 2 * tasks
    return _Law(BAYESIAN, lambda n, t: bayesian_law(n, *unpack(t)),
                (np.r_[np.full(size - 1, -_LOGIT_BOUND), -12.0], np.r_[np.full(size - 1, _LOGIT_BOUND), 8.0]),
                starts, describe, lambda n: np.ones(n.size, dtype=bool))


def _nll_start(y: np.ndarray) -> tuple[float, float]:
    """(floor E, excess C) of a start: the NLL the curve ends at, and how far above it it begins."""
    nll = -np.log(np.clip(y, 1e-12, 1.0))
    floor = max(float(nll.min()) * 0.9, 1e-4)
    return floor, max(float(nll.max()) - floor, 1e-4)


def _baseline(name: str, y: np.ndarray, n: np.ndarray) -> _Law:
    floor, excess = _nll_start(y)
    middle = float(max(np.median(n), 1.0))
    grid: list[tuple[float, ...]]
    names: tuple[str, ...]
    curve: Callable[..., np.ndarray]
    defined: Callable[[np.ndarray], np.ndarray] | None
    if name == "power":
        grid = [(excess, a) for a in (0.1, 0.5, 1.5)]
        names, curve, defined = ("scale", "exponent", "floor"), power_law, (lambda x: x >= 1)
    elif name == "bounded_power":
        grid = [(excess, a, c) for a in (0.5, 1.0, 2.0) for c in (1.0, middle)]
        names, curve, defined = ("scale", "exponent", "knee", "floor"), bounded_power_law, None
    else:
        grid = [(excess, m, s) for m in (1.0, middle) for s in (0.5, 1.0, 2.0)]
        names, curve, defined = ("height", "midpoint", "steepness", "floor"), logistic_law, None
    size = len(names)
    return _Law(name, lambda x, t: curve(x, *np.exp(t)),
                (np.full(size, -_LOG_BOUND), np.full(size, _LOG_BOUND)),
                [np.log(np.r_[start, floor]) for start in grid],
                lambda t: dict(zip(names, np.exp(t).tolist())),
                defined or (lambda x: np.ones(x.size, dtype=bool)))


def _fit(law: _Law, n: np.ndarray, y: np.ndarray, fitted: np.ndarray) -> LawFit:
    defined = law.defined(n)
    use = fitted & defined
    x, target = n[use], y[use]
    best: Any = None  # scipy's OptimizeResult of the lowest cost
    for start in law.starts:
        start = np.clip(start, law.bounds[0] + 1e-9, law.bounds[1] - 1e-9)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            result = least_squares(lambda t: np.nan_to_num(law.curve(x, t) - target, nan=1.0), start,
                                   bounds=law.bounds, x_scale="jac", ftol=1e-10, xtol=1e-10, gtol=1e-10,
                                   max_nfev=500)
        if best is None or result.cost < best.cost:
            best = result
    predictions = np.full(n.size, np.nan)
    predictions[defined] = law.curve(n[defined], best.x)
    held = ~fitted & defined
    return LawFit(law.name, law.describe(best.x), int(best.x.size), _rmse(predictions[use], target),
                  _rmse(predictions[held], y[held]) if held.any() else None, predictions)


def _rmse(prediction: np.ndarray, target: np.ndarray) -> float:
    return float(np.sqrt(np.mean((prediction - target) ** 2)))


def fit_scaling_laws(n: ArrayLike, y: ArrayLike, fitted: ArrayLike, tasks: int = 2) -> ScalingComparison:
    """Fit the Bayesian law with ``tasks`` latent tasks and the three baselines to ``y`` (probabilities in
    (0, 1]) at ``n`` on the points where ``fitted`` is True; score each on the others."""
    x, target = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    mask = np.asarray(fitted, dtype=bool)
    if x.ndim != 1 or target.shape != x.shape or mask.shape != x.shape:
        raise ValueError("n, y and fitted must be 1-D arrays of the same length")
    if tasks < 1:
        raise ValueError("tasks must be >= 1")
    if np.any(x < 0) or not np.all(np.isfinite(target)) or np.any(target <= 0) or np.any(target > 1):
        raise ValueError("n must be >= 0 and y in (0, 1]")
    if mask.sum() <= 2 * tasks or (mask & (x >= 1)).sum() < 4:
        raise ValueError(f"too few points to fit: {int(mask.sum())} (the laws have up to {max(2 * tasks, 4)}"
                         " parameters)")
    laws = [_bayesian(tasks, target[mask]), *(_baseline(name, target[mask], x[mask]) for name in BASELINES)]
    return ScalingComparison(x, target, mask, tasks, {law.name: _fit(law, x, target, mask) for law in laws})
