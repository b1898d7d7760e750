"""Dirichlet mixtures by EM: recovery of known components, BIC choice, and the one-type design."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import logsumexp

from llmprobe.bayes import (
    MixtureFit,
    dirichlet_logpdf,
    fit_dirichlet,
    fit_dirichlet_mixture,
    fit_dirichlet_multinomial_mixture,
    select_components,
)

ALPHA_A = np.array([12.0, 3.0, 1.0])
ALPHA_B = np.array([1.0, 3.0, 12.0])
WEIGHT_A = 0.3


def two_component_probs(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    in_a = rng.random(rows) < WEIGHT_A
    return np.where(in_a[:, None], rng.dirichlet(ALPHA_A, rows), rng.dirichlet(ALPHA_B, rows))


def in_truth_order(fit: MixtureFit) -> MixtureFit:
    """The fit with component A (mass on category 0) first."""
    order = np.argsort(-fit.means[:, 0])
    return MixtureFit(
        fit.weights[order], fit.alphas[order], fit.loglik, fit.n_obs, fit.iterations, fit.converged, fit.data
    )


@pytest.fixture(scope="module")
def selection():
    return select_components(two_component_probs(6_000, seed=0), max_components=3, seed=0)


def test_two_separated_components_are_recovered(selection) -> None:
    fit = in_truth_order(selection.fits[1])
    assert fit.converged
    np.testing.assert_allclose(fit.weights, [WEIGHT_A, 1 - WEIGHT_A], atol=0.05)
    np.testing.assert_allclose(fit.means, [ALPHA_A / ALPHA_A.sum(), ALPHA_B / ALPHA_B.sum()], atol=0.02)
    np.testing.assert_allclose(fit.alphas, [ALPHA_A, ALPHA_B], rtol=0.15)


def test_bic_selects_two_components_over_one_and_three(selection) -> None:
    assert [row["n_components"] for row in selection.table] == [1, 2, 3]
    bics = [row["bic"] for row in selection.table]
    assert bics[1] < bics[0] and bics[1] < bics[2]
    assert selection.best.n_components == 2
    assert selection.fits[2].loglik >= selection.fits[1].loglik - 1.0  # more components fit no worse


def test_mixture_loglik_and_criteria_match_their_definitions(selection) -> None:
    fit = selection.best
    probs = two_component_probs(6_000, seed=0)
    per_component = np.stack([dirichlet_logpdf(probs, a) for a in fit.alphas], axis=1)
    assert fit.loglik == pytest.approx(logsumexp(per_component + np.log(fit.weights), axis=1).sum(), rel=1e-9)
    assert fit.n_params == 2 * 3 + 1
    assert fit.bic == pytest.approx(-2 * fit.loglik + 7 * np.log(6_000))
    assert fit.aic == pytest.approx(-2 * fit.loglik + 14)


def test_one_component_mixture_is_the_dirichlet_fit() -> None:
    probs = np.random.default_rng(1).dirichlet([1.0, 2.0, 3.0], size=2_000)
    single = fit_dirichlet(probs)
    mixture = fit_dirichlet_mixture(probs, 1)
    np.testing.assert_allclose(mixture.alphas[0], single.alpha, rtol=1e-6)
    assert mixture.loglik == pytest.approx(single.loglik, rel=1e-9)
    as_mixture = MixtureFit.from_dirichlet(single)
    np.testing.assert_array_equal(as_mixture.weights, [1.0])
    assert as_mixture.n_params == 3 and as_mixture.loglik == single.loglik


def test_dirichlet_multinomial_mixture_recovers_components_from_counts() -> None:
    rng = np.random.default_rng(2)
    rows = 4_000
    in_a = rng.random(rows) < WEIGHT_A
    theta = np.where(in_a[:, None], rng.dirichlet(ALPHA_A, rows), rng.dirichlet(ALPHA_B, rows))
    counts = rng.multinomial(rng.integers(10, 40, size=rows), theta)
    fit = in_truth_order(fit_dirichlet_multinomial_mixture(counts, 2, seed=0))
    assert fit.converged and fit.data == "counts"
    np.testing.assert_allclose(fit.weights, [WEIGHT_A, 1 - WEIGHT_A], atol=0.05)
    np.testing.assert_allclose(fit.means, [ALPHA_A / ALPHA_A.sum(), ALPHA_B / ALPHA_B.sum()], atol=0.03)


def test_mixture_json_round_trip(selection) -> None:
    fit = selection.best
    back = MixtureFit.from_dict(json.loads(json.dumps(fit.to_dict())))
    np.testing.assert_array_equal(back.weights, fit.weights)
    np.testing.assert_array_equal(back.alphas, fit.alphas)
    assert (back.loglik, back.bic, back.n_obs, back.converged, back.data) == (
        fit.loglik,
        fit.bic,
        fit.n_obs,
        fit.converged,
        fit.data,
    )


def test_from_dict_rejects_mismatched_components() -> None:
    with pytest.raises(ValueError):
        MixtureFit.from_dict(
            {"weights": [1.0], "alphas": [[1.0, 2.0], [2.0, 1.0]], "loglik": 0, "n_obs": 1, "iterations": 1,
             "converged": True}
        )
