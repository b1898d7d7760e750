"""The peers' per-n tables: mean ± std over prompt templates, as Gupta et al. (2025) report them.

Per mark (a prompt of a template after n examples) four distances between the model's distribution p
over the categories (renormalized) and a reference:

* ``tvd_theta`` = TV(p, θ) and ``kl_theta_bits`` = KL(θ ‖ p): to the true θ the examples were drawn
  from (the peers' statistic; θ may put 0 on a category, so θ is KL's first argument);
* ``tvd_bayes`` = TV(p, b) and ``kl_bayes_bits`` = KL(b ‖ p): to the posterior predictive b of the
  prior fit-posterior uses, after the mark's counts (what llmprobe adds).

Each template's value at (θ, n) or at n is the mean over its marks there; the table then gives the
mean and the population standard deviation (ddof = 0, numpy's default) over templates, so a single
template shows std 0. Records without a ``template`` field (the single-[template] form) count as
template 0. Numbers only: the CLI renders them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from llmprobe.analysis.fit_options import GAMMA_VARIANTS, check_choice
from llmprobe.analysis.marks import CategoryMarks, sequence_inputs
from llmprobe.bayes.metrics import kl_bits, total_variation
from llmprobe.bayes.peers import GuptaFit, fit_gupta_gamma
from llmprobe.errors import UsageError

STATISTICS = ("p_first_model", "p_first_bayes", "tvd_theta", "kl_theta_bits", "tvd_bayes", "kl_bayes_bits")

__all__ = ["STATISTICS", "PeerStatistics", "peer_gamma", "peer_statistics", "per_mark_statistics", "template_tables"]


@dataclass(frozen=True)
class PeerStatistics:
    """What fit-posterior adds for ``by="template"`` (the per-n tables over templates) and for a
    ``gamma_variant`` (that peer's gamma), each under its own key of the JSON summary."""

    by_template: dict[str, pd.DataFrame] | None
    gamma_variant: str | None
    gamma: GuptaFit | None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.by_template is not None:
            out["by_template"] = {name: frame.to_dict(orient="records") for name, frame in self.by_template.items()}
        if self.gamma is not None:
            out["gamma_variants"] = {self.gamma_variant: self.gamma.to_dict()}
        return out


def peer_statistics(cm: CategoryMarks, bayes: np.ndarray, by: str | None,
                    gamma_variant: str | None) -> PeerStatistics | None:
    """The peers' statistics fit-posterior was asked for (None: neither ``by`` nor ``gamma_variant``)."""
    if by is None and gamma_variant is None:
        return None
    tables = template_tables(per_mark_statistics(cm, bayes)) if by == "template" else None
    return PeerStatistics(tables, gamma_variant, None if gamma_variant is None else peer_gamma(cm, gamma_variant))


def per_mark_statistics(cm: CategoryMarks, bayes: np.ndarray) -> pd.DataFrame:
    """One row per mark: template, θ (as a label), n and the statistics in :data:`STATISTICS`."""
    if cm.theta is None:
        raise UsageError("marks carry no θ (generate prompts with `llmprobe experiment`)")
    if bayes.shape != cm.probs.shape:
        raise ValueError(f"bayes has shape {bayes.shape}, the marks {cm.probs.shape}")
    template = cm.marks["template"] if "template" in cm.marks else pd.Series(0, index=cm.marks.index)
    return pd.DataFrame({
        "template": template.fillna(0).astype(int).to_numpy(),
        "theta": [_theta_label(t) for t in cm.theta],
        "n": cm.marks["n"].to_numpy(dtype=np.int64),
        "p_first_model": cm.probs[:, 0],
        "p_first_bayes": bayes[:, 0],
        "tvd_theta": total_variation(cm.probs, cm.theta),
        "kl_theta_bits": kl_bits(cm.theta, cm.probs),
        "tvd_bayes": total_variation(cm.probs, bayes),
        "kl_bayes_bits": kl_bits(bayes, cm.probs),
    })


def _theta_label(theta: np.ndarray) -> str:
    return "[" + ", ".join(f"{x:.6g}" for x in theta) + "]"


def template_tables(per_mark: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``by_n`` (each template averaged over every θ at n) and ``by_theta_n``: mean and std over templates.

    Columns: the keys, ``templates`` (how many), ``marks``, then ``{statistic}_mean`` and ``{statistic}_std``.
    """
    return {"by_n": _over_templates(per_mark, ["n"]), "by_theta_n": _over_templates(per_mark, ["theta", "n"])}


def _over_templates(per_mark: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    per_template = per_mark.groupby([*keys, "template"], sort=True)[list(STATISTICS)].mean()
    marks = per_mark.groupby(keys, sort=True).size()
    grouped = per_template.groupby(level=keys, sort=True)
    mean = grouped.mean().add_suffix("_mean")
    std = grouped.std(ddof=0).add_suffix("_std")
    out = pd.concat([grouped.size().rename("templates"), marks.rename("marks"), mean, std], axis=1)
    ordered = ["templates", "marks", *[f"{s}_{w}" for s in STATISTICS for w in ("mean", "std")]]
    return out[ordered].reset_index()


def peer_gamma(cm: CategoryMarks, variant: str) -> GuptaFit:
    """The named peer's γ fitted to a trace's marks (``gupta``: :func:`llmprobe.bayes.peers.fit_gupta_gamma`)."""
    check_choice(variant, GAMMA_VARIANTS, "gamma_variant")
    outcomes, sequence, position = sequence_inputs(cm, "generate prompts with `llmprobe experiment`")
    return fit_gupta_gamma(cm.probs, outcomes, sequence, position)
