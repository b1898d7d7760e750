"""The scorecard's statistics on inputs whose answer is known: order dependence, excess code length, and the
scaling laws (curves made by each law with known parameters are recovered)."""

from __future__ import annotations

import numpy as np
import pytest

from llmprobe.bayes.codelength import excess_code_length
from llmprobe.bayes.exchangeability import order_dependence
from llmprobe.bayes.scaling import (BAYESIAN, bayesian_law, bounded_power_law, fit_scaling_laws, logistic_law,
                                    power_law)
from tests.bayes.fixtures import SCALING_PLANTED


# ------------------------------------------------------------------------------------------ order dependence
def test_orders_that_agree_have_no_spread_and_averaging_gains_nothing():
    p = np.array([[0.3, 0.7], [0.3, 0.7], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])
    q = np.array([[0.5, 0.5]] * 2 + [[0.2, 0.8]] * 3)
    result = order_dependence(p, ["a", "a", "b", "b", "b"], q)
    assert result.n_sequences == 2 and result.n_orders == 5
    assert result.spread_kl_bits == pytest.approx(0, abs=1e-15) and result.spread_tv == pytest.approx(0, abs=1e-15)
    assert result.max_pairwise_tv == pytest.approx(0, abs=1e-15)
    assert result.averaging_gain_bits == pytest.approx(0, abs=1e-15)


def test_two_orders_by_hand():
    """Orders predict (0.9, 0.1) and (0.1, 0.9): their mean is uniform, each is KL(p‖½) = 1 − H(0.9) bits away."""
    p = np.array([[0.9, 0.1], [0.1, 0.9]])
    q = np.array([[0.5, 0.5], [0.5, 0.5]])
    result = order_dependence(p, [0, 0], q)
    h = -(0.9 * np.log2(0.9) + 0.1 * np.log2(0.1))
    assert result.spread_kl_bits == pytest.approx(1 - h) and result.spread_tv == pytest.approx(0.4)
    assert result.max_pairwise_tv == pytest.approx(0.8)
    assert result.kl_bayes_of_average_bits == pytest.approx(0) and result.kl_bayes_per_order_bits == pytest.approx(
        0.5 * np.log2(0.5 / 0.9) + 0.5 * np.log2(0.5 / 0.1))


def test_sequences_weigh_the_same_and_single_orders_are_left_out():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([2, 2, 2], size=7)
    q = np.tile([0.2, 0.3, 0.5], (7, 1))
    group = [0, 0, 1, 1, 1, 1, 2]  # sequence 2 has a single order
    both = order_dependence(p, group, q)
    first, second = order_dependence(p[:2], group[:2], q[:2]), order_dependence(p[2:6], group[2:6], q[2:6])
    assert both.n_sequences == 2 and both.n_orders == 6
    assert both.spread_kl_bits == pytest.approx((first.spread_kl_bits + second.spread_kl_bits) / 2)
    assert both.averaging_gain_bits >= 0 and both.kl_bayes_of_average_bits == pytest.approx(
        (first.kl_bayes_of_average_bits + second.kl_bayes_of_average_bits) / 2)
    assert order_dependence(p[:1], [0], q[:1]) is None


# ------------------------------------------------------------------------------------------ excess code length
def test_a_model_that_is_bayes_codes_at_no_excess():
    rng = np.random.default_rng(1)
    q = rng.uniform(0.1, 0.9, size=30)
    result = excess_code_length(q, q, np.repeat([0, 1, 2], 10), np.tile(np.arange(10), 3))
    assert result.mean_bits_per_sequence == 0 and result.slope_bits_per_example == pytest.approx(0, abs=1e-12)


def test_a_constant_toll_grows_linearly_with_that_slope():
    """Each prediction costs d bits more than Bayes: E(n) = n d, so the slope is d and the intercept 0, whatever
    order the predictions come in."""
    d = 0.25
    bayes = np.full(24, 0.5)
    model = bayes / 2**d
    sequence, position = np.repeat([5, 9, 2], 8), np.tile(np.arange(8), 3)
    order = np.random.default_rng(2).permutation(24)
    result = excess_code_length(model[order], bayes[order], sequence[order], position[order])
    assert result.slope_bits_per_example == pytest.approx(d) and result.intercept_bits == pytest.approx(0, abs=1e-12)
    assert result.mean_bits_per_sequence == pytest.approx(8 * d) and result.bits_per_prediction == pytest.approx(d)
    np.testing.assert_allclose(result.by_n[:, 0], np.arange(1, 9))
    np.testing.assert_allclose(result.by_n[:, 1], d * np.arange(1, 9))
    assert result.n_sequences == 3 and result.n_predictions == 24


