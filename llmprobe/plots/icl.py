"""``llmprobe plot-icl``: the model's predictions against the Bayesian posterior predictive as n grows.

Input is the long table ``llmprobe fit-posterior`` writes (Parquet, or CSV), one row per
(mark, category). Sequences that share a source trace and a true θ form a *group*; each group is
drawn as the mean over its sequences at every n, with a band from the 10th to the 90th percentile.
Panels: one per category (model probability, Bayes prediction, θ), then the per-mark distances
(total variation, KL(Bayes‖model) in bits), the entropy-collapse curve, and the probability mass
the model puts on the category set at all.
"""

from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from llmprobe.errors import UsageError
from llmprobe.plots.common import check_image_output, plain_label, save_figure

from llmprobe.analysis.fits import FIT_META_KEY  # noqa: E402
FIT_COLUMNS = ("trace", "prompt_id", "sequence", "n", "category", "count", "theta", "model_prob", "bayes_prob",
               "mass", "tv", "kl_bits", "entropy_model_bits", "entropy_bayes_bits")
MARK_KEY = ["trace", "prompt_id", "sequence", "n"]  # one mark: its rows share the per-mark columns
MARK_METRICS = ("tv", "kl_bits", "entropy_model_bits", "entropy_bayes_bits", "mass")
CATEGORY_METRICS = ("model_prob", "bayes_prob")
BAND = (0.10, 0.90)
HEADLINE_KEYS = {  # the fit-posterior summary's most telling entries, in this order, with display names
    "prior.kind": "prior",
    "exact_bayes.alpha0": "exact-Bayes α₀",
    "exact_bayes.prior_mean": "prior mean",
    "forgetting.gamma": "fitted γ",
    "gamma_ci": "γ interval",
    "exact_bayes_rejected": "exact Bayes rejected",
    "mean_kl_bits": "mean KL (bits)",
}


@dataclass
class FitTable:
    frame: pd.DataFrame
    summaries: list[dict[str, Any]]  # the fit summary of each source trace, from the Parquet metadata
    source: str


