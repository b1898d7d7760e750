"""`trace --chat prefill` and the chat template's placement of marks (tiny model; one real-model check)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from llmprobe.cli.options import fill_optional_values
from llmprobe.errors import ParameterError, UsageError
from llmprobe.tracing.encoding import PromptEncoder
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from llmprobe.tracing.prompts import PromptRecord
from llmprobe.tracing.schema import JSONL_HEADER_KEY
from tests.cli_helpers import assert_one_line_error, run_cli

INSTRUCTION = "A coin lands heads 70% of the time. Continue the flips.\n"
FLIPS = "Flips: heads, tails, heads,"


def _record(text: str, offsets: list[int], **meta) -> PromptRecord:
    return PromptRecord(0, "p0", text, 3, marks=[{"offset": o} for o in offsets], meta=meta)


def _prefill_record() -> PromptRecord:
    text = INSTRUCTION + FLIPS
    split = len(INSTRUCTION)
    offsets = [split + FLIPS.index(","), split + FLIPS.index(",", FLIPS.index(",") + 1), len(text)]
    return _record(text, offsets, split=split)


def test_prefill_user_turn_then_open_assistant_turn(tiny_loaded):
    tok = tiny_loaded.tokenizer
    record = _prefill_record()
    encoded = PromptEncoder.for_model(tiny_loaded, TraceSettings(chat="prefill")).encode(record)
    # the tiny template: "<s>{role}: {content}\n" per message; the assistant turn is left open
    expected = "<s>user: " + INSTRUCTION.rstrip() + "\n<s>assistant: " + FLIPS
    assert encoded.ids == tok(expected, add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in encoded.ids[1:]
    assert tok.decode(encoded.ids).endswith(FLIPS)
    for position, m in sorted(encoded.marks_at.items()):
        before = record.text[record.meta["split"]: record.marks[m]["offset"]]
        assert tok.decode(encoded.ids[: position + 1]).endswith("assistant: " + before)
        assert encoded.marks_exact[position]


def test_prefill_differs_from_user_mode(tiny_loaded):
    record = _prefill_record()
    user = PromptEncoder.for_model(tiny_loaded, TraceSettings(chat=True)).encode(record)
    prefill = PromptEncoder.for_model(tiny_loaded, TraceSettings(chat="prefill")).encode(record)
    text = tiny_loaded.tokenizer.decode(user.ids)
    assert text.endswith("assistant:") and FLIPS in text.split("assistant")[0]
    assert user.ids != prefill.ids and len(user.marks_at) == len(prefill.marks_at) == 3


def test_user_mode_ignores_the_prompt_text_inside_a_system_prompt(tiny_loaded):
    """A prompt that also occurs in the template's own text is placed by the template's structure."""
    tokenizer = copy.deepcopy(tiny_loaded.tokenizer)
    tokenizer.chat_template = ("<s>system: Say: I just flipped a coin, and it came up heads\n"
                               "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    loaded = dataclasses.replace(tiny_loaded, tokenizer=tokenizer)
    text = "I just flipped a coin, and it came up heads"
    encoder = PromptEncoder.for_model(loaded, TraceSettings(chat=True))
    encoded = encoder.encode(_record(text, [len("I just"), len(text)]))
    rendered = tokenizer.decode(encoded.ids)
    user_start = rendered.index("<s>user: ")
    for position in encoded.marks_at:
        prefix = tokenizer.decode(encoded.ids[: position + 1])
        assert len(prefix) > user_start, "the mark was placed inside the system prompt"
    first, last = sorted(encoded.marks_at)
    assert tokenizer.decode(encoded.ids[: first + 1]).endswith("<s>user: I just")
    assert tokenizer.decode(encoded.ids[: last + 1]).endswith("user: " + text)


@pytest.mark.parametrize("meta,offsets,match", [
    ({}, [70], "needs a split point"),
    ({"split": 0}, [70], "split"),
    ({"split": "56"}, [70], "split"),
    ({"split": len(INSTRUCTION)}, [10, 70], "mark 0: offset 10 lies in the user turn"),
])
def test_prefill_bad_records(tiny_loaded, meta, offsets, match):
    record = _record(INSTRUCTION + FLIPS, offsets, **meta)
    with pytest.raises(UsageError, match=match) as info:
        PromptEncoder.for_model(tiny_loaded, TraceSettings(chat="prefill")).encode(record)
    assert "prompt 'p0' (line 3)" in str(info.value)


def test_chat_option_values():
    assert fill_optional_values(["trace", "p.jsonl", "--chat"]) == ["trace", "p.jsonl", "--chat=user"]
    assert fill_optional_values(["trace", "--chat", "p.jsonl"]) == ["trace", "--chat=user", "p.jsonl"]
    assert fill_optional_values(["trace", "--chat", "prefill", "p.jsonl"]) == ["trace", "--chat", "prefill", "p.jsonl"]
    assert fill_optional_values(["trace", "--", "--chat"]) == ["trace", "--", "--chat"]
    with pytest.raises(ParameterError, match="^chat: "):  # the library names its parameter; the CLI, its flag
        TraceSettings(chat="assistant").validate()


def test_cli_prefill_trace_and_missing_split(tiny_model_dir, tmp_path, capsys, monkeypatch):
    good = _prefill_record()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": good.text, "marks": good.marks, **good.meta}) + "\n")
    out = tmp_path / "t.jsonl"
    code, _, err = run_cli(["trace", str(prompts), "--chat", "prefill", "-m", str(tiny_model_dir), "--device", "cpu",
                            "--targets", " heads, tails", "--format", "jsonl", "-o", str(out), "-q",
                            "--attn-implementation", "eager"], capsys, monkeypatch)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert JSONL_HEADER_KEY in rows[0]  # a JSONL trace opens with its header record
    assert sum(r["mark_index"] is not None for r in rows[1:]) == 3
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"id": "b", "prompt": good.text, "marks": good.marks}) + "\n")
    code, _, err = run_cli(["trace", str(bare), "--chat", "prefill", "-m", str(tiny_model_dir), "--device", "cpu",
                            "-o", str(tmp_path / "x.parquet")], capsys, monkeypatch)
    assert_one_line_error(code, err, "split point", "line 1")
    assert not (tmp_path / "x.parquet").exists()
    code, _, err = run_cli(["trace", str(bare), "--attn-implementation", "flash", "-m", str(tiny_model_dir),
                            "-o", str(tmp_path / "y.parquet")], capsys, monkeypatch)
    assert_one_line_error(code, err, "--attn-implementation", "sdpa or eager")


@pytest.mark.real_model
def test_real_prefill_places_flips_in_the_open_assistant_turn(real_loaded):
    record = _prefill_record()
    encoded = PromptEncoder.for_model(real_loaded, TraceSettings(chat="prefill")).encode(record)
    text = real_loaded.tokenizer.decode(encoded.ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n" + FLIPS)
    assert text.count("<|im_end|>") == 2  # system and user turns closed, the assistant's open
    for position, m in encoded.marks_at.items():
        before = record.text[record.meta["split"]: record.marks[m]["offset"]]
        assert real_loaded.tokenizer.decode(encoded.ids[: position + 1]).endswith(before)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_attention_kernel_is_loaded_and_recorded(tiny_model_dir, kernel):
    from llmprobe.model.loading import load_model

    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32", attn_implementation=kernel)
    assert loaded.model.config._attn_implementation == kernel
    assert TraceRun(TraceSettings(), []).start(loaded).metadata()["attn_implementation"] == kernel
