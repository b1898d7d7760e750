"""The trace format, defined once.

A trace is a Parquet file (or a directory of Parquet part files) with one row per
(prompt, position[, layer]). Every writer builds its Arrow tables from :func:`trace_schema` and
every reader checks files with :func:`check_trace_schema`, so the column list lives here only.
docs/traces.md documents each column for users.

Run-level facts (model, dtype, targets, generation settings, versions, command line) travel in the
Parquet key-value metadata under :data:`META_KEY` as one JSON object; the vocabulary (token id ->
display string) travels under :data:`VOCAB_KEY` so top-k ids need not repeat their strings per row.

A JSONL trace (``--format jsonl``) carries the same facts in its first line, a header record
(:func:`jsonl_header`: the metadata, the vocabulary and the Arrow schema), so every reader takes it
as it takes Parquet; the rows follow, one JSON object each.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmprobe.errors import UsageError

TRACE_FORMAT_VERSION = 1
META_KEY = b"llmprobe"
VOCAB_KEY = b"llmprobe.vocab"

PHASE_PROMPT = "prompt"
PHASE_GENERATED = "generated"

# Columns every trace has, in order. (name, type, nullable, meaning)
BASE_COLUMNS: list[tuple[str, pa.DataType, bool, str]] = [
    ("prompt_index", pa.int32(), False, "0-based index of the prompt in the input"),
    ("prompt_id", pa.string(), False, "JSONL `id`, else the 1-based line number"),
    ("position", pa.int32(), False, "0-based token position in the model input"),
    ("phase", pa.dictionary(pa.int8(), pa.string()), False, "'prompt' (teacher-forced) or 'generated'"),
    ("token_id", pa.int32(), False, "the token at this position"),
    ("token", pa.string(), False, "its display string"),
    ("next_token_id", pa.int32(), True, "the token that actually follows (null at the end)"),
    ("next_token", pa.string(), True, "its display string"),
    ("next_logprob", pa.float32(), True, "log P(next_token | tokens[0..position]) in nats"),
    ("next_rank", pa.int32(), True, "1-based rank of next_token over the whole vocabulary"),
    ("entropy", pa.float32(), False, "entropy of the full next-token distribution, nats"),
]
MARK_COLUMNS: list[tuple[str, pa.DataType, bool, str]] = [
    ("mark_index", pa.int32(), True, "index into the prompt's `marks` list, null if unmarked"),
    ("mark", pa.string(), True, "the mark object as JSON (offset and any caller fields)"),
    ("meta", pa.string(), True, "the prompt's extra JSONL fields as JSON"),
]

# Float columns that must be finite wherever they are not null; NaN or Inf there means the model's
# arithmetic failed (float16 overflow, corrupt weights), and such numbers are never written.
FINITE_COLUMNS = ("entropy", "next_logprob", "topk_logprobs", "target_logprobs", "target_seq_logprobs")


def trace_schema(top_k: int, n_targets: int = 0, *, layers: bool = False, embedding_dim: int = 0) -> pa.Schema:
    """The Arrow schema of a trace with ``top_k`` candidates and ``n_targets`` target strings.

    ``layers`` adds the logit-lens ``layer`` column; ``embedding_dim`` adds the float16 ``embedding`` column.
    """
    fields = [pa.field(n, t, nullable=null) for n, t, null, _ in BASE_COLUMNS]
    if layers:
        fields.insert(3, pa.field("layer", pa.int16(), nullable=False))
    fields.append(pa.field("topk_ids", pa.list_(pa.int32(), top_k), nullable=False))
    fields.append(pa.field("topk_logprobs", pa.list_(pa.float32(), top_k), nullable=False))
    if n_targets:
        fields.append(pa.field("target_logprobs", pa.list_(pa.float32(), n_targets), nullable=False))
        fields.append(pa.field("target_seq_logprobs", pa.list_(pa.float32(), n_targets), nullable=True))
    if embedding_dim:
        fields.append(pa.field("embedding", pa.list_(pa.float16(), embedding_dim), nullable=True))
    fields += [pa.field(n, t, nullable=null) for n, t, null, _ in MARK_COLUMNS]
    return pa.schema(fields)


def column_docs() -> dict[str, str]:
    docs = {n: d for n, _, _, d in BASE_COLUMNS + MARK_COLUMNS}
    docs.update(
        layer="0-based decoder layer whose residual output was unembedded (logit lens); the last layer's rows"
        " are the model's output, i.e. the rows of a plain trace",
        embedding="the final-normed hidden state the output head reads (float16), at marks or else the last"
        " prompt position, on output-layer rows; null elsewhere",
        topk_ids="the k most probable next tokens, descending",
        topk_logprobs="their log-probabilities (nats), descending",
        target_logprobs="log-probability of each target's first token, at every position",
        target_seq_logprobs="log-probability of each whole target string (sum over its tokens), at marks"
        " and at the last prompt position; null elsewhere",
    )
    return docs


def encode_metadata(meta: dict[str, Any], vocab: list[str] | None) -> dict[bytes, bytes]:
    out = {META_KEY: json.dumps({"trace_format": TRACE_FORMAT_VERSION, **meta}).encode()}
    if vocab is not None:
        out[VOCAB_KEY] = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode()  # compact: ~10% smaller
    return out


JSONL_HEADER_KEY = "llmprobe_trace_header"  # the key that marks a JSONL trace's first line


def jsonl_header(schema: pa.Schema) -> dict[str, Any]:
    """The first record of a JSONL trace: metadata, vocabulary and schema (``schema`` as the writer made it)."""
    kv = schema.metadata or {}
    bare = schema.remove_metadata()
    return {JSONL_HEADER_KEY: TRACE_FORMAT_VERSION, "meta": decode_metadata(kv), "vocab": decode_vocab(kv),
            "schema": base64.b64encode(bare.serialize().to_pybytes()).decode("ascii")}


def schema_from_jsonl_header(header: dict[str, Any]) -> pa.Schema:
    """The trace schema, with the metadata and vocabulary in its key-value metadata, from a JSONL header."""
    import pyarrow.ipc

    schema = pyarrow.ipc.read_schema(pa.py_buffer(base64.b64decode(header["schema"])))
    kv = {META_KEY: json.dumps(header["meta"]).encode()}
    if header.get("vocab") is not None:
        kv[VOCAB_KEY] = json.dumps(header["vocab"], ensure_ascii=False).encode()
    return schema.with_metadata(kv)


def decode_metadata(kv: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    """The run metadata of a trace, or None when the file is not an llmprobe trace."""
    if not kv or META_KEY not in kv:
        return None
    return json.loads(kv[META_KEY])


def decode_vocab(kv: dict[bytes, bytes] | None) -> list[str] | None:
    if not kv or VOCAB_KEY not in kv:
        return None
    return json.loads(kv[VOCAB_KEY])


def check_finite(batch: pa.RecordBatch, records: Sequence[Any] | Mapping[int, Any]) -> None:
    """Refuse a batch holding NaN or Inf, naming the first prompt and position where it appears.

    ``records`` maps a row's ``prompt_index`` to its prompt record (for the id and line in the message)."""
    for name in FINITE_COLUMNS:
        if name not in batch.schema.names:
            continue
        bad = ~_finite_rows(batch.column(name))
        if bad.any():
            row = int(np.argmax(bad))
            record = records[batch.column("prompt_index")[row].as_py()]
            layer = f" layer {batch.column('layer')[row].as_py()}," if "layer" in batch.schema.names else ""
            raise UsageError(
                f"{name} is NaN or infinite at{layer} position {batch.column('position')[row].as_py()}: the"
                f" model's logits overflowed or its weights are corrupt (try --dtype float32); not written",
                where=f"prompt {record.id!r} (line {record.line})")


def _finite_rows(column: pa.Array) -> np.ndarray:
    """Per row: every non-null value is finite."""
    if not pa.types.is_fixed_size_list(column.type):
        return pc.fill_null(pc.is_finite(column), True).to_numpy(zero_copy_only=False)
    size = column.type.list_size
    values = column.values.slice(column.offset * size, len(column) * size)
    ok = pc.fill_null(pc.is_finite(values), True).to_numpy(zero_copy_only=False).reshape(len(column), size)
    return ok.all(axis=1) | column.is_null().to_numpy(zero_copy_only=False)