def open_fit(source: str) -> FitTable:
    """A fit-posterior table (Parquet or CSV, by content; ``-`` reads stdin) with its fit parameters."""
    if source == "-":
        data = sys.stdin.buffer.read()
        name = "<stdin>"
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError("no such file" if not path.exists() else "not a file", where=source)
        data = path.read_bytes()
        name = source
    summaries: list[dict[str, Any]] = []
    if data[:4] == b"PAR1":
        try:
            parquet = pq.ParquetFile(pa.BufferReader(data))
            frame = parquet.read().to_pandas()
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"not a readable Parquet file ({str(exc).splitlines()[0]})", where=name) from None
        kv = parquet.schema_arrow.metadata or {}
        if FIT_META_KEY in kv:
            try:
                meta = json.loads(kv[FIT_META_KEY])
            except ValueError:
                raise UsageError("its fit metadata is not valid JSON (the file is damaged)", where=name) from None
            summaries = [m for m in (meta if isinstance(meta, list) else [meta]) if isinstance(m, dict)]
    else:
        try:
            frame = pd.read_csv(io.BytesIO(data), dtype={"trace": str, "prompt_id": str, "category": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise UsageError(f"neither Parquet nor CSV ({str(exc).splitlines()[0]})", where=name) from None
    missing = [c for c in FIT_COLUMNS if c not in frame.columns]
    if missing:
        raise UsageError(f"not a fit-posterior table: no {', '.join(missing)} column(s)", where=name)
    if frame.empty:
        raise UsageError("the fit table has no rows", where=name)
    frame = frame.astype({"trace": str, "prompt_id": str, "category": str})
    for column in ("theta", "model_prob", "bayes_prob", *MARK_METRICS):
        values = pd.to_numeric(frame[column], errors="coerce").astype(float)
        bad = values.isna() & frame[column].notna()
        if bad.any():
            row = int(bad.to_numpy().argmax())
            raise UsageError(f"column {column} holds {frame[column].iloc[row]!r} in row {row + 1}, not a number",
                             where=name)
        frame[column] = values
    for column in ("model_prob", "bayes_prob"):
        outside = ~frame[column].between(0.0, 1.0) & frame[column].notna()
        if outside.any():
            row = int(outside.to_numpy().argmax())
            raise UsageError(f"column {column} holds {frame[column].iloc[row]!r} in row {row + 1}, not a"
                             " probability", where=name)
    return FitTable(frame, summaries, name)


@dataclass
class IclSummary:
    """What the figure draws: per (group, category, n) and per (group, n), mean and band over sequences."""

    categories: list[str]
    groups: pd.DataFrame  # group, trace, theta (tuple or None), label, sequences
    per_category: pd.DataFrame  # group, category, n, metric, mean, lo, hi, rows
    per_mark: pd.DataFrame  # group, n, metric, mean, lo, hi, rows
    members: pd.DataFrame  # trace, layout, prompt_id, sequence, group: which group each prompt belongs to
    traces: list[str]
    prompt_ids: list[str]


def summarize(fit: FitTable) -> IclSummary:
    """Group the prompts by (trace, layout, θ) and reduce every curve to its mean and band per n."""
    frame = fit.frame
    if "layout" not in frame.columns:  # the layout column is optional: one layout
        frame = frame.assign(layout="")
    categories = list(dict.fromkeys(frame["category"]))
    units = ["trace", "layout", "prompt_id", "sequence"]
    # θ of each prompt's sequence as a tuple over the categories (None when the table has no θ)
    theta = (frame.groupby([*units, "category"], sort=False)["theta"].first()
             .unstack("category").reindex(columns=categories))
    members = theta.index.to_frame(index=False)
    thetas = [None if np.isnan(row).any() else tuple(np.round(row, 6)) for row in theta.to_numpy()]
    keys_of = list(zip(members["trace"], members["layout"], thetas))
    keys = sorted(set(keys_of), key=lambda k: (k[0], k[1], k[2] is None, k[2] or ()))
    index = {k: i for i, k in enumerate(keys)}
    members["group"] = [index[k] for k in keys_of]
    multi_trace, multi_layout = members["trace"].nunique() > 1, members["layout"].nunique() > 1
    groups = pd.DataFrame({
        "group": range(len(keys)),
        "trace": [k[0] for k in keys],
        "theta": [k[2] for k in keys],
        "label": [_group_label(k, multi_trace, multi_layout) for k in keys],
        "sequences": [members.loc[members["group"] == i, "sequence"].nunique() for i in range(len(keys))],
    })
    frame = frame.merge(members, on=units)
    long = frame.melt(id_vars=["group", "category", "n"], value_vars=list(CATEGORY_METRICS), var_name="metric")
    per_category = _band(long, ["group", "category", "n", "metric"])
    marks = frame.drop_duplicates(MARK_KEY)
    long = marks.melt(id_vars=["group", "n"], value_vars=list(MARK_METRICS), var_name="metric")
    per_mark = _band(long, ["group", "n", "metric"])
    return IclSummary(categories, groups, per_category, per_mark, members, list(dict.fromkeys(frame["trace"])),
                      list(dict.fromkeys(frame["prompt_id"])))


def _band(long: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    grouped = long.dropna(subset=["value"]).groupby(keys, sort=True)["value"]
    out = grouped.agg(mean="mean", rows="size")
    out["lo"] = grouped.quantile(BAND[0])
    out["hi"] = grouped.quantile(BAND[1])
    return out.reset_index()


def _group_label(key: tuple, multi_trace: bool, multi_layout: bool) -> str:
    trace, layout, theta = key
    label = "θ unknown" if theta is None else "θ = " + "/".join(f"{t:.2g}" for t in theta)
    if multi_layout:
        label = f"{layout}, {label}"
    return f"{trace}: {label}" if multi_trace else label


def flatten_summary(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested fit summary as dotted keys -> numbers, strings, booleans and short numeric lists."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten_summary(inner, f"{prefix}{key}."))
        return out
    if isinstance(value, (int, float, str, bool)) or (
            isinstance(value, list) and 0 < len(value) <= 8 and all(isinstance(v, (int, float)) for v in value)):
        return {prefix[:-1]: value}
    return {}


def _number(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def fit_params_line(summaries: list[dict[str, Any]]) -> str:
    """The fitted parameters worth a subtitle, one line per source trace."""
    lines = []
    for summary in summaries[:3]:
        flat = flatten_summary(summary)
        chosen = [(name, flat[key]) for key, name in HEADLINE_KEYS.items() if key in flat]
        if not chosen:  # a summary of another shape: its first few numbers
            numbers = [(k, v) for k, v in flat.items() if isinstance(v, (int, float, list)) and not isinstance(v, bool)]
            chosen = numbers[:6]
        text = " · ".join(f"{name} = {_number(value)}" for name, value in chosen)
        if text:
            lines.append((f"{summary['trace']}: " if len(summaries) > 1 and "trace" in summary else "") + text)
    return "\n".join(lines)


def _colors(summary: IclSummary) -> list:
    n = len(summary.groups)
    if n == 1:
        return ["#1f4e9c"]
    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / (n - 1)) for i in range(n)]


def plot_icl(summary: IclSummary, fit_summaries: list[dict[str, Any]] | None = None) -> Figure:
    """Category panels (model vs Bayes vs θ), then TV, KL, entropy collapse and mass against n."""
    k = len(summary.categories)
    per_row = min(k, 4)
    cat_rows = math.ceil(k / per_row)
    fig = Figure(figsize=(15.5, 3.4 * (cat_rows + 1) + 1.0), layout="constrained")
    outer = fig.add_gridspec(1, 2, width_ratios=[5.0, 1.0])
    grid = outer[0].subgridspec(cat_rows + 1, 12)
    colors = _colors(summary)
    span = 12 // per_row
    cat_axes = []
    for i, category in enumerate(summary.categories):
        r, c = divmod(i, per_row)
        ax = fig.add_subplot(grid[r, c * span:(c + 1) * span], sharey=cat_axes[0] if cat_axes else None)
        cat_axes.append(ax)
        for group, color in zip(summary.groups.itertuples(), colors):
            rows = summary.per_category[(summary.per_category["group"] == group.group)
                                        & (summary.per_category["category"] == category)]
            _mean_band(ax, rows[rows["metric"] == "model_prob"], color, "-", f"model_prob|{category}|{group.group}")
            _mean_band(ax, rows[rows["metric"] == "bayes_prob"], color, "--", f"bayes_prob|{category}|{group.group}",
                       band=False)
            if group.theta is not None:
                theta = group.theta[i]
                ax.axhline(theta, color=color, linestyle=":", linewidth=1.3, gid=f"theta|{category}|{group.group}")
        ax.set_title(f"P({plain_label(category)}) as examples accumulate", fontsize=10)
        ax.set_xlabel("examples seen (n)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"P({plain_label(category)} | categories)")
        ax.grid(alpha=0.3)
    # two categories mirror each other across 0.5; with more, each sits low and gets the room it needs
    top = 1.0 if k == 2 else min(1.0, 1.15 * max(summary.per_category["hi"].max(), max(
        (max(g) for g in summary.groups["theta"] if g is not None), default=0.0)))
    cat_axes[0].set_ylim(-0.02 * top, top + 0.02 * top)
    panels = [("tv", "total variation(model, Bayes)", "TV distance"),
              ("kl_bits", "KL(Bayes ‖ model)", "KL (bits)"),
              ("entropy", "entropy collapse (over the categories)", "entropy (bits)"),
              ("mass", "model's mass on the categories", "P(any category)")]
    for i, (metric, title, ylabel) in enumerate(panels):
        ax = fig.add_subplot(grid[cat_rows, 3 * i:3 * (i + 1)])
        for group, color in zip(summary.groups.itertuples(), colors):
            rows = summary.per_mark[summary.per_mark["group"] == group.group]
            if metric == "entropy":
                _mean_band(ax, rows[rows["metric"] == "entropy_model_bits"], color, "-",
                           f"entropy_model_bits|{group.group}")
                _mean_band(ax, rows[rows["metric"] == "entropy_bayes_bits"], color, "--",
                           f"entropy_bayes_bits|{group.group}", band=False)
            else:
                _mean_band(ax, rows[rows["metric"] == metric], color, "-", f"{metric}|{group.group}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("examples seen (n)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        if metric in ("tv", "mass"):
            ax.set_ylim(top=1.02)
        ax.grid(alpha=0.3)
    style = [Line2D([], [], color="0.2", linestyle="-", label="model (mean)"),
             Patch(facecolor="0.2", alpha=0.18, label=f"model, {BAND[0]:.0%}–{BAND[1]:.0%}\nof sequences"),
             Line2D([], [], color="0.2", linestyle="--", label="Bayes posterior\npredictive (mean)"),
             Line2D([], [], color="0.2", linestyle=":", label="true θ")]
    legend_ax = fig.add_subplot(outer[1])
    legend_ax.axis("off")
    first = legend_ax.legend(handles=style, loc="upper left", fontsize=8.5, frameon=False, title="lines",
                             title_fontsize=9, alignment="left")
    if len(summary.groups) > 1 or summary.groups["theta"].iloc[0] is not None:
        legend_ax.add_artist(first)
        groups = [Line2D([], [], color=c, linewidth=3, label=f"{plain_label(g.label)} ({g.sequences} seq.)")
                  for g, c in zip(summary.groups.itertuples(), colors)]
        legend_ax.legend(handles=groups, loc="upper left", bbox_to_anchor=(0.0, 0.66), fontsize=8.5, frameon=False,
                         title="groups of sequences", title_fontsize=9, alignment="left")
    fig.suptitle(_title(summary, fit_summaries or []), fontsize=11)
    return fig


def _title(summary: IclSummary, fit_summaries: list[dict[str, Any]]) -> str:
    ids = summary.prompt_ids
    prompts = ids[0] if len(ids) == 1 else f"{len(ids)} prompts {ids[0]} … {ids[-1]}"
    title = (f"{', '.join(map(plain_label, summary.traces))} — in-context predictions vs Bayesian posterior"
             f" predictive ({plain_label(prompts)})")
    params = fit_params_line(fit_summaries)
    return title + ("\n" + plain_label(params) if params else "")


def _mean_band(ax, rows: pd.DataFrame, color, linestyle: str, gid: str, band: bool = True) -> None:
    if rows.empty:
        return
    ax.plot(rows["n"], rows["mean"], color=color, linestyle=linestyle, linewidth=1.6, gid=gid)
    if band and (rows["rows"] > 1).any():
        ax.fill_between(rows["n"], rows["lo"], rows["hi"], color=color, alpha=0.18, linewidth=0, gid=gid)


def write_icl_figure(source: str, output: str | None, *, force: bool) -> Path:
    """Read a fit table, draw it, write the figure; returns the file written."""
    if output is None:
        if source == "-":
            raise UsageError("give an output file when the fit table comes from stdin", where="-o")
        output = str(Path(source).with_suffix("")) + ".icl.png"
    check_image_output(output, force, inputs=[source])
    fit = open_fit(source)
    save_figure(plot_icl(summarize(fit), fit.summaries), output, replace=force)
    return Path(output)
