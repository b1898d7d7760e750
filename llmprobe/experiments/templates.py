"""The template language: how an experiment's text fields become prompts with marks.

A template is one sentence frame. Its text fields are parsed once, at load time, into *pieces*:
``("lit", text)`` for literal text and ``("field", name)`` for a placeholder. ``example`` is split at
``{outcome}`` into a head (before) and a tail (after), so a prompt is
``instruction + prefix + head + outcome + tail + separator + head + ...`` and a mark sits after every
head, right where the next outcome would be written (``render.build_prompt`` assembles it).

Two forms (docs/experiments.md):

* the single ``[template]`` table: only ``example`` is a format string, with ``{outcome}``,
  ``{cue}`` and ``{index}``; ``prefix`` and ``separator`` are literal text, so its prompts are
  byte-for-byte those of the first llmprobe versions;
* ``[[templates]]``: every text field is a format string that may also hold the value placeholders
  ``{theta}``, ``{theta_percent}``, ``{category}`` (each also indexed, ``{theta[1]}``), ``{n}`` and
  ``{n_max}``; an optional ``instruction`` opens the prompt and is the split point of
  ``trace --chat prefill``.

Invariants, checked when a definition loads so a bad template never reaches generation: ``example``
holds ``{outcome}`` exactly once; every placeholder is known, has no format spec or conversion, and an
indexed one names an existing category; ``{cue}`` and ``cues`` come together, with enough distinct cues
for every example of a sequence; the text right before every mark is non-empty and does not end in
whitespace (the space belongs to the targets, " heads"). Literal braces are written ``{{`` and ``}}``.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterable

from llmprobe.errors import UsageError
from llmprobe.experiments.schema import TEMPLATES_KEYS, check_keys, check_str, require_str

__all__ = ["Pieces", "Template", "check_cue_count", "parse_legacy_template", "parse_template"]

TEMPLATE_FIELDS = ("outcome", "cue", "index")  # the example's own placeholders
VALUE_FIELDS = ("theta", "theta_percent", "category", "n", "n_max")  # [[templates]]: any text field
_VALUE_RE = re.compile(r"(?P<vec>theta|theta_percent|category)(?:\[(?P<i>\d+)\])?\Z|(?:n|n_max)\Z")

Pieces = tuple[tuple[str, str], ...]  # ("lit", text) / ("field", placeholder name)


@dataclass(frozen=True)
class Template:
    """One sentence frame, its text fields parsed into pieces (literal text and placeholders)."""

    index: int
    name: str  # "" when the definition gives none
    instruction: Pieces  # () when none; the prompt then has no split point
    prefix: Pieces
    separator: Pieces
    head: Pieces  # `example` before {outcome}
    tail: Pieces  # `example` after {outcome}
    cues: tuple[str, ...] | None
    has_instruction: bool


def parse_legacy_template(tpl: dict[str, Any], categories, n_max: int, where: str) -> Template:
    """The single ``[template]`` table: ``example`` is the one format string; prefix and separator are literal."""
    prefix = require_str(tpl, "prefix", "template.", where, allow_empty=True)
    separator = require_str(tpl, "separator", "template.", where, allow_empty=True)
    example = require_str(tpl, "example", "template.", where)
    head, tail, fields = _parse_example(example, where)
    cues = _template_cues(tpl, fields, n_max, "template.", where)
    _check_mark_context(((("lit", prefix),) if prefix else (), "template.prefix"),
                        (((("lit", separator),) if separator else ()), "template.separator"),
                        head, tail, "template.example", categories, cues, "template.cues", "template", where)
    return Template(0, "", (), (("lit", prefix),) if prefix else (), (("lit", separator),) if separator else (),
                    head, tail, cues, False)


def parse_template(index: int, own: dict[str, Any], shared: dict[str, Any], categories, n_max: int,
                   has_phases: bool, where: str) -> Template:
    """Entry ``index`` of ``[[templates]]``, its missing fields taken from the shared ``[template]`` table."""
    scope = f"templates[{index}]."
    check_keys(own, TEMPLATES_KEYS, scope, where)
    merged = {**shared, **own}
    label = {key: (scope if key in own else "template.") + key for key in merged}
    k = len(categories)

    def text(key: str, *, required: bool, allow_empty: bool = True) -> Pieces:
        if key not in merged:
            if required:
                raise UsageError(f"{scope}{key}: missing required key (here or in [template])", where=where)
            return ()
        value = check_str(merged[key], label[key], where, allow_empty=allow_empty)
        return _parse_format(value, label[key], where, k, has_phases, example=False)

    name = check_str(own["name"], f"{scope}name", where) if "name" in own else ""
    instruction = text("instruction", required=False)
    prefix = text("prefix", required=True)
    separator = text("separator", required=True)
    if "example" not in merged:
        raise UsageError(f"{scope}example: missing required key (here or in [template])", where=where)
    example = check_str(merged["example"], label["example"], where)
    pieces = _parse_format(example, label["example"], where, k, has_phases, example=True)
    head, tail, fields = _split_at_outcome(pieces, label["example"], where)
    cues = _template_cues(merged, fields, n_max, "template." if "cues" not in own else scope, where,
                          example_label=label["example"])
    _check_mark_context((prefix, label["prefix"]), (separator, label["separator"]), head, tail, label["example"],
                        categories, cues, label.get("cues", scope + "cues"), scope.rstrip("."), where)
    return Template(index, name, instruction, prefix, separator, head, tail, cues, "instruction" in merged)


def _template_cues(tpl: dict[str, Any], fields: set[str], n_max: int, scope: str, where: str,
                   example_label: str = "template.example") -> tuple[str, ...] | None:
    if "cues" in tpl:
        cues = _parse_cues(tpl["cues"], where, f"{scope}cues")
        if "cue" not in fields:
            raise UsageError(f"{scope}cues is given but {example_label} has no {{cue}}", where=where)
        check_cue_count(len(cues), n_max, where, None, f"{scope}cues")
        return cues
    if "cue" in fields:
        raise UsageError(f"{example_label} uses {{cue}} but {scope}cues is missing", where=where)
    return None


def _parse_cues(raw: Any, where: str, label: str = "template.cues") -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"{label}: must be a non-empty array of strings", where=where)
    seen: dict[str, int] = {}
    for i, c in enumerate(raw):
        check_str(c, f"{label}[{i}]", where)
        if c in seen:
            raise UsageError(f"{label}[{i}]: duplicate {c!r} (same as cues[{seen[c]}])", where=where)
        seen[c] = i
    return tuple(raw)


def check_cue_count(n_cues: int, n_max: int, where: str, label: str | None, key: str = "template.cues") -> None:
    """Each example of a sequence, and the last mark, get a different cue (``label``: an override to lower)."""
    if n_cues < n_max + 1:
        raise UsageError(
            f"{key}: has {n_cues} cues but n_max = {n_max} needs {n_max + 1}"
            " (each example of a sequence gets a different cue, including the one at the last mark)"
            + (f"; lower {label}" if label else ""),
            where=where,
        )


def _parse_example(example: str, where: str) -> tuple[tuple, tuple, set[str]]:
    """The original form: split `example` at {outcome}; only {outcome}, {cue}, {index}."""
    try:
        parsed = list(string.Formatter().parse(example))
    except ValueError as e:
        raise UsageError(f"template.example: {e} (write {{{{ and }}}} for literal braces)", where=where) from None
    pieces: list[tuple[str, str]] = []
    for literal, field, spec, conversion in parsed:
        if literal:
            pieces.append(("lit", literal))
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS or spec or conversion:
            raise UsageError(
                f"template.example: unknown placeholder {_shown(field, spec, conversion)}; allowed: "
                + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
                + " (write {{ and }} for literal braces)",
                where=where,
            )
        pieces.append(("field", field))
    return _split_at_outcome(tuple(pieces), "template.example", where)


def _shown(field: str, spec: str | None, conversion: str | None) -> str:
    return "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"


def _parse_format(text: str, label: str, where: str, k: int, has_phases: bool, *, example: bool) -> Pieces:
    """A [[templates]] text field as pieces; value placeholders are checked against the categories."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise UsageError(f"{label}: {e} (write {{{{ and }}}} for literal braces)", where=where) from None
    allowed = [*(TEMPLATE_FIELDS if example else ()), *VALUE_FIELDS]
    pieces: list[tuple[str, str]] = []
    for literal, field, spec, conversion in parsed:
        if literal:
            pieces.append(("lit", literal))
        if field is None:
            continue
        match = _VALUE_RE.match(field)
        if spec or conversion or not (match or (example and field in TEMPLATE_FIELDS)):
            raise UsageError(
                f"{label}: unknown placeholder {_shown(field, spec, conversion)}; allowed here: "
                + ", ".join("{" + f + "}" for f in allowed)
                + " ({theta}, {theta_percent} and {category} also as {theta[i]}: category i, from 0;"
                " write {{ and }} for literal braces)",
                where=where,
            )
        if match and match.group("vec"):
            if has_phases and match.group("vec") != "category":
                raise UsageError(f"{label}: {{{field}}} has no single value when experiment.phases chain several θ",
                                 where=where)
            i = int(match.group("i") or 0)
            if i >= k:
                raise UsageError(f"{label}: {{{field}}} names category {i}, but there are {k} (0..{k - 1})",
                                 where=where)
        pieces.append(("field", field))
    return tuple(pieces)


