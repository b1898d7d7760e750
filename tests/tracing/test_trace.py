"""The trace engine against an independent plain forward pass (tiny random Llama).

The reference here never goes through llmprobe's hooks or padding: each prompt alone, one
``model(input_ids)`` call, ``log_softmax`` in float64. Everything the trace records must match it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmprobe.errors import UsageError
from llmprobe.tracing.encoding import PromptEncoder, map_marks
from llmprobe.tracing.hooks import capture_logits
from llmprobe.tracing.reduction import LogitReducer
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from llmprobe.tracing.prompts import PromptRecord
from tests.tracing.reference import PROMPTS, TARGETS, TOL, check_rows_against_reference, reference, trace_rows


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_prompt_rows_equal_plain_forward(tiny_loaded, batch_size):
    rows = trace_rows(tiny_loaded, TraceSettings(top_k=7, targets=TARGETS, batch_size=batch_size))
    expected = sum(len(tiny_loaded.tokenizer(t)["input_ids"]) for t in PROMPTS)
    assert len(rows) == expected
    assert check_rows_against_reference(tiny_loaded, rows, 7, TARGETS) == expected
    assert all(r["phase"] == "prompt" for r in rows)


def test_batched_equals_unbatched(tiny_loaded):
    one = trace_rows(tiny_loaded, TraceSettings(top_k=5, targets=TARGETS, batch_size=1))
    many = trace_rows(tiny_loaded, TraceSettings(top_k=5, targets=TARGETS, batch_size=5))
    assert [(r["prompt_id"], r["position"], r["token_id"]) for r in one] == \
           [(r["prompt_id"], r["position"], r["token_id"]) for r in many]
    for a, b in zip(one, many):
        np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], atol=TOL)
        assert a["entropy"] == pytest.approx(b["entropy"], abs=TOL)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_greedy_generation_matches_generate_and_plain_forward(tiny_loaded, batch_size):
    new = 6
    rows = trace_rows(tiny_loaded, TraceSettings(top_k=5, targets=TARGETS, max_new_tokens=new, batch_size=batch_size))
    check_rows_against_reference(tiny_loaded, rows, 5, TARGETS)
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    for i, text in enumerate(PROMPTS):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
        expected_new = expected[0, ids.shape[1]:].tolist()
        mine = [r for r in rows if r["prompt_index"] == i]
        prompt_rows = [r for r in mine if r["phase"] == "prompt"]
        generated = [r["token_id"] for r in mine if r["phase"] == "generated"]
        produced = generated + ([mine[-1]["next_token_id"]] if mine[-1]["next_token_id"] is not None else [])
        assert produced == expected_new[: len(produced)]
        assert prompt_rows[-1]["next_token_id"] == expected_new[0]
        positions = [r["position"] for r in mine]
        assert positions == list(range(len(mine)))


def test_sampling_is_reproducible_and_independent_of_batching(tiny_loaded):
    settings = dict(top_k=3, max_new_tokens=8, sample=True, temperature=1.5, seed=11)
    a = trace_rows(tiny_loaded, TraceSettings(batch_size=1, **settings))
    b = trace_rows(tiny_loaded, TraceSettings(batch_size=4, **settings))
    c = trace_rows(tiny_loaded, TraceSettings(batch_size=1, **{**settings, "seed": 12}))
    tokens = lambda rows: [r["token_id"] for r in rows if r["phase"] == "generated"]  # noqa: E731
    assert tokens(a) == tokens(b)
    assert tokens(a) != tokens(c)
    check_rows_against_reference(tiny_loaded, a, 3, [])


def test_top_p_restricts_sampling_to_the_nucleus(tiny_loaded):
    rows = trace_rows(tiny_loaded, TraceSettings(top_k=3, max_new_tokens=5, sample=True, top_p=1e-6, seed=3))
    greedy = trace_rows(tiny_loaded, TraceSettings(top_k=3, max_new_tokens=5))
    assert [r["token_id"] for r in rows] == [r["token_id"] for r in greedy]


def test_multi_token_target_sequence_scores(tiny_loaded):
    marked = PromptRecord(index=0, id="m", text=PROMPTS[1], line=1,
                          marks=[{"offset": PROMPTS[1].index(" heads"), "n": 0},
                                 {"offset": len(PROMPTS[1]), "n": 2}])
    rows = trace_rows(tiny_loaded, TraceSettings(top_k=3, targets=TARGETS), [marked])
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    ids = [r["token_id"] for r in rows]
    scored = [r for r in rows if r["target_seq_logprobs"] is not None]
    assert [r["mark_index"] for r in scored] == [0, 1]  # the last mark is also the last position
    for row in scored:
        prefix = ids[: row["position"] + 1]
        for value, target in zip(row["target_seq_logprobs"], TARGETS):
            t_ids = tok(target, add_special_tokens=False)["input_ids"]
            ref = reference(model, prefix + t_ids)
            expected = sum(ref[len(prefix) - 1 + j, t] for j, t in enumerate(t_ids))
            assert value == pytest.approx(expected, abs=TOL)
    assert len(tok(" Paris is", add_special_tokens=False)["input_ids"]) > 1


def test_continuations_share_forward_passes_and_stay_exact(tiny_loaded):
    """Marks whose continuations extend one another are scored from one pass, with the same numbers."""
    text = "I just rolled a six-sided die, and it showed 3, then 5, then 1, then"
    offsets = [text.index(" 3"), text.index(" 5"), text.index(" 1"), len(text)]
    targets = [" 3, then", " 5, then", " 6, then"]
    record = PromptRecord(0, "d", text, 1, marks=[{"offset": o} for o in offsets])
    calls = []
    handle = tiny_loaded.model.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        rows = trace_rows(tiny_loaded, TraceSettings(top_k=2, targets=targets, batch_size=4), [record])
    finally:
        handle.remove()
    scored = [r for r in rows if r["target_seq_logprobs"] is not None]
    assert len(scored) == 4
    assert len(calls) < 1 + len(scored) * len(targets)  # 12 continuations, far fewer passes
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    ids = [r["token_id"] for r in rows]
    for row in scored:
        prefix = ids[: row["position"] + 1]
        for value, target in zip(row["target_seq_logprobs"], targets):
            t_ids = tok(target, add_special_tokens=False)["input_ids"]
            ref = reference(model, prefix + t_ids)
            assert value == pytest.approx(sum(ref[len(prefix) - 1 + j, t] for j, t in enumerate(t_ids)), abs=TOL)


def test_marks_land_on_the_token_ending_at_the_offset(tiny_loaded):
    text = PROMPTS[1]
    enc = tiny_loaded.tokenizer(text, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    ends = [e for _, e in spans]
    inside = next(s + 1 for s, e in spans if e - s > 1)  # an offset strictly inside a token
    record = PromptRecord(0, "x", text, 1, marks=[{"offset": inside}, {"offset": ends[-3]}, {"offset": len(text)}])
    at, exact = map_marks(record.marks, spans, 0, record)
    assert at[len(spans) - 1] == 2 and exact[len(spans) - 1]
    assert at[len(spans) - 3] == 1 and exact[len(spans) - 3]
    inside_position = next(p for p, m in at.items() if m == 0)
    assert spans[inside_position][0] < inside < spans[inside_position][1] and not exact[inside_position]


def test_mark_fields_and_meta_are_written(tiny_loaded):
    text = PROMPTS[1]
    record = PromptRecord(0, "x", text, 1, marks=[{"offset": len(text), "n": 3, "counts": [2, 1]}],
                          meta={"theta": [0.5, 0.5], "experiment": "coin"})
    rows = trace_rows(tiny_loaded, TraceSettings(top_k=2), [record])
    marked = [r for r in rows if r["mark_index"] is not None]
    assert len(marked) == 1 and marked[0]["position"] == len(rows) - 1
    assert json.loads(marked[0]["mark"]) == {"offset": len(text), "n": 3, "counts": [2, 1], "exact": True}
    assert all(json.loads(r["meta"]) == {"theta": [0.5, 0.5], "experiment": "coin"} for r in rows)


def test_two_marks_in_one_token_are_refused(tiny_loaded):
    text = "The capital"
    record = PromptRecord(0, "x", text, 7, marks=[{"offset": 5}, {"offset": 6}])
    encoder = PromptEncoder.for_model(tiny_loaded, TraceSettings())
    with pytest.raises(UsageError, match="same token"):
        encoder.encode(record)


def test_chat_template_marks_shift_with_the_template(tiny_loaded):
    text = "I just flipped a coin, and it came up heads, then"
    record = PromptRecord(0, "x", text, 1, marks=[{"offset": len(text)}])
    encoded = PromptEncoder.for_model(tiny_loaded, TraceSettings(chat=True)).encode(record)
    rendered = tiny_loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                          add_generation_prompt=True, tokenize=False)
    assert encoded.ids == tiny_loaded.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    (position,) = encoded.marks_at
    assert tiny_loaded.tokenizer.decode(encoded.ids[: position + 1]).endswith("then")


@pytest.mark.parametrize("settings,match", [  # the library names the parameter; the CLI shows its flag
    (dict(top_k=0), "^top_k: "),
    (dict(top_k=10**6), "^top_k: "),
    (dict(max_new_tokens=-1), "^max_new_tokens: "),
    (dict(targets=[" heads", " heads"]), "duplicate"),
    (dict(targets=[""]), "tokenizes to nothing"),
])
def test_bad_settings_are_usage_errors(tiny_loaded, settings, match):
    with pytest.raises(UsageError, match=match):
        TraceRun(TraceSettings(**settings), []).start(tiny_loaded)


def test_hook_is_removed_on_every_exit_path(tiny_loaded):
    head = tiny_loaded.model.get_output_embeddings()
    before = len(head._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_logits(head, LogitReducer(3)):
            assert len(head._forward_hooks) == before + 1
            raise RuntimeError("boom")
    assert len(head._forward_hooks) == before
    trace_rows(tiny_loaded, TraceSettings(top_k=2))
    assert len(head._forward_hooks) == before


def test_reducer_handles_bfloat16_logits_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 300) * 4
    stats = LogitReducer(4, chunk_positions=3).reduce(logits.bfloat16(), torch.zeros(2, 5, dtype=torch.long))
    ref = torch.log_softmax(logits.bfloat16().double(), -1)
    assert stats.topk_logprobs.dtype == torch.float32
    torch.testing.assert_close(stats.topk_logprobs.double(), ref.topk(4).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.next_logprob.double(), ref[..., 0], atol=1e-5, rtol=0)
