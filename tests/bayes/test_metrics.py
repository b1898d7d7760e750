"""KL, total variation and entropy in bits: hand values and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from llmprobe.bayes import entropy_bits, entropy_gap_bits, kl_bits, total_variation


def test_kl_of_identical_rows_is_zero() -> None:
    p = np.random.default_rng(0).dirichlet([1.0, 1.0, 1.0], size=10)
    p[0] = [1.0, 0.0, 0.0]
    np.testing.assert_array_equal(kl_bits(p, p), 0.0)


def test_kl_hand_values() -> None:
    assert kl_bits([0.5, 0.5], [0.25, 0.75]) == pytest.approx(1 - 0.5 * math.log2(3))
    assert kl_bits([1.0, 0.0], [0.5, 0.5]) == pytest.approx(1.0)
    assert kl_bits([0.5, 0.5], [1.0, 0.0]) == math.inf
    np.testing.assert_allclose(kl_bits([[1.0, 0.0], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]), [1.0, 0.0])


def test_total_variation_hand_values() -> None:
    assert total_variation([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25)
    assert total_variation([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)


def test_entropy_and_entropy_gap_hand_values() -> None:
    rows = [[0.25] * 4, [1.0, 0.0, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0]]
    np.testing.assert_allclose(entropy_bits(rows), [2.0, 0.0, 1.5])
    assert entropy_gap_bits([0.5, 0.5], [1.0, 0.0]) == pytest.approx(1.0)
    assert entropy_gap_bits([1.0, 0.0], [0.5, 0.5]) == pytest.approx(-1.0)


simplex_rows = arrays(np.float64, (2, 5), elements=st.floats(0.0, 1.0)).filter(
    lambda rows: np.all(rows.sum(axis=1) > 1e-3)
)


@settings(deadline=None)  # no wall-clock limit: CI machines may be busy
@given(simplex_rows)
def test_kl_is_non_negative_and_bounds_total_variation(rows: np.ndarray) -> None:
    p, q = rows / rows.sum(axis=1, keepdims=True)
    kl = kl_bits(p, q)
    assert kl >= -1e-12
    # Pinsker: TV <= sqrt(KL_nats / 2).
    assert total_variation(p, q) <= math.sqrt(max(kl, 0.0) * math.log(2) / 2) + 1e-9
