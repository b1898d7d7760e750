"""``llmprobe continuity``'s figure: distribution distance against embedding distance, pair by pair."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from llmprobe.analysis.continuity import ContinuityResult
from llmprobe.plots.common import plain_label


def continuity_figure(result: ContinuityResult, pairs: dict[str, np.ndarray], model: str) -> Figure:
    """Distribution distance against embedding distance, TV and Hellinger side by side, with the bounds."""
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    colors = {"same group": "tab:blue", "different groups": "tab:orange", "ungrouped": "tab:gray"}
    top = float(pairs["distance"].max()) * 1.05 or 1.0
    for ax, name, lip in ((axes[0], "tv", result.lipschitz_tv), (axes[1], "hellinger", result.lipschitz_hellinger)):
        for kind, color in colors.items():
            sel = pairs["kind"] == kind
            if sel.any():
                ax.scatter(pairs["distance"][sel], pairs[name][sel], s=6, alpha=0.5, color=color,
                           label=f"{kind} ({int(sel.sum())})")
        xs = np.linspace(0, top, 50)
        ax.plot(xs, np.minimum(lip * xs, 1), color="black", lw=1, label=f"q{result.quantile:g} ratio {lip:.3f}")
        if name == "tv" and result.tv_bound is not None:
            ax.plot(xs, np.minimum(result.tv_bound * xs, 1), color="red", lw=1, ls="--",
                    label=f"analytic bound {result.tv_bound:.2f}")
        ax.set_xlim(0, top)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("embedding distance ‖h_a − h_b‖₂")
        ax.set_ylabel("total variation" if name == "tv" else "Hellinger distance")
        rho = result.spearman_tv if name == "tv" else result.spearman_hellinger
        ax.set_title(f"Spearman ρ = {rho:.3f}")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(plain_label(f"continuity ({result.over}): {result.points} points, {result.pairs} pairs  {model}"))
    return fig
