"""``llmprobe continuity``: are nearby prompt embeddings mapped to nearby next-token distributions?

Dalal & Misra argue that the map from a prompt's embedding to its next-token distribution is
continuous. A trace written with ``--save-embeddings`` holds, at each mark (else the last position),
the final-normed hidden state h that the output head reads, so the distribution is softmax(W h).
Over pairs of such points this module sets the embedding distance ||h_a - h_b||_2 against the
distance between the two distributions, and reports

* the Spearman rank correlation of the two distances (scipy.stats.spearmanr);
* an empirical Lipschitz constant: a high quantile (and the maximum) of distribution distance over
  embedding distance; and, from the trace metadata, the analytic constant max_i ||w_i|| / 2 that
  bounds the total-variation ratio for softmax(W h) (see :meth:`llmprobe.model.structure.Unembed.tv_lipschitz_bound`).

Distributions are compared on a common partition of the vocabulary (docs/analyses.md):

* ``targets``: each target string (whole-string probability, exact) plus one bucket for everything
  else — a coarsening of the true distributions, so its TV never exceeds the full TV and the analytic
  bound holds exactly (targets must be prefix-free so their events are disjoint);
* ``topk``: the union of the two top-k sets plus a remainder bucket. A token in the other point's top-k
  but not in this point's is not in the trace; it gets this point's remainder mass spread evenly over
  the tokens outside its top-k (never more than its k-th probability). Known cells are exact; the
  estimate matters only for tokens at the bottom of a top-k list.

Distances: total variation ½ Σ|p - q| and Hellinger sqrt(½ Σ (√p - √q)²), both in [0, 1].
Pure numpy/scipy: no torch, no model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmprobe.bayes import hellinger, total_variation
from llmprobe.errors import UsageError
from llmprobe.tracing.reader import open_trace

OVER = ("topk", "targets")


@dataclass
class Points:
    """The embedded points of a trace and their distributions."""

    ids: list[str]  # "prompt_id@position"
    groups: list[str | None]  # the prompt's `group` field, if any
    embeddings: np.ndarray  # [N, d] float32
    probs: np.ndarray  # [N, k] top-k probabilities, or [N, T] target probabilities
    topk_ids: np.ndarray | None  # [N, k] for "topk", None for "targets"
    vocab_size: int


@dataclass
class PairStats:
    kind: str
    pairs: int
    embedding_distance_median: float
    tv_median: float
    hellinger_median: float


@dataclass
class ContinuityResult:
    over: str
    points: int
    pairs: int
    spearman_tv: float
    spearman_tv_p: float
    spearman_hellinger: float
    spearman_hellinger_p: float
    quantile: float
    lipschitz_tv: float  # the `quantile` of TV / embedding distance
    lipschitz_tv_max: float
    lipschitz_hellinger: float
    lipschitz_hellinger_max: float
    tv_bound: float | None  # analytic: TV <= tv_bound * distance
    identical_embeddings: int  # pairs at distance 0 (excluded from ratios)
    by_kind: list[PairStats] = field(default_factory=list)


def load_points(trace_path: str, over: str) -> tuple[Points, dict[str, Any]]:
    """The embedded points of a trace, with the trace's run metadata."""
    if over not in OVER:
        raise UsageError(f"expected one of {', '.join(OVER)}, got {over!r}", where="--over")
    trace = open_trace(trace_path)
    trace.require_columns("embedding", purpose="continuity (trace with --save-embeddings)")
    table = trace.table
    rows = table.filter(table.column("embedding").is_valid())
    if rows.num_rows < 2:
        raise UsageError(f"needs at least 2 embedded points, found {rows.num_rows}", where=trace_path)
    frame = rows.to_pandas()
    embeddings = np.stack(frame["embedding"].to_numpy()).astype(np.float32)
    groups = [_group(meta) for meta in rows.column("meta").to_pylist()]
    ids = [f"{p}@{pos}" for p, pos in zip(frame["prompt_id"], frame["position"])]
    if over == "targets":
        trace.require_columns("target_seq_logprobs", purpose="continuity --over targets (trace with --targets)")
        token_ids = [t["token_ids"] for t in trace.meta.get("targets", [])]
        for a in token_ids:
            for b in token_ids:
                if a is not b and b[: len(a)] == a:
                    raise UsageError(f"target tokens {a} are a prefix of {b}, so their events overlap; use"
                                     " prefix-free targets or --over topk", where=trace_path)
        probs = np.exp(np.stack(frame["target_seq_logprobs"].to_numpy()).astype(np.float64))
        return Points(ids, groups, embeddings, probs, None, 0), trace.meta
    probs = np.exp(np.stack(frame["topk_logprobs"].to_numpy()).astype(np.float64))
    topk_ids = np.stack(frame["topk_ids"].to_numpy())
    vocab_size = int(trace.meta.get("vocab_size") or 0)
    if vocab_size <= topk_ids.shape[1]:
        raise UsageError("the trace metadata has no usable vocab_size, which --over topk needs", where=trace_path)
    return Points(ids, groups, embeddings, probs, topk_ids, vocab_size), trace.meta


def _group(meta: str | None) -> str | None:
    if not meta:
        return None
    value = json.loads(meta).get("group")
    return None if value is None else str(value)


