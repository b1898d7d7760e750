"""An interventions trace on the page: the line that names what it changed, and its baseline beside it.

A *baseline* is the same prompts traced to the same tokens, usually by the model as it is:
:func:`aligned_baseline` takes its rows in the trace's page order and checks them row by row (prompt,
layer, position, token id); anything else is one :class:`~llmprobe.errors.UsageError` naming the baseline
file and the first row that differs. :func:`baseline_entry` is the data model's ``baseline`` entry (its
predictions aligned row for row with the trace's, and per row the lower bound on KL(baseline‖trace) of
:mod:`llmprobe.analysis.shift`); :func:`add_baseline_probs` puts the baseline's category distribution
beside the fit's at each mark.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from llmprobe.errors import UsageError
from llmprobe.tracing.reader import Trace
from llmprobe.tracing.schema import PHASE_GENERATED
from llmprobe.viewer.columns import distribution_columns, fixed_list_matrix, in_order, trace_targets, typed


def interventions_line(trace: Trace) -> str | None:
    """``interventions: zero-ablated head 8.1`` for a trace of a changed model (None: the model as it is)."""
    from llmprobe.tracing.interventions import describe

    settings = trace.meta.get("settings") if isinstance(trace.meta.get("settings"), dict) else {}
    found = settings.get("interventions") or []
    try:
        return describe(found)
    except (TypeError, KeyError, ValueError):  # metadata written by hand, or damaged: say so, draw the page
        return f"interventions: {json.dumps(found)[:200]} (not readable as llmprobe interventions)"


# ------------------------------------------------------------------------------------------- the baseline
BASELINE_RULE = ("a baseline is a trace of the same prompts, in the same order, to the same tokens (the same"
                 " prompts file traced without the intervention)")


def aligned_baseline(table: pa.Table, layer: np.ndarray, source: str, baseline: Trace) -> pa.Table:
    """``baseline``'s rows in the order of ``table`` (a trace's rows, :func:`in_order`), checked to be the
    same prompts, layers, positions and tokens row by row; anything else is one UsageError naming it."""
    where = baseline.source
    has_layers = "layer" in table.column_names
    if ("layer" in baseline.table.column_names) != has_layers:
        which = ("has logit-lens rows (--layers) and the trace does not" if not has_layers
                 else "has no logit-lens rows (--layers) and the trace does")
        raise UsageError(f"is not a baseline of {source}: it {which}; {BASELINE_RULE}", where=where)
    base, base_layer = in_order(baseline)
    count = min(table.num_rows, base.num_rows)
    columns = ("prompt_id", "position", "token_id")
    mine = {c: table.column(c).to_numpy(zero_copy_only=False)[:count] for c in columns}
    theirs = {c: base.column(c).to_numpy(zero_copy_only=False)[:count] for c in columns}
    differ = (layer[:count] != base_layer[:count]) | np.logical_or.reduce([mine[c] != theirs[c] for c in columns])
    if differ.any():
        row = int(np.argmax(differ))
        if mine["prompt_id"][row] != theirs["prompt_id"][row]:
            what = (f"its prompt number {int(table.column('prompt_index')[row].as_py()) + 1} is"
                    f" {theirs['prompt_id'][row]!r} where the trace has {mine['prompt_id'][row]!r}")
        else:
            at = f"prompt {mine['prompt_id'][row]!r}" + (f" layer {int(layer[row])}" if has_layers else "")
            if layer[row] != base_layer[row] or mine["position"][row] != theirs["position"][row]:
                what = f"{at} has other layers or positions than the trace's"
            else:
                generated = table.column("phase")[row].as_py() == PHASE_GENERATED
                what = (f"at {at} position {int(mine['position'][row])} its token is"
                        f" {base.column('token')[row].as_py()!r} where the trace has {table.column('token')[row].as_py()!r}"
                        + (" (a generated token: the two models generated different text)" if generated else ""))
        raise UsageError(f"is not a baseline of {source}: {what}; {BASELINE_RULE}", where=where)
    if base.num_rows != table.num_rows:
        longer, shorter = (table, base) if table.num_rows > base.num_rows else (base, table)
        extra = longer.column("prompt_id")[count].as_py()
        holder = "the trace" if longer is table else "the baseline"
        raise UsageError(f"is not a baseline of {source}: it has {base.num_rows} rows and the trace {table.num_rows};"
                         f" {holder} goes on with prompt {extra!r} where the other ends; {BASELINE_RULE}", where=where)
    return base


def baseline_entry(table: pa.Table, baseline: Trace, base: pa.Table, base_topk: np.ndarray, kind: str,
                    targets: list[str]) -> dict[str, Any]:
    """The ``baseline`` entry: the baseline's predictions row by row (aligned with ``rows``) and the change."""
    from llmprobe.analysis.shift import kl_lower_bound_bits

    def matrix(t: pa.Table, name: str) -> np.ndarray:
        return fixed_list_matrix(t.column(name), t.schema.field(name).type.list_size)

    next_ids = pc.fill_null(table.column("next_token_id"), -1).to_numpy()
    change = kl_lower_bound_bits(matrix(base, "topk_ids"), matrix(base, "topk_logprobs"), matrix(table, "topk_ids"),
                                 matrix(table, "topk_logprobs"), next_ids,
                                 base.column("next_logprob").to_numpy(zero_copy_only=False).astype(np.float64),
                                 table.column("next_logprob").to_numpy(zero_copy_only=False).astype(np.float64))
    same_targets = trace_targets(baseline) == targets
    return {
        "source": baseline.source,
        "model": baseline.meta.get("model"),
        "interventions": interventions_line(baseline),
        "top_k": base.schema.field("topk_ids").type.list_size,
        "targets": same_targets,
        "rows": {"topk": typed(base_topk, kind), **distribution_columns(base, same_targets and bool(targets)),
                 "kl_bits": typed(change, "f64")},
    }


def add_baseline_probs(marks: pd.DataFrame, baseline: Trace) -> bool:
    """Add ``baseline_prob`` to the fit's rows: the baseline trace's category distribution at the same mark
    (renormalized over the categories, as the fit's ``model_prob``); False when the baseline has no target
    scores to give it (its page then shows the fit without that column)."""
    from llmprobe.analysis.marks import category_marks

    try:
        cm = category_marks(baseline)
    except UsageError:
        return False
    at = {(str(p), int(q)): i for i, (p, q) in enumerate(zip(cm.marks["prompt_id"], cm.marks["position"]))}
    column = {c: i for i, c in enumerate(cm.categories)}
    marks["baseline_prob"] = [cm.probs[at[(str(p), int(q))], column[c]] if (str(p), int(q)) in at and c in column
                              else np.nan for p, q, c in zip(marks["prompt_id"], marks["position"], marks["category"])]
    return True
