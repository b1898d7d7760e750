"""Synthetic traces in the real trace schema, from real experiment prompts, with planted predictions."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.analysis.martingale import MartingaleResult, martingale_test
from llmprobe.bayes import discounted_counts, mixture_posterior_predictive
from llmprobe.experiments import generate, load_experiment
from llmprobe.tracing.schema import encode_metadata, trace_schema

ROOT = Path(__file__).resolve().parents[2]


def records(experiment: str, sequences: int, n_max: int, seed: int = 5, permutations: int = 0) -> list[dict]:
    """Prompts of ``configs/experiments/<experiment>.toml`` (marks layout; each followed by ``permutations``
    shuffled orders of its examples)."""
    return list(generate(load_experiment(ROOT / f"configs/experiments/{experiment}.toml"), seed=seed, n_max=n_max,
                         sequences=sequences, permutations=permutations))


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


def recency(repeat: float, start: list[float]):
    """``predict`` for a model that leans on the last example: ``start`` before any example, then the last
    outcome with probability ``repeat`` and the rest shared as ``start`` shares it, whatever came before."""
    m = np.asarray(start, dtype=float)

    def predict(record: dict, index: int) -> np.ndarray:
        rows = []
        for mark in record["marks"]:
            row = m.copy()
            if mark["n"] > 0:
                last = record["outcomes"][mark["n"] - 1]
                row[last] = 0.0
                row *= (1 - repeat) / row.sum()
                row[last] = repeat
            rows.append(row)
        return np.array(rows)

    return predict


def per_sequence_constant(concentration: float, mean: list[float], seed: int = 0):
    """``predict`` for a model that never updates but differs between sequences: each prompt's
    prediction is drawn once from Dirichlet(``concentration`` ``mean``) and kept at every mark."""
    rng = np.random.default_rng(seed)
    drawn: dict[int, np.ndarray] = {}

    def predict(record: dict, index: int) -> np.ndarray:
        if index not in drawn:
            drawn[index] = np.clip(rng.dirichlet(concentration * np.asarray(mean, dtype=float)), 1e-4, None)
        return np.tile(drawn[index] / drawn[index].sum(), (len(record["marks"]), 1))

    return predict


def noisy(predict: Callable[[dict, int], np.ndarray], sigma: float, seed: int = 0):
    """``predict`` with multiplicative log-normal noise: p ∝ q exp(sigma z), z standard normal per entry."""
    rng = np.random.default_rng(seed)

    def noisy_predict(record: dict, index: int) -> np.ndarray:
        q = predict(record, index) * np.exp(sigma * rng.standard_normal((len(record["marks"]), len(record["targets"]))))
        return q / q.sum(axis=1, keepdims=True)

    return noisy_predict


def blend(first: Callable[[dict, int], np.ndarray], second: Callable[[dict, int], np.ndarray], share: float):
    """``predict`` for the mixture ``share`` first + (1 - share) second."""
    return lambda record, index: share * first(record, index) + (1 - share) * second(record, index)


def constant(row: list[float]):
    """``predict`` for a model that predicts ``row`` at every mark of every prompt."""
    return lambda record, index: np.tile(row, (len(record["marks"]), 1))


def knows_theta(floor: float = 0.05):
    """``predict`` for a model that never updates but knows each sequence's true theta (kept off 0 and 1)."""

    def predict(record: dict, index: int) -> np.ndarray:
        theta = np.clip(record["theta"], floor, None)
        return np.tile(theta / theta.sum(), (len(record["marks"]), 1))

    return predict


@dataclass(frozen=True)
class Planted:
    """A planted model whose verdict is known: ``make()`` builds a fresh ``predict`` for
    ``records(experiment, sequences, n_max)``; ``catches`` names the wrong rule it fails."""

    name: str
    verdict: str
    experiment: str
    sequences: int
    n_max: int
    make: Callable[[], Callable[[dict, int], np.ndarray]]
    catches: str

    def write(self, path: Path) -> Path:
        return write_trace(path, records(self.experiment, self.sequences, self.n_max), self.make())


