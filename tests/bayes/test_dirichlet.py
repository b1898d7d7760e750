"""Dirichlet and Dirichlet-multinomial MLE against known parameters and closed forms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from llmprobe.bayes import (
    DirichletFit,
    dirichlet_logpdf,
    dirichlet_multinomial_logpmf,
    fit_dirichlet,
    fit_dirichlet_multinomial,
)


@pytest.mark.parametrize(
    "alpha",
    [
        [0.5, 2.0],
        [5.0, 5.0],
        [1.0, 2.0, 3.0, 4.0],
        [20.0, 5.0, 1.0],
        [0.3] * 10,
        [0.5, 1.0, 2.0, 4.0, 8.0, 0.5, 1.0, 2.0, 4.0, 8.0],
    ],
)
def test_fit_dirichlet_recovers_alpha_within_5_percent(alpha: list[float]) -> None:
    truth = np.array(alpha)
    probs = np.random.default_rng(0).dirichlet(truth, size=10_000)
    fit = fit_dirichlet(probs)
    assert fit.converged
    np.testing.assert_allclose(fit.alpha, truth, rtol=0.05)
    assert fit.n_obs == 10_000


def test_fit_dirichlet_loglik_is_the_sum_of_log_densities_and_is_maximal() -> None:
    probs = np.random.default_rng(1).dirichlet([2.0, 3.0, 4.0], size=2_000)
    fit = fit_dirichlet(probs)
    assert fit.loglik == pytest.approx(dirichlet_logpdf(probs, fit.alpha).sum(), rel=1e-12)
    for nudge in ([1.01, 1, 1], [1, 0.99, 1], [1.01, 1.01, 1.01]):
        assert dirichlet_logpdf(probs, fit.alpha * np.array(nudge)).sum() < fit.loglik


def test_integer_weights_equal_repeated_rows() -> None:
    rng = np.random.default_rng(2)
    probs = rng.dirichlet([1.0, 2.0, 0.5], size=300)
    repeats = rng.integers(0, 4, size=300)
    weighted = fit_dirichlet(probs, weights=repeats)
    repeated = fit_dirichlet(np.repeat(probs, repeats, axis=0))
    np.testing.assert_allclose(weighted.alpha, repeated.alpha, rtol=1e-8)
    assert weighted.loglik == pytest.approx(repeated.loglik, rel=1e-10)


def test_exact_zeros_are_floored_not_fatal() -> None:
    probs = np.random.default_rng(3).dirichlet([2.0, 2.0, 2.0], size=1_000)
    probs[:10] = [1.0, 0.0, 0.0]
    fit = fit_dirichlet(probs, floor=1e-6)
    assert fit.converged and np.all(np.isfinite(fit.alpha))
    assert fit.alpha[1] < 2.0  # the floored zeros pull alpha_2 and alpha_3 down


def test_rows_that_do_not_vary_have_no_mle() -> None:
    fit = fit_dirichlet(np.tile([0.2, 0.3, 0.5], (50, 1)))
    assert not fit.converged
    assert fit.concentration > 1e6
    np.testing.assert_allclose(fit.mean, [0.2, 0.3, 0.5], rtol=1e-6)


def test_fit_dirichlet_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        fit_dirichlet(np.ones(3))
    with pytest.raises(ValueError):
        fit_dirichlet([[0.5, -0.1, 0.6]])
    with pytest.raises(ValueError):
        fit_dirichlet([[0.0, 0.0], [0.5, 0.5]])


def test_dirichlet_logpdf_matches_scipy() -> None:
    alpha = np.array([0.7, 2.0, 3.5])
    probs = np.random.default_rng(4).dirichlet(alpha, size=5)
    expected = [stats.dirichlet.logpdf(p, alpha) for p in probs]
    np.testing.assert_allclose(dirichlet_logpdf(probs, alpha), expected, rtol=1e-12)


def test_dirichlet_multinomial_for_two_categories_is_beta_binomial() -> None:
    a, b, n = 1.5, 2.5, 7
    counts = np.array([[k, n - k] for k in range(n + 1)])
    expected = stats.betabinom.logpmf(np.arange(n + 1), n, a, b)
    np.testing.assert_allclose(dirichlet_multinomial_logpmf(counts, [a, b]), expected, rtol=1e-12)


def test_dirichlet_multinomial_without_coefficient_is_one_sequence() -> None:
    # P(sequence 0, 0, 1 | Beta(1, 1)) = 1/2 * 2/3 * 1/4 = 1/12; the count vector (2, 1) has 3 orders.
    one_order = dirichlet_multinomial_logpmf([2, 1], [1.0, 1.0], coefficient=False)
    any_order = dirichlet_multinomial_logpmf([2, 1], [1.0, 1.0])
    assert math.exp(one_order) == pytest.approx(1 / 12)
    assert math.exp(any_order) == pytest.approx(3 / 12)


def test_dirichlet_multinomial_pmf_sums_to_one() -> None:
    n = 5
    counts = np.array([[i, j, n - i - j] for i in range(n + 1) for j in range(n + 1 - i)])
    total = np.exp(dirichlet_multinomial_logpmf(counts, [0.4, 1.3, 2.2])).sum()
    assert total == pytest.approx(1.0, abs=1e-12)


def test_fit_dirichlet_multinomial_recovers_alpha() -> None:
    # Counts carry less information than the probabilities themselves: with 20,000 rows of
    # 10..60 draws each, 5 % relative error is about three standard errors.
    rng = np.random.default_rng(5)
    truth = np.array([1.0, 3.0, 6.0])
    rows = 20_000
    theta = rng.dirichlet(truth, size=rows)
    counts = rng.multinomial(rng.integers(10, 60, size=rows), theta)
    fit = fit_dirichlet_multinomial(counts)
    assert fit.converged and fit.data == "counts"
    np.testing.assert_allclose(fit.alpha, truth, rtol=0.05)
    assert fit.loglik == pytest.approx(dirichlet_multinomial_logpmf(counts, fit.alpha).sum(), rel=1e-10)


def test_fit_dirichlet_multinomial_drops_empty_rows_and_needs_every_category() -> None:
    counts = np.array([[3, 1], [0, 0], [2, 2], [1, 4], [5, 0]])
    assert fit_dirichlet_multinomial(counts).n_obs == 4
    with pytest.raises(ValueError):
        fit_dirichlet_multinomial([[3, 0], [2, 0]])


def test_dirichlet_fit_json_round_trip() -> None:
    fit = fit_dirichlet(np.random.default_rng(6).dirichlet([1.0, 2.0], size=100))
    back = DirichletFit.from_dict(json.loads(json.dumps(fit.to_dict())))
    np.testing.assert_array_equal(back.alpha, fit.alpha)
    assert (back.loglik, back.n_obs, back.iterations, back.converged, back.data) == (
        fit.loglik,
        fit.n_obs,
        fit.iterations,
        fit.converged,
        fit.data,
    )
    assert back.concentration == pytest.approx(fit.alpha.sum())
    np.testing.assert_allclose(back.mean, fit.alpha / fit.alpha.sum())


def test_underdispersed_counts_head_for_the_multinomial_limit_without_failing():
    """Counts less spread than any Dirichlet-multinomial allows (multinomial draws, or identical rows):
    the MLE is alpha_0 -> infinity. The fit stops there, unconverged, with the pooled proportions as its
    mean — it does not divide by a trigamma difference that rounding made zero (a crash seen in
    ``fit-prior --components auto`` on a real coin trace) or return NaN."""
    from llmprobe.bayes.dirichlet import ALPHA0_UNBOUNDED, fit_dm_rows

    cases = [np.full((30, 2), 25.0)] + [np.random.default_rng(seed).multinomial(40, [0.5, 0.5], size=30).astype(float)
                                         for seed in range(40)]
    unbounded = 0
    for counts in cases:
        alpha, _, converged = fit_dm_rows(counts, np.ones(len(counts)))
        assert np.all(np.isfinite(alpha)) and np.all(alpha > 0)
        if alpha.sum() > ALPHA0_UNBOUNDED:
            unbounded += 1
            assert not converged
            np.testing.assert_allclose(alpha / alpha.sum(), counts.sum(0) / counts.sum(), atol=1e-6)
    assert unbounded >= 2  # the identical rows and at least one draw reach the limit


def test_sherman_morrison_step_at_zero_coupling_is_the_diagonal_solve():
    from llmprobe.bayes.dirichlet import _sherman_morrison_step

    g, q = np.array([1.0, -2.0, 0.5]), np.array([-3.0, -1.0, -2.0])
    np.testing.assert_allclose(_sherman_morrison_step(g, q, 0.0), g / q)
    z = 0.7
    np.testing.assert_allclose(_sherman_morrison_step(g, q, z), np.linalg.solve(np.diag(q) + z, g))
