"""Reading traces back: one Parquet or JSONL file, a directory of part files, or ``-`` (stdin).

Every reader in llmprobe goes through :func:`open_trace`, which checks that the input really is an
llmprobe trace, whoever wrote it — Parquet whose data pages decode and match their checksums, or a JSONL
trace whose header holds an Arrow schema; llmprobe metadata that is a JSON object with the shapes the
readers use, a vocabulary that is a JSON list of strings, every base column present with its type, no
nulls where a trace has none, list widths that agree with the targets (:func:`check_columns`) — and that
all parts of a directory agree on what their columns mean (model, targets in the same order,
vocabulary), and returns the Arrow table with its run metadata and vocabulary. Hidden entries of a
directory (a running trace's ``.OUTPUT.parts/`` work directory, temporary ``.partial`` files) are
skipped. Any problem is one :class:`~llmprobe.errors.UsageError` naming the file. :func:`read_trace` is
the pandas view for notebooks, with the top-k token strings joined in from the vocabulary that travels
with the trace.
"""

from __future__ import annotations

import binascii
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmprobe.errors import UsageError, first_line
from llmprobe.tracing.schema import (BASE_COLUMNS, JSONL_HEADER_KEY, MARK_COLUMNS, PHASE_GENERATED, PHASE_PROMPT,
                                     decode_metadata, decode_vocab, schema_from_jsonl_header)

IDENTITY_KEYS = ("model", "weights_sha256", "model_revision")  # parts must agree on these
# ... and on these, which give columns their meaning (target_logprobs[i] is targets[i]).
MEANING_KEYS = ("targets",)


@dataclass
class Trace:
    table: pa.Table
    meta: dict[str, Any]
    vocab: list[str] | None
    source: str

    def require_columns(self, *names: str, purpose: str) -> None:
        missing = [n for n in names if n not in self.table.column_names]
        if missing:
            raise UsageError(f"trace has no {', '.join(missing)} column(s), which {purpose} needs", where=self.source)


def open_trace(source: str | Path, columns: list[str] | None = None) -> Trace:
    source = str(source)
    if source == "-":
        data = sys.stdin.buffer.read()
        if not data:
            raise UsageError("no trace on standard input", where="<stdin>")
        return _read_any(data, "<stdin>", columns)
    path = Path(source)
    if path.is_dir():
        parts = sorted(p for p in path.rglob("*.parquet")
                       if not any(name.startswith(".") for name in p.relative_to(path).parts))
        if not parts:
            raise UsageError("directory holds no .parquet part files", where=source)
        traces = [_read_one(p, str(p), columns) for p in parts]
        first = traces[0]
        for other in traces[1:]:
            for key in IDENTITY_KEYS:
                if other.meta.get(key) != first.meta.get(key):
                    raise UsageError(f"parts come from different models ({key} {first.meta.get(key)!r} in"
                                     f" {first.source}, {other.meta.get(key)!r} in {other.source})", where=source)
            for key in MEANING_KEYS:
                if other.meta.get(key) != first.meta.get(key):
                    raise UsageError(f"parts were traced with different {key} ({_brief(first.meta.get(key))} in"
                                     f" {first.source}, {_brief(other.meta.get(key))} in {other.source}); trace"
                                     " them with the same options", where=source)
            if other.vocab != first.vocab:
                raise UsageError(f"parts carry different vocabularies ({first.source}, {other.source}), so their"
                                 " token ids do not mean the same tokens", where=source)
        try:
            table = pa.concat_tables([t.table for t in traces], promote_options="permissive")
        except pa.ArrowInvalid as exc:
            raise UsageError(f"part files have incompatible schemas: {exc}", where=source) from None
        return Trace(table, first.meta, first.vocab, source)
    if not path.exists():
        raise UsageError("no such trace file or directory", where=source)
    with open(path, "rb") as handle:
        start = handle.read(64)
    if start.lstrip().startswith(b"{") or start.startswith(CSV_START):
        return _read_any(path.read_bytes(), source, columns)
    return _read_one(path, source, columns)


CSV_START = b"prompt_index,"


def _read_any(data: bytes, name: str, columns: list[str] | None) -> Trace:
    """Parquet, or a JSONL trace (``--format jsonl``); a CSV trace is refused with the reason."""
    if data.lstrip().startswith(b"{"):
        return _read_jsonl(data, name, columns)
    if data.startswith(CSV_START):
        raise UsageError("a CSV trace cannot be read back (CSV holds no metadata or vocabulary); write the trace"
                         " with --format parquet or --format jsonl", where=name)
    return _read_one(pa.BufferReader(data), name, columns)


