"""The trace on the embedded default model (SmolLM2-135M-Instruct, converted from its GGUF).

Same standard as the tiny-model tests: every recorded number equals a plain forward pass over the
same tokens, batched and unbatched, with and without generation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llmprobe.tracing.settings import TraceSettings
from llmprobe.model.sources import DEFAULT_MODEL_NAME, cache_dir
from tests.tracing.reference import check_rows_against_reference, records, trace_rows

pytestmark = pytest.mark.real_model

REAL_PROMPTS = [
    "The capital of France is",
    "I just flipped a coin, and it came up heads, then tails, then",
    "I just rolled a six-sided die, and it showed 3, then 5, then",
]
TARGETS = [" heads", " tails", " Paris"]


def test_default_model_is_the_converted_smollm2(real_loaded):
    assert real_loaded.source.label == DEFAULT_MODEL_NAME
    assert type(real_loaded.model).__name__ == "LlamaForCausalLM"
    assert real_loaded.vocab_size == 49152
    assert (real_loaded.source.path / "model.safetensors").exists()
    assert real_loaded.source.path.is_relative_to(cache_dir())
    assert len(real_loaded.source.weights_sha256) == 64


@pytest.mark.parametrize("batch_size,new_tokens", [(1, 0), (3, 0), (3, 4)])
def test_real_trace_equals_plain_forward(real_loaded, batch_size, new_tokens):
    settings = TraceSettings(top_k=20, targets=TARGETS, batch_size=batch_size, max_new_tokens=new_tokens)
    rows = trace_rows(real_loaded, settings, records(REAL_PROMPTS))
    checked = check_rows_against_reference(real_loaded, rows, 20, TARGETS)
    assert checked == len(rows) > 0
    if new_tokens:
        assert sum(r["phase"] == "generated" for r in rows) > 0


def test_real_model_knows_paris(real_loaded):
    rows = trace_rows(real_loaded, TraceSettings(top_k=5, targets=TARGETS), records(REAL_PROMPTS[:1]))
    last = rows[-1]
    assert real_loaded.tokenizer.decode([last["topk_ids"][0]]) == " Paris"
    assert last["target_seq_logprobs"][2] == pytest.approx(last["topk_logprobs"][0], abs=1e-6)


def test_real_chat_template(real_loaded):
    settings = TraceSettings(top_k=5, chat=True, max_new_tokens=2)
    rows = trace_rows(real_loaded, settings, records(REAL_PROMPTS[:1]))
    text = real_loaded.tokenizer.decode([r["token_id"] for r in rows if r["phase"] == "prompt"])
    assert text.startswith("<|im_start|>system") and text.rstrip().endswith("<|im_start|>assistant")
    check_rows_against_reference(real_loaded, rows, 5, [])


def test_pipeline_prints_only_json_lines(real_loaded):
    """The README's pipe example, as a real subprocess with the real model."""
    env = {**os.environ, "LLMPROBE_CACHE": str(cache_dir())}
    result = subprocess.run(
        [sys.executable, "-m", "llmprobe", "trace", "-", "--max-new-tokens", "3", "-o", "-", "--format", "jsonl"],
        input=b"The capital of France is\n", capture_output=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode()
    header, *rows = [json.loads(line) for line in result.stdout.decode().splitlines()]  # header first (issue 16)
    assert header["meta"]["model"] == "SmolLM2-135M-Instruct"
    assert [r["phase"] for r in rows].count("generated") == 3
    first_generated = next(r for r in rows if r["phase"] == "generated")
    assert first_generated["token"] == " Paris"
