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

Shuffled orders (``experiment --permutations K``) carry ``permutation`` (1..K) and ``permutation_of`` (the
original's id): their marks are kept with ``permutation`` > 0 and ``order_of`` naming the original prompt,
under a sequence key of their own (their outcomes are in another order), and must reorder the original's
examples exactly. :meth:`CategoryMarks.originals` is the trace without them: every fit reads only the
original orders, so a trace gives the same fits whether or not its shuffled orders were traced too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from llmprobe.errors import UsageError
from llmprobe.tracing.reader import Trace, json_objects


@dataclass
class CategoryMarks:
    """One row per measurement point; arrays aligned with ``marks``."""

    label: str  # which trace (model) these come from
    categories: list[str]
    marks: pd.DataFrame  # prompt_id, prompt_index, position, sequence, n, layout, template, exact, permutation,
    # order_of
    probs: np.ndarray  # (M, K) model probabilities renormalized over the categories
    mass: np.ndarray  # (M,) total model probability on the category set
    counts: np.ndarray | None  # (M, K) running counts of the in-context examples, if known
    theta: np.ndarray | None  # (M, K) true category distribution, if known
    outcomes: dict[Any, list[int]]  # sequence -> outcomes in order, if known
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.marks)

    @property
    def has_permutations(self) -> bool:
        return bool((self.marks["permutation"] > 0).any())

    def originals(self) -> CategoryMarks:
        """The marks of the original orders only (this object itself when the trace has no shuffled orders)."""
        if not self.has_permutations:
            return self
        keep = (self.marks["permutation"] == 0).to_numpy()
        marks = self.marks[keep].reset_index(drop=True)
        kept = set(marks["sequence"])
        return CategoryMarks(
            label=self.label, categories=self.categories, marks=marks, probs=self.probs[keep], mass=self.mass[keep],
            counts=None if self.counts is None else self.counts[keep],
            theta=None if self.theta is None else self.theta[keep],
            outcomes={key: value for key, value in self.outcomes.items() if key in kept}, meta=self.meta)


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
    metas = json_objects(scored.column("meta").to_pylist(), "meta", trace.source, empty={})
    marks = json_objects(scored.column("mark").to_pylist(), "mark", trace.source, empty={})
    _check_fields(metas, marks, trace.source)
    categories, columns = _category_columns(metas, trace_targets, trace.source)
    _refuse_overlapping_targets([trace.meta.get("targets", [])[c] for c in columns], trace.source)
    logprobs = np.asarray(scored.column("target_seq_logprobs").to_pylist(), dtype=np.float64)[:, columns]
    if not np.all(np.isfinite(logprobs)):
        raise UsageError("non-finite target log-probabilities in the trace", where=trace.source)
    shifted = np.exp(logprobs - logprobs.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    mass = np.exp(logprobs).sum(axis=1)
    prompt_ids = scored.column("prompt_id").to_pylist()
    permutation, order_of = _orders(metas, prompt_ids, trace.source)
    frame = pd.DataFrame({
        "prompt_id": prompt_ids,
        "prompt_index": scored.column("prompt_index").to_numpy(),
        "position": scored.column("position").to_numpy(),
        # a shuffled order's outcomes differ in order from its original's: a sequence of its own
        "sequence": [m.get("sequence", pid) if not k else f"{m.get('sequence', pid)}/p{k}"
                     for m, pid, k in zip(metas, prompt_ids, permutation)],
        "n": [mk.get("n") for mk in marks],
        "layout": [m.get("layout") for m in metas],
        "template": [m.get("template", 0) for m in metas],  # [[templates]] experiments; 0 otherwise
        "exact": [bool(mk.get("exact", True)) for mk in marks],
        "permutation": permutation,
        "order_of": order_of,  # the original order's prompt id (its own for an original)
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
    if counts is not None and any(permutation):
        _check_reorderings(frame, counts, trace.source)
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


def next_outcomes(outcomes: list[np.ndarray], sequence: np.ndarray, position: np.ndarray) -> np.ndarray:
    """(M,) per mark (as :func:`sequence_inputs` gives them): the outcome that came next, or -1 after the last."""
    return np.array([outcomes[s][p] if p < outcomes[s].size else -1 for s, p in zip(sequence, position)],
                    dtype=np.int64)


def _orders(metas: list[dict], prompt_ids: list, source: str) -> tuple[list[int], list]:
    """Per row: its permutation number (0: an original order) and the prompt id of its original order."""
    permutation, order_of = [], []
    for meta, prompt_id in zip(metas, prompt_ids):
        k = meta.get("permutation", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise UsageError(f"prompt {prompt_id!r}: 'permutation' must be a whole number >= 0, got {k!r}",
                             where=source)
        original = meta.get("permutation_of") if k else prompt_id
        if original is None:
            raise UsageError(f"prompt {prompt_id!r} is shuffled order {k} but names no 'permutation_of'", where=source)
        permutation.append(k)
        order_of.append(str(original))
    return permutation, order_of


def _check_reorderings(frame: pd.DataFrame, counts: np.ndarray, source: str) -> None:
    """Every shuffled order ends with its original's counts: the same examples, reordered."""
    last = frame.assign(_row=np.arange(len(frame))).sort_values("n").groupby("prompt_id")["_row"].last()
    final = {prompt_id: counts[row] for prompt_id, row in last.items()}
    for prompt_id, original in frame.loc[frame["permutation"] > 0, ["prompt_id", "order_of"]].drop_duplicates(
            "prompt_id").itertuples(index=False):
        if original not in final:
            raise UsageError(f"prompt {prompt_id!r} is a shuffled order of {original!r}, which is not in the trace",
                             where=source)
        if not np.array_equal(final[prompt_id], final[original]):
            raise UsageError(f"prompt {prompt_id!r} is not a reordering of {original!r}: its examples' counts differ",
                             where=source)


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


NUMBER_LISTS = ("counts", "theta")
"""Mark (or prompt) fields that are lists of numbers, one per category."""


def _check_fields(metas: list[dict], marks: list[dict], source: str) -> None:
    """The experiment fields the fits read have their types: ``n`` a whole number >= 0; ``counts``, ``theta``
    lists of numbers; ``outcomes`` a list of whole numbers >= 0; ``categories``, ``targets`` lists of strings;
    ``sequence`` a string or a number. A field from another tool that breaks this is one line naming it."""
    def refuse(name: str, value: Any) -> UsageError:
        return UsageError(f"a prompt's {name!r} is {value!r}, which an experiment never writes (the trace's prompts"
                          " were not made by llmprobe experiment, or the file is damaged)", where=source)

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def numbers(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)

    for holder in [*{id(m): m for m in metas}.values(), *marks]:
        if holder.get("n") is not None and not whole(holder["n"]):
            raise refuse("n", holder["n"])
        for name in NUMBER_LISTS:
            if holder.get(name) is not None and not numbers(holder[name]):
                raise refuse(name, holder[name])
        if holder.get("outcomes") is not None and not (isinstance(holder["outcomes"], list)
                                                       and all(whole(o) for o in holder["outcomes"])):
            raise refuse("outcomes", holder["outcomes"])
        for name in ("categories", "targets"):
            if holder.get(name) is not None and not (isinstance(holder[name], list)
                                                     and all(isinstance(v, str) for v in holder[name])):
                raise refuse(name, holder[name])
        sequence = holder.get("sequence")
        if sequence is not None and (isinstance(sequence, bool) or not isinstance(sequence, (str, int, float))):
            raise refuse("sequence", sequence)
