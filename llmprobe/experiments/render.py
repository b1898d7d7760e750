"""From a validated :class:`~llmprobe.experiments.config.Experiment` to prompt records: text, marks, layouts.

A prompt is ``instruction + prefix + head₀ + outcome₀ + tail₀ + separator + head₁ + ...``; a mark
is recorded after every head, where the next outcome would be written, with the running ``counts``
of each category before it (and, for a chain of phases, the θ the next outcome is drawn from). The
text of a mark is what ``llmprobe trace`` conditions on; ``fit-posterior`` compares the model's
distribution there with the Dirichlet predictive for those counts.

Layouts: ``marks`` is one record per sequence holding every mark; ``per-n`` is one record per n
(0..n_max, or ``experiment.ns``) whose only mark is at its end, cut from the same sequence
(``draws = "nested"``) or with outcomes of its own (``draws = "independent"``); ``both`` is both.

Shuffled orders (``experiment.permutations = K``, marks layout only): each marks record is followed by K
records of the same examples in random orders, ids ``NAME-sSSSS-pKK``, the same ``sequence``, θ and
replicate, and ``permutation_of`` (the original's id) and ``permutation`` (1..K). An example is an
(outcome, cue) pair, so cues move with their outcomes; the cue after the last example (the query) stays.
The orders come from a stream of their own (suffix ``(4,)``), drawn one after another, so raising K keeps
the earlier orders, and K = 0 writes exactly the records it always did.

Invariants: record ids are ``NAME-sSSSS[-nNN]`` with zero-padded numbers, unique and in file order
(θ, then template, then replicate, then n); mark offsets are character offsets into ``prompt``
(Python str indices); the same experiment and arguments give the same records, byte for byte, since
every draw comes from a stream keyed by value (:mod:`~llmprobe.experiments.sampling`). Numbers in
text render with ``%.6g``.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Iterable, Iterator

from llmprobe.experiments.config import Experiment
from llmprobe.experiments.sampling import Phase, phase_of, sample_outcomes, schedule_key, streams
from llmprobe.experiments.templates import Template

__all__ = ["build_prompt", "generate", "render_pieces"]


def _number(x: float) -> str:
    return f"{x:.6g}"


def _values(exp: Experiment, theta: tuple[float, ...], n: int) -> dict[str, str]:
    """What each value placeholder renders as, for one θ and a prompt holding n examples."""
    values = {"n": str(n), "n_max": str(exp.n_max)}
    for i, (category, p) in enumerate(zip(exp.categories, theta)):
        values[f"theta[{i}]"] = _number(p)
        values[f"theta_percent[{i}]"] = _number(100 * p)
        values[f"category[{i}]"] = category.name
    for name in ("theta", "theta_percent", "category"):
        values[name] = values[f"{name}[0]"]
    return values


def render_pieces(pieces: Iterable[tuple[str, str]], index: int, cue: str | None,
                  values: dict[str, str] | None = None) -> str:
    """Template pieces as text: ``{index}`` is 1-based, ``{cue}`` the given cue, value placeholders from ``values``."""
    out = []
    for kind, value in pieces:
        if kind == "lit":
            out.append(value)
        elif value == "cue":
            out.append(cue or "")
        elif value == "index":
            out.append(str(index + 1))
        else:
            out.append((values or {})[value])
    return "".join(out)


def build_prompt(exp: Experiment, template: Template, schedule: tuple[Phase, ...], outcomes: list[int],
                 cues: list[str] | None, n_text: int) -> tuple[str, list[dict[str, Any]], int | None]:
    """The prompt holding ``outcomes``, its marks (one before each outcome and one at the end) and the
    split point (the instruction's length; None without one). ``n_text`` is what {n} renders as."""
    values = _values(exp, schedule[0][0], n_text)
    instruction = render_pieces(template.instruction, 0, None, values)
    prefix = render_pieces(template.prefix, 0, None, values)
    separator = render_pieces(template.separator, 0, None, values)
    chained = exp.phases is not None
    parts = [instruction, prefix]
    length = len(instruction) + len(prefix)
    marks: list[dict[str, Any]] = []
    counts = [0] * len(exp.categories)
    for j in range(len(outcomes) + 1):
        cue = cues[j] if cues is not None else None
        if j > 0:
            prev = outcomes[j - 1]
            prev_cue = cues[j - 1] if cues is not None else None
            chunk = exp.categories[prev].text + render_pieces(template.tail, j - 1, prev_cue, values) + separator
            parts.append(chunk)
            length += len(chunk)
            counts[prev] += 1
        head = render_pieces(template.head, j, cue, values)
        parts.append(head)
        length += len(head)
        mark: dict[str, Any] = {"offset": length, "n": j, "counts": list(counts)}
        if chained:  # the θ the next outcome is drawn from
            mark["theta"] = list(schedule[phase_of(schedule, j)][0])
        marks.append(mark)
    return "".join(parts), marks, (len(instruction) if template.has_instruction else None)


def generate(
    experiment: Experiment,
    *,
    seed: int | None = None,
    n_max: int | None = None,
    sequences: int | None = None,
    layout: str | None = None,
    permutations: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Prompt records, lazily (see docs/experiments.md); arguments that are not None override the TOML.

    Order: for each θ (file order), for each template, for each replicate, the "marks" record (followed by its
    shuffled orders) and/or the "per-n" records n = 0..n_max (or experiment.ns). Deterministic: the same
    experiment and arguments give the same records.
    """
    # Overrides are validated here, eagerly, so a bad flag fails before any record is written.
    exp = experiment.with_overrides(seed=seed, n_max=n_max, sequences=sequences, layout=layout,
                                    permutations=permutations)
    return _records(exp)


def _records(exp: Experiment) -> Iterator[dict[str, Any]]:
    ns = list(exp.ns) if exp.ns is not None else list(range(exp.n_max + 1))
    with_marks, with_per_n = exp.layout in ("marks", "both"), exp.layout in ("per-n", "both")
    independent = exp.draws == "independent" and with_per_n
    per_unit = (1 if with_marks or not independent else 0) + (len(ns) if independent else 0)
    n_sequences = len(exp.schedules) * len(exp.templates) * exp.sequences * per_unit
    width_s = max(4, len(str(n_sequences - 1)))
    width_n = max(2, len(str(exp.n_max)))
    seq = 0
    for ti, schedule in enumerate(exp.schedules):
        key = schedule_key(schedule)
        for template in exp.templates:
            own = (2, template.index) if exp.templated and exp.template_draws == "own" else ()

            def draw(rep: int, n: int, extra: tuple[int, ...]) -> tuple[list[int], list[str] | None]:
                rng_out, rng_cue = streams(exp.seed, key, rep, own + extra)
                outcomes = sample_outcomes(rng_out, schedule, n)
                if template.cues is None:
                    return outcomes, None
                order = rng_cue.permutation(len(template.cues))[: n + 1]
                return outcomes, [template.cues[int(i)] for i in order]

            def record(rid: str, sequence: int, rep: int, layout: str, outcomes: list[int], cues, n_text: int,
                       marks_kept: slice) -> dict[str, Any]:
                prompt, marks, split = build_prompt(exp, template, schedule, outcomes, cues, n_text)
                theta = schedule[phase_of(schedule, len(outcomes))][0] if exp.phases else schedule[0][0]
                rec: dict[str, Any] = {
                    "id": rid, "prompt": prompt, "marks": marks[marks_kept],
                    "targets": exp.targets,
                    "categories": exp.category_names,
                    "theta": list(theta),
                    "experiment": exp.name,
                    "sequence": sequence,
                    "theta_index": ti,
                    "replicate": rep,
                    "n_max": exp.n_max,
                    "seed": exp.seed,
                }
                if exp.templated:
                    rec["template"] = template.index
                    if template.name:
                        rec["template_name"] = template.name
                if split is not None:
                    rec["split"] = split
                if exp.phases is not None:
                    rec["phases"] = [{"theta": list(t), "n": n} for t, n in exp.phases]
                rec["layout"] = layout
                rec["outcomes"] = list(outcomes)
                if cues is not None:
                    rec["cues"] = list(cues)
                return rec

            def shuffled(sid: str, sequence: int, rep: int, outcomes: list[int],
                         cues: list[str] | None) -> Iterator[dict[str, Any]]:
                """The same examples in ``exp.permutations`` random orders (cues move with their outcomes)."""
                if not exp.permutations:
                    return
                rng, _ = streams(exp.seed, key, rep, own + (4,))
                width_p = max(2, len(str(exp.permutations)))
                for k in range(1, exp.permutations + 1):
                    order = [int(i) for i in rng.permutation(len(outcomes))]
                    moved = [cues[i] for i in order] + cues[len(outcomes):] if cues is not None else None
                    rec = record(f"{sid}-p{k:0{width_p}d}", sequence, rep, "marks", [outcomes[i] for i in order],
                                 moved, exp.n_max, slice(None))
                    rec["permutation_of"] = sid
                    rec["permutation"] = k
                    yield rec

            for rep in range(exp.sequences):
                outcomes, cues = draw(rep, exp.n_max, ())
                sid = f"{exp.name}-s{seq:0{width_s}d}"
                if with_marks or not independent:
                    if with_marks:
                        yield record(sid, seq, rep, "marks", outcomes, cues, exp.n_max, slice(None))
                        yield from shuffled(sid, seq, rep, outcomes, cues)
                    if with_per_n and not independent:
                        for n in ns:
                            yield record(f"{sid}-n{n:0{width_n}d}", seq, rep, "per-n", outcomes[:n],
                                         cues[: n + 1] if cues is not None else None, n, slice(-1, None))
                    seq += 1
                if independent:
                    for n in ns:
                        fresh, fresh_cues = draw(rep, n, (3, n))
                        yield record(f"{exp.name}-s{seq:0{width_s}d}-n{n:0{width_n}d}", seq, rep, "per-n", fresh,
                                     fresh_cues, n, slice(-1, None))
                        seq += 1
