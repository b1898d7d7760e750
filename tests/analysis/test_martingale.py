"""The martingale test (llmprobe/martingale.py) on synthetic predictors with known answers, then the model.

The synthetic predictors are Dirichlet-categorical with counts discounted by γ per step:
p(k) = (α + c_k) / (Kα + Σ c), c <- γ c + e_x. γ = 1 is exact Bayes (a Pólya urn, a martingale);
γ < 1 forgets, drifting back towards the prior along its own sampled paths.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from llmprobe.analysis.martingale import CategoryPredictor, continuation, martingale_test, model_martingale
from llmprobe.experiments import generate, load_experiment, loads_experiment
from llmprobe.tracing.prompts import PromptRecord
from tests.cli_helpers import run_cli

COIN_ONE_THETA = """
[experiment]
name = "coin1"
n_max = 8
sequences = 2
seed = 3
theta = [0.7, 0.3]
[template]
prefix = "I just flipped a coin, and it came up"
example = "{outcome}"
separator = ", then"
[[categories]]
name = "heads"
target = " heads"
[[categories]]
name = "tails"
target = " tails"
"""


def discounted_predictive(counts: np.ndarray, alpha: float) -> np.ndarray:
    return (alpha + counts) / (alpha * counts.shape[-1] + counts.sum(-1, keepdims=True))


def simulate(gamma: float, *, states: int = 40, paths: int = 64, n: int = 10, horizon: int = 4, k: int = 2,
             alpha: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """p_n [S, K] after n draws from θ ~ Dirichlet(1), and p_{n+m} [S, J, K] along the predictor's own paths."""
    rng = np.random.default_rng(seed)
    theta = rng.dirichlet(np.ones(k), size=states)
    counts = np.zeros((states, k))
    for _ in range(n):
        draw = np.minimum((rng.random(states)[:, None] > np.cumsum(theta, 1)).sum(1), k - 1)
        counts = gamma * counts + np.eye(k)[draw]
    p_now = discounted_predictive(counts, alpha)
    walk = np.repeat(counts[:, None, :], paths, axis=1)
    for _ in range(horizon):
        p = discounted_predictive(walk, alpha)
        draw = np.minimum((rng.random((states, paths))[..., None] > np.cumsum(p, -1)).sum(-1), k - 1)
        walk = gamma * walk + np.eye(k)[draw]
    return p_now, discounted_predictive(walk, alpha)


def test_exact_bayes_passes_and_a_forgetting_predictor_fails():
    """Five independent runs each: under H0 two or more rejections at 5% would have probability 0.023."""
    bayes = [martingale_test(*simulate(1.0, seed=s), n_bootstrap=500, seed=s) for s in range(5)]
    forgetting = [martingale_test(*simulate(0.8, seed=s), n_bootstrap=500, seed=s) for s in range(5)]
    assert sum(r.rejected(0.05) for r in bayes) <= 1
    assert all(r.p_value < 0.01 for r in forgetting)
    assert min(r.mean_tv_deviation for r in forgetting) > 3 * max(r.mean_tv_deviation for r in bayes)
    die = martingale_test(*simulate(0.7, k=6, states=20, paths=48, horizon=3, seed=5), n_bootstrap=1000)
    assert die.rejected(0.01)


def test_rejection_rate_under_the_null_is_near_the_level():
    rejected = [martingale_test(*simulate(1.0, states=8, paths=12, n=5, horizon=2, k=3, seed=s), n_bootstrap=200,
                                seed=s).rejected(0.05) for s in range(200)]
    assert 0.01 <= np.mean(rejected) <= 0.10


def test_one_step_deviation_matches_the_closed_form_for_forgetting():
    """E[p_{n+1}] - p_n = α(1-γ)(N - 2S) / ((2α + N)(2α + γN + 1)) for the discounted coin."""
    alpha, gamma = 1.0, 0.6
    counts = np.array([[3.1, 0.4]])  # S (heads) and N - S, already discounted
    p_now = discounted_predictive(counts, alpha)
    rng = np.random.default_rng(7)
    paths = 40_000
    heads = rng.random(paths) < p_now[0, 0]
    walk = gamma * counts + np.where(heads[:, None], [[1.0, 0.0]], [[0.0, 1.0]])
    result = martingale_test(p_now, discounted_predictive(walk, alpha)[None], n_bootstrap=50)
    big_n, s = counts.sum(), counts[0, 0]
    expected = alpha * (1 - gamma) * (big_n - 2 * s) / ((2 * alpha + big_n) * (2 * alpha + gamma * big_n + 1))
    spread = np.abs(discounted_predictive(walk, alpha)[:, 0] - p_now[0, 0]).max()
    assert result.mean_tv_deviation == pytest.approx(abs(expected), abs=4 * spread / np.sqrt(paths))
    assert result.rejected(0.05)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="expected p_now"):
        martingale_test(np.ones((3, 2)) / 2, np.ones((2, 4, 2)) / 2)
    with pytest.raises(ValueError, match="at least 2 paths"):
        martingale_test(np.ones((3, 2)) / 2, np.ones((3, 1, 2)) / 2)


