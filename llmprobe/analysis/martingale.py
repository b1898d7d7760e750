"""``llmprobe martingale``: is the model's in-context predictive a martingale (Falck, Wang & Holmes 2024)?

A Bayesian predictor on exchangeable data is a martingale: if, after n examples, one samples the next
m examples from the predictor itself, the expected predictive after them equals the current one,
E[p_{n+m} | x_{1:n}] = p_n. For an experiment (configs/experiments/coin.toml, die.toml, ...) this
module takes each generated sequence cut at example n (a *state*), reads the model's predictive
p_n over the experiment's categories (whole-target probabilities, renormalised over the categories),
samples ``paths`` continuations of ``horizon`` examples from that same predictive — appending each
sampled category's text and the template's separator, exactly as the experiment would render it —
and reads the predictive p_{n+m} at the end of each path.

The test (:func:`martingale_test`, numpy only) compares, per n, the path-averaged p_{n+m} with p_n:

* statistic T = mean over states of ||mean_j p_{n+m}^{(j)} - p_n||² (squared Euclidean deviation);
* null distribution by bootstrap under H0: each state's paths are centred on p_n (residuals scaled by
  sqrt(J/(J-1)) so the bootstrap variance of a mean matches the sample's), paths are resampled with
  replacement within each state, and T is recomputed; p-value = (1 + #{T* >= T}) / (1 + B).

A Bayesian predictor passes (p-values uniform); a forgetting one — counts discounted by γ < 1, as
Gupta et al. (2025) fit — drifts back towards its prior along sampled paths and is rejected once the
paths are many enough. Paths that share their first steps share forward passes (the model is
deterministic), so a state costs at most sum_t min(paths, K^t) forward passes, not paths x horizon.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llmprobe.progress import SILENT, Reporter
from llmprobe.bayes import total_variation
from llmprobe.errors import UsageError


@dataclass
class MartingaleResult:
    n: int  # examples before the state
    horizon: int  # sampled examples per path
    states: int
    paths: int
    statistic: float  # mean squared deviation of the path-averaged predictive from the current one
    p_value: float
    mean_tv_deviation: float  # mean over states of TV(mean_j p_{n+m}, p_n)
    mean_category_mass: float | None = None  # model only: mean P(any category) at the states

    def rejected(self, alpha: float) -> bool:
        return self.p_value < alpha


def martingale_test(p_now: np.ndarray, p_next: np.ndarray, *, n_bootstrap: int = 2000, seed: int = 0,
                    n: int = -1, horizon: int = 1) -> MartingaleResult:
    """Test E[p_next | state] = p_now for predictives ``p_now`` [S, K] and ``p_next`` [S, J, K] (J >= 2)."""
    p_now = np.asarray(p_now, dtype=np.float64)
    p_next = np.asarray(p_next, dtype=np.float64)
    if p_now.ndim != 2 or p_next.ndim != 3 or p_next.shape[0] != p_now.shape[0] or p_next.shape[2] != p_now.shape[1]:
        raise ValueError(f"expected p_now [S, K] and p_next [S, J, K], got {p_now.shape} and {p_next.shape}")
    states, paths, _ = p_next.shape
    if paths < 2:
        raise ValueError("the bootstrap needs at least 2 paths per state")
    mean_next = p_next.mean(1)
    deviation = mean_next - p_now
    statistic = float((deviation**2).sum(1).mean())
    residuals = (p_next - mean_next[:, None, :]) * np.sqrt(paths / (paths - 1))
    rng = np.random.default_rng(seed)
    exceed = 0
    rows = np.arange(states)[:, None]
    for _ in range(n_bootstrap):
        pick = rng.integers(0, paths, size=(states, paths))
        boot_dev = residuals[rows, pick].mean(1)  # H0: the resampled paths average to p_now exactly
        exceed += float((boot_dev**2).sum(1).mean()) >= statistic
    return MartingaleResult(
        n=n, horizon=horizon, states=states, paths=paths, statistic=statistic,
        p_value=(1 + exceed) / (1 + n_bootstrap), mean_tv_deviation=float(total_variation(deviation, 0.0).mean()),
    )


# ------------------------------------------------------------------------------------------------
# The model-driven part


@dataclass
class _State:
    record: dict[str, Any]
    n: int
    prefix: str  # the prompt cut at mark n


class CategoryPredictor:
    """The model's predictive over an experiment's categories, for any prefix text."""

    def __init__(self, loaded, targets: list[str], batch_size: int) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.batch_size = batch_size
        self.targets = [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets]
        self.max_context = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 0)

    def logprobs(self, prefixes: list[str]) -> np.ndarray:
        """log P(target_k | prefix) for every prefix and whole target string: [N, K]."""
        import torch

        encoded = [list(self.tokenizer(p)["input_ids"]) for p in prefixes]
        contexts: dict[tuple[int, ...], int] = {}  # a context is scored once, however many targets share it
        wanted = []  # (prefix index, target index, context index, token)
        for i, ids in enumerate(encoded):
            for k, target in enumerate(self.targets):
                for step, token in enumerate(target):
                    context = tuple(ids + target[:step])
                    wanted.append((i, k, contexts.setdefault(context, len(contexts)), token))
        order = list(contexts)
        longest = max(map(len, order), default=0)
        if self.max_context and longest > self.max_context:  # as trace refuses them: no silent wrong numbers
            raise UsageError(f"a prompt (with its continuation) has {longest} tokens but the model's context is"
                             f" {self.max_context} tokens; test at smaller --n or --horizon", where="--n")
        scores = []
        for start in range(0, len(order), self.batch_size):
            scores.append(self._last_logprobs(order[start : start + self.batch_size], torch))
        table = torch.cat(scores)
        out = np.zeros((len(prefixes), len(self.targets)))
        for i, k, c, token in wanted:
            out[i, k] += float(table[c, token])
        if not np.all(np.isfinite(out)):
            raise UsageError("the model's log-probabilities are NaN or infinite: its logits overflowed or its weights"
                             " are corrupt (try --dtype float32)", where="--model")
        return out

    def _last_logprobs(self, contexts: list[tuple[int, ...]], torch):
        width = max(map(len, contexts))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for b, ids in enumerate(contexts):
            input_ids[b, width - len(ids):] = torch.tensor(ids)
            attention[b, width - len(ids):] = 1
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        device = self.loaded.device
        with torch.inference_mode():
            logits = self.loaded.model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                       position_ids=position_ids.to(device), use_cache=False,
                                       logits_to_keep=1).logits[:, -1]
            return torch.log_softmax(logits.float(), dim=-1).cpu()


def continuation(exp, record: dict[str, Any], n: int, path: tuple[int, ...]) -> str:
    """The text after mark n when the next examples are the categories in ``path``."""
    from llmprobe.experiments.render import render_pieces

    cues = record.get("cues")
    parts = []
    for step, category in enumerate(path):
        j = n + step
        parts.append(exp.categories[category].text + render_pieces(exp.tail, j, cues[j] if cues else None)
                     + exp.separator + render_pieces(exp.head, j + 1, cues[j + 1] if cues else None))
    return "".join(parts)


def model_martingale(loaded, exp, ns: list[int], *, paths: int, horizon: int, seed: int = 0, n_bootstrap: int = 2000,
               batch_size: int = 16, out: Reporter = SILENT) -> list[MartingaleResult]:
    """Sample paths from the model's own category predictive and test the martingale property per n.

    ``exp`` must already have ``n_max >= max(ns) + horizon`` (cues, where the template has them, come
    from the generated records, so paths use the same cue words the experiment would).
    """
    from llmprobe.experiments import generate

    if exp.templated:
        raise UsageError("martingale takes the single-[template] form; [[templates]] experiments are not supported",
                         where=exp.where)
    if exp.n_max < ns[-1] + horizon:
        raise UsageError(f"n_max {exp.n_max} < largest n {ns[-1]} + horizon {horizon}", where=exp.where)
    records = list(generate(exp, layout="marks"))
    predictor = CategoryPredictor(loaded, exp.targets, batch_size)
    states = [_State(r, n, r["prompt"][: r["marks"][n]["offset"]]) for n in ns for r in records]
    out.log(f"{len(states)} states ({len(records)} sequences x n in {ns}), {paths} paths of {horizon} examples each")
    known: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}  # (state, path) -> log P(category)

    def fill(nodes: set[tuple[int, tuple[int, ...]]]) -> None:
        todo = sorted(nodes - known.keys())
        texts = [states[s].prefix + continuation(exp, states[s].record, states[s].n, path) for s, path in todo]
        for node, row in zip(todo, predictor.logprobs(texts)):
            known[node] = row

    def predictive(node) -> np.ndarray:
        row = known[node]
        p = np.exp(row - row.max())
        return p / p.sum()

    rngs = [np.random.default_rng(np.random.SeedSequence([seed, s])) for s in range(len(states))]
    walks: list[list[tuple[int, ...]]] = [[()] * paths for _ in states]
    with out.progress("martingale steps", total=horizon + 1) as advance:
        fill({(s, ()) for s in range(len(states))})
        advance(1)
        for _ in range(horizon):
            for s, walk in enumerate(walks):
                for j, path in enumerate(walk):
                    p = predictive((s, path))
                    walk[j] = path + (int(rngs[s].choice(len(p), p=p)),)
            fill({(s, path) for s, walk in enumerate(walks) for path in walk})
            advance(1)
    results = []
    for n in ns:
        members = [s for s, st in enumerate(states) if st.n == n]
        p_now = np.stack([predictive((s, ())) for s in members])
        p_next = np.stack([[predictive((s, path)) for path in walks[s]] for s in members])
        result = martingale_test(p_now, p_next, n_bootstrap=n_bootstrap, seed=seed, n=n, horizon=horizon)
        result.mean_category_mass = float(np.mean([np.exp(known[(s, ())]).sum() for s in members]))
        results.append(result)
    return results
