"""The sweep engine (issue 22 part 4): every component's scores against a trace with that intervention.

The engine reruns only blocks >= L on a cached residual stream and applies the head at the scored rows
only; its numbers must be the trace's: the whole-string target log-probabilities, the entropy and the
top-1 token at each mark and last position, for every kind of component, zero and mean ablation,
padded batches and targets of several tokens. On the tiny model (one vocabulary tile) they agree bit
for bit; on the default model to float32 rounding of the log-normalizer (tested there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmprobe.experiments import generate, load_experiment
from llmprobe.tracing.interventions import Intervention, parse_ablation
from llmprobe.tracing.prompts import records_from_objects
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from llmprobe.tracing.sweep import BASELINE, Component, SweepEngine
from tests.tracing import surgery

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def coin_records(n_max: int = 5, sequences: int = 1):
    return records_from_objects(list(generate(load_experiment(ROOT / "configs/experiments/coin.toml"), n_max=n_max,
                                              sequences=sequences)))[:5]


SETTINGS = dict(top_k=1, batch_size=3)  # 5 prompts of different lengths: padded batches of 3 and 2


def trace_at_rows(loaded, recs, engine, interventions):
    """The trace with ``interventions``, read at the engine's scored rows: (target_seq, entropy, top-1)."""
    table = TraceRun(TraceSettings(**SETTINGS, interventions=interventions), recs).start(loaded).table()
    by_row = {(r["prompt_index"], r["position"]): r for r in
              table.select(["prompt_index", "position", "target_seq_logprobs", "entropy", "topk_ids"]).to_pylist()}
    rows = [by_row[(e.record.index, p)] for e, p in engine.rows]
    return (np.array([r["target_seq_logprobs"] for r in rows], dtype=np.float32),
            np.array([r["entropy"] for r in rows], dtype=np.float32), np.array([r["topk_ids"][0] for r in rows]))


def assert_scores_equal(scores, reference, atol=0.0):
    target_seq, entropy, top1 = reference
    np.testing.assert_allclose(scores.target_seq_logprobs, target_seq, atol=atol, rtol=0)
    np.testing.assert_allclose(scores.entropy, entropy, atol=atol, rtol=0)
    assert (scores.top1 == top1).all()


COMPONENTS = [Component("1.2", "head", 1, 2), Component("0.0", "head", 0, 0), Component("2.attn", "attn", 2),
              Component("0.mlp", "mlp", 0), Component("1", "block", 1), Component("2", "block", 2)]


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_every_component_scores_as_its_trace(tiny_loaded, ablation):
    recs = coin_records()
    model = tiny_loaded.model
    parameters, hooks = surgery.parameters_of(model), surgery.attached_hooks(model)
    run = TraceRun(TraceSettings(**SETTINGS), recs).start(tiny_loaded)
    assert any(len(ids) > 1 for ids in run.tracer.target_tokens)  # " tails" spans tokens: continuations are run
    engine = SweepEngine(run, ablation, sites={(c.kind, c.layer) for c in COMPONENTS})
    assert_scores_equal(engine.scores(BASELINE), trace_at_rows(tiny_loaded, recs, engine, []))
    for component in COMPONENTS:
        scores = engine.scores(component)
        reference = trace_at_rows(tiny_loaded, recs, engine, [parse_ablation(component.name, ablation)])
        assert_scores_equal(scores, reference)
        assert np.abs(scores.target_seq_logprobs - engine.baseline.target_seq_logprobs).max() > 1e-3, component
    assert sum(engine.measured) == sum(len(e.marks_at) for e in run.prompts)  # experiment prompts: the marks
    assert_untouched = [torch.equal(v, parameters[k]) for k, v in surgery.parameters_of(model).items()]
    assert all(assert_untouched) and surgery.attached_hooks(model) == hooks


def test_principal_directions_and_random_controls(tiny_loaded, tmp_path):
    recs = coin_records()
    run = TraceRun(TraceSettings(**SETTINGS), recs).start(tiny_loaded)
    engine = SweepEngine(run, direction_layers={1: 2}, random_controls=3, seed=4)
    # the residual stream after block 1 at the marks, computed one unpadded prompt at a time
    seen = []
    hook = tiny_loaded.model.model.layers[1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(
        o, tuple) else o))
    stream = []
    try:
        with torch.no_grad():
            for e in run.prompts:
                tiny_loaded.model(input_ids=torch.tensor([e.ids]))
                stream.append(seen.pop()[0, sorted(e.marks_at)].double().numpy())
    finally:
        hook.remove()
    stream = np.concatenate(stream)
    _, _, vt = np.linalg.svd(stream - stream.mean(0), full_matrices=False)
    for rank in range(2):
        found = engine.directions[f"1.pc{rank + 1}"]
        assert abs(abs(found @ vt[rank]) - 1) < 1e-6 and abs(np.linalg.norm(found) - 1) < 1e-12
    randoms = np.stack([engine.directions[f"1.random{n}"] for n in (1, 2, 3)])
    np.testing.assert_allclose(np.linalg.norm(randoms, axis=1), 1, atol=1e-12)
    again = SweepEngine(run, direction_layers={1: 2}, random_controls=3, seed=4).directions
    assert all(np.array_equal(again[k], v) for k, v in engine.directions.items())  # seeded
    other = SweepEngine(run, direction_layers={1: 2}, random_controls=3, seed=5).directions
    assert not np.array_equal(other["1.random1"], engine.directions["1.random1"])
    for name, kind in (("1.pc1", "pca"), ("1.random2", "random")):  # as --ablate-direction of it, saved
        np.save(tmp_path / f"{name}.npy", engine.directions[name][None])
        reference = trace_at_rows(tiny_loaded, recs, engine, [Intervention("direction", 1,
                                                                           path=str(tmp_path / f"{name}.npy"))])
        assert_scores_equal(engine.scores(Component(name, kind, 1)), reference)


def test_the_residual_cache_changes_no_number(tiny_loaded):
    """Streams carried forward block by block, recomputed for every component (budget 0), or going back to
    an earlier layer: the same bits."""
    recs = coin_records()
    run = TraceRun(TraceSettings(**SETTINGS), recs).start(tiny_loaded)
    cached, uncached = SweepEngine(run), SweepEngine(run, cache_budget=0)
    order = [COMPONENTS[1], COMPONENTS[0], COMPONENTS[2], COMPONENTS[1]]  # layers 0, 1, 2, then back to 0
    for component in order:
        a, b = cached.scores(component), uncached.scores(component)
        assert np.array_equal(a.target_seq_logprobs, b.target_seq_logprobs) and np.array_equal(a.entropy, b.entropy)
    assert cached.cache.used > 0 and uncached.cache.used == 0


@pytest.mark.real_model
def test_a_head_scores_as_its_trace_on_the_default_model(real_loaded):
    recs = coin_records(n_max=6)[:3]
    run = TraceRun(TraceSettings(**SETTINGS), recs).start(real_loaded)
    engine = SweepEngine(run)
    scores = engine.scores(Component("3.1", "head", 3, 1))
    reference = trace_at_rows(real_loaded, recs, engine, [parse_ablation("3.1")])
    np.testing.assert_allclose(scores.target_seq_logprobs, reference[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores.entropy, reference[1], atol=1e-5, rtol=0)
    assert np.abs(scores.target_seq_logprobs - engine.baseline.target_seq_logprobs).max() > 1e-4