COIN, SKEWED = [0.5, 0.5], [0.2, 0.5, 0.3]
OLD_LOW_GAMMA = "the old rule 'γ interval below 0.5 → no-updating' (and its sentence 'spans most of (0, 1]')"
CONSISTENT_FIRST = "consistent decided before rejected (the γ = 1 filter fits within FIT_KL_BITS here too)"
POSITIVE = ""
"""``catches`` of a positive control: no comparison near its threshold; only a wrong fit changes its verdict."""
OLD_POOR_FIRST = "poor-fit decided before the never-updating baseline is consulted (the old order)"
PLANTED = (
    # no-updating: a predictor that ignores the examples explains every mark; no filter does better
    *(Planted(f"per-sequence constants, Dir({c:g}·m)", "no-updating", exp, seqs, 12,
              lambda c=c, m=m: per_sequence_constant(c, m), OLD_POOR_FIRST)
      for c, m, exp, seqs in ((3, COIN, "coin", 2), (20, COIN, "coin", 2), (10, SKEWED, "categorical", 12))),
    Planted("per-sequence constants, Dir(20·m), noise σ = 0.1", "no-updating", "coin", 2, 12,
            lambda: noisy(per_sequence_constant(20, COIN), 0.1), OLD_POOR_FIRST),
    Planted("knows each sequence's θ, never updates", "no-updating", "coin", 2, 12, knows_theta, OLD_POOR_FIRST),
    Planted("one constant (0.3, 0.7), noise σ = 0.1", "no-updating", "coin", 2, 12,
            lambda: noisy(constant([0.3, 0.7]), 0.1),
            "no-updating judged by each sequence's (noisy) first prediction alone: the shared constant is the witness"),
    Planted("exact Bayes, Dir(1000, 1000): moves < 1 %", "no-updating", "coin", 2, 15,
            lambda: bayesian([1.0], [[1000.0, 1000.0]]), "updating below NO_UPDATE_BITS called consistent"),
    # rejected: forgetting established (interval below 1, out-of-sample gain) and the forgetting filter fits
    *(Planted(f"recency: repeats the last outcome w.p. {r:g}", "rejected", "coin", 2, 15,
              lambda r=r: recency(r, COIN), OLD_LOW_GAMMA) for r in (0.6, 0.8, 0.95)),
    Planted("recency 0.8, categorical, skewed start", "rejected", "categorical", 8, 15,
            lambda: recency(0.8, SKEWED), OLD_LOW_GAMMA),
    *(Planted(f"forgetting γ = {g:g}, Dir(1.5, 1.5)", "rejected", "coin", 2, n_max,
              lambda g=g: bayesian([1.0], [[1.5, 1.5]], gamma=g), catches)
      for g, n_max, catches in ((0.3, 20, OLD_LOW_GAMMA), (0.5, 20, OLD_LOW_GAMMA), (0.95, 30, CONSISTENT_FIRST))),
    Planted("forgetting γ = 0.7, categorical Dir(2, 5, 1.5)", "rejected", "categorical", 12, 15,
            lambda: bayesian([1.0], [[2.0, 5.0, 1.5]], gamma=0.7), CONSISTENT_FIRST),
    *(Planted(f"{share:.0%} recency 0.8 + {1 - share:.0%} exact Bayes", "rejected", "coin", 2, 15,
              lambda share=share: blend(recency(0.8, COIN), bayesian([1.0], [[2.0, 2.0]]), share), catches)
      for share, catches in ((0.3, CONSISTENT_FIRST), (0.5, OLD_LOW_GAMMA))),
    # consistent: forgetting not established and the γ = 1 filter fits
    Planted("frequency follower: exact Bayes, Dir(0.05, 0.05)", "consistent", "coin", 2, 15,
            lambda: bayesian([1.0], [[0.05, 0.05]]), POSITIVE),
    Planted("frequency follower: exact Bayes, Dir(0.1, 0.1, 0.1)", "consistent", "categorical", 12, 15,
            lambda: bayesian([1.0], [[0.1, 0.1, 0.1]]), POSITIVE),
    Planted("exact Bayes, Dir(20, 20)", "consistent", "coin", 2, 15, lambda: bayesian([1.0], [[20.0, 20.0]]),
            "no-updating whenever never updating fits, without asking what updating gains"),
    *(Planted(f"exact Bayes {name}, noise σ = 0.1", "consistent", exp, seqs, 15,
              lambda alpha=alpha: noisy(bayesian([1.0], [alpha]), 0.1), catches)
      for name, alpha, exp, seqs, catches in (
          ("Dir(2, 3)", [2.0, 3.0], "coin", 2,
           "rejection on the bootstrap alone (γ = 1 lies outside the interval; forgetting gains < 1e-3 bits)"),
          ("Dir(2, 5, 1.5)", [2.0, 5.0, 1.5], "categorical", 12, POSITIVE))),
    # poor-fit: the filter the verdict rests on does not explain the predictions
    *(Planted(f"exact Bayes {name}, noise σ = 0.4", "poor-fit", exp, seqs, 15,
              lambda alpha=alpha: noisy(bayesian([1.0], [alpha]), 0.4), "no threshold on the fit level")
      for name, alpha, exp, seqs in (("Dir(2, 3)", [2.0, 3.0], "coin", 2),
                                     ("Dir(2, 5, 1.5)", [2.0, 5.0, 1.5], "categorical", 12))),
    Planted("forgetting γ = 0.5, noise σ = 0.4", "poor-fit", "coin", 2, 20,
            lambda: noisy(bayesian([1.0], [[1.5, 1.5]], gamma=0.5), 0.4),
            "rejected without the forgetting filter fitting"),
    Planted("anti-Bayesian (counts reversed), Dir(5, 5)", "poor-fit", "coin", 2, 20,
            lambda: bayesian([1.0], [[5.0, 5.0]], swap=True),
            "no-updating without asking the ignoring predictor to fit (it beats every filter here)"),
    Planted("one constant (0.3, 0.7), noise σ = 0.5", "poor-fit", "coin", 2, 12,
            lambda: noisy(constant([0.3, 0.7]), 0.5), "no-updating without asking the ignoring predictor to fit"),
)
"""The planted models of the verdict's decision table (docs/statistics.md; benchmarks/verdict_table.py)."""


