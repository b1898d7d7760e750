"""The continuity analysis (llmprobe/continuity.py): distances with known answers, then the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmprobe.analysis.continuity import Points, analyse, load_points, target_distances, topk_distances
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from llmprobe.tracing.prompts import read_prompts
from llmprobe.tracing.writer import open_trace_sink
from tests.cli_helpers import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]






def full_tv_hellinger(p: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    return 0.5 * float(np.abs(p - q).sum()), float(np.sqrt(0.5 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum()))


def random_distributions(rng, n: int, vocab: int, concentration: float) -> np.ndarray:
    return rng.dirichlet(np.full(vocab, concentration), size=n)


def top_k(dists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.argsort(-dists, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dists, ids, 1), ids


def test_topk_distances_are_exact_when_the_top_k_holds_all_the_mass():
    rng = np.random.default_rng(0)
    vocab, k = 40, 6
    dists = np.zeros((5, vocab))
    for row in dists:  # each distribution lives on its own 1..k tokens, overlapping at random
        support = rng.choice(vocab, size=rng.integers(1, k + 1), replace=False)
        row[support] = rng.dirichlet(np.ones(len(support)))
    probs, ids = top_k(dists, k)
    i, j = np.triu_indices(5, 1)
    tv, hel = topk_distances(probs, ids, vocab, i, j)
    for a, b, t, h in zip(i, j, tv, hel):
        exact = full_tv_hellinger(dists[a], dists[b])
        assert t == pytest.approx(exact[0], abs=1e-12) and h == pytest.approx(exact[1], abs=1e-12)


def test_topk_distances_stay_within_the_bound_set_by_unknown_cells():
    rng = np.random.default_rng(1)
    vocab, k = 200, 10
    dists = random_distributions(rng, 12, vocab, 0.05)
    probs, ids = top_k(dists, k)
    i, j = np.triu_indices(12, 1)
    tv, hel = topk_distances(probs, ids, vocab, i, j)
    tv_back, _ = topk_distances(probs, ids, vocab, j, i)
    np.testing.assert_allclose(tv, tv_back, atol=1e-12)  # symmetric
    for a, b, t in zip(i, j, tv):
        exact, _ = full_tv_hellinger(dists[a], dists[b])
        only_b = len(set(ids[b]) - set(ids[a]))
        only_a = len(set(ids[a]) - set(ids[b]))
        # each unknown cell (a token in one top-k only) is off by at most the other point's k-th probability
        assert abs(t - exact) <= only_b * probs[a, -1] + only_a * probs[b, -1] + 1e-12
    same, _ = topk_distances(probs, ids, vocab, np.arange(12), np.arange(12))
    np.testing.assert_allclose(same, 0, atol=1e-12)


def test_target_distances_are_a_coarsening_of_the_full_distributions():
    rng = np.random.default_rng(2)
    dists = random_distributions(rng, 8, 30, 0.3)
    targets = [3, 7, 11]
    i, j = np.triu_indices(8, 1)
    tv, hel = target_distances(dists[:, targets], i, j)
    for a, b, t, h in zip(i, j, tv, hel):
        coarse = lambda p: np.append(p[targets], 1 - p[targets].sum())  # noqa: E731
        assert (t, h) == pytest.approx(full_tv_hellinger(coarse(dists[a]), coarse(dists[b])), abs=1e-12)
        assert t <= full_tv_hellinger(dists[a], dists[b])[0] + 1e-12  # data processing inequality


def test_analysis_of_a_distance_preserving_map():
    t = np.array([0.0, 0.1, 0.25, 0.33, 0.72, 0.96])  # all pairwise differences distinct
    points = Points(ids=[str(x) for x in range(6)], groups=["a", "a", "a", "b", "b", None],
                    embeddings=np.stack([t, np.zeros_like(t)], 1).astype(np.float32),
                    probs=np.stack([t, 1 - t], 1), topk_ids=None, vocab_size=0)
    # two targets that hold all the mass: TV(p_a, p_b) = |t_a - t_b| = embedding distance
    result, pairs = analyse(points, over="targets", quantile=0.5)
    assert result.pairs == 15 and result.points == 6
    assert result.spearman_tv == pytest.approx(1.0)
    assert result.lipschitz_tv == pytest.approx(1.0, abs=1e-6)
    assert result.lipschitz_tv_max == pytest.approx(1.0, abs=1e-6)
    kinds = {k.kind: k.pairs for k in result.by_kind}
    assert kinds == {"same group": 4, "different groups": 6, "ungrouped": 5}
    limited, _ = analyse(points, over="targets", max_pairs=7, seed=3)
    assert limited.pairs == 7


def test_softmax_of_a_linear_map_respects_the_analytic_tv_bound():
    rng = np.random.default_rng(4)
    weight = rng.normal(size=(25, 6))
    hidden = rng.normal(scale=0.3, size=(30, 6))
    logits = hidden @ weight.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    bound = np.linalg.norm(weight, axis=1).max() / 2
    points = Points([str(x) for x in range(30)], [None] * 30, hidden.astype(np.float32), probs, None, 0)
    result, _ = analyse(points, over="targets", tv_bound=bound)
    assert 0 < result.lipschitz_tv_max <= bound
    assert result.spearman_tv > 0.5


@pytest.fixture(scope="module")
def tiny_embedding_trace(tiny_loaded, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("continuity") / "emb.parquet"
    records = read_prompts(str(ROOT / "configs" / "prompts" / "continuity.jsonl"))[:12]
    run = TraceRun(TraceSettings(top_k=8, targets=[" Paris", " Paris is"], save_embeddings=True), records)
    run.start(tiny_loaded)
    with open_trace_sink(str(path), "parquet", run.schema, run.metadata(), run.vocab) as sink:
        for batch in run.batches():
            sink.write(batch)
    return path


def test_cli_continuity_json_table_and_plot(tiny_embedding_trace, tmp_path, capsysbinary, monkeypatch):
    image = tmp_path / "c.png"
    code, stdout, err = run_cli(["continuity", str(tiny_embedding_trace), "--json", "-o", str(image)],
                                capsysbinary, monkeypatch)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["points"] == 12 and result["pairs"] == 66 and result["over"] == "topk"
    assert result["tv_bound"] > 0 and -1 <= result["spearman_tv"] <= 1
    assert image.read_bytes()[:4] == b"\x89PNG"
    points, _ = load_points(str(tiny_embedding_trace), "topk")
    assert sorted(points.groups) == ["capital-france"] * 6 + ["capital-japan"] * 6
    code, stdout, err = run_cli(["continuity", str(tiny_embedding_trace)], capsysbinary, monkeypatch)
    assert code == 0 and b"Spearman" in stdout and "Spearman" not in err  # the result on stdout (issue 16)


def test_cli_continuity_errors(tiny_embedding_trace, tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    code, _, err = run_cli(["continuity", str(tiny_embedding_trace), "--over", "targets"], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "prefix of")  # " Paris" is a prefix of " Paris is"
    code, _, err = run_cli(["continuity", str(tiny_embedding_trace), "--over", "words"], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "--over")
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\nOnce upon a time\n")
    plain = tmp_path / "plain.parquet"
    run_cli(["trace", str(prompts), "-o", str(plain), "--model", str(tiny_model_dir), "-q"], capsysbinary, monkeypatch)
    code, _, err = run_cli(["continuity", str(plain)], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "no embedding column", "--save-embeddings")


@pytest.mark.real_model
def test_real_model_continuity(real_loaded, tmp_path):
    records = [r for r in read_prompts(str(ROOT / "configs" / "prompts" / "continuity.jsonl"))
               if r.meta["group"] in ("capital-france", "unrelated-0", "unrelated-1")]
    path = tmp_path / "emb.parquet"
    targets = [" Paris", " Tokyo", " Rome"]
    run = TraceRun(TraceSettings(top_k=20, targets=targets, save_embeddings=True), records).start(real_loaded)
    with open_trace_sink(str(path), "parquet", run.schema, run.metadata(), run.vocab) as sink:
        for batch in run.batches():
            sink.write(batch)
    summary = {}
    for over in ("topk", "targets"):
        points, meta = load_points(str(path), over)
        result, _ = analyse(points, over=over, tv_bound=meta["embedding"]["tv_lipschitz_bound"])
        kinds = {k.kind: k for k in result.by_kind}
        assert result.points == len(records) == 8
        assert kinds["same group"].embedding_distance_median < kinds["different groups"].embedding_distance_median
        summary[over] = (result.spearman_tv, result.lipschitz_tv, result.lipschitz_tv_max, result.tv_bound)
    # exact coarsening, so the analytic bound must hold
    assert summary["targets"][2] <= summary["targets"][3]
    print(json.dumps(summary))
