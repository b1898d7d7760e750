"""Synthetic in-context-learning experiments: TOML definitions in, JSONL prompt records out.

An experiment draws sequences of categorical outcomes from a true distribution θ and writes each
sequence as text ("I just flipped a coin, and it came up heads, then tails, then"), with a *mark*
at every point where the next thing in the text would be the next outcome. ``llmprobe trace``
records the model's next-token distribution at each mark; ``fit-posterior`` compares it with the
Dirichlet predictive (α_k + n_k) / (α_0 + n) for the running counts stored in the mark.

Two forms of definition (docs/experiments.md has the schema):

* one ``[template]`` table: the original form. Only ``example`` is a format string; ``prefix`` and
  ``separator`` are literal. Its output is byte-for-byte what it has always been.
* a ``[[templates]]`` list (the peers' protocols, e.g. Gupta et al. 2025: many sentence frames per
  task): every text field of every template is a format string with the value placeholders
  ``{theta}``, ``{theta_percent}``, ``{category}`` (each also indexed, ``{theta_percent[1]}``),
  ``{n}`` and ``{n_max}``; an optional ``instruction`` opens the prompt and marks the split point
  for ``trace --chat prefill``; every record carries ``template``. A ``[template]`` table next to
  ``[[templates]]`` holds the fields the templates share.

Options of either form: ``draws = "independent"`` redraws the outcomes of every per-n prompt (the
default, "nested", cuts one sequence), ``ns`` picks the n of per-n prompts, ``phases`` replaces θ
by a chain of distributions (θ = 0.75 for 20 draws, then 0.25 ...).

Invariants: same definition and seed, same bytes; each random stream is keyed by the seed, the
value of θ (or of the phases), the replicate and, where draws are independent, the template and n,
so adding θs, templates, sequences or examples leaves existing sequences unchanged. Pure Python +
numpy: nothing here imports torch, evaluates anything from a config, or treats a value as a path.

Public API (what the CLI calls)::

    exp = load_experiment(path)                      # UsageError on any problem, naming the file
    records = generate(exp, seed=..., n_max=..., sequences=..., layout=...)   # overrides or None
    write_jsonl(records, sys.stdout)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import string
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

import numpy as np

from llmprobe.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "DRAWS",
    "LAYOUTS",
    "Category",
    "Experiment",
    "Template",
    "generate",
    "load_experiment",
    "loads_experiment",
    "write_jsonl",
]

LAYOUTS = ("marks", "per-n", "both")
DRAWS = ("nested", "independent")
TEMPLATE_DRAWS = ("own", "shared")
CHAT_MODES = ("prefill",)
THETA_TOLERANCE = 1e-6
TEMPLATE_FIELDS = ("outcome", "cue", "index")  # the example's own placeholders
VALUE_FIELDS = ("theta", "theta_percent", "category", "n", "n_max")  # [[templates]]: any text field
_VALUE_RE = re.compile(r"(?P<vec>theta|theta_percent|category)(?:\[(?P<i>\d+)\])?\Z|(?:n|n_max)\Z")

# Allowed keys per table; anything else is an error (typos must not be silently ignored).
_TOP_KEYS = {"experiment", "template", "templates", "categories", "prior"}  # [prior]: read by `wind-tunnel`
# Examples per sequence: far beyond any model context, yet small enough to generate without exhausting memory.
MAX_EXAMPLES = 100_000
_EXPERIMENT_KEYS = {"name", "description", "layout", "n_max", "sequences", "seed", "theta", "thetas",
                    "draws", "ns", "phases", "template_draws", "chat"}
_TEMPLATE_KEYS = {"prefix", "example", "separator", "cues"}
_TEMPLATES_KEYS = _TEMPLATE_KEYS | {"name", "instruction"}
_CATEGORY_KEYS = {"name", "target", "text"}
_PHASE_KEYS = {"theta", "n"}
_TABLE_OF_KEY = {
    **{k: "[experiment]" for k in _EXPERIMENT_KEYS},
    **{k: "[template]" for k in _TEMPLATE_KEYS},
    **{k: "[[categories]]" for k in _CATEGORY_KEYS},
}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")

Pieces = tuple[tuple[str, str], ...]  # ("lit", text) / ("field", placeholder name)
Phase = tuple[tuple[float, ...], int]  # (θ, number of draws); the last phase of a plain θ never ends


@dataclass(frozen=True)
class Category:
    name: str
    target: str  # what the model would emit right after a mark, leading space included
    text: str  # what {outcome} renders as in the prompt; begins with `target`


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


@dataclass(frozen=True)
class Experiment:
    """A validated experiment definition. Build it with :func:`load_experiment`."""

    name: str
    description: str
    layout: str
    n_max: int
    sequences: int
    seed: int
    thetas: tuple[tuple[float, ...], ...]
    categories: tuple[Category, ...]
    prefix: str  # these five: the first template's raw strings (the single [template] of the original form)
    separator: str
    example: str
    cues: tuple[str, ...] | None
    where: str  # the file (or "<string>") it came from, for error messages
    # `example` split at {outcome}: ("lit", text) / ("field", "cue"|"index") pieces.
    head: tuple[tuple[str, str], ...] = dataclasses.field(repr=False, compare=False, default=())
    tail: tuple[tuple[str, str], ...] = dataclasses.field(repr=False, compare=False, default=())
    templates: tuple[Template, ...] = dataclasses.field(repr=False, default=())
    templated: bool = False  # defined with [[templates]]: records carry `template`
    draws: str = "nested"
    template_draws: str = "own"  # [[templates]]: each template its own draws, or all the same ones
    ns: tuple[int, ...] | None = None  # the n of per-n records (None: 0..n_max)
    phases: tuple[Phase, ...] | None = None  # a chain of θs instead of a sweep
    chat: str | None = None  # "prefill": every template has an instruction (the split point)

    @property
    def targets(self) -> list[str]:
        return [c.target for c in self.categories]

    @property
    def category_names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def schedules(self) -> list[tuple[Phase, ...]]:
        """What each sweep entry draws from: one endless phase per θ, or the one chain of phases."""
        if self.phases is not None:
            return [self.phases]
        return [((theta, -1),) for theta in self.thetas]

    def with_overrides(
        self,
        *,
        seed: int | None = None,
        n_max: int | None = None,
        sequences: int | None = None,
        layout: str | None = None,
    ) -> "Experiment":
        """A copy with CLI overrides applied and validated (UsageError on a bad value)."""
        where = self.where
        changes: dict[str, Any] = {}
        if seed is not None:
            changes["seed"] = _check_int(seed, "seed (override)", where, minimum=0)
        if n_max is not None:
            changes["n_max"] = _check_int(n_max, "n_max (override)", where, minimum=0, maximum=MAX_EXAMPLES)
            if self.phases is not None and changes["n_max"] != self.n_max:
                raise UsageError(f"n_max (override): experiment.phases fix n_max at {self.n_max}", where=where)
            if self.ns is not None and changes["n_max"] < self.ns[-1]:
                raise UsageError(f"n_max (override): experiment.ns needs n_max >= {self.ns[-1]}", where=where)
        if sequences is not None:
            changes["sequences"] = _check_int(sequences, "sequences (override)", where, minimum=1)
        if layout is not None:
            changes["layout"] = _check_layout(layout, "layout (override)", where)
            _check_per_n_options(changes["layout"], self.ns, self.draws, "layout (override)", where)
        new = dataclasses.replace(self, **changes)
        for template in new.templates:
            if template.cues is not None:
                _check_cue_count(len(template.cues), new.n_max, where,
                                 "n_max (override)" if n_max is not None else None,
                                 _scope(new, template) + "cues")
        return new


def _scope(exp: Experiment, template: Template) -> str:
    return f"templates[{template.index}]." if exp.templated else "template."


# ----------------------------------------------------------------------------------------------
# Loading and validation


def load_experiment(path: Path | str) -> Experiment:
    """Read and validate an experiment TOML file. Every problem is a UsageError naming the file."""
    path = Path(path)
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read experiment file: {e.strerror or e}", where=where) from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a BOM some editors add is not TOML
    except UnicodeDecodeError as e:
        raise UsageError(f"not UTF-8 text (byte {e.start}): TOML files must be UTF-8", where=where) from None
    return loads_experiment(text, where=where)


def loads_experiment(text: str, *, where: str = "<string>") -> Experiment:
    """Parse and validate experiment TOML given as a string (``where`` names it in errors)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"invalid TOML: {e}", where=where) from None
    return _parse(data, where)


