"""``llmprobe plot-prior``: a fitted Dirichlet (or Dirichlet mixture) prior, drawn over the simplex.

Two categories: the Beta density of the first category's probability. Three: a ternary heatmap of
the density with contours. More: the marginal density of each category's probability, which for
Dirichlet(α) is Beta(α_k, α_0 − α_k), mixed with the mixture weights. Component means are marked.
The input is the JSON ``llmprobe fit-prior`` writes: a :class:`~llmprobe.bayes.MixtureFit` or
:class:`~llmprobe.bayes.DirichletFit` ``to_dict()``, at the top level or under one key, with
optional ``categories`` and ``model`` entries beside it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from matplotlib.tri import Triangulation
from scipy.special import betaln, xlog1py, xlogy

from llmprobe.analysis.priors import Prior, read_prior
from llmprobe.bayes import dirichlet_logpdf
from llmprobe.plots.common import check_image_output, plain_label, save_figure

TERNARY_RESOLUTION = 160
SQRT3_2 = math.sqrt(3.0) / 2.0


def beta_marginal_density(prior: Prior, category: int, x: np.ndarray) -> np.ndarray:
    """Density of p_category under the prior: sum_j w_j Beta(x; α_jk, α_j0 − α_jk)."""
    a = prior.alphas[:, category]
    b = prior.alphas.sum(axis=1) - a
    return sum(w * np.exp(xlogy(ak - 1.0, x) + xlog1py(bk - 1.0, -x) - betaln(ak, bk))
               for w, ak, bk in zip(prior.weights, a, b))


def simplex_density(prior: Prior, points: np.ndarray) -> np.ndarray:
    """Mixture density at points (N, K) on the simplex, summed in log space."""
    logs = np.stack([dirichlet_logpdf(points, a) for a in prior.alphas]) + np.log(prior.weights)[:, None]
    top = logs.max(axis=0)
    return np.exp(top + np.log(np.exp(logs - top).sum(axis=0)))


def ternary_points(resolution: int = TERNARY_RESOLUTION) -> np.ndarray:
    """Barycentric grid points strictly inside the triangle (where the density is finite)."""
    i, j = np.meshgrid(np.arange(resolution + 1), np.arange(resolution + 1), indexing="ij")
    keep = i + j <= resolution
    p1, p2 = (i[keep] + 0.5) / (resolution + 1.5), (j[keep] + 0.5) / (resolution + 1.5)
    return np.column_stack([p1, p2, 1.0 - p1 - p2])


def to_plane(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Barycentric (p1, p2, p3) -> plane: category 1 bottom left, 2 bottom right, 3 on top."""
    return points[:, 1] + points[:, 2] / 2.0, points[:, 2] * SQRT3_2


def plot_prior(prior: Prior) -> Figure:
    k = prior.alphas.shape[1]
    if k == 2:
        fig = Figure(figsize=(7.5, 4.6), layout="constrained")
        _draw_beta(fig.add_subplot(), prior)
    elif k == 3:
        fig = Figure(figsize=(7.5, 6.6), layout="constrained")
        _draw_ternary(fig, fig.add_subplot(), prior)
    else:
        cols = min(k, 4)
        rows = math.ceil(k / cols)
        fig = Figure(figsize=(3.6 * cols, 2.9 * rows + 0.8), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
        for i, ax in enumerate(axes.flat):
            if i < k:
                _draw_marginal(ax, prior, i)
                ax.tick_params(labelbottom=True)
            else:
                ax.set_visible(False)
        axes.flat[0].legend(handles=[Line2D([], [], color="0.3", linestyle=":", label=_means_label(prior))],
                            fontsize=8, loc="upper right")
    fig.suptitle(_title(prior), fontsize=11)
    return fig


def _title(prior: Prior) -> str:
    j, k = prior.alphas.shape
    kind = "Dirichlet prior" if j == 1 else f"mixture of {j} Dirichlet priors"
    strength = "α₀ = " + ", ".join(f"{a:.3g}" for a in prior.alphas.sum(axis=1))
    if j > 1:
        strength = "weights " + ", ".join(f"{w:.2f}" for w in prior.weights) + " · " + strength
    head = f"{plain_label(prior.label)} — " if prior.label else ""
    view = "Beta density of " + plain_label(prior.categories[0]) if k == 2 else (
        "density on the simplex" if k == 3 else "marginal density of each category")
    return f"{head}fitted {kind} over {k} categories: {view}\n{strength}"


def _means_label(prior: Prior) -> str:
    return "prior mean" if prior.weights.size == 1 else "component means"


def _mixture_note(prior: Prior, j: int) -> str:
    return f"component {j + 1} (w = {prior.weights[j]:.2f})"


def _x_grid() -> np.ndarray:
    return np.linspace(0.0, 1.0, 1001)[1:-1]


def _beta_ylim(ax, a: np.ndarray, b: np.ndarray, density: np.ndarray, x: np.ndarray) -> None:
    """y from 0; when some Beta parameter is < 1 the density is infinite at an edge, so clip and say so."""
    if np.all(a >= 1.0) and np.all(b >= 1.0):
        ax.set_ylim(0, 1.05 * float(density.max()))
        return
    ax.set_ylim(0, 1.3 * float(density[(x > 0.02) & (x < 0.98)].max()))
    ax.text(0.5, 0.97, "unbounded at an edge (a parameter < 1): clipped", transform=ax.transAxes, ha="center",
            va="top", fontsize=7.5, color="0.35")


def _draw_beta(ax, prior: Prior) -> None:
    x = _x_grid()
    density = beta_marginal_density(prior, 0, x)
    ax.plot(x, density, color="#1f4e9c", linewidth=2, label="prior density", gid="density|0")
    if prior.weights.size > 1:
        for j in range(prior.weights.size):
            single = Prior(np.ones(1), prior.alphas[j:j + 1], prior.categories, None, {})
            ax.plot(x, prior.weights[j] * beta_marginal_density(single, 0, x), linestyle="--", linewidth=1,
                    label=_mixture_note(prior, j))
    for j, mean in enumerate(prior.means[:, 0]):
        ax.axvline(mean, color="0.3", linestyle=":", linewidth=1, label=_means_label(prior) if j == 0 else None)
    _beta_ylim(ax, prior.alphas[:, 0], prior.alphas[:, 1], density, x)
    ax.set_xlim(0, 1)
    first, second = (plain_label(c) for c in prior.categories)
    ax.set_xlabel(f"P({first})   (P({second}) = 1 − P({first}))")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right" if prior.means[0, 0] < 0.5 else "upper left")


def _draw_marginal(ax, prior: Prior, category: int) -> None:
    x = _x_grid()
    density = beta_marginal_density(prior, category, x)
    ax.plot(x, density, color="#1f4e9c", linewidth=1.8, gid=f"density|{category}")
    ax.fill_between(x, density, color="#1f4e9c", alpha=0.15, linewidth=0)
    for mean in prior.means[:, category]:
        ax.axvline(mean, color="0.3", linestyle=":", linewidth=1)
    a = prior.alphas[:, category]
    b = prior.alphas.sum(axis=1) - a
    _beta_ylim(ax, a, b, density, x)
    ax.set_xlim(0, 1)
    name = plain_label(prior.categories[category])
    ax.set_title(f"P({name}): Beta({', '.join(f'{v:.3g}' for v in a)} | {', '.join(f'{v:.3g}' for v in b)})"
                 if a.size == 1 else f"P({name}), mixture of {a.size} Betas", fontsize=9)
    ax.set_xlabel(f"P({name})")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)