def choose_pairs(n: int, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j, or ``max_pairs`` of them drawn without replacement."""
    i, j = np.triu_indices(n, k=1)
    if len(i) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(i), size=max_pairs, replace=False))
        i, j = i[keep], j[keep]
    return i, j


def target_distances(probs: np.ndarray, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TV and Hellinger on the partition {each target, everything else}."""
    cells = np.concatenate([probs, np.clip(1 - probs.sum(1, keepdims=True), 0, None)], axis=1)
    return _tv_hellinger(cells[i], cells[j])


def topk_distances(probs: np.ndarray, ids: np.ndarray, vocab_size: int, i: np.ndarray, j: np.ndarray,
                   chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """TV and Hellinger on the partition {union of the two top-k sets, everything else}."""
    k = ids.shape[1]
    remainder = np.clip(1 - probs.sum(1), 0, None)
    spread = remainder / (vocab_size - k)  # estimate for a token outside a point's own top-k
    tv, hel = [], []
    for s in range(0, len(i), chunk):
        a, b = i[s : s + chunk], j[s : s + chunk]
        match = ids[a][:, :, None] == ids[b][:, None, :]  # [P, k_a, k_b]
        a_in_b, b_in_a = match.any(2), match.any(1)
        pa_ = probs[a]
        pb_ = probs[b]
        pb_at_a = (match * pb_[:, None, :]).sum(2) + ~a_in_b * spread[b][:, None]  # B's mass on A's tokens
        pa_at_b_only = np.where(b_in_a, 0.0, spread[a][:, None])  # A's mass on B-only tokens
        pb_b_only = np.where(b_in_a, 0.0, pb_)
        rest_a = np.clip(remainder[a] - spread[a] * (~b_in_a).sum(1), 0, None)
        rest_b = np.clip(remainder[b] - spread[b] * (~a_in_b).sum(1), 0, None)
        p = np.concatenate([pa_, pa_at_b_only, rest_a[:, None]], axis=1)
        q = np.concatenate([pb_at_a, pb_b_only, rest_b[:, None]], axis=1)
        t, h = _tv_hellinger(p, q)
        tv.append(t)
        hel.append(h)
    return np.concatenate(tv), np.concatenate(hel)


def _tv_hellinger(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return total_variation(p, q), hellinger(p, q)


def analyse(points: Points, *, over: str, max_pairs: int = 50_000, quantile: float = 0.95, seed: int = 0,
            tv_bound: float | None = None) -> tuple[ContinuityResult, dict[str, np.ndarray]]:
    """The summary, and the per-pair arrays (embedding distance, TV, Hellinger, same-group flag) for plots."""
    from scipy.stats import spearmanr

    if not 0 < quantile <= 1:
        raise UsageError(f"must be in (0, 1], got {quantile}", where="--quantile")
    if max_pairs < 1:
        raise UsageError(f"must be 1 or more, got {max_pairs}", where="--max-pairs")
    i, j = choose_pairs(len(points.ids), max_pairs, seed)
    distance = np.linalg.norm(points.embeddings[i] - points.embeddings[j], axis=1).astype(np.float64)
    if points.topk_ids is None:
        tv, hel = target_distances(points.probs, i, j)
    else:
        tv, hel = topk_distances(points.probs, points.topk_ids, points.vocab_size, i, j)
    groups = np.array(points.groups, dtype=object)
    has_group = np.array([g is not None for g in points.groups])
    kind = np.where(~(has_group[i] & has_group[j]), "ungrouped",
                    np.where(groups[i] == groups[j], "same group", "different groups"))
    positive = distance > 0
    ratio_tv = tv[positive] / distance[positive]
    ratio_hel = hel[positive] / distance[positive]
    rho_tv = spearmanr(distance, tv)
    rho_hel = spearmanr(distance, hel)
    by_kind = [
        PairStats(str(name), int(sel.sum()), float(np.median(distance[sel])), float(np.median(tv[sel])),
                  float(np.median(hel[sel])))
        for name in ("same group", "different groups", "ungrouped") if (sel := kind == name).any()
    ]
    quantile_of = lambda x: float(np.quantile(x, quantile)) if len(x) else float("nan")  # noqa: E731
    result = ContinuityResult(
        over=over, points=len(points.ids), pairs=len(i),
        spearman_tv=float(rho_tv.statistic), spearman_tv_p=float(rho_tv.pvalue),
        spearman_hellinger=float(rho_hel.statistic), spearman_hellinger_p=float(rho_hel.pvalue),
        quantile=quantile, lipschitz_tv=quantile_of(ratio_tv),
        lipschitz_tv_max=float(ratio_tv.max()) if len(ratio_tv) else float("nan"),
        lipschitz_hellinger=quantile_of(ratio_hel),
        lipschitz_hellinger_max=float(ratio_hel.max()) if len(ratio_hel) else float("nan"),
        tv_bound=tv_bound, identical_embeddings=int((~positive).sum()), by_kind=by_kind,
    )
    return result, {"distance": distance, "tv": tv, "hellinger": hel, "kind": kind}


def continuity(trace_path: str, *, over: str = "topk", max_pairs: int = 50_000, quantile: float = 0.95,
               seed: int = 0) -> tuple[ContinuityResult, dict[str, np.ndarray], dict[str, Any]]:
    """The whole analysis of one trace: the result, the pair distances behind it, the trace metadata."""
    points, meta = load_points(trace_path, over)
    bound = (meta.get("embedding") or {}).get("tv_lipschitz_bound")
    result, pairs = analyse(points, over=over, max_pairs=max_pairs, quantile=quantile, seed=seed, tv_bound=bound)
    return result, pairs, meta


def finite_or_null(value: Any) -> Any:
    """JSON has no NaN: undefined numbers (e.g. a correlation over one pair) become null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value
