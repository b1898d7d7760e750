"""Gupta et al.'s γ variant (llmprobe.bayes.peers): the filter's definition and recovery of planted values."""

from __future__ import annotations

import numpy as np
import pytest

from llmprobe.bayes.bayes_fit import fit_bayes
from llmprobe.bayes.peers import decayed_pseudocount_predictive, fit_gupta_gamma, position_means


def chain_outcomes(rng, n_sequences: int, phases=((0.75, 30), (0.25, 30))) -> list[np.ndarray]:
    """Coin flips (0 = heads) whose P(heads) follows the phases, one array per sequence."""
    p = np.concatenate([np.full(n, theta) for theta, n in phases])
    return [(rng.random(len(p)) >= p).astype(np.int64) for _ in range(n_sequences)]


def marks_for(outcomes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sequence = np.concatenate([np.full(len(o) + 1, s) for s, o in enumerate(outcomes)])
    position = np.concatenate([np.arange(len(o) + 1) for o in outcomes])
    return sequence, position


def test_gamma_one_is_the_laplace_rule_and_gamma_zero_the_last_outcome():
    outcomes = [np.array([0, 0, 1, 0, 1, 1, 1])]
    sequence, position = marks_for(outcomes)
    laplace = decayed_pseudocount_predictive(outcomes, sequence, position, 2, 1.0)
    heads = np.concatenate([[0], np.cumsum(outcomes[0] == 0)])
    np.testing.assert_allclose(laplace[:, 0], (1 + heads) / (2 + position))
    last = decayed_pseudocount_predictive(outcomes, sequence, position, 2, 0.0)
    assert last[0, 0] == 0.5  # the Beta(1,1) prior before any flip
    np.testing.assert_allclose(last[1:, 0], (outcomes[0] == 0).astype(float))


def test_prior_pseudocounts_decay_with_the_evidence():
    """a_j = γ^j·1 + Σ γ^(j-1-t) e_x_t: after j heads, P(heads) = (γ^j + Σ_{t<j} γ^t) / (2γ^j + Σ_{t<j} γ^t)."""
    gamma, j = 0.6, 5
    outcomes = [np.zeros(j, dtype=np.int64)]
    q = decayed_pseudocount_predictive(outcomes, [0], [j], 2, gamma)[0, 0]
    evidence = sum(gamma**t for t in range(j))
    assert q == pytest.approx((gamma**j + evidence) / (2 * gamma**j + evidence))


@pytest.mark.parametrize("planted", [0.88, 0.6, 0.3])
def test_recovers_a_planted_gamma_from_noisy_template_means(planted):
    rng = np.random.default_rng(1)
    outcomes = chain_outcomes(rng, 1) * 4  # four templates on the same flips, as in coin_chain.toml
    sequence, position = marks_for(outcomes)
    exact = decayed_pseudocount_predictive(outcomes, sequence, position, 2, planted)
    heads = np.clip(exact[:, 0] + rng.normal(0, 0.03, len(exact)), 1e-4, 1 - 1e-4)  # per-template noise
    fit = fit_gupta_gamma(np.stack([heads, 1 - heads], axis=1), outcomes, sequence, position)
    assert fit.gamma == pytest.approx(planted, abs=0.03)
    assert fit.n_positions == 61 and fit.n_marks == 4 * 61
    exact_fit = fit_gupta_gamma(exact, outcomes, sequence, position)
    assert exact_fit.gamma == pytest.approx(planted, abs=1e-4) and exact_fit.mean_abs_error < 1e-6


def test_recovers_gamma_with_each_template_on_its_own_flips_and_three_categories():
    rng = np.random.default_rng(2)
    outcomes = [rng.choice(3, size=40, p=[0.6, 0.3, 0.1]) for _ in range(5)]
    sequence, position = marks_for(outcomes)
    probs = decayed_pseudocount_predictive(outcomes, sequence, position, 3, 0.75)
    assert fit_gupta_gamma(probs, outcomes, sequence, position).gamma == pytest.approx(0.75, abs=1e-3)


def test_the_two_filters_are_different_parametrisations():
    """On Gupta-filter data llmprobe's filter (fitted prior, undecayed) finds another γ: they must be named apart."""
    rng = np.random.default_rng(3)
    outcomes = chain_outcomes(rng, 6)
    sequence, position = marks_for(outcomes)
    probs = decayed_pseudocount_predictive(outcomes, sequence, position, 2, 0.7)
    ours = fit_bayes(probs, outcomes, sequence, position).gamma
    theirs = fit_gupta_gamma(probs, outcomes, sequence, position).gamma
    assert theirs == pytest.approx(0.7, abs=1e-3) and abs(ours - theirs) > 0.01


def test_position_means_average_rows_per_position():
    keys, means = position_means(np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]), [2, 2, 0])
    assert keys.tolist() == [0, 2]
    np.testing.assert_allclose(means, [[0.5, 0.5], [0.5, 0.5]])
