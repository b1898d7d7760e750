"""An experiment definition: the TOML file read, validated, and frozen into an :class:`Experiment`.

``load_experiment(path)`` (or ``loads_experiment(text)``) reads the tables ``[experiment]``,
``[[categories]]`` and ``[template]`` / ``[[templates]]`` (docs/experiments.md has the schema), checks
every key and value (:mod:`~llmprobe.experiments.schema`), parses the templates
(:mod:`~llmprobe.experiments.templates`) and returns an immutable :class:`Experiment`.
:meth:`Experiment.with_overrides` applies the command line's ``--seed``, ``--n-max``, ``--sequences``,
``--layout`` and ``--permutations`` with the same checks.

Invariants: a definition that loads can be generated (every cross-field rule is checked here: θ vectors sum to
1 over as many entries as there are categories, each category's text begins with its target, per-n options
need a per-n layout, ``phases`` fix ``n_max``, ``ns`` stay within it, enough cues for ``n_max``,
``permutations`` only on exchangeable marks records); any problem is one :class:`~llmprobe.errors.UsageError`
naming the file and the key. The file is read as UTF-8 TOML (a leading BOM ignored); nothing in it is
evaluated or treated as a path. ``[prior]`` is allowed and ignored here: it belongs to ``wind-tunnel``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmprobe.errors import UsageError
from llmprobe.experiments.sampling import Phase
from llmprobe.experiments.schema import (CATEGORY_KEYS, EXPERIMENT_KEYS, PHASE_KEYS, TEMPLATE_KEYS, TEMPLATES_KEYS,
                                         TOP_KEYS, check_choice, check_int, check_keys, describe, optional_str,
                                         require, require_str, require_table)
from llmprobe.experiments.templates import Template, check_cue_count, parse_legacy_template, parse_template

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["CHAT_MODES", "DRAWS", "LAYOUTS", "MAX_EXAMPLES", "TEMPLATE_DRAWS", "Category", "Experiment",
           "load_experiment", "loads_experiment"]

LAYOUTS = ("marks", "per-n", "both")
DRAWS = ("nested", "independent")
TEMPLATE_DRAWS = ("own", "shared")
CHAT_MODES = ("prefill",)
THETA_TOLERANCE = 1e-6
# Examples per sequence: far beyond any model context, yet small enough to generate without exhausting memory.
MAX_EXAMPLES = 100_000
MAX_PERMUTATIONS = 1_000  # shuffled orders per sequence: far more than any order-dependence estimate needs
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True)
class Category:
    name: str
    target: str  # what the model would emit right after a mark, leading space included
    text: str  # what {outcome} renders as in the prompt; begins with `target`


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
    permutations: int = 0  # each marks record also rendered in this many shuffled orders of its examples

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
        permutations: int | None = None,
    ) -> Experiment:
        """A copy with CLI overrides applied and validated (UsageError on a bad value)."""
        where = self.where
        changes: dict[str, Any] = {}
        if seed is not None:
            changes["seed"] = check_int(seed, "seed (override)", where, minimum=0)
        if n_max is not None:
            changes["n_max"] = check_int(n_max, "n_max (override)", where, minimum=0, maximum=MAX_EXAMPLES)
            if self.phases is not None and changes["n_max"] != self.n_max:
                raise UsageError(f"n_max (override): experiment.phases fix n_max at {self.n_max}", where=where)
            if self.ns is not None and changes["n_max"] < self.ns[-1]:
                raise UsageError(f"n_max (override): experiment.ns needs n_max >= {self.ns[-1]}", where=where)
        if sequences is not None:
            changes["sequences"] = check_int(sequences, "sequences (override)", where, minimum=1)
        if layout is not None:
            changes["layout"] = check_choice(layout, LAYOUTS, "layout (override)", where)
            _check_per_n_options(changes["layout"], self.ns, self.draws, "layout (override)", where)
        if permutations is not None:
            changes["permutations"] = check_int(permutations, "permutations (override)", where, minimum=0,
                                                maximum=MAX_PERMUTATIONS)
        new = dataclasses.replace(self, **changes)
        if permutations is not None or layout is not None:
            _check_permutations(new.permutations, new.layout, new.phases,
                                "permutations (override)" if permutations is not None else "layout (override)", where)
        for template in new.templates:
            if template.cues is not None:
                check_cue_count(len(template.cues), new.n_max, where,
                                 "n_max (override)" if n_max is not None else None,
                                 _scope(new, template) + "cues")
        return new


def _scope(exp: Experiment, template: Template) -> str:
    return f"templates[{template.index}]." if exp.templated else "template."


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
    except RecursionError:
        raise UsageError("invalid TOML: nested too deeply to read (thousands of levels of [ or {)",
                         where=where) from None
    return _parse(data, where)


def _parse(data: dict[str, Any], where: str) -> Experiment:
    check_keys(data, TOP_KEYS, "", where)
    exp = require_table(data, "experiment", where)
    templated = "templates" in data
    shared: dict[str, Any] = {}
    if templated:
        if "template" in data:
            shared = require_table(data, "template", where)
            check_keys(shared, TEMPLATES_KEYS - {"name"}, "template.", where)
    else:
        shared = require_table(data, "template", where)
        for key in ("instruction", "name"):
            if key in shared:
                raise UsageError(f"template.{key}: only in [[templates]] (the form with placeholders in every"
                                 " text field); a single template is one [[templates]] table", where=where)
        check_keys(shared, TEMPLATE_KEYS, "template.", where)
    check_keys(exp, EXPERIMENT_KEYS, "experiment.", where)

    name = require_str(exp, "name", "experiment.", where)
    if not _NAME_RE.match(name):
        raise UsageError(
            f"experiment.name: {name!r} must be letters, digits, '_', '.' or '-' (it starts every record id)",
            where=where,
        )
    description = optional_str(exp, "description", "experiment.", where, default="")
    layout = check_choice(exp.get("layout", "marks"), LAYOUTS, "experiment.layout", where)
    categories = _parse_categories(data, where)
    phases = _parse_phases(exp, len(categories), where) if "phases" in exp else None
    if phases is not None:
        total = sum(n for _, n in phases)
        n_max = check_int(exp.get("n_max", total), "experiment.n_max", where, minimum=0, maximum=MAX_EXAMPLES)
        if n_max != total:
            raise UsageError(f"experiment.n_max: is {n_max} but the phases hold {total} draws (or leave it out)",
                             where=where)
        thetas = tuple(theta for theta, _ in phases)
    else:
        n_max = check_int(require(exp, "n_max", "experiment.", where), "experiment.n_max", where, minimum=0,
                           maximum=MAX_EXAMPLES)
        thetas = _parse_thetas(exp, len(categories), where)
    sequences = check_int(
        require(exp, "sequences", "experiment.", where), "experiment.sequences", where, minimum=1
    )
    seed = check_int(require(exp, "seed", "experiment.", where), "experiment.seed", where, minimum=0)
    draws = check_choice(exp.get("draws", "nested"), DRAWS, "experiment.draws", where)
    ns = _parse_ns(exp["ns"], n_max, where) if "ns" in exp else None
    _check_per_n_options(layout, ns, draws, "experiment.layout", where)
    template_draws = check_choice(exp.get("template_draws", "own"), TEMPLATE_DRAWS, "experiment.template_draws", where)
    if "template_draws" in exp and not templated:
        raise UsageError("experiment.template_draws: only with [[templates]]", where=where)
    chat = check_choice(exp["chat"], CHAT_MODES, "experiment.chat", where) if "chat" in exp else None
    permutations = check_int(exp.get("permutations", 0), "experiment.permutations", where, minimum=0,
                             maximum=MAX_PERMUTATIONS)
    _check_permutations(permutations, layout, phases, "experiment.permutations", where)

    if templated:
        raw = data["templates"]
        if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
            raise UsageError("templates: must be an array of tables ([[templates]])", where=where)
        if not raw:
            raise UsageError("templates: the template list is empty; give at least one [[templates]] table",
                             where=where)
        templates = tuple(parse_template(i, t, shared, categories, n_max, phases is not None, where)
                          for i, t in enumerate(raw))
        raw_first = {**shared, **raw[0]}
    else:
        templates = (parse_legacy_template(shared, categories, n_max, where),)
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
        permutations=permutations,
    )


def _check_per_n_options(layout: str, ns, draws: str, label: str, where: str) -> None:
    if layout == "marks" and (ns is not None or draws != "nested"):
        key = "experiment.ns" if ns is not None else "experiment.draws"
        raise UsageError(f"{key}: applies to per-n prompts, but {label} is \"marks\"; use \"per-n\" or \"both\"",
                         where=where)


def _check_permutations(permutations: int, layout: str, phases, label: str, where: str) -> None:
    """Shuffled orders are marks records of exchangeable draws: one θ per sequence, all n in one prompt."""
    if not permutations:
        return
    if layout != "marks":
        raise UsageError(f"{label}: shuffled orders are rendered as marks records (one prompt per order), but the"
                         f" layout is {layout!r}; use layout \"marks\"", where=where)
    if phases is not None:
        raise UsageError(f"{label}: a chain of θs (experiment.phases) is not exchangeable: shuffling it would move"
                         " outcomes between phases", where=where)


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
        check_keys(c, CATEGORY_KEYS, scope, where)
        name = require_str(c, "name", scope, where)
        target = require_str(c, "target", scope, where)
        text = optional_str(c, "text", scope, where, default=target)
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
            raise UsageError(f"{label}[{j}]: must be a number, got {describe(v)}", where=where)
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise UsageError(f"{label}[{j}]: must be a finite probability >= 0, got {v!r}", where=where)
        values.append(v + 0.0)  # -0.0 -> 0.0 so equal θs seed equally
    total = math.fsum(values)
    if abs(total - 1.0) > THETA_TOLERANCE:
        raise UsageError(f"{label}: must sum to 1 (±{THETA_TOLERANCE:g}), sums to {total!r}", where=where)
    return tuple(values)


def _parse_ns(raw: Any, n_max: int, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw:
        raise UsageError("experiment.ns: must be a non-empty array of example counts", where=where)
    values = [check_int(v, f"experiment.ns[{i}]", where, minimum=0) for i, v in enumerate(raw)]
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
        check_keys(phase, PHASE_KEYS, scope, where)
        theta = _parse_theta(require(phase, "theta", scope, where), k, f"{scope}theta", where)
        phases.append((theta, check_int(require(phase, "n", scope, where), f"{scope}n", where, minimum=1)))
    return tuple(phases)
