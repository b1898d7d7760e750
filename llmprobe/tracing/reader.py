"""Reading traces back: one Parquet file, a directory of part files, or ``-`` (stdin).

Every reader in llmprobe goes through :func:`open_trace`, which checks that the input really is an
llmprobe trace and that all parts come from the same model, and returns the Arrow table with its
run metadata and vocabulary. :func:`read_trace` is the pandas view for notebooks, with the top-k
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
from llmprobe.tracing.schema import decode_metadata, decode_vocab

IDENTITY_KEYS = ("model", "weights_sha256", "model_revision")  # parts must agree on these


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
        parts = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))
        if not parts:
            raise UsageError("directory holds no .parquet part files", where=source)
        traces = [_read_one(p, str(p), columns) for p in parts]
        first = traces[0]
        for other in traces[1:]:
            for key in IDENTITY_KEYS:
                if other.meta.get(key) != first.meta.get(key):
                    raise UsageError(f"parts come from different models ({key} {first.meta.get(key)!r} in"
                                     f" {first.source}, {other.meta.get(key)!r} in {other.source})", where=source)
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
    meta = decode_metadata(parquet.schema_arrow.metadata)
    if meta is None:
        raise UsageError("a Parquet file, but not an llmprobe trace (no llmprobe metadata)", where=name)
    table = parquet.read(columns=columns)
    return Trace(table, meta, decode_vocab(parquet.metadata.metadata), name)  # the file's key-value metadata


def read_trace(source: str | Path, columns: list[str] | None = None, *, token_strings: bool = True):
    """A trace as a pandas DataFrame in input order, with ``topk_tokens`` joined from the vocabulary.

    List columns come back as numpy arrays per row; ``mark`` and ``meta`` stay JSON strings.
    """
    trace = open_trace(source, columns)
    frame = trace.table.to_pandas()
    order = [c for c in ("prompt_index", "layer", "position") if c in frame.columns]
    if order:
        frame = frame.sort_values(order, kind="stable").reset_index(drop=True)
    if token_strings and trace.vocab is not None and "topk_ids" in frame.columns:
        vocab = np.array(trace.vocab, dtype=object)
        frame["topk_tokens"] = [vocab[ids] for ids in frame["topk_ids"]]
    frame.attrs["llmprobe"] = trace.meta
    return frame


def visible(token: str | None) -> str:
    """Whitespace made visible, so ' the' and 'the' differ on screen."""
    if not isinstance(token, str):  # null (no next token) arrives as None or NaN from pandas
        return "∅"
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")
