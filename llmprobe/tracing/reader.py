"""Reading traces back: one Parquet file, a directory of part files, or ``-`` (stdin).

Every reader in llmprobe goes through :func:`open_trace`, which checks that the input really is an
llmprobe trace (Parquet whose data pages decode, llmprobe metadata that is a JSON object, a
vocabulary that is a JSON list of strings, every base column present) and that all parts of a
directory agree on what their columns mean (model, targets in the same order, vocabulary), and
returns the Arrow table with its run metadata and vocabulary. Hidden entries of a directory (a
running trace's ``.OUTPUT.parts/`` work directory, temporary ``.partial`` files) are skipped. Any
problem is one :class:`~llmprobe.errors.UsageError` naming the file. :func:`read_trace` is the pandas view for notebooks, with the top-k
token strings joined in from the vocabulary that travels with the trace.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.errors import UsageError
from llmprobe.tracing.schema import BASE_COLUMNS, decode_metadata, decode_vocab

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
        return _read_one(pa.BufferReader(data), "<stdin>", columns)
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
    return _read_one(path, source, columns)


def _read_one(handle, name: str, columns: list[str] | None) -> Trace:
    try:
        parquet = pq.ParquetFile(handle)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UsageError(f"not a Parquet file ({str(exc).splitlines()[0]})", where=name) from None
    kv = parquet.schema_arrow.metadata
    try:
        meta = decode_metadata(kv)
    except (ValueError, UnicodeDecodeError):
        raise UsageError("its llmprobe metadata is not valid JSON (the file is damaged)", where=name) from None
    if meta is None:
        raise UsageError("a Parquet file, but not an llmprobe trace (no llmprobe metadata)", where=name)
    if not isinstance(meta, dict):
        raise UsageError("its llmprobe metadata is not a JSON object (the file is damaged)", where=name)
    try:
        vocab = decode_vocab(parquet.metadata.metadata)  # the file's key-value metadata: either layout
    except (ValueError, UnicodeDecodeError, pa.ArrowException):
        vocab = False
    if vocab is not None and not (isinstance(vocab, list) and all(isinstance(t, str) for t in vocab)):
        raise UsageError("its vocabulary is not a JSON list of strings (the file is damaged)", where=name)
    required = columns if columns is not None else [c for c, *_ in BASE_COLUMNS]
    missing = [c for c in required if c not in parquet.schema_arrow.names]
    if missing:
        raise UsageError(f"not a complete llmprobe trace: no {', '.join(missing)} column(s)", where=name)
    try:
        table = parquet.read(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"its data cannot be read ({_first_line(exc)}): the file is damaged", where=name) from None
    return Trace(table, meta, vocab, name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_trace(source: str | Path, columns: list[str] | None = None, *, token_strings: bool = True):
    """A trace as a pandas DataFrame in input order, with ``topk_tokens`` joined from the vocabulary.

    List columns come back as numpy arrays per row; ``mark`` and ``meta`` stay JSON strings.
    """
    trace = open_trace(source, columns)
    frame = trace.table.to_pandas()
    order = [c for c in ("prompt_index", "layer", "position") if c in frame.columns]
    if order:
        frame = frame.sort_values(order, kind="stable").reset_index(drop=True)
    if token_strings and "topk_ids" in frame.columns:
        # a trace without its vocabulary (written by another tool) shows ids instead of token strings
        vocab = np.array(trace.vocab if trace.vocab is not None else [], dtype=object)
        largest = max((int(ids.max()) for ids in frame["topk_ids"] if len(ids)), default=-1)
        if trace.vocab is None:
            vocab = np.array([f"#{i}" for i in range(largest + 1)], dtype=object)
        elif largest >= len(vocab):
            raise UsageError(f"token id {largest} is outside its vocabulary of {len(vocab)} (the file is damaged)",
                             where=trace.source)
        frame["topk_tokens"] = [vocab[ids] for ids in frame["topk_ids"]]
    frame.attrs["llmprobe"] = trace.meta
    return frame


def visible(token: str | None) -> str:
    """Whitespace made visible, so ' the' and 'the' differ on screen."""
    if not isinstance(token, str):  # null (no next token) arrives as None or NaN from pandas
        return "∅"
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")
