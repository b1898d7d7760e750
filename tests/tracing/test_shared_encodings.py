"""Runs over the same prompts share one encoding per distinct encoder (what ``compare`` relies on).

An encoder's key covers everything its encoding depends on, so: two loads of one checkpoint share; two
checkpoints of one series (one tokenizer) share; a different tokenizer, context or chat mode does not; different
prompts never reuse. A run that reused an encoding traces exactly what a run that encoded would.
"""

from __future__ import annotations

import pytest

from llmprobe.model.loading import load_model
from llmprobe.tracing.encoding import PromptEncoder
from llmprobe.tracing.prompts import records_from_objects
from llmprobe.tracing.run import SharedEncodings, TraceRun
from llmprobe.tracing.settings import TraceSettings

PROMPTS = [{"prompt": "I just flipped a coin, and it came up heads, then tails, then",
            "marks": [{"offset": 42}, {"offset": 53}]},
           "I just flipped a coin, and it came up"]


@pytest.fixture(scope="module")
def series_models(tiny_series):
    return [load_model(str(tiny_series / "steps" / f"step-{step:06d}"), device="cpu", dtype="float32")
            for step in (50, 200)]


def _run(loaded, shared=None, settings=None, prompts=PROMPTS) -> TraceRun:
    return TraceRun(settings or TraceSettings(top_k=3), records_from_objects(prompts), {}).start(loaded, shared=shared)


def test_one_tokenizer_is_encoded_once_and_traces_the_same(series_models, one_thread):
    shared = SharedEncodings()
    first, second = (_run(loaded, shared) for loaded in series_models)
    assert shared.encoded == 1 and second.prompts is first.prompts and second.plan is first.plan
    alone = _run(series_models[1])
    assert alone.prompts is not first.prompts
    assert second.table().equals(alone.table())


def test_different_encoders_and_prompts_are_not_shared(series_models, tiny_loaded):
    shared = SharedEncodings()
    control = _run(series_models[0], shared)
    tiny = _run(tiny_loaded, shared)
    assert shared.encoded == 2 and [e.ids for e in tiny.prompts] != [e.ids for e in control.prompts]
    _run(series_models[1], shared, prompts=PROMPTS[:1])
    assert shared.encoded == 3  # other prompts: encoded again
    keys = {PromptEncoder.for_model(loaded, settings).key()
            for loaded, settings in [(series_models[0], TraceSettings()), (series_models[1], TraceSettings()),
                                     (tiny_loaded, TraceSettings()), (tiny_loaded, TraceSettings(chat=True)),
                                     (tiny_loaded, TraceSettings(max_new_tokens=4))]}
    assert len(keys) == 4  # the two series checkpoints share one key
