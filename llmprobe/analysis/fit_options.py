"""The options of the fits, their defaults and their checks, in one place for the library and the CLI.

:class:`PosteriorOptions` is every option ``fit-posterior`` has (:class:`ScalingOptions`, ``fit-scaling``'s);
building one checks them all and raises :class:`~llmprobe.errors.ParameterError` naming the parameter
(``min_mass``), which the CLI shows as its flag (``--min-mass``). :func:`llmprobe.analysis.fits.fit_posterior`
builds one from its arguments, so a notebook gets the same checks; the CLI builds one before reading any
trace. This module imports nothing heavy (no numpy), so a bad option fails in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprobe.errors import ParameterError

DEFAULT_BOOTSTRAP = 200
"""Bootstrap resamples for the interval of gamma."""

DEFAULT_MIN_MASS = 0.05
"""Marks where the model puts less than this probability on the category set are left out of every
fit and score (it is not predicting a category there; renormalizing would invent a prediction)."""

DEFAULT_FOLDS = 5
"""Out-of-sample scores: sequences dealt into this many folds, each scored by fits on the others."""

DEFAULT_MAX_COMPONENTS = 3
"""The largest updating prior tried with ``components="auto"``."""

DEFAULT_TASKS = 2
"""Latent tasks of the Bayesian scaling law: 2 gives it four parameters, as many as the bounded power and
logistic laws it is compared with."""

DEFAULT_FIT_FRACTION = 0.5
"""The scaling laws are fitted on this first fraction of the distinct n and scored on the rest."""

BY_CHOICES = ("template",)
"""``by``: the peers' per-n tables over prompt templates (:mod:`llmprobe.analysis.protocols`)."""

GAMMA_VARIANTS = ("gupta",)
"""``gamma_variant``: a peer's gamma fitted beside llmprobe's (:func:`llmprobe.analysis.protocols.peer_gamma`)."""


def check_choice(value: str | None, choices: tuple[str, ...], parameter: str) -> str | None:
    """``value`` if it is None or one of ``choices``."""
    if value is not None and value not in choices:
        raise ParameterError(parameter, f"expected {' or '.join(choices)}, got {value!r}")
    return value


def parse_components(spec: str | int, parameter: str = "components") -> int | None:
    """A number of mixture components (1 or more), or ``auto`` (None: the fit chooses)."""
    if spec == "auto":
        return None
    if isinstance(spec, (bool, float)):
        raise ParameterError(parameter, f"expected a whole number or 'auto', got {spec!r}")
    try:
        k = int(spec)
    except (TypeError, ValueError):
        raise ParameterError(parameter, f"expected a number or 'auto', got {spec!r}") from None
    if k < 1:
        raise ParameterError(parameter, "must be 1 or more, or 'auto'")
    return k


def check_min_mass(min_mass: float) -> None:
    check_number(min_mass, "min_mass")
    if not 0.0 <= min_mass < 1.0:
        raise ParameterError("min_mass", f"must be in [0, 1), got {min_mass}")


def check_number(value: float, parameter: str) -> None:
    """A real number (a notebook can pass anything; a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(parameter, f"expected a number, got {value!r}")


def check_at_least(value: int, low: int, parameter: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(parameter, f"expected a whole number, got {value!r}")
    if value < low:
        raise ParameterError(parameter, f"must be {low} or more, got {value}")


TRUE_PRIOR = "true"
"""``compare``'s ``--prior``: the prior the compared controls were trained under (resolved by
:func:`llmprobe.compare.resolve_prior` into their prior file)."""


@dataclass(frozen=True)
class PosteriorOptions:
    """Every option of fit-posterior, checked when built.

    ``prior``: the reference prior of the per-mark Bayes column (``fit``, ``uniform``,
    ``dirichlet:a1,...,aK`` or a prior file; :func:`llmprobe.analysis.priors.reference_prior`);
    ``bootstrap``: resamples for gamma's interval; ``components``: of the updating prior, or ``auto``
    (chosen by held-out KL among 1..``max_components``); ``min_mass``: marks with less probability on
    the categories are left out; ``folds``: of sequences, for the out-of-sample scores; ``by``:
    ``template`` adds the peers' per-n tables over templates; ``gamma_variant``: ``gupta`` adds Gupta
    et al.'s gamma.
    """

    prior: str = "fit"
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = 0
    components: str | int = "1"
    max_components: int = DEFAULT_MAX_COMPONENTS
    min_mass: float = DEFAULT_MIN_MASS
    folds: int = DEFAULT_FOLDS
    by: str | None = None
    gamma_variant: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prior, str):
            raise ParameterError("prior", f"expected 'fit', 'uniform', 'dirichlet:a1,...,aK' or a file name, got"
                                          f" {self.prior!r}")
        check_choice(self.by, BY_CHOICES, "by")
        check_choice(self.gamma_variant, GAMMA_VARIANTS, "gamma_variant")
        parse_components(self.components)
        check_min_mass(self.min_mass)
        check_at_least(self.folds, 2, "folds")
        check_at_least(self.max_components, 1, "max_components")
        check_at_least(self.bootstrap, 1, "bootstrap")
        check_at_least(self.seed, 0, "seed")

    @property
    def n_components(self) -> int | None:
        """The updating prior's components; None: choose them out of sample."""
        return parse_components(self.components)


@dataclass(frozen=True)
class ScalingOptions:
    """Every option of fit-scaling, checked when built: ``tasks``: latent tasks of the Bayesian law (>= 1);
    ``fit_fraction``: the first fraction of the distinct n the laws are fitted on, in (0, 1); ``min_mass``:
    marks with less probability on the categories are left out."""

    tasks: int = DEFAULT_TASKS
    fit_fraction: float = DEFAULT_FIT_FRACTION
    min_mass: float = DEFAULT_MIN_MASS

    def __post_init__(self) -> None:
        check_at_least(self.tasks, 1, "tasks")
        check_number(self.fit_fraction, "fit_fraction")
        if not 0.0 < self.fit_fraction < 1.0:
            raise ParameterError("fit_fraction", f"must be between 0 and 1 (exclusive), got {self.fit_fraction}")
        check_min_mass(self.min_mass)