def _parse(data: dict[str, Any], where: str) -> Experiment:
    _check_keys(data, _TOP_KEYS, "", where)
    exp = _require_table(data, "experiment", where)
    templated = "templates" in data
    shared: dict[str, Any] = {}
    if templated:
        if "template" in data:
            shared = _require_table(data, "template", where)
            _check_keys(shared, _TEMPLATES_KEYS - {"name"}, "template.", where)
    else:
        shared = _require_table(data, "template", where)
        for key in ("instruction", "name"):
            if key in shared:
                raise UsageError(f"template.{key}: only in [[templates]] (the form with placeholders in every"
                                 " text field); a single template is one [[templates]] table", where=where)
        _check_keys(shared, _TEMPLATE_KEYS, "template.", where)
    _check_keys(exp, _EXPERIMENT_KEYS, "experiment.", where)

    name = _require_str(exp, "name", "experiment.", where)
    if not _NAME_RE.match(name):
        raise UsageError(
            f"experiment.name: {name!r} must be letters, digits, '_', '.' or '-' (it starts every record id)",
            where=where,
        )
    description = _optional_str(exp, "description", "experiment.", where, default="")
    layout = _check_layout(exp.get("layout", "marks"), "experiment.layout", where)
    categories = _parse_categories(data, where)
    phases = _parse_phases(exp, len(categories), where) if "phases" in exp else None
    if phases is not None:
        total = sum(n for _, n in phases)
        n_max = _check_int(exp.get("n_max", total), "experiment.n_max", where, minimum=0, maximum=MAX_EXAMPLES)
        if n_max != total:
            raise UsageError(f"experiment.n_max: is {n_max} but the phases hold {total} draws (or leave it out)",
                             where=where)
        thetas = tuple(theta for theta, _ in phases)
    else:
        n_max = _check_int(_require(exp, "n_max", "experiment.", where), "experiment.n_max", where, minimum=0,
                           maximum=MAX_EXAMPLES)
        thetas = _parse_thetas(exp, len(categories), where)
    sequences = _check_int(
        _require(exp, "sequences", "experiment.", where), "experiment.sequences", where, minimum=1
    )
    seed = _check_int(_require(exp, "seed", "experiment.", where), "experiment.seed", where, minimum=0)
    draws = _check_choice(exp.get("draws", "nested"), DRAWS, "experiment.draws", where)
    ns = _parse_ns(exp["ns"], n_max, where) if "ns" in exp else None
    _check_per_n_options(layout, ns, draws, "experiment.layout", where)
    template_draws = _check_choice(exp.get("template_draws", "own"), TEMPLATE_DRAWS, "experiment.template_draws", where)
    if "template_draws" in exp and not templated:
        raise UsageError("experiment.template_draws: only with [[templates]]", where=where)
    chat = _check_choice(exp["chat"], CHAT_MODES, "experiment.chat", where) if "chat" in exp else None

    if templated:
        raw = data["templates"]
        if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
            raise UsageError("templates: must be an array of tables ([[templates]])", where=where)
        if not raw:
            raise UsageError("templates: the template list is empty; give at least one [[templates]] table",
                             where=where)
        templates = tuple(_parse_template(i, t, shared, categories, n_max, phases is not None, where)
                          for i, t in enumerate(raw))
        raw_first = {**shared, **raw[0]}
    else:
        templates = (_parse_legacy_template(shared, categories, n_max, where),)
        raw_first = shared
    if chat == "prefill":
        for t in templates:
            if not t.has_instruction:
                scope = f"templates[{t.index}]." if templated else "template."
                raise UsageError(
                    f"{scope}instruction: missing split point: experiment.chat = \"prefill\" needs an instruction"
                    " (the user turn; the rest of the prompt is the open assistant turn)", where=where)
    first = templates[0]
    return Experiment(
        name=name,
        description=description,
        layout=layout,
        n_max=n_max,
        sequences=sequences,
        seed=seed,
        thetas=thetas,
        categories=categories,
        prefix=raw_first.get("prefix", ""),
        separator=raw_first.get("separator", ""),
        example=raw_first.get("example", ""),
        cues=first.cues,
        where=where,
        head=first.head,
        tail=first.tail,
        templates=templates,
        templated=templated,
        draws=draws,
        template_draws=template_draws,
        ns=ns,
        phases=phases,
        chat=chat,
    )


