"""Views of ``continuity`` (embedding vs distribution distances) and ``martingale`` (the martingale test)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pandas as pd
from rich.table import Table

from llmprobe.analysis.continuity import ContinuityResult, finite_or_null
from llmprobe.analysis.martingale import MartingaleResult


@dataclass(frozen=True)
class ContinuityView:
    """One table of measures; TSV: measure and value, one row per number; JSON: the result's fields."""

    result: ContinuityResult

    def tables(self) -> Iterator[Table]:
        result = self.result
        table = Table(title=f"continuity over {result.over}: {result.points} points, {result.pairs} pairs",
                      show_header=True)
        table.add_column("measure")
        table.add_column("TV", justify="right")
        table.add_column("Hellinger", justify="right")
        table.add_row("Spearman ρ (embedding distance vs distribution distance)",
                      f"{result.spearman_tv:.3f} (p={result.spearman_tv_p:.2g})",
                      f"{result.spearman_hellinger:.3f} (p={result.spearman_hellinger_p:.2g})")
        table.add_row(f"Lipschitz, q{result.quantile:g} of distance ratio", f"{result.lipschitz_tv:.4f}",
                      f"{result.lipschitz_hellinger:.4f}")
        table.add_row("Lipschitz, max ratio", f"{result.lipschitz_tv_max:.4f}", f"{result.lipschitz_hellinger_max:.4f}")
        if result.tv_bound is not None:
            table.add_row("analytic TV bound max‖w_i‖/2", f"{result.tv_bound:.4f}", "")
        for kind in result.by_kind:
            table.add_row(f"median over {kind.pairs} {kind.kind} pairs: distance {kind.embedding_distance_median:.3f}",
                          f"{kind.tv_median:.3f}", f"{kind.hellinger_median:.3f}")
        if result.identical_embeddings:
            table.add_row("pairs with identical embeddings (left out of ratios)", str(result.identical_embeddings), "")
        yield table

    def beside_data(self, fmt: str) -> tuple[()]:
        return ()

    def rows(self) -> pd.DataFrame:
        values = asdict(self.result)
        rows = [(name, value) for name, value in values.items() if name != "by_kind"]
        for kind in values["by_kind"]:
            rows += [(f"{kind['kind']}.{name}", value) for name, value in kind.items() if name != "kind"]
        return pd.DataFrame(rows, columns=["measure", "value"], dtype=object)

    def json(self) -> Iterator[str]:
        yield json.dumps(finite_or_null(asdict(self.result))) + "\n"


@dataclass(frozen=True)
class MartingaleView:
    """One row per n with the verdict at ``alpha``, in every format (JSON: one line per n)."""

    results: list[MartingaleResult]
    alpha: float
    name: str

    def tables(self) -> Iterator[Table]:
        first = self.results[0]
        table = Table(title=f"martingale test, {self.name}: {first.states} states per n, {first.paths} paths of"
                            f" {first.horizon} examples")
        for column in ("n", "mean TV |E p_n+m − p_n|", "statistic", "p-value", f"reject at {self.alpha:g}",
                       "P(categories)"):
            table.add_column(column, justify="right")
        for r in self.results:
            table.add_row(str(r.n), f"{r.mean_tv_deviation:.4f}", f"{r.statistic:.3g}", f"{r.p_value:.3g}",
                          "yes" if r.rejected(self.alpha) else "no",
                          "" if r.mean_category_mass is None else f"{r.mean_category_mass:.3f}")
        yield table

    def beside_data(self, fmt: str) -> tuple[()]:
        return ()

    def _records(self) -> list[dict]:
        return [{**asdict(r), "rejected": r.rejected(self.alpha)} for r in self.results]

    def rows(self) -> pd.DataFrame:
        return pd.DataFrame(self._records())

    def json(self) -> Iterator[str]:
        yield "".join(json.dumps(record) + "\n" for record in self._records())
