"""The free (m, alpha_0, gamma) fit is robust: never worse than its nested gamma = 1 fit, flags its bounds."""

from __future__ import annotations

import numpy as np
import pytest

from llmprobe.bayes import bootstrap_exact_bayes, fit_bayes, fit_dirichlet
from llmprobe.bayes.filter import GAMMA_GRID, DirichletFilter, Marks, robust_fit
from tests.bayes.fixtures import dirichlet_bayesian, plateau


def test_plateau_free_fit_is_never_worse_than_gamma_one() -> None:
    data = plateau()
    free, exact = fit_bayes(*data), fit_bayes(*data, gamma=1.0)
    assert free.mean_kl_bits <= exact.mean_kl_bits + 1e-12
    assert free.prior_strength < 1e5 and not free.at_bound  # not the alpha_0 -> infinity plateau
    profile = robust_fit(DirichletFilter(Marks.build(*data, None)))
    assert profile.free.value <= min(s.value for s in profile.grid.values()) + 1e-15
    assert [row["gamma"] for row in profile.profile_table()] == sorted(GAMMA_GRID)


def test_plateau_bootstrap_uses_the_robust_fit() -> None:
    test = bootstrap_exact_bayes(*plateau(), n_bootstrap=10, seed=0)
    assert test.free.mean_kl_bits <= test.exact.mean_kl_bits + 1e-12
    assert not test.rejected and test.gamma_ci[1] == pytest.approx(1.0, abs=1e-3)


def test_free_fit_recovers_planted_gamma_from_a_far_start() -> None:
    probs, outcomes, sequence, position, _ = dirichlet_bayesian(np.array([2.0, 5.0, 1.5]), 40, 25, seed=3, gamma=0.3)
    fit = fit_bayes(probs, outcomes, sequence, position)
    assert fit.gamma == pytest.approx(0.3, abs=1e-3) and fit.converged and not fit.at_bound


def test_unbounded_alpha0_is_flagged_not_converged() -> None:
    probs, outcomes, sequence, position, _ = dirichlet_bayesian(np.array([1.0, 1.0]), 10, 10, seed=0)
    constant = np.tile([0.3, 0.7], (probs.shape[0], 1))
    for fit in (fit_bayes(constant, outcomes, sequence, position, gamma=1.0),
                fit_bayes(constant, outcomes, sequence, position)):
        assert fit.at_bound and not fit.converged
        assert fit.to_dict()["at_bound"] is True
    bayesian = fit_bayes(probs, outcomes, sequence, position, gamma=1.0)
    assert bayesian.converged and not bayesian.at_bound


def test_dirichlet_rows_identical_up_to_float32_are_not_converged() -> None:
    rng = np.random.default_rng(0)
    rows = (np.tile([0.3, 0.7], (100, 1)) + rng.normal(0.0, 1e-8, (100, 2))).astype(np.float32).astype(float)
    fit = fit_dirichlet(rows)
    assert fit.concentration > 1e8 and not fit.converged
