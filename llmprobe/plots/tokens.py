"""``llmprobe plot``: one prompt's top-k next-token candidates as an annotated heatmap, entropy underneath.

Column i is position i: the token x_i above it, the k most probable next tokens below (rank 1 on
top), each cell coloured by P(candidate | x_0..x_i) and labelled with the candidate's string. The
actual next token x_{i+1} gets a red box when it is among the candidates and always appears in the
"actual" row with its probability and rank. Underneath: the entropy of the full next-token
distribution and the surprisal of the actual next token, in bits. Long prompts wrap into rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from llmprobe.errors import UsageError
from llmprobe.plots.common import check_image_output, plain_label, save_figure, token_label
from llmprobe.tracing.reader import read_trace
from llmprobe.tracing.schema import PHASE_GENERATED

LN2 = math.log(2.0)
CMAP = "Blues"
HIGHLIGHT = "#d62728"
GENERATED_COLOR = "#b35806"
MARK_COLOR = "#fee391"
COLUMN_INCHES = 0.95
ROW_INCHES = 0.36


@dataclass
class TokenGrid:
    """The numbers one token figure shows, P positions by K candidates, straight from the trace."""

    model: str
    prompt_id: str
    positions: np.ndarray  # (P,) position numbers
    tokens: list[str]  # x_i, the token at each position
    phases: list[str]
    candidates: list[list[str]]  # (P, K) candidate strings, most probable first
    candidate_ids: np.ndarray  # (P, K)
    probs: np.ndarray  # (P, K) P(candidate | x_0..x_i)
    next_tokens: list[str | None]  # x_{i+1}, None at the end
    next_ids: np.ndarray  # (P,) -1 where there is no next token
    next_probs: np.ndarray  # (P,) NaN where there is no next token
    next_ranks: np.ndarray  # (P,) 1-based rank over the vocabulary, 0 where there is no next token
    entropy_bits: np.ndarray  # (P,)
    marked: np.ndarray  # (P,) bool: an experiment mark sits at this position
    prompt_text: str


def parse_positions(spec: str | None) -> tuple[int | None, int | None]:
    """``START:END`` (END exclusive, either side optional) -> (start, end)."""
    if spec is None:
        return None, None
    parts = spec.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise UsageError(f"expected START:END (e.g. 0:32, 40: or :16), got {spec!r}", where="--positions") from None
    if any(p is not None and p < 0 for p in (start, end)):
        raise UsageError(f"positions are 0 or more (counted from the prompt's first token), got {spec!r}",
                         where="--positions")
    if start is not None and end is not None and end <= start:
        raise UsageError(f"END must be greater than START in {spec!r}", where="--positions")
    return start, end


def load_token_grid(source: str, prompt: str | None, positions: str | None = None, top: int | None = None,
                    layer: int | None = None) -> TokenGrid:
    """Read one prompt's rows from a trace; ``positions`` is ``START:END``, ``top`` caps the candidates."""
    return token_grid(select_layer(read_trace(source), layer), source, prompt, positions, top)


def select_layer(frame: pd.DataFrame, layer: int | None) -> pd.DataFrame:
    """A per-layer (logit lens) trace cut to one layer, the last by default; other traces pass through."""
    if "layer" not in frame.columns:
        if layer is not None:
            raise UsageError("the trace has no layer column (it was not traced per layer)", where="--layer")
        return frame
    layers = sorted(set(int(v) for v in frame["layer"]))
    chosen = layers[-1] if layer is None else layer
    if chosen not in layers:
        raise UsageError(f"no layer {layer} in the trace (it has {layers[0]}..{layers[-1]})", where="--layer")
    return frame[frame["layer"] == chosen]