def _read_jsonl(data: bytes, name: str, columns: list[str] | None) -> Trace:
    """A JSONL trace: the header record (metadata, vocabulary, schema), then one object per row."""
    lines = [line for line in data.split(b"\n") if line.strip()]
    try:
        header = json.loads(lines[0])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UsageError("neither Parquet nor a JSONL trace (line 1 is not JSON)", where=name) from None
    if not isinstance(header, dict) or JSONL_HEADER_KEY not in header:
        raise UsageError("JSON lines, but not an llmprobe trace (no header record: write it with llmprobe"
                         " trace --format jsonl)", where=name)
    check_meta_and_vocab(header.get("meta"), header.get("vocab"), name)
    try:
        schema = schema_from_jsonl_header(header)
    except (KeyError, TypeError, ValueError, binascii.Error, pa.ArrowException):
        raise UsageError("its header's \"schema\" is not an Arrow schema (base64): the file is damaged or was not"
                         " written by llmprobe trace --format jsonl", where=f"{name}:1") from None
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise UsageError(f"invalid JSON ({exc})", where=f"{name}:{number}") from None
        if not isinstance(row, dict):
            raise UsageError("a row must be a JSON object", where=f"{name}:{number}")
        for key in ("mark", "meta"):  # written as objects, stored as JSON text
            if isinstance(row.get(key), (dict, list)):
                row[key] = json.dumps(row[key])
        rows.append(row)
    try:
        table = pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        raise UsageError(f"rows do not match the trace schema in the header ({first_line(exc)})",
                         where=name) from None
    check_columns(table, header["meta"], name)
    if "phase" in table.column_names:  # the dictionary the engine writes, whichever phases occur
        phases = pa.array([PHASE_PROMPT, PHASE_GENERATED])
        codes = pc.index_in(table.column("phase").cast(pa.string()), value_set=phases).cast(pa.int8())
        index = table.column_names.index("phase")
        table = table.set_column(index, table.schema.field(index),
                                 pa.chunked_array([pa.DictionaryArray.from_arrays(codes.combine_chunks(), phases)]))
    if columns is not None:
        table = table.select([c for c in columns if c in table.column_names])
    meta = decode_metadata(schema.metadata)
    if meta is None:
        raise UsageError("its header's schema carries no llmprobe metadata: the file is damaged", where=f"{name}:1")
    return Trace(table, meta, decode_vocab(schema.metadata), name)


def _read_one(handle, name: str, columns: list[str] | None) -> Trace:
    try:
        parquet = pq.ParquetFile(handle, page_checksum_verification=True)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UsageError(f"not a Parquet file ({str(exc).splitlines()[0]})", where=name) from None
    kv = parquet.schema_arrow.metadata
    try:
        meta = decode_metadata(kv)
    except (ValueError, UnicodeDecodeError):
        raise UsageError("its llmprobe metadata is not valid JSON (the file is damaged)", where=name) from None
    if meta is None:
        raise UsageError("a Parquet file, but not an llmprobe trace (no llmprobe metadata)", where=name)
    read: list[str] | None | bool
    try:
        read = decode_vocab(parquet.metadata.metadata)  # the file's key-value metadata: either layout
    except (ValueError, UnicodeDecodeError, pa.ArrowException):
        read = False
    vocab = check_meta_and_vocab(meta, read, name)
    required = columns if columns is not None else [c for c, *_ in BASE_COLUMNS]
    missing = [c for c in required if c not in parquet.schema_arrow.names]
    if missing:
        raise UsageError(f"not a complete llmprobe trace: no {', '.join(missing)} column(s)", where=name)
    try:
        table = parquet.read(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"its data cannot be read ({first_line(exc)}): the file is damaged", where=name) from None
    check_columns(table, meta, name)
    return Trace(table, meta, vocab, name)


