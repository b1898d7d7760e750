"""Priors as files: one reader for every command that takes a prior, and the ``--prior`` choices.

``--prior`` specs (:func:`reference_prior`): ``uniform``, ``dirichlet:a1,...,aK``, a fit-posterior
``--json`` summary (its fitted *updating prior*) or a fit-prior file (a *prior over rows*).

A prior file is JSON holding a :class:`~llmprobe.bayes.MixtureFit` or
:class:`~llmprobe.bayes.DirichletFit` ``to_dict()`` (``alphas`` + ``weights``, or ``alpha``), at the
top level or under one key, with optional ``categories`` and a label (``model``, ``trace``, ...)
beside it; ``llmprobe fit-prior -o`` writes one (format ``llmprobe.prior/1``). Every check happens
here: JSON numbers (not strings, not booleans) for alphas and weights, finite positive alphas of at
most :data:`MAX_ALPHA` over two or more categories, one row of alphas per weight, non-negative weights
that sum to 1, category names that match. A leading UTF-8 BOM is ignored. Pure numpy: the figures (:mod:`llmprobe.plots.prior`) and the fits both read through it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmprobe.bayes import MixtureFit
from llmprobe.errors import ParameterError, UsageError

LABEL_KEYS = ("model", "trace", "label", "source")
UPDATING_PRIOR = "updating prior"
"""The prior a model's in-context predictions update from: what ``fit-posterior --prior`` compares with
(``wind-tunnel``'s known training prior, a fit-posterior summary's fitted one)."""
PRIOR_OVER_ROWS = "prior over rows"
"""The spread of predictions across prompts (``fit-prior``): not the prior a model updates from."""
PRIOR_KINDS = (UPDATING_PRIOR, PRIOR_OVER_ROWS)
# Larger concentrations are a point mass for every purpose here, and their sums and log-gamma terms
# lose all precision or overflow; no fit-prior output comes near this.
MAX_ALPHA = 1e12


@dataclass
class Prior:
    """sum_j weights[j] Dirichlet(alphas[j]) over ``categories``, with the fit's other scalar facts."""

    weights: np.ndarray  # (J,)
    alphas: np.ndarray  # (J, K)
    categories: list[str]
    label: str | None
    facts: dict[str, Any]
    has_names: bool = True  # False: the file named no categories, so ``categories`` are placeholders
    kind: str | None = None  # the file's top-level ``kind`` (one of PRIOR_KINDS); None: it does not say

    @property
    def means(self) -> np.ndarray:
        return self.alphas / self.alphas.sum(axis=1, keepdims=True)