@pytest.mark.parametrize("config", ["coin.toml", "die.toml", "categorical.toml", "mapping.toml"])
def test_continuations_render_exactly_as_the_experiment_does(config):
    exp = load_experiment(f"configs/experiments/{config}").with_overrides(n_max=6, sequences=1)
    for record in list(generate(exp, layout="marks"))[:3]:
        marks, outcomes = record["marks"], record["outcomes"]
        for n in (0, 2):
            cut = record["prompt"][: marks[n]["offset"]]
            text = cut + continuation(exp, record, n, tuple(outcomes[n : n + 3]))
            assert text == record["prompt"][: marks[n + 3]["offset"]]


def test_category_predictor_equals_the_traced_whole_target_scores(tiny_loaded):
    targets = [" heads", " tails", " Paris is"]  # the last spans several tokens
    prompts = ["I just flipped a coin, and it came up", "The capital of France", "Once upon a time"]
    run = TraceRun(TraceSettings(top_k=2, targets=targets, batch_size=2),
                   [PromptRecord(i, str(i), t, i + 1) for i, t in enumerate(prompts)]).start(tiny_loaded)
    rows = [r for batch in run.batches()
            for r in batch.to_pylist() if r["target_seq_logprobs"] is not None]
    traced = {r["prompt_index"]: r["target_seq_logprobs"] for r in rows}
    mine = CategoryPredictor(tiny_loaded, targets, batch_size=2).logprobs(prompts)
    for i in range(len(prompts)):
        np.testing.assert_allclose(mine[i], traced[i], atol=1e-4)


def test_model_martingale_runs_per_n_and_is_reproducible(tiny_loaded):
    exp = loads_experiment(COIN_ONE_THETA)
    first = model_martingale(tiny_loaded, exp, [0, 3], paths=6, horizon=2, seed=1, n_bootstrap=100)
    again = model_martingale(tiny_loaded, exp, [0, 3], paths=6, horizon=2, seed=1, n_bootstrap=100)
    assert [(r.n, r.states, r.paths, r.horizon) for r in first] == [(0, 2, 6, 2), (3, 2, 6, 2)]
    assert [(r.statistic, r.p_value) for r in first] == [(r.statistic, r.p_value) for r in again]
    assert all(0 < r.p_value <= 1 and 0 < r.mean_category_mass <= 1 for r in first)




def test_cli_martingale(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    config = tmp_path / "coin1.toml"
    config.write_text(COIN_ONE_THETA)
    code, stdout, err = run_cli(["martingale", str(config), "--model", str(tiny_model_dir), "--n", "1,2",
                                 "--paths", "4", "--bootstrap", "50", "--json", "-q"], capsysbinary, monkeypatch)
    assert code == 0, err
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [line["n"] for line in lines] == [1, 2] and all("rejected" in line for line in lines)
    for args, needle in ((["--n", "1,x"], "--n"), (["--paths", "1"], "--paths"), (["--alpha", "2"], "--alpha")):
        code, _, err = run_cli(["martingale", str(config), "--model", "/nonexistent", *args], capsysbinary,
                               monkeypatch)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], err  # checked before any model load
    code, _, err = run_cli(["martingale", str(tmp_path / "none.toml")], capsysbinary, monkeypatch)
    assert code == 2 and "none.toml" in err


@pytest.mark.real_model
def test_real_model_martingale(real_loaded):
    exp = loads_experiment(COIN_ONE_THETA)
    results = model_martingale(real_loaded, exp, [4], paths=16, horizon=1, seed=0, n_bootstrap=500)
    (result,) = results
    assert result.states == 2 and result.paths == 16
    assert result.mean_category_mass > 0.5  # after ", then" the model mostly says heads or tails
    print(json.dumps({"p_value": result.p_value, "mean_tv_deviation": result.mean_tv_deviation,
                      "category_mass": result.mean_category_mass}))
