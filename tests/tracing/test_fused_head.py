"""The split path: the engine applies the output head itself, a pass of live positions at a time.

Checked against the independent reference (tests/tracing/reference.py: a plain unpadded forward,
float64 log-softmax) on a long prompt spanning many head passes and on a batch whose prompts differ
a lot in length (mostly padding); that padding never reaches the head and passes span prompts; that
the model's head module never projects a position (generation included); that a model which cannot be split is
traced through the hook with a notice and the same numbers; that ``--batch-size auto`` has no
vocabulary term on the split path; and that the vocabulary is stored once per Parquet file while
old-layout files still read.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmprobe.model.structure import OutputHead
from llmprobe.tracing import engine
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from llmprobe.tracing.reader import open_trace
from llmprobe.tracing.schema import META_KEY, VOCAB_KEY, VOCAB_ZSTD_KEY, encode_metadata, trace_schema
from llmprobe.tracing.writer import open_trace_sink
from tests.tracing.reference import TARGETS, check_rows_against_reference, records, trace_rows

LONG = " ".join(["I just flipped a coin, and it came up heads, then tails, then heads."] * 24)
UNEVEN = ["Once upon a time", LONG[:900], "The capital of France is", "blick means zorp. dax means"]


class Log:
    quiet = False

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def small_blocks(run: TraceRun, rows_per_block: int) -> TraceRun:
    run.tracer.reducer.chunk_positions = rows_per_block  # head blocks (and reduction passes) of this many rows
    return run


def rows_of(run: TraceRun) -> list[dict]:
    table = run.table()
    return sorted(table.to_pylist(), key=lambda r: (r["prompt_index"], r["position"]))


def test_long_prompt_over_many_head_blocks_equals_the_reference(tiny_loaded):
    settings = TraceSettings(top_k=5, targets=TARGETS, truncate="right")
    run = small_blocks(TraceRun(settings, records([LONG])).start(tiny_loaded), 37)
    assert run.tracer.parts is not None
    rows = rows_of(run)
    assert len(rows) > 300  # ten head blocks and more
    assert check_rows_against_reference(tiny_loaded, rows, 5, TARGETS) == len(rows)


def test_padded_batch_equals_the_reference_and_padding_skips_the_head(tiny_loaded, monkeypatch):
    through_head: list[int] = []
    logits = OutputHead.logits

    def counting(self, rows, first, stop, out=None):
        if first == 0:  # a pass's first vocabulary tile
            through_head.append(rows.shape[0])
        return logits(self, rows, first, stop, out)

    monkeypatch.setattr(OutputHead, "logits", counting)
    run = small_blocks(TraceRun(TraceSettings(top_k=4, batch_size=4), records(UNEVEN)).start(tiny_loaded), 16)
    rows = rows_of(run)
    lengths = [len(e.ids) for e in run.prompts]
    assert max(lengths) > 5 * min(lengths)  # most of the short prompts' rows are padding
    assert check_rows_against_reference(tiny_loaded, rows, 4, []) == len(rows) == sum(lengths)
    # every real position goes through the head exactly once, padding never, in passes of 16 rows that
    # span prompts (one read of the head's weight per 16 live rows, not one per prompt)
    assert max(through_head) <= 16 and sum(through_head) == sum(lengths)
    assert len(through_head) == -(-sum(lengths) // 16)


def test_the_model_head_module_never_projects_a_position(tiny_loaded):
    shapes: list[tuple[int, ...]] = []
    head = tiny_loaded.model.get_output_embeddings()
    forward = type(head).forward

    def recording(hidden):  # an instance attribute, not a torch hook: the engine's path stays as it is
        output = forward(head, hidden)
        shapes.append(tuple(output.shape))
        return output

    head.forward = recording
    try:
        trace_rows(tiny_loaded, TraceSettings(top_k=3, targets=TARGETS, batch_size=3, max_new_tokens=2))
    finally:
        del head.forward
    # the model's forward projects no position (prompts, generation steps, multi-token targets alike):
    # the engine applies the head itself, and keeps the logits generation chooses from out of its tiles
    assert shapes and all(shape[-2] == 0 for shape in shapes), shapes


def test_a_model_that_cannot_be_split_is_traced_through_the_hook_with_a_notice(tiny_loaded, monkeypatch):
    settings = TraceSettings(top_k=4, targets=TARGETS, batch_size=3, max_new_tokens=2)
    split = trace_rows(tiny_loaded, settings)
    monkeypatch.setattr(engine, "split_causal_lm", lambda model: (None, "the model post-processes its logits"))
    log = Log()
    run = TraceRun(settings, records()).start(tiny_loaded, reporter=log)
    assert run.tracer.parts is None
    assert len(log.lines) == 1 and "post-processes its logits" in log.lines[0] and "hook" in log.lines[0]
    hooked = sorted(run.table().to_pylist(),
                    key=lambda r: (r["prompt_index"], r["position"]))
    assert [r["next_token_id"] for r in hooked] == [r["next_token_id"] for r in split]
    for a, b in zip(hooked, split):
        assert a["topk_ids"] == b["topk_ids"]
        assert a["entropy"] == pytest.approx(b["entropy"], abs=1e-5)
        assert a["topk_logprobs"] == pytest.approx(b["topk_logprobs"], abs=1e-5)


def test_auto_batch_planning_has_no_vocabulary_term_on_the_split_path(tiny_loaded, monkeypatch):
    split = TraceRun(TraceSettings(top_k=2), []).start(tiny_loaded).tracer
    monkeypatch.setattr(engine, "split_causal_lm", lambda model: (None, "no"))
    hooked = TraceRun(TraceSettings(top_k=2), []).start(tiny_loaded).tracer
    for width in (10, 400):
        assert hooked._bytes_per_prompt(width) - split._bytes_per_prompt(width) == width * tiny_loaded.vocab_size * 4
    assert split._bytes_per_prompt(400) > 0


def big_vocab() -> list[str]:
    return [f"tok{i}-{i * 7919 % 10007}" for i in range(60_000)]


def test_the_vocabulary_is_stored_once_and_compressed(tmp_path):
    vocab = big_vocab()
    text = json.dumps(vocab, separators=(",", ":")).encode()
    schema = trace_schema(2)
    path = tmp_path / "t.parquet"
    with open_trace_sink(str(path), "parquet", schema, {"model": "m"}, vocab) as sink:
        sink.write(pa.RecordBatch.from_pylist([], schema=schema))
    parquet = pq.ParquetFile(path)
    assert VOCAB_ZSTD_KEY in parquet.metadata.metadata and VOCAB_KEY not in parquet.metadata.metadata
    assert set(parquet.schema_arrow.metadata) == {META_KEY}  # nothing of the vocabulary in ARROW:schema
    assert path.stat().st_size < len(text) / 2  # once, compressed (twice in plain JSON before)
    trace = open_trace(path)
    assert trace.vocab == vocab and trace.meta["model"] == "m"


def test_old_layout_traces_still_read(tmp_path):
    vocab = big_vocab()[:500]
    schema = trace_schema(2).with_metadata(encode_metadata({"model": "m"}, vocab))
    path = tmp_path / "old.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=schema), path)
    assert VOCAB_KEY in pq.ParquetFile(path).schema_arrow.metadata  # the plain-JSON layout, in both places
    trace = open_trace(path)
    assert trace.vocab == vocab and trace.meta["model"] == "m"


def test_bfloat16_split_path_stays_close_to_float32(tiny_model_dir, tiny_loaded):
    from llmprobe.model.loading import load_model

    half = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    settings = TraceSettings(top_k=3, batch_size=3)
    full, low = trace_rows(tiny_loaded, settings), trace_rows(half, settings)
    assert len(full) == len(low)
    assert max(abs(a["entropy"] - b["entropy"]) for a, b in zip(full, low)) < 0.2
    assert torch.isfinite(torch.tensor([r["entropy"] for r in low])).all()