def _draw_ternary(fig: Figure, ax, prior: Prior) -> None:
    points = ternary_points()
    density = simplex_density(prior, points)
    x, y = to_plane(points)
    finite = np.isfinite(density)
    capped = np.all(prior.alphas >= 1.0)
    top = float(density[finite].max()) if capped else float(np.quantile(density[finite], 0.99))
    # square-root spaced levels: a sharp component would otherwise leave a broad one invisible
    levels = np.linspace(0.0, math.sqrt(top), 16) ** 2
    tri = Triangulation(x, y)
    clipped = np.minimum(density, top)
    filled = ax.tricontourf(tri, clipped, levels=levels, cmap=colormaps["viridis"], norm=PowerNorm(0.5, 0.0, top),
                            extend="neither" if capped else "max")
    ax.tricontour(tri, clipped, levels=levels[1::2], colors="white", linewidths=0.4, alpha=0.6)
    for t in np.arange(0.2, 1.0, 0.2):  # grid lines of constant p1, p2, p3
        for a, b in (((t, 1 - t, 0), (t, 0, 1 - t)), ((1 - t, t, 0), (0, t, 1 - t)), ((1 - t, 0, t), (0, 1 - t, t))):
            px, py = to_plane(np.array([a, b], dtype=float))
            ax.plot(px, py, color="white", linewidth=0.5, alpha=0.35)
    corners = np.eye(3)
    cx, cy = to_plane(corners)
    ax.plot(np.append(cx, cx[0]), np.append(cy, cy[0]), color="black", linewidth=1.2)
    offsets = ((-0.03, -0.05, "right"), (0.03, -0.05, "left"), (0.0, 0.04, "center"))
    for name, px, py, (dx, dy, ha) in zip(prior.categories, cx, cy, offsets):
        ax.text(px + dx, py + dy, plain_label(name), ha=ha, va="center", fontsize=11, fontweight="bold")
    mx, my = to_plane(prior.means)
    ax.scatter(mx, my, marker="x", s=60, color="#d62728", linewidths=2, zorder=3, label=_means_label(prior))
    if prior.weights.size > 1:
        for j, (px, py) in enumerate(zip(mx, my)):
            ax.annotate(f"{j + 1} (w = {prior.weights[j]:.2f})", (px, py), xytext=(6, 6), textcoords="offset points",
                        fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1.5})
    ax.set_aspect("equal")
    ax.set_xlim(-0.12, 1.12)
    ax.set_ylim(-0.1, SQRT3_2 + 0.1)
    ax.axis("off")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    bar = fig.colorbar(filled, ax=ax, shrink=0.75, ticks=MaxNLocator(8).tick_values(0.0, top))
    bar.set_label("prior density (square-root scale" + (")" if capped else "; capped at the 99th percentile: α < 1)"))
    ax.text(0.5, -0.08, "each corner is all probability on that category; grid lines every 0.2",
            ha="center", va="center", fontsize=8, color="0.35")


def write_prior_figure(source: str, output: str | None, *, force: bool) -> Path:
    """Read a prior file, draw it, write the figure; returns the file written."""
    if output is None:
        output = str(Path(source).with_suffix("")) + ".prior.png"
    check_image_output(output, force, inputs=[source])
    save_figure(plot_prior(read_prior(source)), output, replace=force)
    return Path(output)
