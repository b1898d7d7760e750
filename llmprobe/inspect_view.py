"""Terminal views: ``llmprobe inspect`` (a trace, position by position) and ``llmprobe models``."""

from __future__ import annotations

import json
import math

from rich.table import Table

from llmprobe._output import Output
from llmprobe.errors import UsageError
from llmprobe.reader import read_trace


def visible(token: str | None) -> str:
    """Whitespace made visible, so ' the' and 'the' differ on screen."""
    if not isinstance(token, str):  # null (no next token) arrives as None or NaN from pandas
        return "∅"
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")


def inspect_trace(source: str, prompt: str | None, top: int, as_json: bool, out: Output) -> None:
    frame = read_trace(source)
    if prompt is not None:
        frame = frame[frame["prompt_id"] == prompt]
        if frame.empty:
            raise UsageError(f"no prompt with id {prompt!r} in the trace", where="--prompt")
    if top < 1:
        raise UsageError("must be 1 or more", where="--top")
    if as_json:
        for row in frame.itertuples(index=False):
            out.data_text(json.dumps(_row_json(row, top), ensure_ascii=False) + "\n")
        return
    meta = frame.attrs["llmprobe"]
    for prompt_id, rows in frame.groupby("prompt_id", sort=False):
        table = Table(title=f"{meta.get('model')} — prompt {prompt_id}", title_justify="left")
        # token strings are never wrapped (their whitespace is the point); candidates go one per line
        table.add_column("pos", justify="right")
        table.add_column("token", no_wrap=True)
        table.add_column(f"top-{top} candidates", no_wrap=True)
        table.add_column("actual next", no_wrap=True)
        for name in ("P(next)", "rank", "H (bits)"):
            table.add_column(name, justify="right")
        for row in rows.itertuples(index=False):
            candidates = "\n".join(f"{visible(t)} {math.exp(lp):.3f}"
                                   for t, lp in zip(row.topk_tokens[:top], row.topk_logprobs[:top]))
            has_next = row.next_token is not None and not _isnan(row.next_logprob)
            position = f"{row.position}*" if row.phase == "generated" else str(row.position)
            table.add_row(
                position, visible(row.token), candidates, visible(row.next_token),
                _probability(math.exp(row.next_logprob)) if has_next else "",
                str(int(row.next_rank)) if has_next else "",
                f"{row.entropy / math.log(2):.2f}",
            )
        if (rows["phase"] == "generated").any():
            table.caption = "* generated token"
        out.show(table)


def _probability(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def _isnan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))



def _row_json(row, top: int) -> dict:
    has_next = not _isnan(row.next_logprob)
    return {
        "prompt_id": row.prompt_id,
        "position": int(row.position),
        "phase": row.phase,
        "token": row.token,
        "top": [{"token": t, "id": int(i), "prob": math.exp(float(lp))}
                for t, i, lp in zip(row.topk_tokens[:top], row.topk_ids[:top], row.topk_logprobs[:top])],
        "next_token": row.next_token if has_next else None,
        "next_prob": math.exp(float(row.next_logprob)) if has_next else None,
        "next_rank": int(row.next_rank) if has_next else None,
        "entropy_bits": float(row.entropy) / math.log(2),
    }


def show_models(as_json: bool, out: Output) -> None:
    from llmprobe.models import DEFAULT_MODEL_NAME, DEFAULT_MODEL_PIP, cache_dir, cached_conversions, default_gguf

    try:
        gguf = str(default_gguf())
    except UsageError:
        gguf = None
    entries = cached_conversions()
    if as_json:
        out.data_text(json.dumps({"default": {"name": DEFAULT_MODEL_NAME, "gguf": gguf},
                                  "cache_dir": str(cache_dir()), "cached": entries}, indent=1) + "\n")
        return
    out.log(f"default model: {DEFAULT_MODEL_NAME} — "
            + (f"GGUF at {gguf}" if gguf else f"not installed ({DEFAULT_MODEL_PIP})"))
    table = Table(title=f"cached conversions in {cache_dir()}", title_justify="left")
    for name in ("source", "size", "converted (UTC)", "path"):
        table.add_column(name)
    for entry in entries:
        table.add_row(entry["source"], f"{entry['bytes'] / 2**20:.0f} MiB", entry["converted_utc"], entry["path"])
    out.show(table)


__all__ = ["inspect_trace", "show_models", "visible"]
