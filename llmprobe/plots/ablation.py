"""``llmprobe plot-ablate``: where in the network the fit moves — one figure of one or more ``ablate`` sweeps.

Every panel shows a component's change of mean KL(Bayes‖model) from the un-ablated baseline in bits
(``delta_kl_bits``: positive, the ablated model is further from Bayes), and marks the components whose
ablation flips the verdict with the marker of the new verdict (the baseline's verdict is in the title):

* heads (``--over heads``): a layer × head heatmap, diverging and centred on zero (red: KL up, blue: down;
  the colour range symmetric about zero), one row per swept layer; a component that could not be fitted
  (``no-fit``) is a grey cell;
* per-layer components (``--over attn``, ``mlp``, ``layers``): grouped bars per layer, one colour per kind;
* directions (``--over directions``): one strip per layer, the principal components as labelled points and
  the random unit directions of the same layer as grey points beside them — a real direction matters when
  it stands outside its random spread.

Several sweeps of the same model (a head sweep and an attn and an mlp sweep, say) are drawn into one
figure; each row keeps the change from its own sweep's baseline. What each panel draws is computed by the
pure functions :func:`head_grid`, :func:`layer_bars` and :func:`direction_strips`, which the tests read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from llmprobe.analysis.ablation import NO_FIT, Sweep, open_sweep
from llmprobe.analysis.results import KL_BAYES_MODEL
from llmprobe.errors import UsageError
from llmprobe.plots.common import VERDICT_MARKERS, check_image_output, plain_label, save_figure

DELTA_LABEL = f"Δ {KL_BAYES_MODEL}, bits"
FLIP_MARKERS = {**VERDICT_MARKERS, NO_FIT: "d"}
LAYER_KINDS = {"attn": ("attention output", "#1f77b4"), "mlp": ("MLP output", "#ff7f0e"),
               "block": ("whole block", "#7f7f7f")}
CMAP = "RdBu_r"


@dataclass(frozen=True)
class HeadGrid:
    """The heatmap's data: ``delta[i, h]`` is head h of ``layers[i]`` (NaN: not swept, or no fit), ``verdict``
    the ablated model's verdict there (empty: not swept) and ``flipped`` where it differs from the baseline's."""

    layers: list[int]
    delta: np.ndarray
    verdict: np.ndarray
    flipped: np.ndarray


def head_grid(frame: pd.DataFrame) -> HeadGrid | None:
    """The head rows of a sweep table as a layer × head grid; None when it has none."""
    heads = frame[frame["kind"] == "head"]
    if heads.empty:
        return None
    layers = sorted(int(v) for v in heads["layer"].unique())
    n_heads = int(heads["head"].max()) + 1
    delta = np.full((len(layers), n_heads), np.nan)
    verdict = np.full((len(layers), n_heads), "", dtype=object)
    flipped = np.zeros((len(layers), n_heads), bool)
    row_of = {layer: i for i, layer in enumerate(layers)}
    for row in heads.itertuples():
        i, h = row_of[int(row.layer)], int(row.head)
        delta[i, h] = np.nan if pd.isna(row.delta_kl_bits) else float(row.delta_kl_bits)
        verdict[i, h], flipped[i, h] = row.verdict, bool(row.verdict_flipped)
    return HeadGrid(layers, delta, verdict, flipped)


def layer_bars(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of per-layer components (attn, mlp, block): kind, layer, delta_kl_bits, verdict, verdict_flipped."""
    rows = frame[frame["kind"].isin(list(LAYER_KINDS))]
    return rows[["kind", "layer", "delta_kl_bits", "verdict", "verdict_flipped"]].reset_index(drop=True)


def direction_strips(frame: pd.DataFrame) -> pd.DataFrame:
    """The direction rows (pca and random): component, kind, layer, delta_kl_bits, verdict, verdict_flipped."""
    rows = frame[frame["kind"].isin(["pca", "random"])]
    return rows[["component", "kind", "layer", "delta_kl_bits", "verdict", "verdict_flipped"]].reset_index(drop=True)


