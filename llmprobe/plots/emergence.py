"""``llmprobe plot-compare``: when does a model become Bayesian — a comparison's measures over training and size.

One row of panels per measure (KL(Bayes‖model), KL to the best filter, γ with its interval, α0, the entropy
error, the mass on the categories). Left: against the training step, one line per size of a series (a
model without a step, e.g. SmolLM2, as a dashed level across the panel). Right: against the parameter count
on a log axis, each size at its last checkpoint (joined in order of size) and every other model as a star.
The verdict is the marker (filled circle: consistent; others as the legend says), and a dotted line marks
the step at which each size turns consistent for good (:func:`~llmprobe.analysis.comparison.turning_points`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from llmprobe.analysis.comparison import LOW_MASS, ComparisonTable, group_of, read_comparison, turning_points
from llmprobe.analysis.results import KL_BAYES_MODEL
from llmprobe.errors import UsageError
from llmprobe.plots.common import VERDICT_MARKERS, check_image_output, plain_label, save_figure

# column, axis label, log scale
MEASURES = (("kl_bits", f"{KL_BAYES_MODEL}, bits", True),
            ("kl_best_filter_bits", "KL(model‖best filter), bits", True),
            ("gamma", "γ (95 % CI)", False), ("alpha0", "α0 (exact-Bayes fit)", True),
            ("entropy_mae_bits", "entropy error, bits", True), ("mass", "mass on categories", False))
MARKERS = {**VERDICT_MARKERS, LOW_MASS: "."}
LOG_FLOOR = 1e-7  # zeros on a log axis are drawn here


def plot_emergence(table: ComparisonTable) -> Figure:
    """The figure for a comparison table (see the module docstring)."""
    frame = table.frame.assign(_group=group_of(table.frame))
    size = frame.groupby("_group", sort=False)["parameters"].max()
    groups = sorted(dict.fromkeys(frame["_group"]), key=lambda g: size[g])  # colours run with size
    stepped = [g for g in groups if frame.loc[frame["_group"] == g, "step"].notna().any()]
    colors = {g: colormaps["viridis"](0.85 * i / max(1, len(stepped) - 1)) if g in stepped else "#c0392b"
              for i, g in enumerate(stepped + [g for g in groups if g not in stepped])}
    turns = {t.group: t for t in turning_points(table.frame)}
    fig = Figure(figsize=(12.5, 2.3 * len(MEASURES) + 1.2), layout="constrained")
    axes = fig.subplots(len(MEASURES), 2, sharex="col", squeeze=False)
    for r, (column, label, log) in enumerate(MEASURES):
        by_step, by_size = axes[r]
        for g in groups:
            rows = frame[frame["_group"] == g].sort_values("step")
            if g in stepped:
                _line(by_step, rows["step"], rows, column, colors[g], log)
                turn = turns[g].step
                if turn is not None and turn > rows["step"].min():
                    by_step.axvline(turn, color=colors[g], linestyle=":", linewidth=1.2)
            else:
                level = _values(rows, column, log)[0]
                if np.isfinite(level):
                    by_step.axhline(level, color=colors[g], linestyle="--", linewidth=1.2)
        finals = frame[frame["_group"].isin(stepped)].sort_values("step").groupby("_group", sort=False).tail(1)
        finals = finals.sort_values("parameters")
        if len(finals):
            by_size.plot(finals["parameters"], _values(finals, column, log), color="#777", linewidth=1, zorder=1)
            for _, row in finals.iterrows():
                _point(by_size, row["parameters"], row, column, colors[row["_group"]], log)
        for _, row in frame[~frame["_group"].isin(stepped)].iterrows():
            _point(by_size, row["parameters"], row, column, colors[row["_group"]], log, star=True)
        by_step.set_ylabel(label)
        for ax in (by_step, by_size):
            ax.set_yscale("log" if log else "linear")
            ax.grid(True, alpha=0.3)
        if column == "gamma":
            by_step.set_ylim(-0.02, 1.05)
        if column == "mass":
            by_step.set_ylim(0, 1.05)
    axes[-1][0].set_xlabel("training step")
    axes[-1][1].set_xlabel("parameters (each size at its last checkpoint)")
    axes[-1][1].set_xscale("log")
    fig.legend(handles=_legend(groups, stepped, colors, frame), loc="outside lower center", ncols=4, fontsize=8,
               frameon=False)
    fig.suptitle(_title(turns, stepped), fontsize=10)
    return fig


def _values(rows: pd.DataFrame, column: str, log: bool) -> np.ndarray:
    values = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)
    return np.where(log & (values <= 0), LOG_FLOOR, values)


def _line(ax, x: pd.Series, rows: pd.DataFrame, column: str, color, log: bool) -> None:
    values = _values(rows, column, log)
    ax.plot(x, values, color=color, linewidth=1.4, zorder=2)
    if column == "gamma":
        ax.fill_between(x, rows["gamma_low"].astype(float), rows["gamma_high"].astype(float), color=color, alpha=0.15,
                        linewidth=0)
    for xv, (_, row) in zip(x, rows.iterrows()):
        _point(ax, xv, row, column, color, log)


def _point(ax, x, row: pd.Series, column: str, color, log: bool, star: bool = False) -> None:
    value = _values(row.to_frame().T, column, log)[0]
    if not math.isfinite(value):
        return
    marker = "*" if star else MARKERS.get(str(row["verdict"]), "d")
    consistent = row["verdict"] == "consistent"
    ax.scatter([x], [value], marker=marker, s=90 if star else 34, zorder=3, edgecolors=color, linewidths=1.2,
               facecolors=color if consistent or star else "white")
    if column == "gamma" and star and math.isfinite(float(row["gamma_low"])):
        ax.errorbar([x], [value], yerr=[[value - float(row["gamma_low"])], [float(row["gamma_high"]) - value]],
                    color=color, linewidth=1, zorder=2)


def _legend(groups: list[str], stepped: list[str], colors: dict, frame: pd.DataFrame) -> list[Line2D]:
    handles = []
    for g in groups:
        rows = frame[frame["_group"] == g]
        parameters = int(rows["parameters"].iloc[0])
        if g in stepped:
            handles.append(Line2D([], [], color=colors[g], label=f"{plain_label(g)} ({parameters:,} parameters)"))
        else:
            handles.append(Line2D([], [], color=colors[g], linestyle="--", marker="*", label=f"{plain_label(g)}"
                                  f" ({parameters:,} parameters; {rows['verdict'].iloc[0]})"))
    seen = [v for v in MARKERS if v in set(frame["verdict"])]
    for verdict in seen:
        handles.append(Line2D([], [], color="#444", linestyle="", marker=MARKERS[verdict],
                              markerfacecolor="#444" if verdict == "consistent" else "white", label=verdict))
    handles.append(Line2D([], [], color="#444", linestyle=":", label="turns consistent"))
    return handles


def _title(turns: dict, stepped: list[str]) -> str:
    parts = []
    for group in stepped:
        turn = turns[group]
        parts.append(f"{group}: consistent from step {turn.step}" if turn.step is not None
                     else f"{group}: not consistent by step {turn.last_step} ({turn.last_verdict})")
    return "When the verdict turns consistent — " + "; ".join(parts) if parts else "Comparison"


def write_emergence_figure(source: str, output: str | None, *, force: bool) -> Path:
    """Read a comparison table, draw it, write the figure; returns the file written."""
    if output is None:
        output = str(Path(source).with_suffix("")) + ".emergence.png"
    check_image_output(output, force, inputs=[source])
    table = read_comparison(source)
    if table.frame["parameters"].isna().all():
        raise UsageError("the comparison has no parameter counts to draw", where=source)
    save_figure(plot_emergence(table), output, replace=force)
    return Path(output)