def _split_at_outcome(pieces: Pieces, label: str, where: str) -> tuple[Pieces, Pieces, set[str]]:
    fields = {value for kind, value in pieces if kind == "field"}
    n_outcome = sum(1 for piece in pieces if piece == ("field", "outcome"))
    if n_outcome != 1:
        raise UsageError(f"{label}: must contain {{outcome}} exactly once, found {n_outcome}", where=where)
    at = pieces.index(("field", "outcome"))
    return tuple(pieces[:at]), tuple(pieces[at + 1 :]), fields


def _check_mark_context(prefix: tuple[Pieces, str], separator: tuple[Pieces, str], head: Pieces, tail: Pieces,
                        example_label: str, categories, cues, cues_label: str, scope: str, where: str) -> None:
    """The text right before every mark must be non-empty and must not end in whitespace.

    Walks back from a mark through the pieces that can precede it and looks at the first
    non-empty one. Before mark 0: prefix + head. Before mark j>0: outcome text + tail + separator + head.
    Value placeholders render as numbers (never empty, never ending in whitespace) or category names.
    """

    def check(chars: Iterable[str], source: str) -> None:
        for ch in chars:
            if ch.isspace():
                raise UsageError(
                    f"{source} ends with whitespace ({ch!r}) right before an outcome, so a prompt or mark would"
                    " end in whitespace; move the space into the targets instead"
                    " (example = \"...{outcome}\" with target = \" heads\")",
                    where=where,
                )

    def walk(pieces: list[tuple[str, str, str]]) -> bool:
        for kind, value, source in reversed(pieces):
            if kind == "lit":
                if value:
                    check([value[-1]], source)
                    return True
            elif value == "cue":
                check([c[-1] for c in cues or ()], f"a cue in {cues_label}")
                return True
            elif value == "outcome":
                check([c.text[-1] for c in categories], "a category's text/target")
                return True
            elif value.startswith("category"):
                check([c.name[-1] for c in categories], f"a category name ({{{value}}} in {source})")
                return True
            else:  # {index} and the numbers
                return True
        return False

    def labelled(pieces: Pieces, source: str) -> list[tuple[str, str, str]]:
        return [(kind, value, source) for kind, value in pieces]

    head_pieces = labelled(head, f"{example_label} (before {{outcome}})")
    prefix_pieces, prefix_label = prefix
    if not walk(labelled(prefix_pieces, prefix_label) + head_pieces):
        raise UsageError(
            f"{scope}: prefix and the text before {{outcome}} are both empty, so the first mark would be at"
            " offset 0 with no text to predict from",
            where=where,
        )
    tail_pieces = labelled(tail, f"{example_label} (after {{outcome}})")
    separator_pieces, separator_label = separator
    walk([("field", "outcome", "")] + tail_pieces + labelled(separator_pieces, separator_label) + head_pieces)