def check_meta_and_vocab(meta: Any, vocab: Any, name: str) -> list[str] | None:
    """The run metadata is a JSON object and the vocabulary, if any, a list of strings (``False``: unreadable);
    returns the vocabulary."""
    if not isinstance(meta, dict):
        raise UsageError("its llmprobe metadata is not a JSON object (the file is damaged)", where=name)
    if vocab is not None and not (isinstance(vocab, list) and all(isinstance(t, str) for t in vocab)):
        raise UsageError("its vocabulary is not a JSON list of strings (the file is damaged)", where=name)
    targets = meta.get("targets", [])
    if not (isinstance(targets, list) and all(isinstance(t, dict) and isinstance(t.get("text"), str)
                                              and _token_ids(t.get("token_ids", [0])) for t in targets)):
        raise UsageError("its metadata's \"targets\" is not a list of {\"text\": ..., \"token_ids\": [...]} objects"
                         " (the file is damaged)", where=name)
    for key, kind in META_SHAPES.items():
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise UsageError(f"its metadata's {key!r} is {_brief(value)}, not {META_SHAPE_NAMES[kind]} (the file is"
                             " damaged)", where=name)
    return vocab


# Metadata entries the readers use, and their JSON shapes (None is allowed: absent)
META_SHAPES = {"model": str, "weights_sha256": str, "model_revision": str, "num_layers": int, "vocab_size": int,
               "settings": dict, "lens": dict, "embedding": dict}
META_SHAPE_NAMES = {str: "a string", int: "a whole number", dict: "an object"}


def _token_ids(ids: Any) -> bool:
    return isinstance(ids, list) and bool(ids) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                       for i in ids)


# The element type of each list column (fixed-size as llmprobe writes them, or variable-size)
LIST_COLUMNS = {"topk_ids": pa.int32(), "topk_logprobs": pa.float32(), "target_logprobs": pa.float32(),
                "target_seq_logprobs": pa.float32(), "embedding": pa.float16()}
NON_NULL = {"topk_ids", "topk_logprobs", "target_logprobs"} | {c for c, _, nullable, _ in BASE_COLUMNS if not nullable}


def check_columns(table: pa.Table, meta: dict[str, Any], name: str) -> None:
    """Every column llmprobe knows has its type (``phase``: strings, dictionary-encoded or not), no nulls where
    a trace has none (nor inside a list), and list widths that agree (top-k ids with their log-probabilities,
    target columns with the metadata's targets): a file from another writer is refused here, in one line,
    rather than failing (or showing nonsense) wherever the column is used."""
    known = {c: t for c, t, _, _ in BASE_COLUMNS + MARK_COLUMNS} | {"layer": pa.int16()}
    widths: dict[str, set[int]] = {}
    for field in table.schema:
        kind = field.type
        if field.name == "phase":
            ok = pa.types.is_string(kind) or (pa.types.is_dictionary(kind) and pa.types.is_string(kind.value_type))
        elif field.name in LIST_COLUMNS:
            ok = ((pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind))
                  and kind.value_type == LIST_COLUMNS[field.name])
        elif field.name in known:
            ok = kind == known[field.name]
        else:
            continue
        if not ok:
            raise UsageError(f"column {field.name} is {kind}, not what a trace holds (the file is damaged or was not"
                             " written by llmprobe)", where=name)
        column = table.column(field.name)
        if field.name in LIST_COLUMNS:
            if pc.list_flatten(column).null_count:
                raise UsageError(f"column {field.name} has empty (null) values inside its lists (the file is damaged)",
                                 where=name)
            lengths = pc.list_value_length(column).drop_null()
            widths[field.name] = set(pc.unique(lengths).to_pylist())
        if field.name in NON_NULL and column.null_count:
            raise UsageError(f"column {field.name} has empty (null) values, which a trace never has (the file is"
                             " damaged)", where=name)
    together = [c for c in ("next_token_id", "next_token", "next_logprob", "next_rank") if c in table.column_names]
    for other in together[1:]:  # all null at a prompt's last position, none elsewhere
        if pc.all(pc.equal(pc.is_null(table.column(together[0])), pc.is_null(table.column(other)))).as_py() is False:
            raise UsageError(f"columns {together[0]} and {other} are empty (null) on different rows, which a trace"
                             " never has (the file is damaged)", where=name)
    n_targets = len(meta.get("targets", []))
    expected = {"topk_logprobs": widths.get("topk_ids"), "target_logprobs": {n_targets},
                "target_seq_logprobs": {n_targets}}
    for column, want in expected.items():
        if column in widths and widths[column] and (len(widths[column]) > 1 or widths[column] != want):
            raise UsageError(f"column {column} holds lists of {sorted(widths[column])} values, where the trace's"
                             f" {'top-k ids' if column == 'topk_logprobs' else 'targets'} make {sorted(want or [])}"
                             " (the file is damaged)", where=name)