def combined_rows(sweeps: list[Sweep]) -> pd.DataFrame:
    """The ablated components of every sweep (baselines left out), after checking that the sweeps are of one model
    on the same targets; a component swept twice keeps its first row."""
    first = sweeps[0]
    for other in sweeps[1:]:
        for key in ("weights_sha256", "targets"):
            if first.meta.get(key) != other.meta.get(key):
                what = "model" if key == "weights_sha256" else "targets"
                raise UsageError(f"sweeps another {what} than {first.source} ({first.meta.get('model')}); draw sweeps"
                                 " of one model and one set of prompts together", where=other.source)
    frame = pd.concat([s.frame.iloc[1:] for s in sweeps], ignore_index=True)
    return frame.drop_duplicates("component", keep="first")


def plot_ablation(sweeps: list[Sweep]) -> Figure:
    """The figure for one or more sweeps of one model (see the module docstring)."""
    frame = combined_rows(sweeps)
    grid, bars, strips = head_grid(frame), layer_bars(frame), direction_strips(frame)
    panels = [name for name, present in (("heads", grid is not None), ("layers", not bars.empty),
                                         ("directions", not strips.empty)) if present]
    if not panels:
        raise UsageError("the sweep has no ablated components to draw", where=sweeps[0].source)
    heights = {"heads": max(2.5, 0.22 * len(grid.layers) + 1.2) if grid is not None else 0, "layers": 3.2,
               "directions": 3.2}
    width = max(8.0, 0.3 * grid.delta.shape[1] + 3) if grid is not None else 9.0
    fig = Figure(figsize=(width, sum(heights[p] for p in panels) + 1.0), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=[heights[p] for p in panels])[:, 0]
    flips: set[str] = set()
    for ax, panel in zip(axes, panels):
        ax.set_gid(panel)  # the tests find each panel by it
        if panel == "heads":
            flips |= _draw_heads(fig, ax, grid)
        elif panel == "layers":
            flips |= _draw_bars(ax, bars)
        else:
            flips |= _draw_strips(ax, strips)
    base = sweeps[0].baseline
    ablation = sweeps[0].meta.get("sweep", {}).get("ablation", "zero")
    fig.suptitle(f"{plain_label(str(sweeps[0].meta.get('model')))}: {ablation}-ablation, one component at a time —"
                 f" baseline verdict {base['verdict']}, {KL_BAYES_MODEL} {base['mean_kl_bits']:.3g} bits",
                 fontsize=10)
    if flips:
        fig.legend(handles=[Line2D([], [], linestyle="", marker=FLIP_MARKERS.get(v, "d"), color="black",
                                   markerfacecolor="none", label=f"verdict flipped to {v}") for v in sorted(flips)],
                   loc="outside lower center", ncols=len(flips), fontsize=8, frameon=False)
    return fig


def _symmetric_limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _draw_heads(fig: Figure, ax, grid: HeadGrid) -> set[str]:
    limit = _symmetric_limit(grid.delta)
    cmap = colormaps[CMAP].with_extremes(bad="#bbbbbb")
    image = ax.imshow(np.ma.masked_invalid(grid.delta), cmap=cmap, norm=TwoSlopeNorm(0.0, -limit, limit),
                      aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(grid.layers)), [str(layer) for layer in grid.layers],
                  fontsize=7 if len(grid.layers) > 12 else 9)
    ax.set_xticks(range(grid.delta.shape[1]))
    ax.tick_params(axis="x", labelsize=7 if grid.delta.shape[1] > 12 else 9)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("attention heads: each head's slice of the attention output before o_proj ablated", fontsize=9)
    fig.colorbar(image, ax=ax, label=DELTA_LABEL, shrink=0.9)
    found = set()
    for i, h in zip(*np.nonzero(grid.flipped)):
        verdict = str(grid.verdict[i, h])
        ax.scatter([h], [i], marker=FLIP_MARKERS.get(verdict, "d"), s=40, facecolors="none", edgecolors="black",
                   linewidths=1.2, zorder=3)
        found.add(verdict)
    return found


