"""How far an intervention moved a next-token distribution, from what two traces keep of it (issue 22, 24).

A trace keeps, per position, the top-k token ids with their log-probabilities and the actual next
token's log-probability — not the whole distribution. KL(baseline‖intervened) over the whole
vocabulary is therefore unknown, but a lower bound of it is exact: group the vocabulary into *cells*
whose probabilities both traces give — each token in both top-k lists, the actual next token (both
traces give its log-probability, whatever its rank), and one cell for everything else (its mass is
1 minus the others') — and take the KL divergence of the two grouped distributions. Grouping never
increases a KL divergence (the data-processing inequality; the log-sum inequality per cell), so

    :func:`kl_lower_bound_bits` <= KL(baseline‖intervened),

with equality when the top-k lists hold the whole distribution (or when, within every cell, the two
distributions are proportional). Tokens in one top-k list only fall into the rest cell, so the bound
tightens as k grows.

Rounding: the traced log-probabilities are float32, so a rest mass computed as 1 minus a sum can come
out a little below 0 when the cells hold nearly all the mass. Rest masses are floored at
:data:`REST_FLOOR` (far above that rounding), which changes the bound by less than 2e-5 bits (and a
bound below 0 is 0: a KL divergence is never negative).

Pure numpy/scipy; rows are positions, arrays aligned row by row.
"""

from __future__ import annotations


import numpy as np
from scipy.special import rel_entr

from llmprobe.bayes.filter import LN2

REST_FLOOR = 1e-6


def kl_lower_bound_bits(base_ids: np.ndarray, base_logprobs: np.ndarray, other_ids: np.ndarray,
                        other_logprobs: np.ndarray, next_ids: np.ndarray | None = None,
                        base_next_logprob: np.ndarray | None = None,
                        other_next_logprob: np.ndarray | None = None) -> np.ndarray:
    """Per row, the exact lower bound on KL(base‖other) in bits (see the module docstring).

    ``*_ids``/``*_logprobs``: (rows, k) top-k token ids and log-probabilities (nats) of each trace (k may
    differ between them); ``next_ids`` (rows,; negative: no next token) with both traces'
    ``*_next_logprob`` (rows,; NaN: none) add the actual next token as a cell of its own."""
    base_p = np.exp(np.asarray(base_logprobs, np.float64))
    other_p = np.exp(np.asarray(other_logprobs, np.float64))
    base_ids, other_ids = np.asarray(base_ids), np.asarray(other_ids)
    same = base_ids[:, :, None] == other_ids[:, None, :]  # (rows, k_base, k_other): at most one True per row/column
    shared = same.any(axis=2)
    cell_base = np.where(shared, base_p, 0.0)  # each shared token: its cell, indexed by its place in base's list
    cell_other = np.where(shared, (same * other_p[:, None, :]).sum(axis=2), 0.0)
    kl = rel_entr(cell_base, cell_other).sum(axis=1)
    base_rest = 1.0 - cell_base.sum(axis=1)
    other_rest = 1.0 - cell_other.sum(axis=1)
    if next_ids is not None:
        next_ids = np.asarray(next_ids)
        p_next = np.exp(np.asarray(base_next_logprob, np.float64))
        q_next = np.exp(np.asarray(other_next_logprob, np.float64))
        own_cell = (next_ids >= 0) & ~(shared & (base_ids == next_ids[:, None])).any(axis=1) \
            & np.isfinite(p_next) & np.isfinite(q_next)
        p_next, q_next = np.where(own_cell, p_next, 0.0), np.where(own_cell, q_next, 0.0)
        kl += rel_entr(p_next, q_next)
        base_rest -= p_next
        other_rest -= q_next
    kl += rel_entr(np.maximum(base_rest, REST_FLOOR), np.maximum(other_rest, REST_FLOOR))
    return np.maximum(kl, 0.0) / LN2
