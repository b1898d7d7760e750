"""The known prior a control is trained under: parsed from ``--prior``, an experiment's ``[prior]`` table, or a file.

A prior is a finite Dirichlet mixture sum_j w_j Dirichlet(alpha_j) over the experiment's K
categories (a single Dirichlet is the one-component case). Three spellings, one result:

* ``--prior dirichlet:2,2`` — one Dirichlet, the K concentrations in category order;
* ``--prior 'mixture:0.5*1,1+0.25*20,2+0.25*2,20'`` — components ``WEIGHT*ALPHAS`` joined by ``+``;
* ``--prior uniform`` — Dirichlet(1, ..., 1); ``--prior FILE.json`` — a prior file as ``fit-prior -o``
  writes it (read by :func:`llmprobe.analysis.priors.read_prior`);
* in the experiment TOML, a ``[prior]`` table: ``alpha = [2, 2]``, or ``[[prior.components]]`` tables
  each with ``weight`` and ``alpha``.

Invariants checked here, each a one-line :class:`~llmprobe.errors.UsageError` naming where it came
from: every concentration finite and > 0, exactly K per component, weights > 0 summing to 1
(within 1e-6). Pure numpy.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmprobe.analysis.priors import UPDATING_PRIOR
from llmprobe.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PRIOR_FORMAT = "llmprobe.prior/1"
WEIGHT_TOLERANCE = 1e-6
SPEC_HELP = ("expected 'dirichlet:A1,A2,...', 'mixture:W*A1,A2,...+W*A1,A2,...', 'uniform' or a prior JSON file")


@dataclass(frozen=True)
class KnownPrior:
    """sum_j weights[j] Dirichlet(alphas[j]) over ``categories``; ``spec`` is how it was given."""

    weights: np.ndarray  # (J,)
    alphas: np.ndarray  # (J, K)
    categories: tuple[str, ...]
    spec: str

    @property
    def means(self) -> np.ndarray:
        return self.alphas / self.alphas.sum(axis=1, keepdims=True)

    @property
    def mean(self) -> np.ndarray:
        """The prior predictive before any example: sum_j w_j alpha_j / alpha_j0."""
        return self.weights @ self.means

    def sample_thetas(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``count`` θ vectors, (count, K): a component by weight, then θ from its Dirichlet."""
        components = rng.choice(self.weights.size, size=count, p=self.weights)
        thetas = np.empty((count, self.alphas.shape[1]))
        for j in range(self.weights.size):
            rows = components == j
            if rows.any():
                thetas[rows] = rng.dirichlet(self.alphas[j], size=int(rows.sum()))
        return thetas

    @property
    def canonical(self) -> str:
        """The ``--prior`` string that gives this prior back: ``dirichlet:3,1.5`` or ``mixture:0.6*12,3+0.4*3,12``."""
        def alphas(alpha: np.ndarray) -> str:
            return ",".join(f"{a:g}" for a in alpha)

        if self.weights.size == 1:
            return f"dirichlet:{alphas(self.alphas[0])}"
        return "mixture:" + "+".join(f"{w:g}*{alphas(a)}" for w, a in zip(self.weights, self.alphas))

    def describe(self) -> str:
        """``Dirichlet(2, 2)`` or ``0.5 Dirichlet(1, 1) + 0.5 Dirichlet(20, 2)``."""
        def one(alpha: np.ndarray) -> str:
            return "Dirichlet(" + ", ".join(f"{a:g}" for a in alpha) + ")"

        if self.weights.size == 1:
            return one(self.alphas[0])
        return " + ".join(f"{w:g} {one(a)}" for w, a in zip(self.weights, self.alphas))

    def to_dict(self) -> dict[str, Any]:
        """A prior file (``llmprobe.prior/1``) that ``fit-posterior --prior`` and ``plot-prior`` read."""
        return {
            "format": PRIOR_FORMAT,
            "kind": UPDATING_PRIOR,  # the prior the training sequences were drawn from: what exact Bayes updates
            "source": "wind-tunnel (the known training prior)",
            "spec": self.canonical,
            "given_as": self.spec,
            "categories": list(self.categories),
            "mixture": {"weights": self.weights.tolist(), "alphas": self.alphas.tolist()},
        }


def resolve_prior(option: str | None, experiment_path: str, categories: list[str]) -> KnownPrior:
    """The prior from ``--prior`` when given, else from the experiment file's ``[prior]`` table."""
    if option is not None:
        return parse_prior_spec(option, categories)
    table = experiment_table(experiment_path, "prior")
    if table is None:
        raise UsageError("no prior: give --prior (e.g. dirichlet:2,2) or a [prior] table in the experiment",
                         where=experiment_path)
    return prior_from_table(table, categories, where=experiment_path)


