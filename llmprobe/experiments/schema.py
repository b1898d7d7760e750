"""The experiment TOML schema's keys, and the checks every value goes through.

Which keys each table allows is declared here once; anything else is an error naming the key, the
table it belongs in when it is a known key in the wrong place (TOML puts keys written after a
``[[categories]]`` header into that category), or the closest allowed key. Every check raises one
:class:`~llmprobe.errors.UsageError` of the form ``FILE: table.key: message``: a problem in a
definition is always one line naming the file and the key, never a traceback. Nothing here
evaluates a value or treats one as a path.
"""

from __future__ import annotations

import difflib
from typing import Any

import numpy as np

from llmprobe.errors import UsageError

TOP_KEYS = {"experiment", "template", "templates", "categories", "prior", "sweep"}  # [prior], [sweep]: `wind-tunnel`
EXPERIMENT_KEYS = {"name", "description", "layout", "n_max", "sequences", "seed", "theta", "thetas",
                   "draws", "ns", "phases", "template_draws", "chat", "permutations"}
TEMPLATE_KEYS = {"prefix", "example", "separator", "cues"}
TEMPLATES_KEYS = TEMPLATE_KEYS | {"name", "instruction"}
CATEGORY_KEYS = {"name", "target", "text"}
PHASE_KEYS = {"theta", "n"}
_TABLE_OF_KEY = {
    **{k: "[experiment]" for k in EXPERIMENT_KEYS},
    **{k: "[template]" for k in TEMPLATE_KEYS},
    **{k: "[[categories]]" for k in CATEGORY_KEYS},
}


def check_keys(table: dict[str, Any], allowed: set[str], scope: str, where: str) -> None:
    """Every key of ``table`` is in ``allowed`` (typos must not be silently ignored)."""
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


def require(table: dict[str, Any], key: str, scope: str, where: str) -> Any:
    if key not in table:
        raise UsageError(f"{scope}{key}: missing required key", where=where)
    return table[key]


def require_table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    if key not in data:
        raise UsageError(f"[{key}]: missing required table", where=where)
    if not isinstance(data[key], dict):
        raise UsageError(f"{key}: must be a table ([{key}])", where=where)
    return data[key]


def require_str(table: dict[str, Any], key: str, scope: str, where: str, *, allow_empty: bool = False) -> str:
    value = require(table, key, scope, where)
    return check_str(value, f"{scope}{key}", where, allow_empty=allow_empty)


def optional_str(table: dict[str, Any], key: str, scope: str, where: str, *, default: str) -> str:
    if key not in table:
        return default
    return check_str(table[key], f"{scope}{key}", where, allow_empty=True)


def check_str(value: Any, label: str, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{label}: must be a string, got {describe(value)}", where=where)
    if not value and not allow_empty:
        raise UsageError(f"{label}: must not be empty", where=where)
    return value


def check_int(value: Any, label: str, where: str, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{label}: must be an integer, got {describe(value)}", where=where)
    value = int(value)
    if value < minimum:
        raise UsageError(f"{label}: must be >= {minimum}, got {value}", where=where)
    if maximum is not None and value > maximum:
        raise UsageError(f"{label}: must be <= {maximum}, got {value}", where=where)
    return value


def check_choice(value: Any, choices: tuple[str, ...], label: str, where: str) -> str:
    if value not in choices:
        raise UsageError(f"{label}: must be one of {', '.join(map(repr, choices))}, got {value!r}", where=where)
    return value


def describe(value: Any) -> str:
    """A value's TOML kind for a message: ``an integer (3)``, ``an array``."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})" if not isinstance(value, (dict, list)) else kind
