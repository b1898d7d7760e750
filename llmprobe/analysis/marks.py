"""From a trace to category distributions at marks: the bridge between traces and ``llmprobe.bayes``.

At every marked row (and, for each prompt without marks, its last prompt position) the model's
probability of each category is the exponentiated whole-string score of the category's target
(``target_seq_logprobs``, so multi-token targets are scored as continuations). The distribution is
renormalized over the category set, and the mass the model put on the set is kept: mass outside
the set is part of the finding. Experiment prompts carry ``categories``, ``targets``, ``theta``,
``sequence``, ``outcomes`` (and, from ``[[templates]]``, ``template``) in their metadata and ``n``/``counts``
(and, in a chain of θs, ``theta``) in each mark; the tracer adds ``"exact": false`` to a mark that
falls inside a token (kept in the ``exact`` column). Targets whose tokens nest (" z" begins " zorp")
are refused: their probabilities are not disjoint events.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from llmprobe.errors import UsageError
from llmprobe.tracing.reader import Trace


@dataclass
class CategoryMarks:
    """One row per measurement point; arrays aligned with ``marks``."""

    label: str  # which trace (model) these come from
    categories: list[str]
    marks: pd.DataFrame  # prompt_id, prompt_index, position, sequence, n, layout, template, exact
    probs: np.ndarray  # (M, K) model probabilities renormalized over the categories
    mass: np.ndarray  # (M,) total model probability on the category set
    counts: np.ndarray | None  # (M, K) running counts of the in-context examples, if known
    theta: np.ndarray | None  # (M, K) true category distribution, if known
    outcomes: dict[Any, list[int]]  # sequence -> outcomes in order, if known
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.marks)


def trace_label(trace: Trace) -> str:
    return str(trace.meta.get("model") or trace.source)


CATEGORY_INPUT = "a trace with target scores (traced with --targets, or from prompts that carry their targets)"


def category_marks(trace: Trace, label: str | None = None, *, needs: str = CATEGORY_INPUT) -> CategoryMarks:
    """Extract the category distributions at every mark of ``trace``. ``needs``: what the caller needs,
    named whole in the error when the trace has no target scores (so one message lists every requirement)."""
    if "target_seq_logprobs" not in trace.table.column_names:
        raise UsageError(f"the trace has no target scores (column target_seq_logprobs); this needs {needs}",
                         where=trace.source)
    table = trace.table
    if "layer" in table.column_names:  # a logit-lens trace: the output layer's rows are the model's
        layers = table.column("layer").to_numpy()
        table = table.filter(layers == layers.max())
    scored = table.filter(table.column("target_seq_logprobs").is_valid())
    # per prompt: its marked rows, or (a prompt without marks) its one scored row, the last position
    marked = scored.column("mark_index").is_valid().to_numpy(zero_copy_only=False)
    prompt_index = scored.column("prompt_index").to_numpy()
    scored = scored.filter(pa.array(marked | ~np.isin(prompt_index, np.unique(prompt_index[marked]))))
    if scored.num_rows == 0:
        raise UsageError("trace has no marked rows with target scores", where=trace.source)
    trace_targets = [t["text"] for t in trace.meta.get("targets", [])]
    metas = [json.loads(m) if m else {} for m in scored.column("meta").to_pylist()]
    marks = [json.loads(m) if m else {} for m in scored.column("mark").to_pylist()]
    categories, columns = _category_columns(metas, trace_targets, trace.source)
    _refuse_overlapping_targets([trace.meta.get("targets", [])[c] for c in columns], trace.source)
    logprobs = np.asarray(scored.column("target_seq_logprobs").to_pylist(), dtype=np.float64)[:, columns]
    if not np.all(np.isfinite(logprobs)):
        raise UsageError("non-finite target log-probabilities in the trace", where=trace.source)
    shifted = np.exp(logprobs - logprobs.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    mass = np.exp(logprobs).sum(axis=1)
    frame = pd.DataFrame({
        "prompt_id": scored.column("prompt_id").to_pylist(),
        "prompt_index": scored.column("prompt_index").to_numpy(),
        "position": scored.column("position").to_numpy(),
        "sequence": [m.get("sequence", pid) for m, pid in zip(metas, scored.column("prompt_id").to_pylist())],
        "n": [mk.get("n") for mk in marks],
        "layout": [m.get("layout") for m in metas],
        "template": [m.get("template", 0) for m in metas],  # [[templates]] experiments; 0 otherwise
        "exact": [bool(mk.get("exact", True)) for mk in marks],
    })
    counts = _optional_matrix([mk.get("counts") for mk in marks], len(categories))
    # a chain of θs (experiment.phases) gives each mark its own θ
    theta = _optional_matrix([mk.get("theta", m.get("theta")) for m, mk in zip(metas, marks)], len(categories))
    if counts is not None and frame["n"].isna().any():
        frame["n"] = counts.sum(axis=1)
    order = np.lexsort((frame["position"].to_numpy(), frame["prompt_index"].to_numpy()))
    outcomes = {}  # in input order, whatever the storage order (processing order, Ray parts, a sorted DataFrame)
    sequences = frame["sequence"].tolist()
    for row in order:
        meta, sequence = metas[row], sequences[row]
        seq_outcomes = meta.get("outcomes")
        if isinstance(seq_outcomes, list) and (sequence not in outcomes  # an n = 0 prompt may be its own sequence
                                               or len(seq_outcomes) > len(outcomes[sequence])):
            outcomes[sequence] = seq_outcomes
    return CategoryMarks(
        label=label or trace_label(trace),
        categories=categories,
        marks=frame.iloc[order].reset_index(drop=True),
        probs=probs[order],
        mass=mass[order],
        counts=None if counts is None else counts[order],
        theta=None if theta is None else theta[order],
        outcomes=outcomes,
        meta=trace.meta,
    )


def sequence_inputs(cm: CategoryMarks, needs: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The marks' outcome sequences and, per mark, its sequence's number and position (examples before
    it): the filter fits' inputs. ``needs``: what the caller needs, said when the marks carry no outcomes."""
    if not cm.outcomes:
        raise UsageError(f"the marks carry no outcome sequences; {needs}", where=cm.label)
    keys = list(cm.outcomes)
    index = {k: i for i, k in enumerate(keys)}
    try:
        sequence = np.array([index[s] for s in cm.marks["sequence"]])
    except KeyError as exc:
        raise UsageError(f"sequence {exc.args[0]!r} has marks but no outcomes") from None
    return [np.asarray(cm.outcomes[k], dtype=np.int64) for k in keys], sequence, cm.marks["n"].to_numpy(dtype=np.int64)


