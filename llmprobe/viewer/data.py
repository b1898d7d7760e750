"""The explorer's data model: a trace (and its fit) as one compact JSON document the page's script reads.

Layout (``format`` 1), chosen so that a 20,000-row trace at k = 20 stays a few MB and loads in a blink:

* ``tokens``: every token string the page shows (the prompt's tokens, the actual next tokens, the
  top-k candidates), each once; rows refer to them by index (``none`` marks a missing next token).
  Strings are kept exactly (the page makes whitespace visible itself), so ``data-token`` is the
  trace's own string.
* ``rows``: one entry per trace row, columnar, each column a typed array
  (:func:`~llmprobe.viewer.columns.typed`:
  ``{"type": "f32", "data": ...}``, little-endian bytes regrouped by significance — all first bytes,
  then all second bytes… — deflated (zlib) and base64-encoded; the page inflates them with the
  browser's own ``DecompressionStream``): ``position``, ``token``, ``next``, ``next_logprob`` (NaN: no
  next token), ``next_rank`` (0: none), ``entropy`` (nats), ``generated`` (0/1), ``topk`` and
  ``topk_logprob`` (k per row, most probable first), ``target_logprob`` and ``target_seq_logprob``
  (one per target; NaN where the trace has null). Log-probabilities stay float32, exactly as traced,
  so the page's probabilities are the trace's to the last bit of float32 (``data-prob`` shows
  ``exp`` of them in full double precision).
* ``prompts``: per prompt its ``id``, ``meta`` (the JSONL fields), ``marks`` (``[position, mark]``
  on the model's output rows) and ``slices``. A *slice* is one pass of one model over the prompt:
  ``[start, count, layer]`` — a run of rows ``start … start + count − 1`` in position order. A plain
  trace has one slice per prompt (layer null); a logit-lens trace one per layer.
* ``interventions``: the line naming what the trace changed in the model (``interventions:
  zero-ablated head 8.1``, :func:`llmprobe.tracing.interventions.describe`), null for the model as it is.
* ``baseline`` (with a baseline trace: the same prompts traced to the same tokens, usually without the
  intervention; :func:`~llmprobe.viewer.interventions.aligned_baseline` checks it row by row and refuses anything else): its
  ``source``, ``model``, ``interventions`` line and ``top_k``; ``targets`` (true when it scored the same
  targets); and ``rows``: its own predictions *aligned row for row with* ``rows`` — ``topk`` (indices
  into the one ``tokens`` list), ``topk_logprob``, ``next_logprob``, ``next_rank``, ``entropy``, the
  target columns when ``targets`` — so the page shows both models at a position by one row index, and
  ``kl_bits``: per row, the exact lower bound on KL(baseline‖trace) from the two top-k lists and the
  actual next token (:mod:`llmprobe.analysis.shift`), float64. Tokens, positions and marks are the
  trace's (the baseline's are the same). Its fit entry (below) gains ``baseline_prob``.
* ``fit`` (with a fit-posterior table of this trace): the conclusion lines (verdict first, then the
  γ = 1 test), the categories, the sequences' names, and ``marks``: columns over the fit's marks
  (typed arrays as above) — ``prompt`` (index into ``prompts``), ``position``, ``n``, ``sequence``
  (index into ``sequences``), ``used``, ``mass``, ``tv``, ``kl_bits`` (KL(Bayes‖model)), and K per
  mark of ``model_prob``, ``bayes_prob``, ``theta`` (NaN: unknown) and ``counts`` — float64, exactly
  the table's numbers — and, with a baseline that has target scores (``baseline`` true), ``baseline_prob``:
  the baseline's category distribution at the mark, renormalized over the categories as ``model_prob`` is.

Why deflate: the top-k log-probabilities stay float32, exactly as traced, and the token indices
repeat; regrouped bytes deflate to about half (bytes per row at k = 20: about 50 instead of 120
raw, 160 in plain base64), which keeps a 20,000-row page to a few MB (benchmarks/bench_view.py).

A fit table is accepted only if it is this trace's: its ``trace`` label names this trace's model,
its prompts exist here, and at every mark its model probabilities equal the ones this trace gives
(recomputed by :func:`llmprobe.analysis.marks.category_marks`, the fit's own extraction). Anything
else is one :class:`~llmprobe.errors.UsageError` naming the fit table.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from llmprobe.errors import UsageError
from llmprobe.tracing.reader import Trace
from llmprobe.tracing.schema import PHASE_GENERATED
from llmprobe.viewer.columns import distribution_columns, in_order, index_kind, topk_indices, trace_targets, typed
from llmprobe.viewer.interventions import add_baseline_probs, aligned_baseline, baseline_entry, interventions_line

DATA_FORMAT = 1
RUN_KEYS = ("model", "model_kind", "architecture", "dtype", "device", "gguf_quantization", "weights_precision",
            "attn_implementation", "llmprobe_version", "created_utc", "command")
MATCH_RTOL, MATCH_ATOL = 1e-6, 1e-12  # a fit's model probabilities against the trace's, recomputed
FIT_MARK_FLOATS = ("mass", "tv", "kl_bits")
FIT_CATEGORY_FLOATS = ("model_prob", "bayes_prob", "theta", "count")
FIT_CATEGORY_KEYS = {"count": "counts"}  # the page's name, where the table's would clash (``count``: marks)


def parse_json_text(text: Any) -> Any:
    """A ``mark``/``meta`` cell: JSON text as the object it holds (damaged text is shown as it is)."""
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def trace_data(trace: Trace, baseline: Trace | None = None) -> dict[str, Any]:
    """The page's data model of ``trace`` (see the module docstring), with ``baseline`` (a trace of the
    same prompts and tokens: :func:`aligned_baseline` checks it) beside it; no fit yet."""
    table, layer = in_order(trace)
    rows = table.num_rows
    if rows == 0:
        raise UsageError("the trace has no rows", where=trace.source)
    has_layers = "layer" in table.column_names
    prompt_index = table.column("prompt_index").to_numpy()
    position = table.column("position").to_numpy()
    base_table = aligned_baseline(table, layer, trace.source, baseline) if baseline is not None else None

    tokens: dict[str, int] = {}
    topk = topk_indices(trace, table, tokens)
    base_topk = topk_indices(baseline, base_table, tokens) if base_table is not None else None
    token = np.array([tokens.setdefault(t, len(tokens)) for t in table.column("token").to_pylist()], dtype=np.int64)
    next_strings = table.column("next_token").to_pylist()
    next_local = [None if t is None else tokens.setdefault(t, len(tokens)) for t in next_strings]
    kind = index_kind(len(tokens))
    none = 0xFFFF if kind == "u16" else 0xFFFFFFFF
    next_token = np.array([none if i is None else i for i in next_local], dtype=np.int64)
    generated = (table.column("phase").cast(pa.string()).to_numpy(zero_copy_only=False) == PHASE_GENERATED)

    targets = trace_targets(trace)
    encoded: dict[str, Any] = {
        "count": rows,
        "position": typed(position, index_kind(int(position.max()))),
        "token": typed(token, kind),
        "next": typed(next_token, kind),
        "generated": typed(generated, "u8"),
        "topk": typed(topk, kind),
        **distribution_columns(table, bool(targets)),
    }
    layers = sorted({int(v) for v in layer}) if has_layers else None
    lens = trace.meta.get("lens") if isinstance(trace.meta.get("lens"), dict) else {}
    output_layer = (int(lens["output_layer"]) if isinstance(lens.get("output_layer"), int) else max(layers)) \
        if layers else None
    return {
        "format": DATA_FORMAT,
        "source": trace.source,
        "run": {key: trace.meta[key] for key in RUN_KEYS if trace.meta.get(key) is not None},
        "interventions": interventions_line(trace),
        "top_k": table.schema.field("topk_ids").type.list_size,
        "targets": targets,
        "layers": layers,
        "output_layer": output_layer,
        "tokens": list(tokens),
        "none": none,
        "rows": encoded,
        "prompts": _prompts(table, prompt_index, layer if has_layers else None, output_layer),
        "baseline": None if base_table is None else baseline_entry(table, baseline, base_table, base_topk, kind,
                                                                     targets),
        "fit": None,
    }


def _prompts(table: pa.Table, prompt_index: np.ndarray, layer: np.ndarray | None,
             output_layer: int | None) -> list[dict[str, Any]]:
    """Per prompt (input order): id, JSONL fields, marks on the output rows, and slices (one per layer)."""
    rows = len(prompt_index)
    layer_or_zero = layer if layer is not None else np.zeros(rows, np.int64)
    starts = np.flatnonzero(np.r_[True, (prompt_index[1:] != prompt_index[:-1])
                                  | (layer_or_zero[1:] != layer_or_zero[:-1])])
    ends = np.r_[starts[1:], rows]
    ids = table.column("prompt_id").to_pylist()
    metas = table.column("meta").to_pylist() if "meta" in table.column_names else [None] * rows
    marked = (table.column("mark_index").is_valid().to_numpy(zero_copy_only=False)
              if "mark_index" in table.column_names else np.zeros(rows, bool))
    mark_text = table.column("mark").to_pylist() if "mark" in table.column_names else [None] * rows
    positions = table.column("position").to_numpy()
    prompts: list[dict[str, Any]] = []
    for start, end in zip(starts, ends):
        if not prompts or prompts[-1]["_index"] != prompt_index[start]:
            prompts.append({"_index": prompt_index[start], "id": str(ids[start]), "meta": parse_json_text(metas[start]),
                            "marks": [], "slices": []})
        prompt = prompts[-1]
        this_layer = None if layer is None else int(layer[start])
        prompt["slices"].append([int(start), int(end - start), this_layer])
        if this_layer == output_layer:
            prompt["marks"] = [[int(positions[r]), parse_json_text(mark_text[r])]
                               for r in range(start, end) if marked[r]]
    for prompt in prompts:
        del prompt["_index"]
    return prompts


# -------------------------------------------------------------------------------------------------- the fit
def fit_data(trace: Trace, fit: Any, prompts: list[dict[str, Any]], baseline: Trace | None = None) -> dict[str, Any]:
    """The ``fit`` entry of the data model, from a :class:`~llmprobe.plots.icl.FitTable` of this trace (with
    the baseline's category distribution at each mark, when a baseline trace with target scores is given)."""
    from llmprobe.analysis.results import gamma_test_line, verdict_line
    from llmprobe.analysis.marks import trace_label
    from llmprobe.plots.icl import HEADLINE_KEYS, flatten_summary

    label = trace_label(trace)
    frame = fit.frame
    accepted = {label, f"{label} ({trace.source})"}  # fit-posterior labels a second trace of one model so
    rows = frame[frame["trace"].isin(accepted)]
    if rows.empty:
        found = ", ".join(repr(t) for t in dict.fromkeys(frame["trace"]))
        raise UsageError(f"is a fit of {found}, not of this trace ({label!r}, {trace.source}); give the"
                         " fit-posterior table of this trace", where=fit.source)
    fit_label = str(rows["trace"].iloc[0])
    rows = rows[rows["trace"] == fit_label]
    index_of = {p["id"]: i for i, p in enumerate(prompts)}
    missing = [p for p in dict.fromkeys(rows["prompt_id"]) if p not in index_of]
    if missing:
        raise UsageError(f"is not a fit of this trace: prompt {missing[0]!r} of the fit is not in {trace.source}"
                         f" ({len(missing)} of its prompts are missing)", where=fit.source)
    categories = list(dict.fromkeys(rows["category"]))
    marks = _matched_marks(trace, fit, rows, fit_label, categories)
    with_baseline = baseline is not None and add_baseline_probs(marks, baseline)
    summary = next((s for s in fit.summaries if s.get("trace") == fit_label), None)
    flat = flatten_summary(summary) if summary else {}
    params = [[name, flat[key]] for key, name in HEADLINE_KEYS.items() if key in flat]
    if summary is None:
        verdict = ("no verdict: this fit table carries no fit summary (a CSV table keeps none); write the fit"
                   " with -o FILE.parquet")
    else:
        verdict = verdict_line(summary)
    sequences = list(dict.fromkeys(marks["sequence"].astype(str)))
    return {
        "source": fit.source,
        "label": fit_label,
        "verdict": verdict,
        "gamma_test": gamma_test_line(summary or {}),
        "params": params,
        "categories": categories,
        "sequences": sequences,
        "baseline": with_baseline,
        "marks": _fit_columns(marks, categories, index_of, sequences, with_baseline),
    }


def _matched_marks(trace: Trace, fit: Any, rows: pd.DataFrame, label: str, categories: list[str]):
    """The fit's rows, each checked against the trace's own category probability, with the mark's position."""
    from llmprobe.analysis.marks import category_marks

    try:
        cm = category_marks(trace, label)
    except UsageError as exc:
        raise UsageError(f"is not a fit of this trace, which has no category marks ({exc})", where=fit.source) from None
    unknown = [c for c in categories if c not in cm.categories]
    if unknown:
        raise UsageError(f"is not a fit of this trace: category {unknown[0]!r} is not among the trace's"
                         f" {cm.categories}", where=fit.source)
    traced = pd.DataFrame({"prompt_id": cm.marks["prompt_id"].astype(str).to_numpy(), "n": cm.marks["n"].to_numpy(),
                           "position": cm.marks["position"].to_numpy(dtype=np.int64), "_row": np.arange(len(cm))})
    key = ["prompt_id", "position"] if "position" in rows.columns else ["prompt_id", "n"]  # older tables: by n
    merged = rows.drop(columns=["_row"], errors="ignore").merge(
        traced.drop_duplicates(key)[list(dict.fromkeys([*key, "position", "_row"]))], on=key, how="left")
    if merged["_row"].isna().any():
        first = merged[merged["_row"].isna()].iloc[0]
        raise UsageError(f"is not a fit of this trace: prompt {first['prompt_id']!r} has no mark at"
                         f" {key[1]} {first[key[1]]} in {trace.source}", where=fit.source)
    column = np.array([cm.categories.index(c) for c in merged["category"]])
    traced_prob = cm.probs[merged["_row"].to_numpy(dtype=np.int64), column]
    fitted = pd.to_numeric(merged["model_prob"], errors="coerce").to_numpy(dtype=np.float64)
    off = ~np.isclose(fitted, traced_prob, rtol=MATCH_RTOL, atol=MATCH_ATOL)
    if off.any():
        i = int(np.argmax(off))
        raise UsageError(f"is not a fit of this trace: at prompt {merged['prompt_id'].iloc[i]!r}, {key[1]}"
                         f" {merged[key[1]].iloc[i]}, the fit's model probability of {merged['category'].iloc[i]!r}"
                         f" is {fitted[i]:.6g} but the trace gives {traced_prob[i]:.6g}", where=fit.source)
    return merged


def _fit_columns(rows: pd.DataFrame, categories: list[str], index_of: dict[str, int],
                 sequences: list[str], with_baseline: bool = False) -> dict[str, Any]:
    """The fit's marks as typed columns: one entry per mark (in table order), K per mark for the category
    columns (in ``categories`` order; NaN where the table has no row for a category)."""
    mark, first = _codes(rows["prompt_id"].astype(str) + "\0" + rows["position"].astype(str))
    category = rows["category"].map({c: i for i, c in enumerate(categories)}).to_numpy()
    heads = rows.iloc[first]
    sequence = {name: i for i, name in enumerate(sequences)}

    def numbers(frame: pd.DataFrame, name: str) -> np.ndarray:
        if name not in frame:
            return np.full(len(frame), np.nan)
        return pd.to_numeric(frame[name], errors="coerce").to_numpy(np.float64)

    def per_category(name: str) -> np.ndarray:
        matrix = np.full((len(first), len(categories)), np.nan)
        matrix[mark, category] = numbers(rows, name)
        return matrix.reshape(-1)

    used = heads["used"].fillna(True).astype(bool) if "used" in heads else np.ones(len(first), bool)
    columns: dict[str, Any] = {
        "count": len(first),
        "prompt": typed(heads["prompt_id"].astype(str).map(index_of).to_numpy(np.int64), "u32"),
        "position": typed(heads["position"].to_numpy(np.int64), "u32"),
        "n": typed(heads["n"].to_numpy(np.int64), "i32"),
        "sequence": typed(heads["sequence"].astype(str).map(sequence).to_numpy(np.int64), "u32"),
        "used": typed(np.asarray(used, dtype=np.uint8), "u8"),
    }
    columns.update({name: typed(numbers(heads, name), "f64") for name in FIT_MARK_FLOATS})
    floats = FIT_CATEGORY_FLOATS + (("baseline_prob",) if with_baseline else ())
    columns.update({FIT_CATEGORY_KEYS.get(name, name): typed(per_category(name), "f64") for name in floats})
    return columns


def _codes(keys: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each key's number in order of first appearance, and the row where each number first appears."""
    codes, _ = pd.factorize(keys, sort=False)
    return codes, np.unique(codes, return_index=True)[1]


def page_data(trace: Trace, fit: Any = None, baseline: Trace | None = None) -> dict[str, Any]:
    """The whole data model: the trace, the fit (a FitTable of this trace) and the baseline trace when given."""
    data = trace_data(trace, baseline)
    if fit is not None:
        data["fit"] = fit_data(trace, fit, data["prompts"], baseline)
    return data