def _draw_bars(ax, bars: pd.DataFrame) -> set[str]:
    kinds = [k for k in LAYER_KINDS if k in set(bars["kind"])]
    width = 0.8 / len(kinds)
    found = set()
    for j, kind in enumerate(kinds):
        rows = bars[bars["kind"] == kind].sort_values("layer")
        x = rows["layer"].to_numpy(float) + (j - (len(kinds) - 1) / 2) * width
        values = rows["delta_kl_bits"].to_numpy(float)
        label, color = LAYER_KINDS[kind]
        ax.bar(x, np.nan_to_num(values), width=width, color=color, label=label, gid=kind)
        for xv, value, row in zip(x, values, rows.itertuples()):
            if row.verdict_flipped:
                ax.scatter([xv], [value if np.isfinite(value) else 0.0], marker=FLIP_MARKERS.get(row.verdict, "d"),
                           s=40, facecolors="none", edgecolors="black", linewidths=1.2, zorder=3)
                found.add(row.verdict)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(sorted(bars["layer"].unique()))
    ax.tick_params(axis="x", labelsize=7 if bars["layer"].nunique() > 16 else 9)
    ax.set_xlabel("layer")
    ax.set_ylabel(DELTA_LABEL)
    ax.set_title("per layer: " + ", ".join(LAYER_KINDS[k][0] for k in kinds) + " ablated", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    return found


def _draw_strips(ax, strips: pd.DataFrame) -> set[str]:
    layers = sorted(int(v) for v in strips["layer"].unique())
    found = set()
    rng = np.random.default_rng(0)  # the random controls' horizontal jitter only
    for x, layer in enumerate(layers):
        rows = strips[strips["layer"] == layer]
        randoms = rows[rows["kind"] == "random"]
        ax.scatter(x - 0.15 + rng.uniform(-0.06, 0.06, len(randoms)), randoms["delta_kl_bits"].to_numpy(float),
                   color="#999999", s=14, gid="random", label="random directions" if x == 0 else None)
        real = rows[rows["kind"] == "pca"]
        ax.scatter(np.full(len(real), x + 0.15), real["delta_kl_bits"].to_numpy(float), color="#d62728", s=24,
                   gid="pca", label="principal components" if x == 0 else None)
        for row in real.itertuples():
            if np.isfinite(row.delta_kl_bits):
                ax.annotate(row.component.split(".", 1)[1], (x + 0.15, row.delta_kl_bits), xytext=(5, 0),
                            textcoords="offset points", fontsize=7, va="center")
        for offset, row in [(-0.15, r) for r in randoms.itertuples()] + [(0.15, r) for r in real.itertuples()]:
            if row.verdict_flipped and np.isfinite(row.delta_kl_bits):
                ax.scatter([x + offset], [row.delta_kl_bits], marker=FLIP_MARKERS.get(row.verdict, "d"), s=60,
                           facecolors="none", edgecolors="black", linewidths=1.2, zorder=3)
                found.add(row.verdict)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(layers)), [f"after block {layer}" for layer in layers])
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylabel(DELTA_LABEL)
    ax.set_title("directions of the residual stream projected out: principal components vs random controls",
                 fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    return found


def write_ablation_figure(sources: list[str], output: str | None, *, force: bool) -> Path:
    """Read the sweeps, draw them, write the figure; returns the file written."""
    if output is None:
        output = str(Path(sources[0]).with_suffix("")) + ".ablate.png"
    check_image_output(output, force, inputs=sources)
    sweeps = [open_sweep(source) for source in sources]
    save_figure(plot_ablation(sweeps), output, replace=force)
    return Path(output)
