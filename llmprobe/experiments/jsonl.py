"""Prompt records as JSON Lines: the format ``llmprobe experiment`` writes and ``llmprobe trace`` reads.

One JSON object per line, keys in the order the record was built. The writer takes an open text
stream (stdout, or the stream :func:`llmprobe.files.atomic_file` hands out) and never opens a file
itself.
"""

from __future__ import annotations

import json
from typing import Any, TextIO
from collections.abc import Iterable

__all__ = ["write_jsonl"]


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