def token_grid(frame: pd.DataFrame, source: str, prompt: str | None, positions: str | None = None,
               top: int | None = None) -> TokenGrid:
    """One prompt's numbers from a trace frame (:func:`~llmprobe.tracing.reader.read_trace`, one layer)."""
    start, end = parse_positions(positions)
    if top is not None and top < 1:
        raise UsageError("must be 1 or more", where="--top-k")
    meta = frame.attrs["llmprobe"]
    chosen_prompt = _choose_prompt(frame, prompt, source)
    frame = frame[frame["prompt_id"] == chosen_prompt]
    text = "".join(t for t, ph in zip(frame["token"], frame["phase"]) if ph != PHASE_GENERATED)
    position = frame["position"]
    frame = frame[(position >= (start if start is not None else position.min()))
                  & (position < (end if end is not None else position.max() + 1))]
    if frame.empty:
        raise UsageError(f"prompt {chosen_prompt!r} has no positions in {positions!r}", where="--positions")
    ids = np.stack(frame["topk_ids"].to_numpy())
    logprobs = np.stack(frame["topk_logprobs"].to_numpy()).astype(float)
    k = ids.shape[1] if top is None else min(top, ids.shape[1])
    if "topk_tokens" in frame.columns:
        candidates = [[str(t) for t in row[:k]] for row in frame["topk_tokens"]]
    else:  # a trace without its vocabulary: show ids
        candidates = [[f"#{i}" for i in row[:k]] for row in ids]
    has_next = frame["next_token_id"].notna().to_numpy()
    return TokenGrid(
        model=str(meta.get("model", "unknown model")),
        prompt_id=str(frame["prompt_id"].iloc[0]),
        positions=frame["position"].to_numpy(dtype=int),
        tokens=list(frame["token"]),
        phases=[str(p) for p in frame["phase"]],
        candidates=candidates,
        candidate_ids=ids[:, :k],
        probs=np.exp(logprobs[:, :k]),
        next_tokens=[t if h else None for t, h in zip(frame["next_token"], has_next)],
        next_ids=np.where(has_next, frame["next_token_id"].fillna(-1).to_numpy(), -1).astype(int),
        next_probs=np.where(has_next, np.exp(frame["next_logprob"].to_numpy(dtype=float)), np.nan),
        next_ranks=np.where(has_next, frame["next_rank"].fillna(0).to_numpy(), 0).astype(int),
        entropy_bits=frame["entropy"].to_numpy(dtype=float) / LN2,
        marked=frame["mark_index"].notna().to_numpy() if "mark_index" in frame.columns else np.zeros(len(frame), bool),
        prompt_text=text,
    )


def _choose_prompt(frame, prompt: str | None, source: str) -> str:
    ids = list(dict.fromkeys(frame["prompt_id"]))
    shown = ", ".join(ids[:8]) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")
    if prompt is None:
        if len(ids) == 1:
            return ids[0]
        raise UsageError(f"the trace has {len(ids)} prompts; pick one with --prompt (ids: {shown})", where=source)
    if prompt not in ids:
        raise UsageError(f"no prompt with id {prompt!r} in {source} (ids: {shown})", where="--prompt")
    return prompt


