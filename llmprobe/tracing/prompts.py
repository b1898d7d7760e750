"""Reading prompt files: plain text (one prompt per line), JSONL records, or a Parquet table of prompts.

The whole file is read and validated before any model is loaded, so a malformed line 90,000 fails
in a second instead of after an hour of tracing, and never leaves half an output behind. Prompt text
is only ever data: nothing in a prompt file is used as a path or evaluated.

A leading UTF-8 byte-order mark is dropped (like a CRLF line end, it is an editor's artefact, not
prompt text). Text that is not valid Unicode — invalid UTF-8, or a JSON ``\\udfff`` escape naming a lone
UTF-16 surrogate — is refused with its line. A Parquet file (by its ``PAR1`` magic bytes, whatever
its name; Hugging Face datasets ship Parquet) is read as a table with a string ``prompt`` column and
optional ``id`` and ``marks`` columns, every other column kept as an extra field; each row is
validated like a JSONL record. Any other binary input (a NUL byte) is refused.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmprobe.errors import UsageError

INPUT_FORMATS = ("auto", "text", "jsonl", "parquet")
UTF8_BOM = b"\xef\xbb\xbf"
PARQUET_MAGIC = b"PAR1"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
RESERVED_FIELDS = ("id", "prompt", "marks")
NESTED = "nested too deeply to read (thousands of levels of [ or {)"  # what the parsers' RecursionError means


@dataclass
class PromptRecord:
    index: int  # 0-based order in the input
    id: str
    text: str
    line: int  # 1-based line in the input, for error messages
    marks: list[dict[str, Any]] = field(default_factory=list)  # each with an int "offset"
    meta: dict[str, Any] = field(default_factory=dict)  # every other JSONL field, kept verbatim


def read_prompts(source: str, input_format: str = "auto") -> list[PromptRecord]:
    """Parse ``source`` (a path, or ``-`` for stdin) into validated prompt records."""
    if input_format not in INPUT_FORMATS:
        raise UsageError(f"unknown format {input_format!r} (expected {', '.join(INPUT_FORMATS)})",
                         where="--input-format")
    name = "<stdin>" if source == "-" else source
    data = _read_bytes(source)
    if input_format == "parquet" or input_format == "auto" and data.startswith(PARQUET_MAGIC):
        return _read_parquet(data, name)
    data = data.removeprefix(UTF8_BOM)
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise UsageError("a binary file, not prompts (NUL byte); give a text, JSONL or Parquet prompt file",
                         where=f"{name}:{line}")
    lines = data.split(b"\n")
    if input_format == "auto":
        input_format = _detect_format(source, lines)
    records: list[PromptRecord] = []
    first_line_of: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        text = _decode(raw, name, number).removesuffix("\r")
        if not text.strip():
            continue
        where = f"{name}:{number}"
        if input_format == "jsonl":
            record = _parse_jsonl(text, where, len(records), number)
        else:
            record = PromptRecord(index=len(records), id=str(number), text=text, line=number)
        if record.id in first_line_of:
            raise UsageError(f"duplicate id {record.id!r} (first used on line {first_line_of[record.id]})",
                             where=where)
        first_line_of[record.id] = number
        records.append(record)
    if not records:
        raise UsageError("no prompts found (the input is empty or only blank lines)", where=name)
    return records


def _read_bytes(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    path = Path(source)
    if path.is_dir():
        raise UsageError("is a directory, expected a prompt file", where=source)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError("no such prompt file", where=source) from None
    except OSError as exc:
        raise UsageError(f"cannot read prompt file: {exc.strerror}", where=source) from None


def _detect_format(source: str, lines: list[bytes]) -> str:
    """By extension for files; for stdin, JSONL when the first non-blank line starts with ``{``."""
    if source != "-":
        return "jsonl" if Path(source).suffix.lower() in JSONL_SUFFIXES else "text"
    first = next((line.strip() for line in lines if line.strip()), b"")
    return "jsonl" if first.startswith(b"{") else "text"


def _decode(raw: bytes, name: str, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", where=f"{name}:{number}"
        ) from None


def records_from_objects(prompts: list[str | dict[str, Any]]) -> list[PromptRecord]:
    """Prompt records from Python objects (the notebook API): a string is a prompt, a dict a JSONL record,
    checked as a prompt file's lines are (text that cannot be UTF-8, a lone surrogate, is refused)."""
    records: list[PromptRecord] = []
    seen: set[str] = set()
    for number, obj in enumerate(prompts, start=1):
        where = f"prompts[{number - 1}]"
        if not isinstance(obj, (str, dict)):
            raise UsageError(f"expected a prompt string or a record dict with a \"prompt\", got {type(obj).__name__}",
                             where=where)
        _check_unicode(obj, where)
        if isinstance(obj, str):
            if not obj.strip():
                raise UsageError("the prompt is empty", where=where)
            record = PromptRecord(index=len(records), id=str(number), text=obj, line=number)
        else:
            record = _record_from_object(obj, where, len(records), number)
        if record.id in seen:
            raise UsageError(f"duplicate id {record.id!r}", where=where)
        seen.add(record.id)
        records.append(record)
    if not records:
        raise UsageError("no prompts given", where="prompts")
    return records


def _read_parquet(data: bytes, name: str) -> list[PromptRecord]:
    """A table of prompts: a string ``prompt`` column, optional ``id`` and ``marks``; one record per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"not a readable Parquet file ({str(exc).splitlines()[0] if str(exc) else exc})",
                         where=name) from None
    if "prompt" not in table.column_names:
        raise UsageError(f"a Parquet table of prompts needs a \"prompt\" column (it has"
                         f" {', '.join(table.column_names[:8]) or 'none'})", where=name)
    records: list[PromptRecord] = []
    first_row_of: dict[str, int] = {}
    for number, row in enumerate(table.to_pylist(), start=1):
        where = f"{name}: row {number}"
        _check_unicode(row, where)
        record = _record_from_object({k: v for k, v in row.items() if v is not None or k == "prompt"}, where,
                                     len(records), number)
        if record.id in first_row_of:
            raise UsageError(f"duplicate id {record.id!r} (first used in row {first_row_of[record.id]})", where=where)
        first_row_of[record.id] = number
        records.append(record)
    if not records:
        raise UsageError("no prompts found (the table has no rows)", where=name)
    return records


def _check_unicode(value: Any, where: str) -> None:
    """Refuse strings that cannot be UTF-8 (lone surrogates from ``\\ud800``-style JSON escapes)."""
    try:
        json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end].encode("utf-8", "backslashreplace").decode("ascii")
        raise UsageError(f"contains {bad}, a lone UTF-16 surrogate, which is not text", where=where) from None


def _parse_jsonl(text: str, where: str, index: int, number: int) -> PromptRecord:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"invalid JSON: {exc.msg} (column {exc.colno})", where=where) from None
    except RecursionError:
        raise UsageError(f"invalid JSON: {NESTED}", where=where) from None
    _check_unicode(obj, where)
    return _record_from_object(obj, where, index, number)


def _record_from_object(obj: Any, where: str, index: int, number: int) -> PromptRecord:
    if not isinstance(obj, dict):
        raise UsageError("expected a JSON object with a \"prompt\" field", where=where)
    prompt = obj.get("prompt")
    if prompt is None:
        raise UsageError("record has no \"prompt\" field", where=where)
    if not isinstance(prompt, str):
        raise UsageError("\"prompt\" must be a string", where=where)
    if not prompt.strip():
        raise UsageError("\"prompt\" is empty", where=where)
    raw_id = obj.get("id", number)
    if isinstance(raw_id, (dict, list)) or raw_id is None or isinstance(raw_id, bool):
        raise UsageError("\"id\" must be a string or a number", where=where)
    marks = _parse_marks(obj.get("marks", []), len(prompt), where)
    meta = {k: v for k, v in obj.items() if k not in RESERVED_FIELDS}
    return PromptRecord(index=index, id=str(raw_id), text=prompt, line=number, marks=marks, meta=meta)


def _parse_marks(marks: Any, prompt_length: int, where: str) -> list[dict[str, Any]]:
    if not isinstance(marks, list):
        raise UsageError("\"marks\" must be a list of objects with an \"offset\"", where=where)
    previous = -1
    for i, mark in enumerate(marks):
        if not isinstance(mark, dict) or "offset" not in mark:
            raise UsageError(f"mark {i} must be an object with an \"offset\"", where=where)
        offset = mark["offset"]
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise UsageError(f"mark {i}: offset must be an integer, got {offset!r}", where=where)
        if not 0 < offset <= prompt_length:
            raise UsageError(f"mark {i}: offset {offset} is outside the prompt (1..{prompt_length})", where=where)
        if offset <= previous:
            raise UsageError(f"mark {i}: offsets must increase (offset {offset} after {previous})", where=where)
        previous = offset
    return marks
