"""Synthetic traces in the real trace schema, from real experiment prompts, with planted predictions."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.bayes import discounted_counts, mixture_posterior_predictive
from llmprobe.experiments import generate, load_experiment
from llmprobe.tracing.schema import encode_metadata, trace_schema

ROOT = Path(__file__).resolve().parents[2]


def records(experiment: str, sequences: int, n_max: int, seed: int = 5) -> list[dict]:
    """Prompts of ``configs/experiments/<experiment>.toml`` (marks layout)."""
    return list(generate(load_experiment(ROOT / f"configs/experiments/{experiment}.toml"), seed=seed, n_max=n_max,
                         sequences=sequences))


def write_trace(path: Path, prompts: list[dict], predict: Callable[[dict, int], np.ndarray], mass: float = 0.8,
                model: str = "synthetic", token_ids: list[list[int]] | None = None,
                exact: Callable[[int], bool] = lambda n: True) -> Path:
    """A trace whose target scores at each mark of each prompt are ``predict(record, prompt number)``,
    an (n_marks, K) array, times ``mass``."""
    targets = prompts[0]["targets"]
    schema = trace_schema(top_k=1, n_targets=len(targets))
    rows = []
    for index, record in enumerate(prompts):
        probs = predict(record, index)
        for mark_index, mark in enumerate(record["marks"]):
            logp = np.log(probs[mark_index] * mass).tolist()
            rows.append({
                "prompt_index": index, "prompt_id": record["id"], "position": mark_index, "phase": "prompt",
                "token_id": 0, "token": "x", "next_token_id": None, "next_token": None, "next_logprob": None,
                "next_rank": None, "entropy": 1.0, "topk_ids": [0], "topk_logprobs": [0.0],
                "target_logprobs": logp, "target_seq_logprobs": logp,
                "mark_index": mark_index, "mark": json.dumps({**mark, "exact": exact(mark["n"])}),
                "meta": json.dumps({k: v for k, v in record.items() if k not in ("id", "prompt", "marks")}),
            })
    ids = token_ids or [[i] for i in range(len(targets))]
    meta = {"model": model, "targets": [{"text": t, "token_ids": i} for t, i in zip(targets, ids)]}
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.with_metadata(encode_metadata(meta, None))), path)
    return path


def bayesian(weights: list[float], alphas: list[list[float]], gamma: float = 1.0, swap: bool = False):
    """``predict`` for a filter under a Dirichlet-mixture prior (``swap``: counts reversed, anti-Bayesian)."""
    w, a = np.asarray(weights, dtype=float), np.asarray(alphas, dtype=float)

    def predict(record: dict, index: int) -> np.ndarray:
        counts = discounted_counts(np.asarray(record["outcomes"], dtype=int), gamma, a.shape[1])
        counts = counts[[m["n"] for m in record["marks"]]]
        return mixture_posterior_predictive(w, a, counts[:, ::-1] if swap else counts)

    return predict