def plot_tokens(grid: TokenGrid, wrap: int = 16) -> Figure:
    """The heatmap figure; ``wrap`` positions per row of panels.

    The layout is computed in inches, so cells keep their size (and tokens their legibility) however
    many positions and candidates there are; the figure grows instead.
    """
    if wrap < 1:
        raise UsageError("must be 1 or more", where="--wrap")
    n_pos, k = grid.probs.shape
    width = min(wrap, n_pos)
    chunks = [slice(i, min(i + width, n_pos)) for i in range(0, n_pos, width)]
    left, right, header, footer, gap = 0.75, 1.15, 1.05, 0.1, 0.35
    heat_h, actual_h, entropy_h = k * ROW_INCHES, ROW_INCHES, 1.1
    # per chunk, top to bottom: position labels, candidates, actual row, entropy, its tick labels
    chunk_h = 0.42 + heat_h + 0.06 + actual_h + 0.12 + entropy_h + 0.45
    fig_w = left + width * COLUMN_INCHES + right
    fig_h = header + len(chunks) * chunk_h + (len(chunks) - 1) * gap + footer
    fig = Figure(figsize=(fig_w, fig_h))

    def axes(top_inches: float, height: float):
        return fig.add_axes((left / fig_w, 1 - (top_inches + height) / fig_h, width * COLUMN_INCHES / fig_w,
                             height / fig_h))

    norm = Normalize(0.0, 1.0)
    with np.errstate(divide="ignore"):
        surprisal = -np.log2(grid.next_probs)
    finite = surprisal[np.isfinite(surprisal)]
    entropy_top = 1.1 * max(float(np.max(grid.entropy_bits)), float(finite.max(initial=0.0)), 1.0)
    for row, chunk in enumerate(chunks):
        top = header + row * (chunk_h + gap) + 0.42
        heat = axes(top, heat_h)
        _draw_candidates(heat, grid, chunk, width, norm)
        _draw_actual(axes(top + heat_h + 0.06, actual_h), grid, chunk, width, norm)
        _draw_entropy(axes(top + heat_h + 0.06 + actual_h + 0.12, entropy_h), grid, chunk, width, entropy_top,
                      legend=row == 0)
        if row == 0:
            bar_h = heat_h + 0.06 + actual_h  # beside the candidates and the actual row
            bar = fig.add_axes(((left + width * COLUMN_INCHES + 0.15) / fig_w, 1 - (top + bar_h) / fig_h,
                                0.14 / fig_w, bar_h / fig_h))
            fig.colorbar(heat.images[0], cax=bar).set_label("probability", fontsize=8)
            bar.tick_params(labelsize=7)
    title = (f"{plain_label(grid.model)} — prompt {plain_label(grid.prompt_id)}: top-{k} next-token candidates,"
             f" positions {grid.positions[0]}–{grid.positions[-1]}")
    fig.text(left / fig_w, 1 - 0.12 / fig_h, title + "\n" + _prompt_excerpt(grid.prompt_text), fontsize=11,
             va="top", ha="left", linespacing=1.4)
    handles = [Patch(facecolor="none", edgecolor=HIGHLIGHT, linewidth=2, label="actual next token")]
    if grid.marked.any():
        handles.append(Patch(facecolor=MARK_COLOR, edgecolor="none", label="experiment mark (position label)"))
    if any(p == PHASE_GENERATED for p in grid.phases):
        handles.append(Patch(facecolor="none", edgecolor=GENERATED_COLOR, linewidth=2,
                             label="generated token (italic label)"))
    handles.append(Patch(facecolor="none", edgecolor="none", label="␣ space  ⏎ newline  ⇥ tab"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(left / fig_w - 0.01, 1 - 0.62 / fig_h),
               ncols=len(handles), fontsize=8, frameon=False, handlelength=1.4, columnspacing=1.5)
    return fig


def _prompt_excerpt(text: str, limit: int = 110) -> str:
    shown = " ".join(text.split())
    return plain_label(f"“{shown if len(shown) <= limit else shown[: limit - 1] + '…'}”")


def _draw_candidates(ax, grid: TokenGrid, chunk: slice, width: int, norm: Normalize) -> None:
    probs = grid.probs[chunk]
    k = probs.shape[1]
    ax.imshow(probs.T, cmap=CMAP, norm=norm, aspect="auto", interpolation="nearest",
              extent=(-0.5, probs.shape[0] - 0.5, k - 0.5, -0.5))
    ax.set_xlim(-0.5, width - 0.5)
    for col, i in enumerate(range(chunk.start, chunk.stop)):
        for rank in range(k):
            p = grid.probs[i, rank]
            ax.text(col, rank, f"{token_label(grid.candidates[i][rank])}\n{p:.2g}", ha="center", va="center",
                    fontsize=6.5, linespacing=1.0, color="white" if p > 0.55 else "black")
            if grid.candidate_ids[i, rank] == grid.next_ids[i]:
                ax.add_patch(Rectangle((col - 0.46, rank - 0.46), 0.92, 0.92, fill=False, edgecolor=HIGHLIGHT,
                                       linewidth=2))
    ax.set_yticks(range(k), [str(r + 1) for r in range(k)], fontsize=7)
    ax.set_ylabel("candidate rank", fontsize=8)
    ax.xaxis.tick_top()
    labels = [f"{grid.positions[i]}\n{token_label(grid.tokens[i])}" for i in range(chunk.start, chunk.stop)]
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    for label, i in zip(ax.get_xticklabels(), range(chunk.start, chunk.stop)):
        if grid.marked[i]:
            label.set_fontweight("bold")
            label.set_bbox({"facecolor": MARK_COLOR, "edgecolor": "none", "pad": 1.0})
        if grid.phases[i] == PHASE_GENERATED:
            label.set_color(GENERATED_COLOR)
            label.set_fontstyle("italic")
    ax.tick_params(axis="x", length=0, pad=2)


def _draw_actual(ax, grid: TokenGrid, chunk: slice, width: int, norm: Normalize) -> None:
    probs = grid.next_probs[chunk]
    ax.imshow(np.ma.masked_invalid(probs)[None, :], cmap=CMAP, norm=norm, aspect="auto", interpolation="nearest",
              extent=(-0.5, probs.shape[0] - 0.5, 0.5, -0.5))
    ax.set_xlim(-0.5, width - 0.5)
    for col, i in enumerate(range(chunk.start, chunk.stop)):
        if grid.next_tokens[i] is None:
            ax.text(col, 0, "(end)", ha="center", va="center", fontsize=6.5, color="0.4")
            continue
        p = grid.next_probs[i]
        ax.text(col, 0, f"{token_label(grid.next_tokens[i])}\n{p:.2g} · #{grid.next_ranks[i]}", ha="center",
                va="center", fontsize=6.5, linespacing=1.0, color="white" if p > 0.55 else "black")
    ax.set_yticks([0], ["actual"], fontsize=7)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(HIGHLIGHT)


def _draw_entropy(ax, grid: TokenGrid, chunk: slice, width: int, top: float, legend: bool) -> None:
    cols = np.arange(chunk.stop - chunk.start)
    ax.plot(cols, grid.entropy_bits[chunk], marker="o", markersize=3.5, color="#08519c", label="entropy H (bits)")
    with np.errstate(divide="ignore", invalid="ignore"):
        surprisal = -np.log2(grid.next_probs[chunk])
    ax.plot(cols, surprisal, linestyle="none", marker="x", markersize=4, color=HIGHLIGHT,
            label="surprisal of the actual next token (bits)")
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(0.0, top)
    ax.set_xticks(cols, [str(p) for p in grid.positions[chunk]], fontsize=7)
    ax.set_xlabel("position", fontsize=8)
    ax.set_ylabel("bits", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="upper right", ncols=2, framealpha=0.8,
                  handles=[Line2D([], [], marker="o", markersize=3.5, color="#08519c", label="entropy H"),
                           Line2D([], [], marker="x", linestyle="none", color=HIGHLIGHT,
                                  label="surprisal −log₂ P(actual next)")])


def write_tokens_figure(source: str, prompt: str | None, output: str | None, *, positions: str | None, top: int | None,
                      wrap: int, layer: int | None, force: bool) -> Path:
    """Read, draw, write one prompt's token figure; returns the file written."""
    if output is None:
        if source == "-":
            raise UsageError("give an output file when the trace comes from stdin", where="-o")
        output = str(Path(source).with_suffix("")) + (f".{prompt}" if prompt else "") + ".png"
    check_image_output(output, force, inputs=[source])
    grid = load_token_grid(source, prompt, positions, top, layer)
    save_figure(plot_tokens(grid, wrap), output, replace=force)
    return Path(output)