def read_prior(source: str) -> Prior:
    """Read a fit-prior JSON file; any problem is a one-line :class:`UsageError` naming the file."""
    if source == "-":
        raw, source = sys.stdin.buffer.read(), "<stdin>"
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError("no such file" if not path.exists() else "not a file", where=source)
        raw = path.read_bytes()
    try:
        document = json.loads(raw.decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UsageError(f"not JSON ({exc})", where=source) from None
    except OSError as exc:
        raise UsageError(f"cannot read prior file ({exc.strerror})", where=source) from None
    found = _find_fit(document)
    if found is None:
        raise UsageError("not a fitted prior: no object with 'alphas' and 'weights' (mixture) or 'alpha'"
                         " (Dirichlet)", where=source)
    fit, outer = found
    raw_alphas = fit["alphas"] if "alphas" in fit else fit["alpha"]
    if not _all_numbers(raw_alphas) or not _all_numbers(fit.get("weights", [1.0])):
        raise UsageError("alphas and weights must be JSON numbers (lists of numbers), not strings or booleans",
                         where=source)
    try:
        alphas = np.atleast_2d(np.asarray(fit["alphas"] if "alphas" in fit else fit["alpha"], dtype=float))
        weights = np.asarray(fit.get("weights", [1.0]), dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise UsageError("alphas and weights must be numbers", where=source) from None
    if alphas.ndim != 2 or alphas.shape[1] < 2 or not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
        raise UsageError("alphas must be finite positive numbers over two or more categories", where=source)
    if np.any(alphas > MAX_ALPHA):
        raise UsageError(f"alphas must be at most {MAX_ALPHA:g} (got {alphas.max():g})", where=source)
    if alphas.shape[0] != 1 and "weights" not in fit:
        raise UsageError(f"a mixture of {alphas.shape[0]} components needs 'weights'", where=source)
    if weights.shape != (alphas.shape[0],) or np.any(weights < 0) or not math.isclose(weights.sum(), 1.0,
                                                                                        rel_tol=1e-6):
        raise UsageError(f"weights must be {alphas.shape[0]} non-negative numbers summing to 1", where=source)
    categories = _categories(fit, outer, alphas.shape[1], source)
    label = next((str(outer[k]) for k in LABEL_KEYS if isinstance(outer.get(k), str)), None)
    facts = {k: v for k, v in fit.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    kind = outer.get("kind")
    if kind is not None and kind not in PRIOR_KINDS:
        raise UsageError(f"'kind' must be one of {', '.join(map(repr, PRIOR_KINDS))}, got {kind!r}", where=source)
    return Prior(weights, alphas, categories, label, facts,
                 has_names=fit.get("categories", outer.get("categories")) is not None, kind=kind)


def _all_numbers(value: Any) -> bool:
    """A JSON number or a (nested) list of them; booleans and strings are not numbers."""
    if isinstance(value, list):
        return bool(value) and all(_all_numbers(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _find_fit(document: Any) -> tuple[dict, dict] | None:
    """The fit object and the object holding it (itself at the top level), searched one level deep."""
    if not isinstance(document, dict):
        return None
    if "alphas" in document or "alpha" in document:
        return document, document
    for value in document.values():
        if isinstance(value, dict) and ("alphas" in value or "alpha" in value):
            return value, document
    return None


def _categories(fit: dict, outer: dict, k: int, source: str) -> list[str]:
    names = fit.get("categories", outer.get("categories"))
    if names is None:
        return [f"category {i + 1}" for i in range(k)]
    if not isinstance(names, list):
        raise UsageError(f"'categories' must be a list naming the {k} categories of the alphas", where=source)
    names = [n.get("name") if isinstance(n, dict) else n for n in names]
    if len(names) != k or not all(isinstance(n, str) for n in names):
        raise UsageError(f"'categories' must name the {k} categories of the alphas", where=source)
    return names


def prior_file_for(spec: str, categories: list[str], over: str = "the trace") -> Prior:
    """A prior file over the same categories as ``over`` (``--prior FILE``). The file must name them: alphas
    without names would be applied in the trace's category order unchecked."""
    prior = read_prior(spec)
    if not prior.has_names:
        raise UsageError(f"names no 'categories', so its alphas cannot be matched to {over}'s"
                         f" ({', '.join(categories)}); add \"categories\": [...] in the alphas' order", where=spec)
    if prior.alphas.shape[1] != len(categories) or prior.categories != categories:
        raise UsageError(f"prior is over {prior.categories}, {over} over {categories}", where=spec)
    return prior


@dataclass
class ReferencePrior:
    """A fixed prior given with ``--prior`` (not fitted to the predictions), and what it is.

    ``kind``: ``uniform``, ``dirichlet`` (``dirichlet:2,5,1.5``) or ``file``; ``role`` says what the
    prior is: ``updating prior`` (uniform, dirichlet:, a fit-posterior JSON: the gamma = 1 updating
    prior it fitted, or a file that says so in its ``kind``, as wind-tunnel's known prior does),
    ``prior over rows`` (a file whose ``kind`` says so, as fit-prior's: the spread of predictions
    across prompts, which is not the prior a model updates from) or ``unstated`` (a file that does
    not say).
    """

    mixture: MixtureFit
    kind: str
    role: str
    source: str

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "role": self.role, "source": self.source,
                "weights": self.mixture.weights.tolist(), "alphas": self.mixture.alphas.tolist()}


DIRICHLET_PREFIX = "dirichlet:"


def reference_prior(spec: str, categories: list[str]) -> ReferencePrior:
    """``--prior`` other than ``fit``: ``uniform``, ``dirichlet:a1,...,aK``, a fit-posterior JSON
    (its updating prior) or a fit-prior JSON (a prior over rows). A bad spec is a ParameterError naming ``prior``;
    a bad file, one naming the file."""
    k = len(categories)
    if spec == "uniform":
        return ReferencePrior(_fixed_mixture(np.ones(1), np.ones((1, k))), "uniform", UPDATING_PRIOR, spec)
    if spec.startswith(DIRICHLET_PREFIX):
        try:
            alpha = np.array([float(x) for x in spec[len(DIRICHLET_PREFIX):].split(",")])
        except ValueError:
            raise ParameterError("prior", f"expected dirichlet:a1,...,a{k} with numbers, got {spec!r}") from None
        if alpha.shape != (k,) or not np.all(np.isfinite(alpha)) or np.any(alpha <= 0):
            raise ParameterError("prior", f"dirichlet: needs {k} finite positive numbers (one per category:"
                                          f" {', '.join(categories)}), got {spec!r}")
        return ReferencePrior(_fixed_mixture(np.ones(1), alpha[None, :]), "dirichlet", UPDATING_PRIOR, spec)
    path = Path(spec)
    if not path.exists():
        raise UsageError("no such prior file (expected 'fit', 'uniform', 'dirichlet:a1,...,aK' or a prior JSON"
                         " file)", where=spec)
    updating = _updating_prior_in(path)
    if updating is None:
        prior = prior_file_for(spec, categories)
        return ReferencePrior(_fixed_mixture(prior.weights, prior.alphas), "file", prior.kind or "unstated", spec)
    weights, alphas, file_categories = updating
    if alphas.shape[1] != k or file_categories != categories:
        raise UsageError(f"updating prior is over {file_categories}, the trace over {categories}", where=spec)
    return ReferencePrior(_fixed_mixture(weights, alphas), "file", UPDATING_PRIOR, spec)


def _fixed_mixture(weights: np.ndarray, alphas: np.ndarray) -> MixtureFit:
    return MixtureFit(weights=weights, alphas=alphas, loglik=float("nan"), n_obs=0.0, iterations=0, converged=True)


def _updating_prior_in(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The gamma = 1 updating prior of a fit-posterior ``--json`` summary (the first trace's), if it is one."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None  # read_prior reports what is wrong with the file
    summary = document[0] if isinstance(document, list) and document else document
    if not isinstance(summary, dict) or not isinstance(summary.get("updating_prior"), dict):
        return None
    exact = summary["updating_prior"].get("exact", {})
    try:
        alphas = np.atleast_2d(np.asarray(exact["alphas"], dtype=float))
        weights = np.asarray(exact["weights"], dtype=float).reshape(-1)
    except (KeyError, TypeError, ValueError):
        raise UsageError("fit-posterior summary without a readable updating_prior.exact (weights, alphas)",
                         where=str(path)) from None
    if (alphas.ndim != 2 or alphas.shape[1] < 2 or not np.all(np.isfinite(alphas)) or np.any(alphas <= 0)
            or weights.shape != (alphas.shape[0],) or np.any(weights < 0)
            or not math.isclose(weights.sum(), 1.0, rel_tol=1e-6)):
        raise UsageError("updating_prior.exact needs positive alphas and weights summing to 1", where=str(path))
    names = summary.get("categories")
    if not (isinstance(names, list) and len(names) == alphas.shape[1] and all(isinstance(n, str) for n in names)):
        raise UsageError(f"a fit-posterior summary needs 'categories', a list naming the {alphas.shape[1]} categories"
                         " of its updating prior, to be matched to the trace's", where=str(path))
    return weights, alphas, names
