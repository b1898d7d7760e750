"""``llmprobe plot-icl``: the model's predictions against the Bayesian posterior predictive as n grows.

Input is the long table ``llmprobe fit-posterior`` writes (Parquet, or CSV), one row per
(mark, category). Sequences that share a source trace and a true θ form a *group*; each group is
drawn as the mean over its sequences at every n, with a band from the 10th to the 90th percentile.
Small multiples: one probability panel per group (per run of neighbouring groups when there are more
than :data:`MAX_PANELS`), in a grid with shared axes, each drawing the model probability, the Bayes
prediction and θ for every category (for two categories only the first: the second is 1 − it).
Then one row over all groups: the per-mark distances (total variation, KL(Bayes‖model) in bits —
the direction of the ``kl_bits`` column, named by :data:`~llmprobe.analysis.results.KL_BAYES_MODEL`
everywhere it is shown), the entropy-collapse curve, and the mass the model puts on the categories.
The y scale is linear, log, or ``auto``: log when a plotted value lies below 1 %.
"""

from __future__ import annotations

import io
import json
import math
import sys
import textwrap
from dataclasses import dataclass, field
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

from llmprobe.analysis.fit_tables import FIT_META_KEY
from llmprobe.analysis.results import KL_BAYES_MODEL, gamma_test_line, verdict_line

FIT_COLUMNS = ("trace", "prompt_id", "sequence", "n", "category", "count", "theta", "model_prob", "bayes_prob",
               "mass", "tv", "kl_bits", "entropy_model_bits", "entropy_bayes_bits")
MARK_KEY = ["trace", "prompt_id", "sequence", "n"]  # one mark: its rows share the per-mark columns
MARK_METRICS = ("tv", "kl_bits", "entropy_model_bits", "entropy_bayes_bits", "mass")
CATEGORY_METRICS = ("model_prob", "bayes_prob")
BAND = (0.10, 0.90)
YSCALES = ("auto", "linear", "log")
LOG_BELOW = 0.01  # auto y scale: log when a plotted value lies below this
MAX_PANELS = 12  # probability panels; more θ groups share panels in runs of neighbours
PANEL_COLUMNS = 4
TITLE_WRAP = 160  # characters per line of the figure's title (the verdict, the parameters, the γ = 1 test)
MAX_BANDED_GROUPS = 3  # the overlaid bottom row draws bands only for this many groups or fewer
HEADLINE_KEYS = {  # the fit-posterior summary's most telling entries, in this order, with display names
    "prior.kind": "prior",
    "exact_bayes.alpha0": "exact-Bayes α₀",
    "exact_bayes.prior_mean": "prior mean",
    "forgetting.gamma": "fitted γ",
    "gamma_ci": "γ interval",
    "mean_kl_bits": f"mean {KL_BAYES_MODEL} bits",
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
            parquet = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
            frame = parquet.read().to_pandas()
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"not a readable Parquet file ({str(exc).splitlines()[0]})", where=name) from None
        kv = parquet.schema_arrow.metadata or {}
        if FIT_META_KEY in kv:
            try:
                meta = json.loads(kv[FIT_META_KEY])
            except (ValueError, RecursionError):
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
    left_out: int = 0  # marks the fit left out (mass on the categories below --min-mass): in no curve but the mass
    marks: int = 0
    left_out_n: list[int] = field(default_factory=list)  # the numbers of examples at which marks were left out


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
    # marks the fit left out (too little mass on the categories: column ``used``) are left out of every
    # curve as well, except the mass panel, which shows why
    used = frame["used"].astype(bool) if "used" in frame.columns else pd.Series(True, index=frame.index)
    long = frame[used].melt(id_vars=["group", "category", "n"], value_vars=list(CATEGORY_METRICS), var_name="metric")
    per_category = _band(long, ["group", "category", "n", "metric"])
    marks = frame.drop_duplicates(MARK_KEY)
    fitted = used.loc[marks.index]
    long = pd.concat([marks[fitted].melt(id_vars=["group", "n"], value_vars=[m for m in MARK_METRICS if m != "mass"],
                                         var_name="metric"),
                      marks.melt(id_vars=["group", "n"], value_vars=["mass"], var_name="metric")])
    per_mark = _band(long, ["group", "n", "metric"])
    return IclSummary(categories, groups, per_category, per_mark, members, list(dict.fromkeys(frame["trace"])),
                      list(dict.fromkeys(frame["prompt_id"])), left_out=int((~fitted).sum()), marks=len(marks),
                      left_out_n=sorted(int(n) for n in marks.loc[~fitted, "n"].unique()))


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
    """The conclusion and the fitted parameters worth a subtitle, per source trace: the verdict first
    (:func:`~llmprobe.analysis.results.verdict_line`, wrapped), then the parameters and, beside them, the
    γ = 1 test (:func:`~llmprobe.analysis.results.gamma_test_line`), never the test alone."""
    lines = []
    for summary in summaries[:3]:
        flat = flatten_summary(summary)
        chosen = [(name, flat[key]) for key, name in HEADLINE_KEYS.items() if key in flat]
        if not chosen:  # a summary of another shape: its first few numbers
            numbers = [(k, v) for k, v in flat.items() if isinstance(v, (int, float, list)) and not isinstance(v, bool)]
            chosen = numbers[:6]
        prefix = f"{summary['trace']}: " if len(summaries) > 1 and "trace" in summary else ""
        concluded = "verdict" in summary or "exact_bayes_rejected" in summary
        if concluded:
            lines += textwrap.wrap(prefix + verdict_line(summary), TITLE_WRAP)
            prefix = ""
        text = " · ".join(f"{name} = {_number(value)}" for name, value in chosen)
        if text:
            lines += textwrap.wrap(prefix + text, TITLE_WRAP)
        if concluded:
            lines += textwrap.wrap(gamma_test_line(summary), TITLE_WRAP)
    return "\n".join(lines)