def parse_prior_spec(spec: str, categories: list[str], where: str = "--prior") -> KnownPrior:
    """``dirichlet:...``, ``mixture:...``, ``uniform`` or a prior JSON file (see the module docstring)."""
    k = len(categories)
    kind, sep, body = spec.partition(":")
    if spec == "uniform":
        return _checked(np.ones(1), np.ones((1, k)), categories, spec, where)
    if sep and kind == "dirichlet":
        alpha = _numbers(body, "concentrations", spec, where)
        return _checked(np.ones(1), np.array([alpha]), categories, spec, where)
    if sep and kind == "mixture":
        weights, alphas = [], []
        for i, part in enumerate(body.split("+")):
            weight, star, rest = part.partition("*")
            if not star:
                raise UsageError(f"mixture component {i + 1} {part.strip()!r}: expected WEIGHT*A1,A2,...",
                                 where=where)
            weights.append(_numbers(weight, f"component {i + 1}'s weight", spec, where)[0])
            alphas.append(_numbers(rest, f"component {i + 1}'s concentrations", spec, where))
        if len({len(a) for a in alphas}) > 1:
            raise UsageError(f"mixture components have different numbers of concentrations in {spec!r}", where=where)
        return _checked(np.array(weights), np.array(alphas), categories, spec, where)
    if Path(spec).suffix.lower() == ".json" or Path(spec).is_file():
        return _from_file(spec, categories)
    raise UsageError(f"{SPEC_HELP}, got {spec!r}", where=where)


def prior_from_table(table: Any, categories: list[str], *, where: str) -> KnownPrior:
    """An experiment's ``[prior]`` table: ``alpha = [...]`` or ``[[prior.components]]`` (weight, alpha)."""
    if not isinstance(table, dict):
        raise UsageError("prior: must be a table ([prior])", where=where)
    unknown = sorted(set(table) - {"alpha", "components"})
    if unknown:
        raise UsageError(f"prior.{unknown[0]}: unknown key; allowed here: alpha, components", where=where)
    if ("alpha" in table) == ("components" in table):
        raise UsageError("[prior]: give either alpha = [...] or [[prior.components]] tables", where=where)
    if "alpha" in table:
        alpha = _array(table["alpha"], "prior.alpha", where)
        return _checked(np.ones(1), np.array([alpha]), categories, "[prior] alpha", where)
    components = table["components"]
    if not isinstance(components, list) or not components or not all(isinstance(c, dict) for c in components):
        raise UsageError("prior.components: must be an array of tables ([[prior.components]])", where=where)
    weights, alphas = [], []
    for i, component in enumerate(components):
        label = f"prior.components[{i}]"
        if set(component) != {"weight", "alpha"}:
            raise UsageError(f"{label}: needs exactly the keys weight and alpha", where=where)
        weights.append(_array([component["weight"]], f"{label}.weight", where)[0])
        alphas.append(_array(component["alpha"], f"{label}.alpha", where))
    if len({len(a) for a in alphas}) > 1:
        raise UsageError("prior.components: components have different numbers of concentrations", where=where)
    return _checked(np.array(weights), np.array(alphas), categories, "[prior] components", where)


def experiment_table(experiment_path: str, name: str) -> Any:
    """A raw table the experiment loader leaves to ``wind-tunnel`` (``[prior]``, ``[sweep]``) of an experiment
    file that :func:`load_experiment` already accepted; None when it has none."""
    data = tomllib.loads(Path(experiment_path).read_text(encoding="utf-8"))
    return data.get(name)


def _from_file(path: str, categories: list[str]) -> KnownPrior:
    from llmprobe.analysis.priors import prior_file_for

    prior = prior_file_for(path, list(categories), over="the experiment")
    return KnownPrior(prior.weights / prior.weights.sum(), prior.alphas, tuple(categories), path)


def _numbers(text: str, what: str, spec: str, where: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated numbers in {spec!r}", where=where) from None
    return values


def _array(raw: Any, label: str, where: str) -> list[float]:
    if not isinstance(raw, list) or not raw or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
        raise UsageError(f"{label}: must be an array of numbers", where=where)
    return [float(v) for v in raw]


def _checked(weights: np.ndarray, alphas: np.ndarray, categories: list[str], spec: str, where: str) -> KnownPrior:
    k = len(categories)
    if alphas.shape[1] != k:
        raise UsageError(f"prior has {alphas.shape[1]} concentrations per component but the experiment has {k}"
                         f" categories ({', '.join(categories)})", where=where)
    bad = [float(a) for a in alphas.reshape(-1) if not (math.isfinite(a) and a > 0)]
    if bad:
        raise UsageError(f"concentrations must be finite and > 0, got {bad[0]:g}", where=where)
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise UsageError("mixture weights must be finite and > 0", where=where)
    if abs(math.fsum(weights) - 1.0) > WEIGHT_TOLERANCE:
        raise UsageError(f"mixture weights must sum to 1, they sum to {math.fsum(weights):g}", where=where)
    return KnownPrior(weights / weights.sum(), alphas.astype(float), tuple(categories), spec)
