"""Bayesian models of in-context learning (Dalal & Misra, arXiv 2402.03175), in numpy and scipy only.

Each prompt row is a multinomial over K categories with a Dirichlet(alpha) prior (any prior: a
finite Dirichlet mixture). After counts n the Bayesian next-outcome prediction is
(alpha_k + n_k) / (alpha_0 + n); a mixture also reweights its components by B(alpha_j + n) / B(alpha_j).
A forgetting filter uses discounted counts c_{j+1} = gamma c_j + e_{x_j}; gamma = 1 is exact Bayes.
Fits: Dirichlet / mixture priors over rows by maximum likelihood; the *updating prior* (a Dirichlet
mixture filter with gamma, :mod:`.updating`) to a model's predictions, robustly (:mod:`.filter`: the
marks, the objective, the robust fit and gamma's bootstrap; :mod:`.bayes_fit`: the one-Dirichlet
case as ``fit_bayes`` / ``bootstrap_exact_bayes``); and the verdict on whether the model updates like
a Bayesian, with baselines (:mod:`.verdict`). The field's other tests, for the scorecard: order dependence
(:mod:`.exchangeability`), excess code length over exact Bayes (:mod:`.codelength`) and the Bayesian scaling
law of in-context learning against its baselines (:mod:`.scaling`).
"""

from llmprobe.bayes.bayes_fit import BayesFit, ExactBayesTest, bootstrap_exact_bayes, fit_bayes
from llmprobe.bayes.codelength import ExcessCodeLength, excess_code_length
from llmprobe.bayes.dirichlet import (
    DEFAULT_FLOOR,
    DirichletFit,
    dirichlet_logpdf,
    dirichlet_multinomial_logpmf,
    fit_dirichlet,
    fit_dirichlet_multinomial,
)
from llmprobe.bayes.exchangeability import OrderDependence, order_dependence
from llmprobe.bayes.filter import outcomes_from_running_counts
from llmprobe.bayes.metrics import (
    entropy_bits,
    entropy_gap_bits,
    hellinger,
    kl_bits,
    total_variation,
)
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
from llmprobe.bayes.scaling import ScalingComparison, fit_scaling_laws
from llmprobe.bayes.updating import (
    UpdatingFit,
    UpdatingPrior,
    UpdatingPriorTest,
    held_out_predictions,
    select_updating_prior,
    sequence_folds,
)
from llmprobe.bayes.verdict import VERDICTS, Evidence, Verdict, decide

__all__ = [
    "DEFAULT_FLOOR",
    "VERDICTS",
    "BayesFit",
    "ComponentSelection",
    "DirichletFit",
    "Evidence",
    "ExactBayesTest",
    "ExcessCodeLength",
    "MixtureFit",
    "OrderDependence",
    "ScalingComparison",
    "UpdatingFit",
    "UpdatingPrior",
    "UpdatingPriorTest",
    "Verdict",
    "bootstrap_exact_bayes",
    "decide",
    "dirichlet_logpdf",
    "dirichlet_multinomial_logpmf",
    "discounted_counts",
    "entropy_bits",
    "entropy_gap_bits",
    "excess_code_length",
    "fit_bayes",
    "fit_dirichlet",
    "fit_dirichlet_mixture",
    "fit_dirichlet_multinomial",
    "fit_dirichlet_multinomial_mixture",
    "fit_scaling_laws",
    "held_out_predictions",
    "hellinger",
    "kl_bits",
    "mixture_posterior_predictive",
    "mixture_posterior_weights",
    "order_dependence",
    "outcomes_from_running_counts",
    "posterior_predictive",
    "select_components",
    "select_updating_prior",
    "sequence_folds",
    "total_variation",
]