def json_objects(values: list[str | None], column: str, source: str, empty: Any = None, *,
                 shared: bool = True) -> list[Any]:
    """A trace's ``mark`` or ``meta`` column (JSON text per row) as dicts (``empty`` where null); text that is
    not a JSON object (a trace written by another tool, or damaged) is one line naming the column. ``shared``:
    rows with the same text get the same dict (a prompt's meta repeats on every row: parsed once)."""
    parsed: dict[str, dict[str, Any]] = {}
    out = []
    for value in values:
        if not value:
            out.append(empty)
            continue
        if value not in parsed or not shared:
            try:
                obj = json.loads(value)
            except (ValueError, RecursionError):
                obj = None
            if not isinstance(obj, dict):
                raise UsageError(f"column {column} holds {value[:40]!r}, not a JSON object (the file is damaged)",
                                 where=source)
            parsed[value] = obj
        out.append(parsed[value])
    return out


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_trace(source: str | Path, columns: list[str] | None = None, *, token_strings: bool = True):
    """A trace as a pandas DataFrame in input order, ready for pandas (see docs/traces.md, "Reading traces").

    * ``topk_tokens`` is joined from the vocabulary that travels with the trace;
    * ``mark`` and ``meta`` are dicts (None where absent), not JSON text;
    * integer columns keep integer dtypes, nullable ones (``next_token_id``, ``next_rank``,
      ``mark_index``) as pandas ``Int32`` with ``<NA>`` rather than float64 with NaN;
    * the targets are labelled: one float column per target, ``target_logprob[TEXT]`` and
      ``target_seq_logprob[TEXT]``, beside the list columns;
    * the run metadata is in ``frame.attrs["llmprobe"]``.

    List columns come back as numpy arrays per row. Traces of every ``trace_format`` so far read the same.
    """
    return trace_frame(open_trace(source, columns), token_strings=token_strings)


PANDAS_INTEGERS = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
                   pa.int64(): pd.Int64Dtype()}


def trace_frame(trace: Trace, *, token_strings: bool = True):
    """The pandas view of an opened (or in-memory) trace; see :func:`read_trace`."""
    frame = trace.table.to_pandas(types_mapper=PANDAS_INTEGERS.get)
    order = [c for c in ("prompt_index", "layer", "position") if c in frame.columns]
    if order:
        frame = frame.sort_values(order, kind="stable").reset_index(drop=True)
    if token_strings and "topk_ids" in frame.columns:
        # a trace without its vocabulary (written by another tool) shows ids instead of token strings
        vocab = np.array(trace.vocab if trace.vocab is not None else [], dtype=object)
        largest = max((int(ids.max()) for ids in frame["topk_ids"] if len(ids)), default=-1)
        smallest = min((int(ids.min()) for ids in frame["topk_ids"] if len(ids)), default=0)
        if smallest < 0:
            raise UsageError(f"token id {smallest} is negative (the file is damaged)", where=trace.source)
        if trace.vocab is None:
            vocab = np.array([f"#{i}" for i in range(largest + 1)], dtype=object)
        elif largest >= len(vocab):
            raise UsageError(f"token id {largest} is outside its vocabulary of {len(vocab)} (the file is damaged)",
                             where=trace.source)
        frame["topk_tokens"] = [vocab[ids] for ids in frame["topk_ids"]]
    for name in ("mark", "meta"):
        if name in frame.columns:
            frame[name] = json_objects([v if isinstance(v, str) else None for v in frame[name]], name, trace.source,
                                       shared=False)
    targets = [t.get("text") for t in trace.meta.get("targets", [])]
    for name in ("target_logprobs", "target_seq_logprobs"):
        if name in frame.columns and targets:
            values = np.stack([np.full(len(targets), np.nan, np.float32) if v is None else v for v in frame[name]])
            for i, text in enumerate(targets[:values.shape[1]]):
                frame[f"{name.removesuffix('s')}[{text}]"] = values[:, i]
    frame.attrs["llmprobe"] = trace.meta
    return frame


def visible(token: str | None) -> str:
    """Whitespace made visible, so ' the' and 'the' differ on screen."""
    if not isinstance(token, str):  # null (no next token) arrives as None or NaN from pandas
        return "∅"
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")