def _parse_legacy_template(tpl: dict[str, Any], categories, n_max: int, where: str) -> Template:
    prefix = _require_str(tpl, "prefix", "template.", where, allow_empty=True)
    separator = _require_str(tpl, "separator", "template.", where, allow_empty=True)
    example = _require_str(tpl, "example", "template.", where)
    head, tail, fields = _parse_example(example, where)
    cues = _template_cues(tpl, fields, n_max, "template.", where)
    _check_mark_context(((("lit", prefix),) if prefix else (), "template.prefix"),
                        (((("lit", separator),) if separator else ()), "template.separator"),
                        head, tail, "template.example", categories, cues, "template.cues", "template", where)
    return Template(0, "", (), (("lit", prefix),) if prefix else (), (("lit", separator),) if separator else (),
                    head, tail, cues, False)


def _parse_template(index: int, own: dict[str, Any], shared: dict[str, Any], categories, n_max: int,
                    has_phases: bool, where: str) -> Template:
    scope = f"templates[{index}]."
    _check_keys(own, _TEMPLATES_KEYS, scope, where)
    merged = {**shared, **own}
    label = {key: (scope if key in own else "template.") + key for key in merged}
    k = len(categories)

    def text(key: str, *, required: bool, allow_empty: bool = True) -> Pieces:
        if key not in merged:
            if required:
                raise UsageError(f"{scope}{key}: missing required key (here or in [template])", where=where)
            return ()
        value = _check_str(merged[key], label[key], where, allow_empty=allow_empty)
        return _parse_format(value, label[key], where, k, has_phases, example=False)

    name = _check_str(own["name"], f"{scope}name", where) if "name" in own else ""
    instruction = text("instruction", required=False)
    prefix = text("prefix", required=True)
    separator = text("separator", required=True)
    if "example" not in merged:
        raise UsageError(f"{scope}example: missing required key (here or in [template])", where=where)
    example = _check_str(merged["example"], label["example"], where)
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
        _check_cue_count(len(cues), n_max, where, None, f"{scope}cues")
        return cues
    if "cue" in fields:
        raise UsageError(f"{example_label} uses {{cue}} but {scope}cues is missing", where=where)
    return None