def planted_martingale(predict: Callable[[dict, int], np.ndarray], prompts: list[dict], ns: list[int],
                       paths: int = 32, n_bootstrap: int = 500, seed: int = 0) -> list[MartingaleResult]:
    """The martingale test (horizon 1) of a planted model, as ``llmprobe martingale`` runs it on a real one:
    at each prompt's first n outcomes, ``paths`` next outcomes sampled from the model's own prediction, and
    its prediction after each. Shuffled orders are left out (the test cuts the original sequences)."""
    rng = np.random.default_rng(seed)
    originals = [r for r in prompts if "permutation" not in r]
    results = []
    for n in ns:
        now, after = [], []
        for index, record in enumerate(originals):
            cut = {**record, "outcomes": record["outcomes"][:n], "marks": [{"n": n}]}
            p = predict(cut, index)[0]
            now.append(p)
            draws = rng.choice(p.size, size=paths, p=p / p.sum())
            after.append([predict({**record, "outcomes": cut["outcomes"] + [int(x)], "marks": [{"n": n + 1}]},
                                  index)[0] for x in draws])
        results.append(martingale_test(np.array(now), np.array(after), n_bootstrap=n_bootstrap, seed=seed, n=n))
    return results


def write_martingale(path: Path, results: list[MartingaleResult]) -> Path:
    """``results`` as ``llmprobe martingale --json`` writes them (one JSON object per n)."""
    from llmprobe.cli.views.analyses import MartingaleView

    path.write_text("".join(MartingaleView(results, 0.05, "planted").json()))
    return path


@dataclass(frozen=True)
class PlantedScorecard:
    """A planted model of the scorecard table (docs/statistics.md, section 6g): traced with ``shuffled``
    orders of each coin sequence and fitted with ``--prior prior``; ``make()`` builds a fresh ``predict``."""

    name: str
    make: Callable[[], Callable[[dict, int], np.ndarray]]
    n_max: int = 20
    prior: str = "fit"
    sequences: int = 2
    shuffled: int = 3

    def prompts(self) -> list[dict]:
        return records("coin", self.sequences, self.n_max, permutations=self.shuffled)


SCORECARD_PLANTED = (
    PlantedScorecard("exact Bayes", lambda: bayesian([1.0], [[2.0, 3.0]])),
    PlantedScorecard("exact Bayes, noise σ = 0.1", lambda: noisy(bayesian([1.0], [[2.0, 3.0]]), 0.1)),
    PlantedScorecard("recency 0.8", lambda: recency(0.8, COIN)),
    PlantedScorecard("forgetting γ = 0.5", lambda: bayesian([1.0], [[1.5, 1.5]], gamma=0.5), 30, "dirichlet:1.5,1.5"),
    PlantedScorecard("forgetting γ = 0.5, fitted prior", lambda: bayesian([1.0], [[1.5, 1.5]], gamma=0.5), 30),
    PlantedScorecard("knows θ", knows_theta),
    PlantedScorecard("per-sequence constants, Dir(3·m)", lambda: per_sequence_constant(3, COIN)),
)
"""The scorecard's planted models (tests/analysis/test_scorecard.py; benchmarks/scorecard_table.py)."""
