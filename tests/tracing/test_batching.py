"""Batch formation: length-sorted batches, and ``--batch-size auto`` halving on out-of-memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import AUTO, TraceSettings, parse_batch_size
from llmprobe.errors import UsageError
from llmprobe.tracing.prompts import PromptRecord

PROMPTS = [
    "The capital of France is",
    "I just flipped a coin, and it came up heads, then tails, then",
    "Once upon a time",
    "blick means zorp. dax means",
    "heads, then heads, then tails, then heads, then",
    "I just rolled a six-sided die, and it showed 3, then 5, then",
    "The capital of Italy is Rome. The capital of France is",
]


def records() -> list[PromptRecord]:
    return [PromptRecord(index=i, id=f"p{i}", text=t, line=i + 1) for i, t in enumerate(PROMPTS)]


def started(loaded, settings: TraceSettings) -> TraceRun:
    return TraceRun(settings, records()).start(loaded)


def rows(run: TraceRun) -> list[dict]:
    table = run.table()
    return sorted(table.to_pylist(), key=lambda r: (r["prompt_index"], r["position"]))


def test_batches_are_length_sorted(tiny_loaded):
    run = started(tiny_loaded, TraceSettings(top_k=3, batch_size=3))
    longest = [max(b.column("position").to_pylist()) for b in run.batches()]
    assert len(longest) == 3 and longest == sorted(longest, reverse=True)


def test_auto_halves_on_out_of_memory_and_remembers(tiny_loaded, monkeypatch):
    """A model that 'runs out of memory' above 3 prompts per batch: auto retries in halves, keeps the
    limit, and gives the rows of a fixed batch size."""
    model = tiny_loaded.model
    forward = type(model).forward
    sizes: list[int] = []

    def limited(self, input_ids=None, **kwargs):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return forward(self, input_ids=input_ids, **kwargs)

    expected = rows(started(tiny_loaded, TraceSettings(top_k=4, batch_size=3, max_new_tokens=2)))
    run = started(tiny_loaded, TraceSettings(top_k=4, batch_size=AUTO, max_new_tokens=2))
    monkeypatch.setattr(type(model), "forward", limited)
    got = rows(run)
    assert sizes[:2] == [7, 3]  # all 7 prompts fail, half of them fit
    assert max(sizes[2:]) == 3  # and the limit is remembered
    assert [(r["prompt_index"], r["position"], r["token_id"], r["topk_ids"]) for r in got] == \
           [(r["prompt_index"], r["position"], r["token_id"], r["topk_ids"]) for r in expected]
    np.testing.assert_allclose([r["entropy"] for r in got], [r["entropy"] for r in expected], atol=1e-5)


def test_auto_gives_up_at_one_prompt_and_fixed_sizes_do_not_retry(tiny_loaded, monkeypatch):
    model = tiny_loaded.model

    def always(self, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(model), "forward", always)
    with pytest.raises(torch.OutOfMemoryError):
        rows(started(tiny_loaded, TraceSettings(top_k=2, batch_size=AUTO)))
    with pytest.raises(torch.OutOfMemoryError):
        rows(started(tiny_loaded, TraceSettings(top_k=2, batch_size=4)))


@pytest.mark.parametrize("text,expected", [("auto", AUTO), ("AUTO", AUTO), ("3", 3)])
def test_parse_batch_size(text, expected):
    assert parse_batch_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-2", "big", "1.5"])
def test_parse_batch_size_rejects(text):
    with pytest.raises(UsageError, match="batch-size|1 or more|positive"):
        parse_batch_size(text)