def _check_choice(value: Any, choices: tuple[str, ...], label: str, where: str) -> str:
    if value not in choices:
        raise UsageError(f"{label}: must be one of {', '.join(map(repr, choices))}, got {value!r}", where=where)
    return value


def _check_per_n_options(layout: str, ns, draws: str, label: str, where: str) -> None:
    if layout == "marks" and (ns is not None or draws != "nested"):
        key = "experiment.ns" if ns is not None else "experiment.draws"
        raise UsageError(f"{key}: applies to per-n prompts, but {label} is \"marks\"; use \"per-n\" or \"both\"",
                         where=where)


def _parse_ns(raw: Any, n_max: int, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw:
        raise UsageError("experiment.ns: must be a non-empty array of example counts", where=where)
    values = [_check_int(v, f"experiment.ns[{i}]", where, minimum=0) for i, v in enumerate(raw)]
    if any(b <= a for a, b in zip(values, values[1:])):
        raise UsageError(f"experiment.ns: must increase strictly, got {values}", where=where)
    if values[-1] > n_max:
        raise UsageError(f"experiment.ns: {values[-1]} is above n_max = {n_max}", where=where)
    return tuple(values)


def _parse_phases(exp: dict[str, Any], k: int, where: str) -> tuple[Phase, ...]:
    if "theta" in exp or "thetas" in exp:
        raise UsageError("experiment.phases: give phases or theta/thetas, not both", where=where)
    raw = exp["phases"]
    if not isinstance(raw, list) or not raw or not all(isinstance(p, dict) for p in raw):
        raise UsageError("experiment.phases: must be a non-empty array of {theta = [...], n = ...} tables",
                         where=where)
    phases = []
    for i, phase in enumerate(raw):
        scope = f"experiment.phases[{i}]."
        _check_keys(phase, _PHASE_KEYS, scope, where)
        theta = _parse_theta(_require(phase, "theta", scope, where), k, f"{scope}theta", where)
        phases.append((theta, _check_int(_require(phase, "n", scope, where), f"{scope}n", where, minimum=1)))
    return tuple(phases)


def _check_keys(table: dict[str, Any], allowed: set[str], scope: str, where: str) -> None:
    for key in table:
        if key in allowed:
            continue
        hint = ""
        close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
        if key in _TABLE_OF_KEY:
            hint = f" (it belongs in {_TABLE_OF_KEY[key]}"
            if scope.startswith("categories"):
                hint += "; TOML puts keys written after a [[categories]] header into that category"
            hint += ")"
        elif close:
            hint = f" (did you mean {close[0]!r}?)"
        allowed_list = ", ".join(sorted(allowed))
        what = "unknown table" if not scope and isinstance(table[key], dict) else "unknown key"
        raise UsageError(f"{scope}{key}: {what}{hint}; allowed here: {allowed_list}", where=where)


def _require(table: dict[str, Any], key: str, scope: str, where: str) -> Any:
    if key not in table:
        raise UsageError(f"{scope}{key}: missing required key", where=where)
    return table[key]


def _require_table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    if key not in data:
        raise UsageError(f"[{key}]: missing required table", where=where)
    if not isinstance(data[key], dict):
        raise UsageError(f"{key}: must be a table ([{key}])", where=where)
    return data[key]


def _require_str(table: dict[str, Any], key: str, scope: str, where: str, *, allow_empty: bool = False) -> str:
    value = _require(table, key, scope, where)
    return _check_str(value, f"{scope}{key}", where, allow_empty=allow_empty)


def _optional_str(table: dict[str, Any], key: str, scope: str, where: str, *, default: str) -> str:
    if key not in table:
        return default
    return _check_str(table[key], f"{scope}{key}", where, allow_empty=True)


def _check_str(value: Any, label: str, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{label}: must be a string, got {_describe(value)}", where=where)
    if not value and not allow_empty:
        raise UsageError(f"{label}: must not be empty", where=where)
    return value


def _check_int(value: Any, label: str, where: str, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{label}: must be an integer, got {_describe(value)}", where=where)
    value = int(value)
    if value < minimum:
        raise UsageError(f"{label}: must be >= {minimum}, got {value}", where=where)
    if maximum is not None and value > maximum:
        raise UsageError(f"{label}: must be <= {maximum}, got {value}", where=where)
    return value


def _check_layout(value: Any, label: str, where: str) -> str:
    if value not in LAYOUTS:
        raise UsageError(f"{label}: must be one of {', '.join(map(repr, LAYOUTS))}, got {value!r}", where=where)
    return value


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})" if not isinstance(value, (dict, list)) else kind


def _parse_categories(data: dict[str, Any], where: str) -> tuple[Category, ...]:
    raw = data.get("categories")
    if raw is None:
        raise UsageError("[[categories]]: missing (give at least two [[categories]] tables)", where=where)
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise UsageError("categories: must be an array of tables ([[categories]])", where=where)
    if len(raw) < 2:
        raise UsageError(f"[[categories]]: need at least two categories, got {len(raw)}", where=where)
    out: list[Category] = []
    for i, c in enumerate(raw):
        scope = f"categories[{i}]."
        _check_keys(c, _CATEGORY_KEYS, scope, where)
        name = _require_str(c, "name", scope, where)
        target = _require_str(c, "target", scope, where)
        text = _optional_str(c, "text", scope, where, default=target)
        if not text.startswith(target):
            raise UsageError(
                f"{scope}text: {text!r} must begin with the target {target!r}"
                " (the text right after a mark is what the model is scored on)",
                where=where,
            )
        out.append(Category(name, target, text))
    for field in ("name", "target", "text"):
        seen: dict[str, int] = {}
        for i, c in enumerate(out):
            value = getattr(c, field)
            if value in seen:
                raise UsageError(
                    f"categories[{i}].{field}: duplicate {value!r} (same as categories[{seen[value]}])",
                    where=where,
                )
            seen[value] = i
    return tuple(out)


def _parse_thetas(exp: dict[str, Any], k: int, where: str) -> tuple[tuple[float, ...], ...]:
    if "theta" in exp and "thetas" in exp:
        raise UsageError("experiment: give either theta or thetas, not both", where=where)
    if "theta" in exp:
        return (_parse_theta(exp["theta"], k, "experiment.theta", where),)
    if "thetas" not in exp:
        raise UsageError("experiment.theta: missing required key (or give thetas = [...] for a sweep)", where=where)
    raw = exp["thetas"]
    if not isinstance(raw, list) or not raw:
        raise UsageError("experiment.thetas: must be a non-empty array of θ vectors", where=where)
    thetas = tuple(_parse_theta(t, k, f"experiment.thetas[{i}]", where) for i, t in enumerate(raw))
    seen: dict[tuple[float, ...], int] = {}
    for i, t in enumerate(thetas):
        if t in seen:
            raise UsageError(
                f"experiment.thetas[{i}]: duplicate of thetas[{seen[t]}] (raise sequences instead)", where=where
            )
        seen[t] = i
    return thetas


def _parse_theta(raw: Any, k: int, label: str, where: str) -> tuple[float, ...]:
    if raw == "uniform":
        return tuple(1.0 / k for _ in range(k))
    if not isinstance(raw, list):
        raise UsageError(f"{label}: must be an array of {k} probabilities or \"uniform\"", where=where)
    if len(raw) != k:
        raise UsageError(f"{label}: has {len(raw)} entries but there are {k} categories", where=where)
    values: list[float] = []
    for j, v in enumerate(raw):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UsageError(f"{label}[{j}]: must be a number, got {_describe(v)}", where=where)
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise UsageError(f"{label}[{j}]: must be a finite probability >= 0, got {v!r}", where=where)
        values.append(v + 0.0)  # -0.0 -> 0.0 so equal θs seed equally
    total = math.fsum(values)
    if abs(total - 1.0) > THETA_TOLERANCE:
        raise UsageError(f"{label}: must sum to 1 (±{THETA_TOLERANCE:g}), sums to {total!r}", where=where)
    return tuple(values)


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


def _parse_cues(raw: Any, where: str, label: str = "template.cues") -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"{label}: must be a non-empty array of strings", where=where)
    seen: dict[str, int] = {}
    for i, c in enumerate(raw):
        _check_str(c, f"{label}[{i}]", where)
        if c in seen:
            raise UsageError(f"{label}[{i}]: duplicate {c!r} (same as cues[{seen[c]}])", where=where)
        seen[c] = i
    return tuple(raw)


