"""Synthetic in-context-learning experiments: TOML definitions in, JSONL prompt records out.

An experiment draws sequences of categorical outcomes from a true distribution θ and writes each
sequence as text ("I just flipped a coin, and it came up heads, then tails, then"), with a *mark*
at every point where the next thing in the text would be the next outcome. ``llmprobe trace``
records the model's next-token distribution at each mark; ``fit-posterior`` compares it with the
Dirichlet predictive (α_k + n_k) / (α_0 + n) for the running counts stored in the mark.

The TOML schema, the record format and the seeding rules are documented in docs/experiments.md;
the shipped definitions live in configs/experiments/. Pure Python + numpy: nothing here imports
torch, evaluates anything from a config, or treats a config value as a path.

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
    "LAYOUTS",
    "Category",
    "Experiment",
    "generate",
    "load_experiment",
    "loads_experiment",
    "write_jsonl",
]

LAYOUTS = ("marks", "per-n", "both")
THETA_TOLERANCE = 1e-6
TEMPLATE_FIELDS = ("outcome", "cue", "index")

# Allowed keys per table; anything else is an error (typos must not be silently ignored).
_TOP_KEYS = {"experiment", "template", "categories"}
# Examples per sequence: far beyond any model context, yet small enough to generate without exhausting memory.
MAX_EXAMPLES = 100_000
_EXPERIMENT_KEYS = {"name", "description", "layout", "n_max", "sequences", "seed", "theta", "thetas"}
_TEMPLATE_KEYS = {"prefix", "example", "separator", "cues"}
_CATEGORY_KEYS = {"name", "target", "text"}
_TABLE_OF_KEY = {
    **{k: "[experiment]" for k in _EXPERIMENT_KEYS},
    **{k: "[template]" for k in _TEMPLATE_KEYS},
    **{k: "[[categories]]" for k in _CATEGORY_KEYS},
}
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
    prefix: str
    separator: str
    example: str
    cues: tuple[str, ...] | None
    where: str  # the file (or "<string>") it came from, for error messages
    # `example` split at {outcome}: ("lit", text) / ("field", "cue"|"index") pieces.
    head: tuple[tuple[str, str], ...] = dataclasses.field(repr=False, compare=False, default=())
    tail: tuple[tuple[str, str], ...] = dataclasses.field(repr=False, compare=False, default=())

    @property
    def targets(self) -> list[str]:
        return [c.target for c in self.categories]

    @property
    def category_names(self) -> list[str]:
        return [c.name for c in self.categories]

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
        if sequences is not None:
            changes["sequences"] = _check_int(sequences, "sequences (override)", where, minimum=1)
        if layout is not None:
            changes["layout"] = _check_layout(layout, "layout (override)", where)
        new = dataclasses.replace(self, **changes)
        if new.cues is not None:
            _check_cue_count(len(new.cues), new.n_max, where, "n_max (override)" if n_max is not None else None)
        return new


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
    tpl = _require_table(data, "template", where)
    _check_keys(exp, _EXPERIMENT_KEYS, "experiment.", where)
    _check_keys(tpl, _TEMPLATE_KEYS, "template.", where)

    name = _require_str(exp, "name", "experiment.", where)
    if not _NAME_RE.match(name):
        raise UsageError(
            f"experiment.name: {name!r} must be letters, digits, '_', '.' or '-' (it starts every record id)",
            where=where,
        )
    description = _optional_str(exp, "description", "experiment.", where, default="")
    layout = _check_layout(exp.get("layout", "marks"), "experiment.layout", where)
    n_max = _check_int(_require(exp, "n_max", "experiment.", where), "experiment.n_max", where, minimum=0,
                       maximum=MAX_EXAMPLES)
    sequences = _check_int(
        _require(exp, "sequences", "experiment.", where), "experiment.sequences", where, minimum=1
    )
    seed = _check_int(_require(exp, "seed", "experiment.", where), "experiment.seed", where, minimum=0)

    categories = _parse_categories(data, where)
    thetas = _parse_thetas(exp, len(categories), where)

    prefix = _require_str(tpl, "prefix", "template.", where, allow_empty=True)
    separator = _require_str(tpl, "separator", "template.", where, allow_empty=True)
    example = _require_str(tpl, "example", "template.", where)
    head, tail, fields = _parse_example(example, where)
    cues: tuple[str, ...] | None = None
    if "cues" in tpl:
        cues = _parse_cues(tpl["cues"], where)
        if "cue" not in fields:
            raise UsageError("template.cues is given but template.example has no {cue}", where=where)
        _check_cue_count(len(cues), n_max, where, None)
    elif "cue" in fields:
        raise UsageError("template.example uses {cue} but template.cues is missing", where=where)

    _check_mark_context(prefix, separator, head, tail, categories, cues, where)
    return Experiment(
        name=name,
        description=description,
        layout=layout,
        n_max=n_max,
        sequences=sequences,
        seed=seed,
        thetas=thetas,
        categories=categories,
        prefix=prefix,
        separator=separator,
        example=example,
        cues=cues,
        where=where,
        head=head,
        tail=tail,
    )


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
    """Split `example` at {outcome} into head and tail pieces; only {outcome}, {cue}, {index}."""
    try:
        parsed = list(string.Formatter().parse(example))
    except ValueError as e:
        raise UsageError(f"template.example: {e} (write {{{{ and }}}} for literal braces)", where=where) from None
    pieces: list[tuple[str, str]] = []
    fields: set[str] = set()
    n_outcome = 0
    for literal, field, spec, conversion in parsed:
        if literal:
            pieces.append(("lit", literal))
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS or spec or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UsageError(
                f"template.example: unknown placeholder {shown}; allowed: "
                + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
                + " (write {{ and }} for literal braces)",
                where=where,
            )
        fields.add(field)
        if field == "outcome":
            n_outcome += 1
        pieces.append(("field", field))
    if n_outcome != 1:
        raise UsageError(
            f"template.example: must contain {{outcome}} exactly once, found {n_outcome}", where=where
        )
    at = pieces.index(("field", "outcome"))
    return tuple(pieces[:at]), tuple(pieces[at + 1 :]), fields


def _parse_cues(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise UsageError("template.cues: must be a non-empty array of strings", where=where)
    seen: dict[str, int] = {}
    for i, c in enumerate(raw):
        _check_str(c, f"template.cues[{i}]", where)
        if c in seen:
            raise UsageError(f"template.cues[{i}]: duplicate {c!r} (same as cues[{seen[c]}])", where=where)
        seen[c] = i
    return tuple(raw)


def _check_cue_count(n_cues: int, n_max: int, where: str, label: str | None) -> None:
    if n_cues < n_max + 1:
        raise UsageError(
            f"template.cues: has {n_cues} cues but n_max = {n_max} needs {n_max + 1}"
            " (each example of a sequence gets a different cue, including the one at the last mark)"
            + (f"; lower {label}" if label else ""),
            where=where,
        )


def _check_mark_context(prefix, separator, head, tail, categories, cues, where) -> None:
    """The text right before every mark must be non-empty and must not end in whitespace.

    Walks back from a mark through the pieces that can precede it and looks at the first
    non-empty one. Before mark 0: prefix + head. Before mark j>0: outcome text + tail + separator + head.
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
                check([c[-1] for c in cues or ()], "a cue in template.cues")
                return True
            elif value == "index":
                return True
            elif value == "outcome":
                check([c.text[-1] for c in categories], "a category's text/target")
                return True
        return False

    head_pieces = [(k, v, "template.example (before {outcome})") for k, v in head]
    if not walk([("lit", prefix, "template.prefix")] + head_pieces):
        raise UsageError(
            "template: prefix and the text before {outcome} are both empty, so the first mark would be at"
            " offset 0 with no text to predict from",
            where=where,
        )
    tail_pieces = [(k, v, "template.example (after {outcome})") for k, v in tail]
    walk([("field", "outcome", "")] + tail_pieces + [("lit", separator, "template.separator")] + head_pieces)