def _colors(n: int) -> list:
    if n == 1:
        return ["#1f4e9c"]
    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / (n - 1)) for i in range(n)]


def panel_groups(n_groups: int) -> list[list[int]]:
    """Which groups each probability panel draws: one group a panel up to :data:`MAX_PANELS`, else
    :data:`MAX_PANELS` runs of neighbouring groups (groups are sorted by θ)."""
    if n_groups <= MAX_PANELS:
        return [[g] for g in range(n_groups)]
    return [chunk.tolist() for chunk in np.array_split(np.arange(n_groups), MAX_PANELS)]


def shown_categories(categories: list[str]) -> list[str]:
    """The categories with a probability curve: with two, the second is 1 − the first and is left out."""
    return categories[:1] if len(categories) == 2 else list(categories)


def choose_yscale(values: np.ndarray, yscale: str) -> str:
    """``linear`` or ``log``: ``auto`` is log when any plotted positive value lies below :data:`LOG_BELOW`
    (probabilities under 1 % are flat at the bottom of a linear axis)."""
    if yscale != "auto":
        return yscale
    values = np.asarray(values, dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    return "log" if positive.size and positive.min() < LOG_BELOW else "linear"


def _log_bottom(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    return 10.0 ** math.floor(math.log10(positive.min())) if positive.size else LOG_BELOW


def plot_icl(summary: IclSummary, fit_summaries: list[dict[str, Any]] | None = None, *,
             yscale: str = "auto") -> Figure:
    """Small multiples of P(category) against n, one panel per θ group (model vs Bayes vs θ), then TV,
    KL, entropy collapse and mass against n for every group. ``yscale``: linear, log or auto
    (:func:`choose_yscale`), for the probability panels and the KL panel."""
    if yscale not in YSCALES:
        raise UsageError(f"expected one of {', '.join(YSCALES)}, got {yscale!r}", where="--yscale")
    shown = shown_categories(summary.categories)
    panels = panel_groups(len(summary.groups))
    columns = min(len(panels), PANEL_COLUMNS)
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(15.5, 2.9 * rows + 3.6 + 1.0), layout="constrained")
    outer = fig.add_gridspec(1, 2, width_ratios=[5.0, 1.0])
    grid = outer[0].subgridspec(rows + 1, 12, height_ratios=[1.0] * rows + [1.25])
    span = 12 // columns
    group_colors = _colors(len(summary.groups))
    category_colors = [colormaps["tab10"](i % 10) for i in range(len(shown))]
    per_category = summary.per_category[summary.per_category["category"].isin(shown)]
    thetas = [t[summary.categories.index(c)] for t in summary.groups["theta"] if t is not None for c in shown]
    plotted = np.concatenate([per_category[["mean", "lo", "hi"]].to_numpy().ravel(), np.asarray(thetas, float)])
    scale = choose_yscale(plotted, yscale)
    first = None
    for p, members in enumerate(panels):
        r, c = divmod(p, columns)
        ax = fig.add_subplot(grid[r, c * span:(c + 1) * span], sharex=first, sharey=first)
        ax.set_gid(f"panel|{p}")
        first = first or ax
        for g in members:
            group = summary.groups.iloc[g]
            for i, category in enumerate(shown):
                color = category_colors[i] if len(shown) > 1 else (group_colors[g] if len(members) > 1 else "#1f4e9c")
                mine = per_category[(per_category["group"] == g) & (per_category["category"] == category)]
                _mean_band(ax, mine[mine["metric"] == "model_prob"], color, "-", f"model_prob|{category}|{g}")
                _mean_band(ax, mine[mine["metric"] == "bayes_prob"], color, "--", f"bayes_prob|{category}|{g}",
                           band=False)
                if group.theta is not None:
                    ax.axhline(group.theta[summary.categories.index(category)], color=color, linestyle=":",
                               linewidth=1.3, gid=f"theta|{category}|{g}")
        ax.set_title(plain_label(_panel_title(summary, members)), fontsize=9.5)
        ax.set_xlabel("examples seen (n)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if c == 0:
            ax.set_ylabel(f"P({plain_label(shown[0])})" if len(shown) == 1 else "P(category)")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    top = 1.0 if len(summary.categories) == 2 else min(1.0, 1.15 * max(np.nanmax(plotted), 0.0))
    if scale == "log":
        first.set_ylim(_log_bottom(plotted), 1.2 * top)
    else:
        first.set_ylim(-0.02 * top, top + 0.02 * top)
    metric_panels = [("tv", "total variation(model, Bayes)", "TV distance"),
                     ("kl_bits", KL_BAYES_MODEL, f"{KL_BAYES_MODEL} (bits)"),
                     ("entropy", "entropy collapse (over the categories)", "entropy (bits)"),
                     ("mass", "model's mass on the categories", "P(any category)")]
    bands = len(summary.groups) <= MAX_BANDED_GROUPS
    for i, (metric, title, ylabel) in enumerate(metric_panels):
        ax = fig.add_subplot(grid[rows, 3 * i:3 * (i + 1)])
        for group, color in zip(summary.groups.itertuples(), group_colors):
            mine = summary.per_mark[summary.per_mark["group"] == group.group]
            if metric == "entropy":
                _mean_band(ax, mine[mine["metric"] == "entropy_model_bits"], color, "-",
                           f"entropy_model_bits|{group.group}", band=bands)
                _mean_band(ax, mine[mine["metric"] == "entropy_bayes_bits"], color, "--",
                           f"entropy_bayes_bits|{group.group}", band=False)
            else:
                _mean_band(ax, mine[mine["metric"] == metric], color, "-", f"{metric}|{group.group}", band=bands)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("examples seen (n)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        kl = summary.per_mark.loc[summary.per_mark["metric"] == "kl_bits", ["mean", "lo", "hi"]].to_numpy()
        if metric == "kl_bits" and choose_yscale(kl.ravel(), yscale) == "log":
            ax.set_yscale("log")
            ax.set_ylim(bottom=_log_bottom(kl.ravel()))
        else:
            ax.set_ylim(bottom=0)
        if metric in ("tv", "mass"):
            ax.set_ylim(top=1.02)
        ax.grid(alpha=0.3)
    legend_ax = fig.add_subplot(outer[1])
    _legends(legend_ax, summary, shown, category_colors, group_colors, bands)
    if summary.left_out:
        legend_ax.text(0.0, 0.0, _left_out_note(summary, fit_summaries or []), transform=legend_ax.transAxes,
                       fontsize=8, va="bottom", ha="left", wrap=True, gid="left-out")
    fig.suptitle(_title(summary, fit_summaries or []), fontsize=11)
    return fig


def _panel_title(summary: IclSummary, members: list[int]) -> str:
    groups = summary.groups.iloc[members]
    if len(members) == 1:
        return f"{groups['label'].iloc[0]} ({groups['sequences'].iloc[0]} seq.)"
    return f"{groups['label'].iloc[0]} … {groups['label'].iloc[-1]} ({len(members)} groups)"


def _legends(ax, summary: IclSummary, shown: list[str], category_colors: list, group_colors: list,
             bands: bool) -> None:
    ax.axis("off")
    style = [Line2D([], [], color="0.2", linestyle="-", label="model (mean)"),
             Patch(facecolor="0.2", alpha=0.18, label=f"model, {BAND[0]:.0%}–{BAND[1]:.0%}\nof sequences"),
             Line2D([], [], color="0.2", linestyle="--", label="Bayes posterior\npredictive (mean)"),
             Line2D([], [], color="0.2", linestyle=":", label="true θ")]
    legends = [ax.legend(handles=style, loc="upper left", fontsize=8.5, frameon=False, title="lines",
                         title_fontsize=9, alignment="left")]
    if len(shown) > 1:
        handles = [Line2D([], [], color=c, linewidth=3, label=plain_label(name)) for name, c in zip(shown, category_colors)]
        legends.append(ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, 0.7), fontsize=8.5,
                                 frameon=False, title="categories (top panels)", title_fontsize=9, alignment="left"))
    if len(summary.groups) > 1:
        handles = [Line2D([], [], color=c, linewidth=3, label=f"{plain_label(g.label)} ({g.sequences} seq.)")
                   for g, c in zip(summary.groups.itertuples(), group_colors)]
        note = "" if bands else f"\n(bands: {MAX_BANDED_GROUPS} groups or fewer)"
        legends.append(ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, 0.7 if len(shown) == 1 else 0.45),
                                 fontsize=8, frameon=False, title=f"groups (bottom row){note}", title_fontsize=9,
                                 alignment="left"))
    for legend in legends[:-1]:
        ax.add_artist(legend)


