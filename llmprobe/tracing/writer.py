"""Writing traces: streaming, atomic Parquet files, or JSONL/CSV rows on stdout for pipelines.

A Parquet trace is written one row group per record batch through :func:`llmprobe.files.atomic_file`,
so memory does not grow with the number of prompts and an error or Ctrl-C never leaves a truncated
trace. An existing file is never replaced without ``force``. The vocabulary goes into the footer's
key-value metadata once (:func:`llmprobe.tracing.schema.file_metadata`), not into the Arrow schema.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from contextlib import contextmanager
from typing import IO, Any, Protocol
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.errors import UsageError
from llmprobe.files import atomic_file, check_new_output
from llmprobe.tracing.schema import encode_metadata, file_metadata, jsonl_header

OUTPUT_FORMATS = ("parquet", "jsonl", "csv")
JSON_COLUMNS = ("mark", "meta")  # string columns holding JSON objects
PARQUET_COMPRESSION = "zstd"


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """zstd; no dictionary for float columns: log-probabilities rarely repeat, so a dictionary only
    costs space (benchmarks/bench_size.py: about 110 -> 80 bytes per row at k=20); float columns
    byte-stream-split (their bytes regrouped by significance before zstd: about 14% fewer bytes); and a
    CRC32 in every page header, which readers verify: without it a flipped byte in a data page mostly
    decodes, as a wrong number."""
    def value_type(t: pa.DataType) -> pa.DataType:
        return t.value_type if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) else t

    floats = [f for f in schema if pa.types.is_floating(value_type(f.type))]
    return {"compression": PARQUET_COMPRESSION, "write_page_checksum": True,
            "use_dictionary": [f.name for f in schema if f not in floats],
            "use_byte_stream_split": [f"{f.name}.list.element" if value_type(f.type) != f.type else f.name
                                      for f in floats]}


class Sink(Protocol):
    def write(self, batch: pa.RecordBatch) -> None: ...


def check_output(output: str, fmt: str, force: bool, inputs: Sequence[str] = ()) -> None:
    """Fail before any work when the output cannot be written."""
    if fmt not in OUTPUT_FORMATS:
        raise UsageError(f"unknown format {fmt!r} (expected {', '.join(OUTPUT_FORMATS)})", where="--format")
    if output == "-":
        if fmt == "parquet" and sys.stdout.isatty():
            raise UsageError("refusing to write binary Parquet to a terminal; use --format jsonl or redirect",
                             where="-o")
        return
    check_new_output(output, force, inputs=inputs)


@contextmanager
def open_trace_sink(output: str, fmt: str, schema: pa.Schema, metadata: dict[str, Any],
                    vocab: list[str] | None, *, replace: bool = False) -> Iterator[Sink]:
    """A sink for record batches; the file appears at ``output`` only if the block completes."""
    # Parquet stores the vocabulary once, in the file metadata; a JSONL header carries it from the schema
    schema_meta, file_only = file_metadata(metadata, vocab) if fmt == "parquet" else (encode_metadata(metadata, vocab), {})
    schema = schema.with_metadata(schema_meta)
    if output == "-":
        stream = sys.stdout.buffer
        with _make_sink(stream, fmt, schema, file_only) as sink:
            yield sink
        stream.flush()
        return
    with atomic_file(output, replace=replace) as stream, _make_sink(stream, fmt, schema, file_only) as sink:
        yield sink


def parquet_bytes(table: pa.Table, metadata: dict[str, Any], vocab: list[str] | None) -> bytes:
    """A whole trace as the bytes of the Parquet file :func:`open_trace_sink` would write (a download)."""
    buffer = io.BytesIO()
    schema_meta, file_only = file_metadata(metadata, vocab)
    with _make_sink(buffer, "parquet", table.schema.with_metadata(schema_meta), file_only) as sink:
        for batch in table.to_batches():
            sink.write(batch)
    return buffer.getvalue()


@contextmanager
def _make_sink(stream: IO[bytes], fmt: str, schema: pa.Schema, file_only: dict[bytes, bytes]) -> Iterator[Sink]:
    if fmt == "parquet":
        writer = pq.ParquetWriter(stream, schema, **parquet_options(schema))
        try:
            yield writer
            writer.add_key_value_metadata(file_only)
        finally:
            writer.close()
    elif fmt == "jsonl":
        yield _JsonlSink(stream, schema)
    else:
        yield _CsvSink(stream, schema)


class _JsonlSink:
    """A header record (metadata, vocabulary, schema) first, so the trace reads back like Parquet."""

    def __init__(self, stream, schema: pa.Schema) -> None:
        self.stream = stream
        self.stream.write((json.dumps(jsonl_header(schema), ensure_ascii=False, separators=(",", ":")) + "\n").encode())

    def write(self, batch: pa.RecordBatch) -> None:
        lines = [json_line(row_to_json(row)) for row in batch.to_pylist()]
        self.stream.write(("\n".join(lines) + "\n").encode())


class _CsvSink:
    """CSV cannot hold lists, so list columns are written as JSON text."""

    def __init__(self, stream, schema: pa.Schema) -> None:
        self.stream = stream
        self._emit([schema.names])

    def _emit(self, rows: list[list[Any]]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(rows)
        self.stream.write(buffer.getvalue().encode())

    def write(self, batch: pa.RecordBatch) -> None:
        self._emit([[json.dumps(v) if isinstance(v, list) else v for v in row.values()] for row in batch.to_pylist()])


def json_line(value: Any) -> str:
    """Strict JSON: a NaN or infinity (say in a prompt's extra fields) becomes null, never a bare ``NaN``."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite_or_null(value), ensure_ascii=False, allow_nan=False)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def row_to_json(row: dict[str, Any]) -> dict[str, Any]:
    """A trace row as a JSON object, with the JSON-string columns expanded into objects."""
    for name in JSON_COLUMNS:
        if row.get(name) is not None:
            row[name] = json.loads(row[name])
    return row
