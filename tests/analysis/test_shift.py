"""The change an intervention makes, from two traces' top-k: a lower bound on KL that is exact where it must be."""

from __future__ import annotations

import numpy as np
import pytest

from llmprobe.analysis.shift import kl_lower_bound_bits
from llmprobe.bayes.metrics import kl_bits


def distributions(rows: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(vocab, 0.3), size=rows)
    q = rng.dirichlet(np.full(vocab, 0.3), size=rows)
    return p, q


def top(p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What a trace keeps: the top-k ids (most probable first) and their log-probabilities, in float32."""
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return ids, np.log(np.take_along_axis(p, ids, axis=1)).astype(np.float32)


def grouped_kl_bits(p: np.ndarray, q: np.ndarray, cells: list[set[int]]) -> float:
    """KL of the two distributions grouped into ``cells`` and one cell for every other token, by hand."""
    rest = sorted(set(range(len(p))) - set().union(*cells))
    masses = [(p[list(c)].sum(), q[list(c)].sum()) for c in cells if c] + [(p[rest].sum(), q[rest].sum())]
    return sum(a * np.log2(a / b) for a, b in masses if a > 0)


def test_the_whole_distribution_gives_the_kl_itself():
    p, q = distributions(20, 12, seed=1)
    bound = kl_lower_bound_bits(*top(p, 12), *top(q, 12))
    np.testing.assert_allclose(bound, kl_bits(p, q), rtol=1e-5, atol=1e-6)


def test_a_top_k_bound_is_the_grouped_kl_and_never_above_the_kl():
    p, q = distributions(50, 30, seed=2)
    base_ids, base_lp = top(p, 5)
    other_ids, other_lp = top(q, 7)
    bound = kl_lower_bound_bits(base_ids, base_lp, other_ids, other_lp)
    for row in range(len(p)):
        shared = set(base_ids[row]) & set(other_ids[row])
        expected = grouped_kl_bits(p[row], q[row], [{t} for t in shared])
        assert bound[row] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert np.all(bound <= kl_bits(p, q) + 1e-6)
    shared = np.array([bool(set(b) & set(o)) for b, o in zip(base_ids, other_ids)])
    assert shared.mean() > 0.5 and np.all(bound[shared] > 0)  # not a trivial zero (no shared token: one cell, 0)


def test_the_actual_next_token_is_a_cell_of_its_own_whatever_its_rank():
    p, q = distributions(50, 30, seed=3)
    base_ids, base_lp = top(p, 4)
    other_ids, other_lp = top(q, 4)
    rng = np.random.default_rng(4)
    next_ids = rng.integers(0, 30, size=len(p))
    next_ids[:5] = -1  # no next token (end of the text)
    p_next = np.where(next_ids >= 0, np.log(p[np.arange(len(p)), next_ids]), np.nan)
    q_next = np.where(next_ids >= 0, np.log(q[np.arange(len(q)), next_ids]), np.nan)
    bound = kl_lower_bound_bits(base_ids, base_lp, other_ids, other_lp, next_ids, p_next, q_next)
    without = kl_lower_bound_bits(base_ids, base_lp, other_ids, other_lp)
    for row in range(len(p)):
        cells = [{t} for t in set(base_ids[row]) & set(other_ids[row])]
        if next_ids[row] >= 0 and {next_ids[row]} not in cells:
            cells.append({next_ids[row]})
        assert bound[row] == pytest.approx(grouped_kl_bits(p[row], q[row], cells), rel=1e-5, abs=1e-6)
    assert np.all(bound >= without - 1e-9) and np.all(bound <= kl_bits(p, q) + 1e-6)
    np.testing.assert_array_equal(bound[:5], without[:5])


def test_the_same_distribution_is_no_change_and_rounding_is_no_change():
    p, _ = distributions(10, 40, seed=5)
    ids, lp = top(p, 40)
    assert np.all(kl_lower_bound_bits(ids, lp, ids, lp) == 0)
    # a peaked distribution whose float32 top-k sums to a hair above 1: the rest cell does not blow up
    peaked = np.zeros((1, 40))
    peaked[0, 0] = 1 - 39e-12
    peaked[0, 1:] = 1e-12
    ids, lp = top(peaked, 3)
    assert kl_lower_bound_bits(ids, lp, ids, lp + np.float32(1e-7))[0] < 2e-5