def _check_cue_count(n_cues: int, n_max: int, where: str, label: str | None, key: str = "template.cues") -> None:
    if n_cues < n_max + 1:
        raise UsageError(
            f"{key}: has {n_cues} cues but n_max = {n_max} needs {n_max + 1}"
            " (each example of a sequence gets a different cue, including the one at the last mark)"
            + (f"; lower {label}" if label else ""),
            where=where,
        )


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


# ----------------------------------------------------------------------------------------------
# Generation


def _theta_key(theta: tuple[float, ...]) -> tuple[int, ...]:
    """θ as fixed-width 32-bit words (two per float64), so distinct θs give distinct keys."""
    words: list[int] = []
    for x in theta:
        bits = struct.unpack("<Q", struct.pack("<d", x))[0]
        words += [bits & 0xFFFFFFFF, bits >> 32]
    return tuple(words)


def _schedule_key(schedule: tuple[Phase, ...]) -> tuple[int, ...]:
    """A plain θ keys as itself (the original streams); a chain as each phase's θ words and length."""
    if len(schedule) == 1 and schedule[0][1] < 0:
        return _theta_key(schedule[0][0])
    return tuple(word for theta, n in schedule for word in (*_theta_key(theta), n))


def _streams(seed: int, key: tuple[int, ...], replicate: int,
             extra: tuple[int, ...] = ()) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent outcome and cue generators for one (θ, replicate), keyed by θ's *value*.

    spawn_key = (replicate, stream, *float64 bits of θ as 32-bit words, *extra): a sequence depends only on the
    seed, θ and its replicate number, so adding, removing or reordering θs, raising `sequences` or raising
    `n_max` (outcomes are drawn one uniform at a time, so a longer sequence extends a shorter one)
    leaves every existing sequence unchanged. ``extra`` is empty for the original form and nested draws;
    (2, template) gives a template its own draws, (3, n) a per-n prompt its own (independent draws).
    The θ words have a fixed count, so the suffixes cannot collide with each other.
    """
    outcome_ss = np.random.SeedSequence(seed, spawn_key=(replicate, 0, *key, *extra))
    cue_ss = np.random.SeedSequence(seed, spawn_key=(replicate, 1, *key, *extra))
    return np.random.default_rng(outcome_ss), np.random.default_rng(cue_ss)


def _phase_of(schedule: tuple[Phase, ...], j: int) -> int:
    """Which phase draws outcome j (past the end of a chain: its last phase)."""
    for p, (_, n) in enumerate(schedule):
        if n < 0 or j < n:
            return p
        j -= n
    return len(schedule) - 1


def _sample_outcomes(rng: np.random.Generator, schedule: tuple[Phase, ...], n: int) -> list[int]:
    u = rng.random(n)
    phase = np.array([_phase_of(schedule, j) for j in range(n)], dtype=np.int64)
    out = np.zeros(n, dtype=np.int64)
    for p, (theta, _) in enumerate(schedule):
        at = phase == p
        probs = np.asarray(theta, dtype=np.float64)
        cdf = np.cumsum(probs / probs.sum())
        cdf[-1] = 1.0
        # u < 1 and cdf[-1] == 1, so idx < K; categories with θ_k == 0 have an empty interval.
        out[at] = np.minimum(np.searchsorted(cdf, u[at], side="right"), len(theta) - 1)
    return [int(i) for i in out]


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


def _render(pieces: Iterable[tuple[str, str]], index: int, cue: str | None,
            values: dict[str, str] | None = None) -> str:
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


def _build(exp: Experiment, template: Template, schedule: tuple[Phase, ...], outcomes: list[int],
           cues: list[str] | None, n_text: int) -> tuple[str, list[dict[str, Any]], int | None]:
    """The prompt holding ``outcomes``, its marks (one before each outcome and one at the end) and the
    split point (the instruction's length; None without one). ``n_text`` is what {n} renders as."""
    values = _values(exp, schedule[0][0], n_text)
    instruction = _render(template.instruction, 0, None, values)
    prefix = _render(template.prefix, 0, None, values)
    separator = _render(template.separator, 0, None, values)
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
            chunk = exp.categories[prev].text + _render(template.tail, j - 1, prev_cue, values) + separator
            parts.append(chunk)
            length += len(chunk)
            counts[prev] += 1
        head = _render(template.head, j, cue, values)
        parts.append(head)
        length += len(head)
        mark: dict[str, Any] = {"offset": length, "n": j, "counts": list(counts)}
        if chained:  # the θ the next outcome is drawn from
            mark["theta"] = list(schedule[_phase_of(schedule, j)][0])
        marks.append(mark)
    return "".join(parts), marks, (len(instruction) if template.has_instruction else None)


def generate(
    experiment: Experiment,
    *,
    seed: int | None = None,
    n_max: int | None = None,
    sequences: int | None = None,
    layout: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Prompt records, lazily (see docs/experiments.md); arguments that are not None override the TOML.

    Order: for each θ (file order), for each template, for each replicate, the "marks" record and/or
    the "per-n" records n = 0..n_max (or experiment.ns). Deterministic: the same experiment and
    arguments give the same records.
    """
    # Overrides are validated here, eagerly, so a bad flag fails before any record is written.
    exp = experiment.with_overrides(seed=seed, n_max=n_max, sequences=sequences, layout=layout)
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
        key = _schedule_key(schedule)
        for template in exp.templates:
            own = (2, template.index) if exp.templated and exp.template_draws == "own" else ()

            def draw(rep: int, n: int, extra: tuple[int, ...]) -> tuple[list[int], list[str] | None]:
                rng_out, rng_cue = _streams(exp.seed, key, rep, own + extra)
                outcomes = _sample_outcomes(rng_out, schedule, n)
                if template.cues is None:
                    return outcomes, None
                order = rng_cue.permutation(len(template.cues))[: n + 1]
                return outcomes, [template.cues[int(i)] for i in order]

            def record(rid: str, sequence: int, rep: int, layout: str, outcomes: list[int], cues, n_text: int,
                       marks_kept: slice) -> dict[str, Any]:
                prompt, marks, split = _build(exp, template, schedule, outcomes, cues, n_text)
                theta = schedule[_phase_of(schedule, len(outcomes))][0] if exp.phases else schedule[0][0]
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

            for rep in range(exp.sequences):
                outcomes, cues = draw(rep, exp.n_max, ())
                sid = f"{exp.name}-s{seq:0{width_s}d}"
                if with_marks or not independent:
                    if with_marks:
                        yield record(sid, seq, rep, "marks", outcomes, cues, exp.n_max, slice(None))
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


def write_jsonl(records: Iterable[dict[str, Any]], stream: TextIO) -> int:
    """Write one JSON object per line; returns the number written.

    Output is pure ASCII (non-ASCII text is \\u-escaped), so it is byte-identical on every platform
    and stdout encoding; JSON decoding gives back the same Python str, so mark offsets still hold.
    """
    count = 0
    for rec in records:
        stream.write(json.dumps(rec, ensure_ascii=True, allow_nan=False) + "\n")
        count += 1
    return count
