"""Tracing one set of prompts under two placements and comparing the tables row by row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from llmprobe.tracing.prompts import PromptRecord


PROMPTS = [
    {"prompt": "I just flipped a coin, and it came up heads, then tails, then", "marks": [{"offset": 44}]},
    {"prompt": "The capital of France is", "meta_field": 1},
    {"prompt": "blick means zorp. dax means"},
]


def records(items=PROMPTS) -> list[PromptRecord]:
    return [PromptRecord(index=i, id=str(i + 1), text=p["prompt"], line=i + 1, marks=p.get("marks", []),
                         meta={k: v for k, v in p.items() if k not in ("prompt", "marks")})
            for i, p in enumerate(items)]


def trace_table(loaded, settings: TraceSettings, prompts: list[PromptRecord]) -> pa.Table:
    return TraceRun(settings, prompts).start(loaded).table()


def assert_same_rows(got: pa.Table, want: pa.Table, atol: float) -> None:
    """Row for row after sorting by (prompt, position): integers and strings exactly, floats within atol."""
    keys = [(c, "ascending") for c in ("prompt_index", "layer", "position") if c in want.column_names]
    got, want = got.sort_by(keys), want.sort_by(keys)
    assert got.schema.remove_metadata() == want.schema.remove_metadata()
    assert got.num_rows == want.num_rows > 0
    for name in want.column_names:
        a, b = got.column(name).combine_chunks(), want.column(name).combine_chunks()
        value_type = a.type.value_type if pa.types.is_fixed_size_list(a.type) else a.type
        if pa.types.is_floating(value_type):
            assert a.is_null().equals(b.is_null()), name
            fa = np.array([np.nan if v is None else v for v in a.to_pylist()], dtype=object)
            fb = np.array([np.nan if v is None else v for v in b.to_pylist()], dtype=object)
            for x, y in zip(fa, fb):
                np.testing.assert_allclose(np.asarray(x, dtype=float), np.asarray(y, dtype=float), atol=atol,
                                           rtol=0, err_msg=name)
        else:
            assert a.to_pylist() == b.to_pylist(), name
