"""The page's columns: typed arrays as the page's script decodes them, and the per-row columns of one model's
predictions (a trace's, or its baseline's, :mod:`llmprobe.viewer.interventions`), taken from a trace's rows in
page order (:func:`in_order`). The layout they fill is :mod:`llmprobe.viewer.data`'s.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmprobe.errors import UsageError
from llmprobe.tracing.reader import Trace

TYPES = {"f32": "<f4", "f64": "<f8", "u8": "u1", "u16": "<u2", "u32": "<u4", "i32": "<i4"}


def typed(values: Any, kind: str) -> dict[str, str]:
    """An array as ``{"type": kind, "data": base64(zlib(its little-endian bytes, regrouped by significance))}``."""
    array = np.ascontiguousarray(values, dtype=TYPES[kind])
    planes = array.view(np.uint8).reshape(-1, array.itemsize).T.tobytes()  # byte 0 of every value, then byte 1...
    return {"type": kind, "data": base64.b64encode(zlib.compress(planes, 6)).decode("ascii")}


def untyped(spec: dict[str, str]) -> np.ndarray:
    """The inverse of :func:`typed` (what the page's script does)."""
    dtype = np.dtype(TYPES[spec["type"]])
    planes = np.frombuffer(zlib.decompress(base64.b64decode(spec["data"])), np.uint8)
    return planes.reshape(dtype.itemsize, -1).T.copy().view(dtype).reshape(-1)


def index_kind(largest: int) -> str:
    return "u16" if largest < 0xFFFF else "u32"


def fixed_list_matrix(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A fixed-size-list column as an (rows, width) float array, NaN in null rows."""
    array = column.combine_chunks()
    values = array.values.slice(array.offset * width, len(array) * width)
    matrix = values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(array), width)
    if array.null_count:
        matrix[array.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return matrix


def in_order(trace: Trace) -> tuple[pa.Table, np.ndarray]:
    """The trace's rows in page order — by prompt (input order), layer, position — and each row's layer
    (0 for every row of a trace without logit-lens rows)."""
    table = trace.table
    layer = (table.column("layer").to_numpy().astype(np.int64) if "layer" in table.column_names
             else np.zeros(table.num_rows, np.int64))
    order = np.lexsort((table.column("position").to_numpy(), layer, table.column("prompt_index").to_numpy()))
    return table.take(pa.array(order)), layer[order]


def topk_indices(trace: Trace, table: pa.Table, tokens: dict[str, int]) -> np.ndarray:
    """Every top-k candidate of ``table`` (rows of ``trace``) as an index into ``tokens`` (extended as needed)."""
    topk_ids = table.column("topk_ids").combine_chunks().flatten().to_numpy()
    unique_ids, inverse = np.unique(topk_ids, return_inverse=True)
    vocab = trace.vocab
    if vocab is not None and len(unique_ids) and unique_ids[-1] >= len(vocab):
        raise UsageError(f"token id {unique_ids[-1]} is outside its vocabulary of {len(vocab)} (the file is damaged)",
                         where=trace.source)
    local = np.array([tokens.setdefault(vocab[i] if vocab is not None else f"#{i}", len(tokens)) for i in unique_ids],
                     dtype=np.int64)
    return local[inverse.reshape(-1)]


def trace_targets(trace: Trace) -> list[str]:
    return [str(t.get("text")) for t in trace.meta.get("targets", []) if isinstance(t, dict)]


def distribution_columns(table: pa.Table, with_targets: bool) -> dict[str, Any]:
    """The columns that describe one model's prediction at each row (a trace's, or its baseline's)."""
    columns = {
        "next_logprob": typed(table.column("next_logprob").to_numpy(zero_copy_only=False), "f32"),
        "next_rank": typed(pc.fill_null(table.column("next_rank"), 0).to_numpy(), "i32"),
        "entropy": typed(table.column("entropy").to_numpy(), "f32"),
        "topk_logprob": typed(table.column("topk_logprobs").combine_chunks().flatten().to_numpy(), "f32"),
    }
    for name, key in (("target_logprobs", "target_logprob"), ("target_seq_logprobs", "target_seq_logprob")):
        if name in table.column_names and with_targets:
            width = table.schema.field(name).type.list_size
            columns[key] = typed(fixed_list_matrix(table.column(name), width), "f32")
    return columns
