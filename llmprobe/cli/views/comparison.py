"""The view of ``compare``: one row per model, the verdict and the measures of becoming Bayesian."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
from rich.table import Table

from llmprobe.analysis.results import KL_BAYES_MODEL

SHOWN = (("name", "model"), ("step", "step"), ("size", "L×H"), ("parameters", "parameters"), ("verdict", "verdict"),
         ("kl_bits", f"{KL_BAYES_MODEL} bits"), ("kl_best_filter_bits", "KL(model‖best filter) bits"),
         ("gamma", "γ [95% CI]"), ("alpha0", "α0"), ("entropy_mae_bits", "entropy MAE bits"),
         ("mass", "mass on categories"))


@dataclass(frozen=True)
class ComparisonView:
    """A table for people (KL under the prior named in the title); TSV: every column at full precision; JSON:
    one object per model."""

    frame: pd.DataFrame

    def tables(self) -> Iterator[Table]:
        priors = sorted(set(self.frame["prior"].dropna().astype(str)))
        table = Table(title=f"compare: {len(self.frame)} model(s); {KL_BAYES_MODEL} under --prior"
                            f" {', '.join(priors) or 'fit'}", title_justify="left")
        for _, header in SHOWN:
            table.add_column(header, justify="left" if header in ("model", "verdict") else "right")
        for row in self.frame.itertuples(index=False):
            table.add_row(*[_cell(key, row) for key, _ in SHOWN])
        yield table

    def beside_data(self, fmt: str) -> tuple[()]:
        return ()

    def rows(self) -> pd.DataFrame:
        return self.frame

    def json(self) -> Iterator[str]:
        records = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                   for r in self.frame.astype(object).where(self.frame.notna(), None).to_dict("records")]
        yield json.dumps(records, indent=1) + "\n"


def _cell(key: str, row) -> str:
    if key == "size":
        return "" if _missing(row.layers) else f"{int(row.layers)}×{int(row.hidden)}"
    if key == "gamma":
        return f"{row.gamma:.3f} [{row.gamma_low:.3f}, {row.gamma_high:.3f}]"
    value = getattr(row, key)
    if _missing(value):
        return ""
    if key in ("step", "parameters"):
        return f"{int(value):,}"
    if key in ("kl_bits", "kl_best_filter_bits", "entropy_mae_bits"):
        return f"{value:.2e}" if value < 1e-3 else f"{value:.4f}"
    if key == "alpha0":
        return f"{value:.3g}"
    if key == "mass":
        return f"{value:.3f}"
    return str(value)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