def _left_out_note(summary: IclSummary, fit_summaries: list[dict[str, Any]]) -> str:
    """Which marks the curves leave out, and why (they are left out of the fit for the same reason)."""
    levels = {s["thresholds"]["min_mass"] for s in fit_summaries
              if isinstance(s.get("thresholds"), dict) and isinstance(s["thresholds"].get("min_mass"), (int, float))}
    below = f"less than {levels.pop():g}" if len(levels) == 1 else "too little"
    at = ", ".join(map(str, summary.left_out_n[:6])) + (" …" if len(summary.left_out_n) > 6 else "")
    return "\n".join(textwrap.wrap(
        f"Left out of every curve but the mass, as in the fit: {summary.left_out} of {summary.marks} marks with"
        f" {below} probability on the categories (--min-mass), at n = {at}.", 34))


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


def write_icl_figure(source: str, output: str | None, *, force: bool, yscale: str = "auto") -> Path:
    """Read a fit table, draw it, write the figure; returns the file written."""
    if output is None:
        if source == "-":
            raise UsageError("give an output file when the fit table comes from stdin", where="-o")
        output = str(Path(source).with_suffix("")) + ".icl.png"
    check_image_output(output, force, inputs=[source])
    fit = open_fit(source)
    save_figure(plot_icl(summarize(fit), fit.summaries, yscale=yscale), output, replace=force)
    return Path(output)