def _category_columns(metas: list[dict], trace_targets: list[str], source: str) -> tuple[list[str], list[int]]:
    """Category names and, for each, its column in the trace's target list."""
    declared = {(tuple(m["categories"]), tuple(m["targets"])) for m in metas
                if isinstance(m.get("categories"), list) and isinstance(m.get("targets"), list)}
    if len(declared) > 1:
        raise UsageError("prompts declare different category sets; fit them separately", where=source)
    if not declared:
        return list(trace_targets), list(range(len(trace_targets)))
    names, targets = (list(x) for x in declared.pop())
    missing = [t for t in targets if t not in trace_targets]
    if missing:
        raise UsageError(f"the trace did not score target(s) {', '.join(map(repr, missing))}", where=source)
    return names, [trace_targets.index(t) for t in targets]


def _refuse_overlapping_targets(targets: list[dict], source: str) -> None:
    """Categories must be disjoint events: no target's tokens may begin another target's tokens."""
    for a in targets:
        for b in targets:
            ids_a, ids_b = a.get("token_ids"), b.get("token_ids")
            if a is b or not ids_a or not ids_b:
                continue
            if len(ids_a) < len(ids_b) and list(ids_b[: len(ids_a)]) == list(ids_a):
                raise UsageError(f"targets {a['text']!r} and {b['text']!r} overlap ({a['text']!r} is the first"
                                 f" token(s) of {b['text']!r}): their events are nested, not disjoint categories;"
                                 " choose targets whose first tokens differ", where=source)


def _optional_matrix(values: list[Any], width: int) -> np.ndarray | None:
    if not values or any(not isinstance(v, list) or len(v) != width for v in values):
        return None
    return np.asarray(values, dtype=np.float64)