# ----------------------------------------------------------------------------------------------
# Generation


def _theta_key(theta: tuple[float, ...]) -> tuple[int, ...]:
    """θ as fixed-width 32-bit words (two per float64), so distinct θs give distinct keys."""
    words: list[int] = []
    for x in theta:
        bits = struct.unpack("<Q", struct.pack("<d", x))[0]
        words += [bits & 0xFFFFFFFF, bits >> 32]
    return tuple(words)


def _streams(seed: int, theta: tuple[float, ...], replicate: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent outcome and cue generators for one (θ, replicate), keyed by θ's *value*.

    spawn_key = (replicate, stream, *float64 bits of θ as 32-bit words): a sequence depends only on the seed, θ and
    its replicate number, so adding, removing or reordering θs, raising `sequences` or raising
    `n_max` (outcomes are drawn one uniform at a time, so a longer sequence extends a shorter one)
    leaves every existing sequence unchanged.
    """
    key = _theta_key(theta)
    outcome_ss = np.random.SeedSequence(seed, spawn_key=(replicate, 0, *key))
    cue_ss = np.random.SeedSequence(seed, spawn_key=(replicate, 1, *key))
    return np.random.default_rng(outcome_ss), np.random.default_rng(cue_ss)


def _sample_outcomes(rng: np.random.Generator, theta: tuple[float, ...], n: int) -> list[int]:
    p = np.asarray(theta, dtype=np.float64)
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    u = rng.random(n)
    idx = np.searchsorted(cdf, u, side="right")
    # u < 1 and cdf[-1] == 1, so idx < K; categories with θ_k == 0 have an empty interval.
    return [int(i) for i in np.minimum(idx, len(theta) - 1)]


def _render(pieces: Iterable[tuple[str, str]], index: int, cue: str | None) -> str:
    out = []
    for kind, value in pieces:
        if kind == "lit":
            out.append(value)
        elif value == "cue":
            out.append(cue or "")
        elif value == "index":
            out.append(str(index + 1))
    return "".join(out)


def generate(
    experiment: Experiment,
    *,
    seed: int | None = None,
    n_max: int | None = None,
    sequences: int | None = None,
    layout: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Prompt records, lazily (see docs/experiments.md); arguments that are not None override the TOML.

    Order: for each θ (file order), for each replicate, the "marks" record and/or the "per-n"
    records n = 0..n_max. Deterministic: the same experiment and arguments give the same records.
    """
    # Overrides are validated here, eagerly, so a bad flag fails before any record is written.
    exp = experiment.with_overrides(seed=seed, n_max=n_max, sequences=sequences, layout=layout)
    return _records(exp)


def _records(exp: Experiment) -> Iterator[dict[str, Any]]:
    k = len(exp.categories)
    width_s = max(4, len(str(len(exp.thetas) * exp.sequences - 1)))
    width_n = max(2, len(str(exp.n_max)))
    for ti, theta in enumerate(exp.thetas):
        for rep in range(exp.sequences):
            seq = ti * exp.sequences + rep
            rng_out, rng_cue = _streams(exp.seed, theta, rep)
            outcomes = _sample_outcomes(rng_out, theta, exp.n_max)
            cues: list[str] | None = None
            if exp.cues is not None:
                order = rng_cue.permutation(len(exp.cues))[: exp.n_max + 1]
                cues = [exp.cues[int(i)] for i in order]

            # Build the marks-layout prompt; every per-n prompt is a prefix of it.
            parts = [exp.prefix]
            length = len(exp.prefix)
            marks: list[dict[str, Any]] = []
            counts = [0] * k
            for j in range(exp.n_max + 1):
                cue = cues[j] if cues is not None else None
                if j > 0:
                    prev = outcomes[j - 1]
                    prev_cue = cues[j - 1] if cues is not None else None
                    chunk = exp.categories[prev].text + _render(exp.tail, j - 1, prev_cue) + exp.separator
                    parts.append(chunk)
                    length += len(chunk)
                    counts[prev] += 1
                head = _render(exp.head, j, cue)
                parts.append(head)
                length += len(head)
                marks.append({"offset": length, "n": j, "counts": list(counts)})
            prompt = "".join(parts)

            base = {
                "targets": exp.targets,
                "categories": exp.category_names,
                "theta": list(theta),
                "experiment": exp.name,
                "sequence": seq,
                "theta_index": ti,
                "replicate": rep,
                "n_max": exp.n_max,
                "seed": exp.seed,
            }
            sid = f"{exp.name}-s{seq:0{width_s}d}"
            if exp.layout in ("marks", "both"):
                rec = {"id": sid, "prompt": prompt, "marks": marks, **base, "layout": "marks",
                       "outcomes": list(outcomes)}
                if cues is not None:
                    rec["cues"] = list(cues)
                yield rec
            if exp.layout in ("per-n", "both"):
                for mark in marks:
                    n = mark["n"]
                    rec = {"id": f"{sid}-n{n:0{width_n}d}", "prompt": prompt[: mark["offset"]],
                           "marks": [dict(mark, counts=list(mark["counts"]))], **base, "layout": "per-n",
                           "outcomes": outcomes[:n]}
                    if cues is not None:
                        rec["cues"] = cues[: n + 1]
                    yield rec


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
