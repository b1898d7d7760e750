"""Views of ``inspect`` (a trace, position by position) and ``models`` (the default model and the cache)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
from rich.markup import escape
from rich.table import Table

from llmprobe.tracing.interventions import describe
from llmprobe.tracing.reader import visible


@dataclass(frozen=True)
class TraceView:
    """``inspect``: one table per prompt (token, candidates, actual next token, entropy), or, for a
    logit-lens trace, the layer x position grid; JSON lines; TSV with the top candidates as columns."""

    frame: pd.DataFrame
    top: int

    def tables(self) -> Iterator[Table | str]:
        meta = self.frame.attrs["llmprobe"]
        changed = describe((meta.get("settings") or {}).get("interventions") or [])
        if changed:  # under the title: these are not the model's own numbers
            yield changed
        lens = "layer" in self.frame.columns  # the layer x position grid, not 30 copies of the positions
        for prompt_id, rows in self.frame.groupby("prompt_id", sort=False):
            yield _lens_table(rows, meta, prompt_id) if lens else self._prompt_table(rows, meta, prompt_id)

    def _prompt_table(self, rows: pd.DataFrame, meta: dict, prompt_id: str) -> Table:
        top = self.top
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
        return table

    def beside_data(self, fmt: str) -> tuple[()]:
        return ()

    def rows(self) -> pd.DataFrame:
        """One row per position (and layer), the top candidates as columns."""
        top = self.top
        rows = []
        for row in self.frame.itertuples(index=False):
            record = _row_json(row, top)
            candidates = record.pop("top")
            for i in range(top):
                candidate = candidates[i] if i < len(candidates) else {"token": None, "id": None, "prob": None}
                record.update({f"top{i + 1}_token": candidate["token"], f"top{i + 1}_id": candidate["id"],
                               f"top{i + 1}_prob": candidate["prob"]})
            rows.append(record)
        table = pd.DataFrame(rows)
        integers = ["next_rank", *[f"top{i + 1}_id" for i in range(top)]]
        return table.astype({c: "Int64" for c in integers if c in table.columns})  # missing stays missing, not 2.0

    def json(self) -> Iterator[str]:
        """JSON lines, one per position (and layer)."""
        for row in self.frame.itertuples(index=False):
            yield json.dumps(_row_json(row, self.top), ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class ModelsView:
    """``models``: the default model and the cached conversions (:func:`llmprobe.model.gguf.inventory`),
    after what ``--prune`` removed, if it ran (``pruned``)."""

    inventory: dict
    pruned: list[dict] | None

    def tables(self) -> Iterator[object]:
        yield from self._pruned()
        default = self.inventory["default"]
        yield (f"default model: {default['name']} ({default['quantization']} GGUF, de-quantized to"
               f" {default['loaded_as']}) — "
               + (f"GGUF at {default['gguf']}" if default["gguf"] else f"not installed ({default['install']})"))
        table = Table(title=f"cached conversions in {self.inventory['cache_dir']}", title_justify="left")
        for name in ("source", "sha256", "quantization", "size", "converted (UTC)", "path"):
            table.add_column(name)
        for entry in self.inventory["cached"]:
            table.add_row(entry["source"], entry.get("source_sha256", "")[:12], entry.get("quantization") or "",
                          f"{entry['bytes'] / 2**20:.0f} MiB", entry["converted_utc"], entry["path"])
        yield table

    def _pruned(self) -> Iterator[str]:
        if self.pruned is None:
            return
        freed = sum(entry["bytes"] for entry in self.pruned) / 2**20
        yield f"pruned {len(self.pruned)} cache entr{'y' if len(self.pruned) == 1 else 'ies'}, {freed:.0f} MiB freed"
        for entry in self.pruned:
            yield f"  {entry['path']}: {entry['reason']}"

    def beside_data(self, fmt: str) -> Iterator[str]:
        """What --prune removed: in the JSON (``pruned``), so said beside the TSV only."""
        return self._pruned() if fmt == "tsv" else iter(())

    def rows(self) -> pd.DataFrame:
        """The cached conversions (the default model's record is in the JSON)."""
        columns = ["source", "source_sha256", "quantization", "bytes", "converted_utc", "path"]
        return pd.DataFrame([{c: entry.get(c) for c in columns} for entry in self.inventory["cached"]], columns=columns)

    def json(self) -> Iterator[str]:
        listing = {**self.inventory, **({"pruned": self.pruned} if self.pruned is not None else {})}
        yield json.dumps(listing, indent=1) + "\n"


def _lens_table(rows: pd.DataFrame, meta: dict, prompt_id: str) -> Table:
    """The logit lens: the top-1 next token and its probability per layer (rows, output first) and
    position (columns, headed by the input token); bold where it is the token that actually follows."""
    positions = sorted(set(int(p) for p in rows["position"]))
    layers = sorted(set(int(v) for v in rows["layer"]), reverse=True)
    output = rows[rows["layer"] == layers[0]].set_index("position")
    table = Table(title=f"{meta.get('model')} — prompt {prompt_id}: logit lens, top-1 next token and its"
                        " probability by layer (bold: the actual next token)", title_justify="left")
    table.add_column("layer", justify="right")
    for position in positions:
        table.add_column(f"{position}\n{visible(output.loc[position, 'token'])}", no_wrap=True)
    cells = {(int(r.layer), int(r.position)): r for r in rows.itertuples(index=False)}
    for layer in layers:
        row_cells = []
        for position in positions:
            r = cells.get((layer, position))
            if r is None:
                row_cells.append("")
                continue
            top = r.topk_tokens[0] if hasattr(r, "topk_tokens") else str(int(r.topk_ids[0]))
            text = f"{visible(top)} {math.exp(r.topk_logprobs[0]):.2f}"
            is_next = r.next_token_id is not None and not pd.isna(r.next_token_id) \
                and int(r.topk_ids[0]) == int(r.next_token_id)
            row_cells.append(f"[bold]{escape(text)}[/bold]" if is_next else escape(text))
        table.add_row(f"{layer} (output)" if layer == layers[0] else str(layer), *row_cells)
    return table


def _probability(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def _isnan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _row_json(row, top: int) -> dict:
    has_next = not _isnan(row.next_logprob)
    return {
        "prompt_id": row.prompt_id,
        **({"layer": int(row.layer)} if hasattr(row, "layer") else {}),
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
