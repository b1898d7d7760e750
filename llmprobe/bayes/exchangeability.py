"""Order dependence: does the model's prediction after a set of examples depend on their order?

An exact Bayesian predictor on exchangeable data gives the same predictive for any order of the same
examples: the posterior depends on the counts only. Falck et al. (2024) test this property of in-context
learners; Chlon et al. (2025) argue that language models are Bayesian "in expectation, not in realization":
their prediction varies with the order, and its average over orders is closer to Bayes than any one order.

For each sequence s, the model's final predictions p_{s,o} after the same examples in orders o = 1..O_s
(the original and its shuffled orders, O_s >= 2), their mean p̄_s = mean_o p_{s,o} and the Bayesian
predictive q_s for those counts:

* **spread** in bits: mean_o KL(p_{s,o} ‖ p̄_s), the information radius of the orders' predictions (the
  mutual information between a uniformly drawn order and the prediction): 0 exactly when every order
  predicts the same, at most log2 O_s; in TV: mean_o TV(p_{s,o}, p̄_s);
* **per order vs averaged**: mean_o KL(q_s ‖ p_{s,o}) and KL(q_s ‖ p̄_s), in bits. KL is convex in its second
  argument, so the averaged prediction is never further from Bayes than the orders are on average; the
  difference is what averaging over orders buys.

Each is averaged over sequences (each sequence weighs the same, whatever its number of orders). numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from llmprobe.bayes.metrics import kl_bits, total_variation


@dataclass(frozen=True)
class OrderDependence:
    """The order dependence of final predictions, averaged over ``n_sequences`` sequences (module docstring)."""

    n_sequences: int
    n_orders: int  # predictions over all sequences (originals and shuffled orders)
    spread_kl_bits: float
    spread_tv: float
    max_pairwise_tv: float  # mean over sequences of the largest TV between two orders' predictions
    kl_bayes_per_order_bits: float  # mean over sequences of mean_o KL(Bayes ‖ p_o)
    kl_bayes_of_average_bits: float  # mean over sequences of KL(Bayes ‖ mean_o p_o)

    @property
    def averaging_gain_bits(self) -> float:
        """How much averaging the orders' predictions lowers KL(Bayes ‖ model) (never negative)."""
        return self.kl_bayes_per_order_bits - self.kl_bayes_of_average_bits

    def to_dict(self) -> dict[str, Any]:
        return {"n_sequences": self.n_sequences, "n_orders": self.n_orders, "spread_kl_bits": self.spread_kl_bits,
                "spread_tv": self.spread_tv, "max_pairwise_tv": self.max_pairwise_tv,
                "kl_bayes_per_order_bits": self.kl_bayes_per_order_bits,
                "kl_bayes_of_average_bits": self.kl_bayes_of_average_bits,
                "averaging_gain_bits": self.averaging_gain_bits}


def order_dependence(final: ArrayLike, group: ArrayLike, bayes: ArrayLike) -> OrderDependence | None:
    """``final`` (R, K): each order's final prediction (rows renormalized); ``group`` (R,): which sequence's
    examples it follows; ``bayes`` (R, K): the Bayesian predictive for that sequence's counts (the same for
    every order of it). Sequences with a single prediction are left out; None when none has two."""
    p = np.asarray(final, dtype=float)
    p = p / p.sum(axis=1, keepdims=True)
    q = np.asarray(bayes, dtype=float)
    labels, index, sizes = np.unique(np.asarray(group), return_inverse=True, return_counts=True)
    keep = sizes[index] >= 2
    if not keep.any():
        return None
    p, q, index = p[keep], q[keep], np.unique(index[keep], return_inverse=True)[1]
    n_groups = int(index.max()) + 1
    counts = np.bincount(index, minlength=n_groups).astype(float)
    mean = np.zeros((n_groups, p.shape[1]))
    np.add.at(mean, index, p)
    mean /= counts[:, None]
    first = np.zeros(n_groups, dtype=np.int64)
    first[index[::-1]] = np.arange(index.size)[::-1]  # a row of each group: its Bayes prediction

    def per_group(values: np.ndarray) -> np.ndarray:
        return np.bincount(index, weights=values, minlength=n_groups) / counts

    pairwise = np.zeros(n_groups)
    for g in range(n_groups):  # orders per sequence are few; sequences may be many
        rows = p[index == g]
        pairwise[g] = total_variation(rows[:, None, :], rows[None, :, :]).max()
    return OrderDependence(
        n_sequences=n_groups, n_orders=int(index.size),
        spread_kl_bits=float(per_group(np.maximum(kl_bits(p, mean[index]), 0.0)).mean()),  # >= 0 despite rounding
        spread_tv=float(per_group(total_variation(p, mean[index])).mean()),
        max_pairwise_tv=float(pairwise.mean()),
        kl_bayes_per_order_bits=float(per_group(kl_bits(q, p)).mean()),
        kl_bayes_of_average_bits=float(kl_bits(q[first], mean).mean()))
