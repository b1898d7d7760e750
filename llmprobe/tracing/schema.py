"""The trace format, defined once.

A trace is a Parquet file (or a directory of Parquet part files) with one row per
(prompt, position[, layer]). Every writer builds its Arrow tables from :func:`trace_schema`, and every
reader goes through :func:`llmprobe.tracing.reader.open_trace`, which checks files against it, so the
column list lives here only. docs/traces.md documents each column for users.

Run-level facts (model, dtype, targets, generation settings, versions, command line) travel in the
Parquet key-value metadata under :data:`META_KEY` as one JSON object (also inside the Arrow schema,
where pyarrow keeps it). The vocabulary (token id -> display string), so top-k ids need not repeat
their strings per row, is stored once per file: zstd-compressed JSON under :data:`VOCAB_ZSTD_KEY` in
the file's key-value metadata only, not in the Arrow schema (whose serialized copy would repeat it):
:func:`file_metadata` splits the two. Older traces held plain JSON under :data:`VOCAB_KEY`, in both
places; :func:`decode_vocab` reads either layout.

A JSONL trace (``--format jsonl``) carries the same facts in its first line, a header record
(:func:`jsonl_header`: the metadata, the vocabulary and the Arrow schema), so every reader takes it
as it takes Parquet; the rows follow, one JSON object each.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmprobe.errors import UsageError

TRACE_FORMAT_VERSION = 1
META_KEY = b"llmprobe"
VOCAB_KEY = b"llmprobe.vocab"  # plain JSON: the layout of older traces (and Ray Data's part files)
VOCAB_ZSTD_KEY = b"llmprobe.vocab.zstd"  # b"<json bytes>:" + zstd(JSON); written once per file
VOCAB_ZSTD_LEVEL = 19  # about 0.5 s once per file; 480 kB of SmolLM2 JSON -> 170 kB

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


def encode_metadata(meta: dict[str, Any], vocab: list[str] | None) -> dict[bytes, bytes]:
    """Run metadata and plain-JSON vocabulary as one key-value dict (the layout Ray Data writes)."""
    out = {META_KEY: json.dumps({"trace_format": TRACE_FORMAT_VERSION, **meta}).encode()}
    if vocab is not None:
        out[VOCAB_KEY] = _vocab_json(vocab)
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


def file_metadata(meta: dict[str, Any], vocab: list[str] | None) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """(schema metadata, file-only metadata) of a Parquet trace: the run metadata travels with the Arrow
    schema; the compressed vocabulary goes into the file's key-value metadata alone, so it is stored once."""
    schema_meta = encode_metadata(meta, None)
    if vocab is None:
        return schema_meta, {}
    text = _vocab_json(vocab)
    packed = pa.Codec("zstd", compression_level=VOCAB_ZSTD_LEVEL).compress(text, asbytes=True)
    return schema_meta, {VOCAB_ZSTD_KEY: b"%d:" % len(text) + packed}


def _vocab_json(vocab: list[str]) -> bytes:
    return json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode()  # compact: ~10% smaller


def decode_metadata(kv: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    """The run metadata of a trace, or None when the file is not an llmprobe trace (ValueError: not JSON)."""
    if not kv or META_KEY not in kv:
        return None
    return json_value(kv[META_KEY])


def decode_vocab(kv: dict[bytes, bytes] | None) -> list[str] | None:
    """The vocabulary from a Parquet file's key-value metadata, in either layout (None if absent)."""
    if not kv:
        return None
    if VOCAB_ZSTD_KEY in kv:
        size, _, packed = kv[VOCAB_ZSTD_KEY].partition(b":")
        return json_value(pa.Codec("zstd").decompress(packed, decompressed_size=int(size), asbytes=True))
    if VOCAB_KEY in kv:
        return json_value(kv[VOCAB_KEY])
    return None


def json_value(text: str | bytes) -> Any:
    """``json.loads``, with input nested too deeply for the parser (a RecursionError) a ValueError like any
    other JSON that cannot be read: metadata written by someone else."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


class NonFiniteError(UsageError):
    """NaN or Inf in a batch or in the sampling probabilities: the run would fail the same way on every try,
    so no resume can fix it and a checkpointed run leaves nothing behind."""


def check_finite(batch: pa.RecordBatch, records: Sequence[Any] | Mapping[int, Any]) -> None:
    """Refuse a batch holding NaN or Inf (:class:`NonFiniteError`), naming the first prompt and position.

    ``records`` maps a row's ``prompt_index`` to its prompt record (for the id and line in the message)."""
    for name in FINITE_COLUMNS:
        if name not in batch.schema.names:
            continue
        bad = ~_finite_rows(batch.column(name))
        if bad.any():
            row = int(np.argmax(bad))
            record = records[batch.column("prompt_index")[row].as_py()]
            layer = f" layer {batch.column('layer')[row].as_py()}," if "layer" in batch.schema.names else ""
            raise NonFiniteError(
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