def test_cumulative_sums_restart_per_sequence_by_hand():
    model = np.array([0.5, 0.25, 1.0, 0.5])
    bayes = np.array([0.5, 0.5, 0.5, 0.5])
    result = excess_code_length(model, bayes, [0, 0, 1, 1], [0, 1, 0, 1])
    # sequence 0: 0, then +1 bit; sequence 1: -1 bit, then 0 more
    np.testing.assert_allclose(result.by_n[:, 1], [(0 - 1) / 2, (1 - 1) / 2])
    assert result.mean_bits_per_sequence == pytest.approx(0.0)
    assert excess_code_length([], [], [], []) is None
    single = excess_code_length([0.5], [0.5], [0], [3])
    assert single.slope_bits_per_example is None and single.to_dict()["slope_bits_per_example"] is None


# ------------------------------------------------------------------------------------------ scaling laws
N = np.arange(0, 41)
FIRST_HALF = N <= 20

@pytest.mark.parametrize(("prior", "probs", "efficiency"), SCALING_PLANTED)
@pytest.mark.parametrize("noise", [0.0, 0.002])
def test_curves_made_by_the_law_are_recovered_and_extrapolated(prior, probs, efficiency, noise):
    y = bayesian_law(N, prior, probs, efficiency)
    y = np.clip(y + noise * np.random.default_rng(3).standard_normal(y.size), 1e-3, 1.0)
    fit = fit_scaling_laws(N, y, FIRST_HALF, tasks=2)
    assert fit.efficiency == pytest.approx(efficiency, rel=0.1)
    np.testing.assert_allclose(fit.law.parameters["task_probs"], probs, atol=0.02 + 5 * noise)
    power = fit.fits["power"]
    assert fit.law.rmse_held_out < power.rmse_held_out, (fit.law.rmse_held_out, power.rmse_held_out)
    if noise == 0:
        assert fit.law.rmse_held_out < 1e-4 and fit.error_ratio < 0.05


def test_three_tasks_without_noise():
    y = bayesian_law(N, (0.6, 0.3, 0.1), (0.5, 0.7, 0.9), 0.8)
    fit = fit_scaling_laws(N, y, FIRST_HALF, tasks=3)
    assert fit.efficiency == pytest.approx(0.8, rel=0.1) and fit.law.rmse_held_out < 1e-4


def test_the_law_by_hand():
    """One task: y = P whatever n; two tasks at n = 0: the prior's mean P; K = 0: the prior never moves."""
    assert bayesian_law([0, 5, 50], [1.0], [0.7], 1.0) == pytest.approx([0.7] * 3)
    assert bayesian_law([0], [0.25, 0.75], [0.4, 0.8], 1.0) == pytest.approx([0.25 * 0.4 + 0.75 * 0.8])
    assert bayesian_law([3], [0.5, 0.5], [0.4, 0.8], 1.0) == pytest.approx(
        [(0.5 * 0.4**4 + 0.5 * 0.8**4) / (0.5 * 0.4**3 + 0.5 * 0.8**3)])
    assert bayesian_law([0, 100], [0.5, 0.5], [0.4, 0.8], 0.0) == pytest.approx([0.6, 0.6])


@pytest.mark.parametrize(("law", "curve"), [
    ("power", lambda n: power_law(np.maximum(n, 1), 0.6, 0.7, 0.3)),
    ("bounded_power", lambda n: bounded_power_law(n, 0.6, 1.2, 3.0, 0.3)),
    ("logistic", lambda n: logistic_law(n, 0.5, 6.0, 1.5, 0.3)),
])
def test_each_baseline_recovers_a_curve_of_its_own_form(law, curve):
    fit = fit_scaling_laws(N, curve(N.astype(float)), FIRST_HALF)
    assert fit.fits[law].rmse_fit < 1e-6 and fit.fits[law].rmse_held_out < 1e-4
    assert law != "power" or np.isnan(fit.fits["power"].predictions[0])  # the power law is undefined at n = 0
    assert fit.to_dict()["laws"][BAYESIAN]["n_parameters"] == 4


@pytest.mark.parametrize(("n", "y", "fitted", "message"), [
    (np.arange(5), np.full(5, 0.5), np.arange(5) < 3, "too few points"),
    (np.arange(20), np.full(20, 1.5), np.arange(20) < 10, "y in"),
    (np.arange(20), np.full(19, 0.5), np.arange(20) < 10, "same length"),
])
def test_bad_curves_are_refused(n, y, fitted, message):
    with pytest.raises(ValueError, match=message):
        fit_scaling_laws(n, y, fitted)
