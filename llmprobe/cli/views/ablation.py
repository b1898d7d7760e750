"""View of ``ablate``: the sweep's headline, then its components by how much their ablation moves the fit.

The table shows the baseline and the :data:`SHOWN` components whose ablation raises mean KL(Bayes‖model)
most (every row is in the Parquet table, ``--format tsv`` and ``--json``); a flipped verdict is marked.
TSV and JSON leave out the direction vectors (in the Parquet table).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
from rich.table import Table
from rich.text import Text

from llmprobe.analysis.ablation import Sweep
from llmprobe.analysis.results import KL_BAYES_MODEL
from llmprobe.tracing.interventions import ABLATION_MODES

SHOWN = 20


@dataclass(frozen=True)
class SweepView:
    sweep: Sweep

    def tables(self) -> Iterator[object]:
        sweep = self.sweep
        yield Text(f"{sweep.meta.get('model')}: {sweep.headline()}", style="bold")
        options = sweep.meta.get("sweep", {})
        ablation = options.get("ablation", ABLATION_MODES[0])
        base = sweep.baseline
        yield (f"baseline (nothing ablated): verdict {base['verdict']}, {KL_BAYES_MODEL}"
               f" {_number(base['mean_kl_bits'])} bits, γ {_number(base['gamma'])}; {ablation}-ablation over"
               f" {options.get('over')},"
               f" {len(sweep.frame) - 1} components")
        shown = sweep.components.head(SHOWN)
        table = Table(title=f"components by change of {KL_BAYES_MODEL} (largest first; ! verdict flipped)",
                      title_justify="left")
        for name, justify in (("component", "left"), ("ΔKL bits", "right"), ("KL bits", "right"),
                              ("KL(model‖filter)", "right"), ("γ [95% CI]", "right"), ("α0", "right"),
                              ("verdict", "left"), ("mass", "right"), ("ΔH bits", "right"), ("top-1 agree", "right")):
            table.add_column(name, justify=justify, no_wrap=True)
        for row in [base, *(r for _, r in shown.iterrows())]:
            table.add_row(row["component"], _signed(row["delta_kl_bits"]), _number(row["mean_kl_bits"]),
                          _number(row["kl_model_filter_bits"]),
                          f"{_number(row['gamma'])} [{_number(row['gamma_ci_low'])}, {_number(row['gamma_ci_high'])}]",
                          _number(row["alpha0"]), ("! " if row["verdict_flipped"] else "") + str(row["verdict"]),
                          _number(row["mass"]), _signed(row["delta_entropy_bits"]), _number(row["top1_agreement"]))
        hidden = len(sweep.frame) - 1 - len(shown)
        if hidden > 0:
            table.caption = f"{hidden} more components: every row is in the sweep table (-o), --format tsv and --json"
        yield table

    def beside_data(self, fmt: str) -> Iterator[object]:
        yield Text(f"{self.sweep.meta.get('model')}: {self.sweep.headline()}", style="bold")

    def rows(self) -> pd.DataFrame:
        return self.sweep.frame.drop(columns=["direction"])

    def json(self) -> Iterator[str]:
        meta = self.sweep.meta
        document = {"model": meta.get("model"), "headline": self.sweep.headline(), "sweep": meta.get("sweep"),
                    "fit": meta.get("fit"), "rows": _records(self.rows())}
        yield json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON values: missing numbers null, numpy scalars as Python's."""
    return [{k: (None if _missing(v) else v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            for row in frame.to_dict(orient="records")]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _number(value) -> str:
    return "" if _missing(value) else f"{value:.3g}"


def _signed(value) -> str:
    return "" if _missing(value) else f"{value:+.3f}"
