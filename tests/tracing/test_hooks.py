"""Hook registration (llmprobe/tracing/hooks.py): every hook a handle, removed with its block; after a
trace the model holds no hook of ours, on either path, with every kind of capture, and when the
trace fails or is interrupted halfway through a forward pass."""

from __future__ import annotations

import pytest
import torch

from llmprobe.tracing import engine
from llmprobe.tracing.hooks import Hooks, on_input, on_output, outputs_of
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from tests.tracing.reference import TARGETS, records

LENS = dict(top_k=3, targets=TARGETS, layers="all", save_embeddings=True, batch_size=2)
GENERATION = dict(top_k=3, targets=TARGETS, max_new_tokens=3, batch_size=2)


def attached(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks on every module of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def forward(model: torch.nn.Module) -> None:
    with torch.inference_mode():
        model(input_ids=torch.tensor([[3, 4, 5]]))


def test_a_one_shot_hook_fires_once_and_removes_itself(tiny_loaded):
    model = tiny_loaded.model
    before = attached(model)
    outputs, inputs = [], []
    with Hooks() as hooks:
        hooks.add(on_output(model.model.norm, outputs.append, once=True))
        hooks.add(on_input(model.get_output_embeddings(), inputs.append, once=True))
        assert attached(model) == before + 2
        forward(model)
        assert attached(model) == before  # gone as soon as they fired
        forward(model)
    assert len(outputs) == len(inputs) == 1
    assert outputs[0].shape == inputs[0].shape == (1, 3, model.config.hidden_size)


def test_a_hooks_block_removes_every_handle_on_every_exit(tiny_loaded):
    model = tiny_loaded.model
    before = attached(model)
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with Hooks() as hooks:
            for layer in model.model.layers:
                hooks.add(on_output(layer, seen.append))
            assert attached(model) == before + len(model.model.layers)
            raise RuntimeError("boom")
    assert attached(model) == before
    with outputs_of(model.model.norm) as found:
        forward(model)
        forward(model)
    assert len(found) == 2 and attached(model) == before


@pytest.mark.parametrize("split", [True, False], ids=["split path", "hook path"])
@pytest.mark.parametrize("settings", [LENS, GENERATION], ids=["lens and embeddings", "generation"])
def test_a_trace_leaves_no_hook_on_the_model(tiny_loaded, monkeypatch, split, settings):
    if not split:
        monkeypatch.setattr(engine, "split_causal_lm", lambda model: (None, "test: the hook path"))
    before = attached(tiny_loaded.model)
    run = TraceRun(TraceSettings(**settings), records()).start(tiny_loaded)
    assert (run.tracer.parts is not None) == split
    table = run.table()
    assert table.num_rows > 0
    assert attached(tiny_loaded.model) == before


@pytest.mark.parametrize("split", [True, False], ids=["split path", "hook path"])
@pytest.mark.parametrize("settings,failing_call,failure", [(LENS, 4, RuntimeError), (GENERATION, 3, KeyboardInterrupt)],
                         ids=["error in the lens pass", "Ctrl-C in a generation step"])
def test_a_failing_trace_leaves_no_hook_on_the_model(tiny_loaded, monkeypatch, split, settings, failing_call, failure):
    """The last decoder layer fails during a pass the trace has hooked: the second batch's teacher-forced
    pass with the lens (after the first batch's pass and its two continuation passes for the targets),
    the second generation step otherwise."""
    if not split:
        monkeypatch.setattr(engine, "split_causal_lm", lambda model: (None, "test: the hook path"))
    model = tiny_loaded.model
    before = attached(model)
    run = TraceRun(TraceSettings(**settings), records()).start(tiny_loaded)
    calls = []

    def fail(module, args):
        calls.append(1)
        if len(calls) == failing_call:
            assert attached(model) > before + 1  # the trace's own hooks are on, besides this one
            raise failure("the layer failed")

    saboteur = model.model.layers[-1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(failure, match="the layer failed"):
            list(run.batches())
    finally:
        saboteur.remove()
    assert len(calls) == failing_call
    assert attached(model) == before
