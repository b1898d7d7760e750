"""Bayesian models of in-context learning (Dalal & Misra, arXiv 2402.03175), in numpy and scipy only.

Each prompt row is a multinomial over K categories with a Dirichlet(alpha) prior (any prior: a
finite Dirichlet mixture). After counts n the Bayesian next-outcome prediction is
(alpha_k + n_k) / (alpha_0 + n); a mixture also reweights its components by B(alpha_j + n) / B(alpha_j).
A forgetting filter uses discounted counts c_{j+1} = gamma c_j + e_{x_j}; gamma = 1 is exact Bayes.
Fits: Dirichlet / mixture priors by maximum likelihood, and (m, alpha_0, gamma) to a model's predictions.
"""

from llmprobe.bayes.bayes_fit import (
    BayesFit,
    ExactBayesTest,
    bootstrap_exact_bayes,
    fit_bayes,
    outcomes_from_running_counts,
)
from llmprobe.bayes.dirichlet import (
    DEFAULT_FLOOR,
    DirichletFit,
    dirichlet_logpdf,
    dirichlet_multinomial_logpmf,
    fit_dirichlet,
    fit_dirichlet_multinomial,
)
from llmprobe.bayes.metrics import entropy_bits, entropy_gap_bits, hellinger, kl_bits, total_variation
from llmprobe.bayes.mixture import (
    ComponentSelection,
    MixtureFit,
    fit_dirichlet_mixture,
    fit_dirichlet_multinomial_mixture,
    select_components,
)
from llmprobe.bayes.posterior import (
    discounted_counts,
    mixture_posterior_predictive,
    mixture_posterior_weights,
    posterior_predictive,
)

__all__ = [
    "DEFAULT_FLOOR",
    "BayesFit",
    "ComponentSelection",
    "DirichletFit",
    "ExactBayesTest",
    "MixtureFit",
    "bootstrap_exact_bayes",
    "dirichlet_logpdf",
    "dirichlet_multinomial_logpmf",
    "discounted_counts",
    "entropy_bits",
    "entropy_gap_bits",
    "fit_bayes",
    "fit_dirichlet",
    "fit_dirichlet_mixture",
    "fit_dirichlet_multinomial",
    "fit_dirichlet_multinomial_mixture",
    "hellinger",
    "kl_bits",
    "mixture_posterior_predictive",
    "mixture_posterior_weights",
    "outcomes_from_running_counts",
    "posterior_predictive",
    "select_components",
    "total_variation",
]
