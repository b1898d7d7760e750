"""Views of ``fit-prior`` (the prior over rows), ``fit-posterior`` (the verdict and its evidence) and
``fit-scaling`` (the ICL curve against the scaling laws).

fit-posterior leads every trace with its verdict sentence, then its warnings, the per-n table, the
fitted updating prior, every predictor's scores and the peers' statistics if asked for, and last the
scorecard of the field's other tests (after the verdict, never before it); several traces end side by
side. These views read the typed result (:class:`~llmprobe.analysis.results.PosteriorResult`); its
``summary`` is only the JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
from rich.table import Table
from rich.text import Text

from llmprobe.analysis.priors import PRIOR_OVER_ROWS
from llmprobe.analysis.protocols import PeerStatistics
from llmprobe.analysis.results import KL_BAYES_MODEL, PosteriorResult, gamma_test_line
from llmprobe.analysis.scaling import ScalingResult
from llmprobe.analysis.scorecard import Scorecard
from llmprobe.bayes.scaling import LAW_NAMES, LAWS
from llmprobe.bayes.updating import UpdatingPrior

MAX_CATEGORY_COLUMNS = 3  # per-category columns in the per-n table; wider sets show TV/KL only


@dataclass(frozen=True)
class PriorView:
    """``fit-prior``: the components, then the BIC table; TSV: one row per component; JSON: the prior file."""

    prior: dict
    label: str

    def tables(self) -> Iterator[Table]:
        prior = self.prior
        categories = ", ".join(prior["categories"])
        table = Table(title=f"{self.label}: prior over rows — a Dirichlet over {categories} fitted"
                            f" to the spread of {prior['n_rows']} rows ({prior['data']}); not the updating prior"
                            " (fit-posterior)", title_justify="left")
        table.add_column("component")
        table.add_column("weight", justify="right")
        table.add_column("α0 (strength)", justify="right")
        table.add_column("mean", justify="left")
        table.add_column("α", justify="left")
        for j, (w, a0, mean, alpha) in enumerate(self._components()):
            table.add_row(str(j + 1), f"{w:.3f}", f"{a0:.3g}", _vector(mean), _vector(alpha))
        yield table
        bic = Table(title="components by BIC (lower is better)", title_justify="left")
        for name in ("K", "log-likelihood", "BIC"):
            bic.add_column(name, justify="right")
        for row in prior["selection"]:
            bic.add_row(str(row["n_components"]), f"{row['loglik']:.2f}", f"{row['bic']:.2f}")
        yield bic

    def _components(self) -> Iterator[tuple[float, float, list[float], list[float]]]:
        """(weight, strength, mean, alpha) of each component."""
        mixture = self.prior["mixture"]
        return zip(mixture["weights"], mixture["concentrations"], mixture["means"], mixture["alphas"])

    def beside_data(self, fmt: str) -> Iterator[Table]:
        return self.tables()

    def rows(self) -> pd.DataFrame:
        """One row per mixture component (the BIC selection is in the JSON)."""
        categories = self.prior["categories"]
        return pd.DataFrame([{"component": j + 1, "weight": w, "alpha0": a0,
                              **{f"mean_{c}": m for c, m in zip(categories, mean)},
                              **{f"alpha_{c}": a for c, a in zip(categories, alpha)}}
                             for j, (w, a0, mean, alpha) in enumerate(self._components())])

    def json(self) -> Iterator[str]:
        yield self.document()

    def document(self) -> str:
        """The prior file fit-posterior and plot-prior read (what ``-o`` writes)."""
        return json.dumps(self.prior, indent=1) + "\n"


@dataclass(frozen=True)
class PosteriorView:
    """``fit-posterior`` on one or more traces; TSV: the per-n tables, long; JSON: a list of summaries."""

    results: list[PosteriorResult]

    def tables(self) -> Iterator[object]:
        for result in self.results:
            yield Text(f"{result.label}: {result.conclusion.sentence}", style="bold")
            for warning in _warnings(result):
                yield Text(f"warning: {warning}")
            yield _per_n_table(result)
            yield _fit_table(result)
            yield _scores_table(result)
            if result.peers is not None:
                yield from _peer_tables(result, result.peers)
            yield scorecard_table(result.label, result.scorecard)
        if len(self.results) > 1:
            yield _comparison_table(self.results)

    def beside_data(self, fmt: str) -> Iterator[object]:
        return self.tables()

    def rows(self) -> pd.DataFrame:
        """The per-n table, long (one row per trace, layout, n, category)."""
        return pd.concat([r.by_n for r in self.results], ignore_index=True)

    def json(self) -> Iterator[str]:
        yield json.dumps([r.summary for r in self.results], indent=1) + "\n"


def _warnings(result: PosteriorResult) -> list[str]:
    lines = list(result.conclusion.warnings)
    counts = result.counts
    if counts.low_mass:
        lines.append(f"{counts.low_mass} of {counts.marks} marks left out: less than"
                     f" {result.options.min_mass:g} probability on the categories (--min-mass)")
    if result.reference is not None and result.reference.role == PRIOR_OVER_ROWS:
        lines.append(f"--prior {result.reference.source} is a prior over rows (fit-prior: the spread of predictions"
                     " across prompts), not the prior a model updates from; pass a fit-posterior --json file for that")
    if counts.inexact:
        lines.append(f"{counts.inexact} marks are inexact (the mark falls inside a token; column 'exact'):"
                     " the model may not be predicting a category there")
    return lines


def _vector(values) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def _per_n_table(result: PosteriorResult) -> Table:
    by_n = result.by_n
    k = len(result.categories)
    show_categories = result.categories[:1] if k == 2 else result.categories if k <= MAX_CATEGORY_COLUMNS else []
    has_theta = by_n["tv_theta"].notna().any()
    several_layouts = by_n["layout"].nunique(dropna=False) > 1
    table = Table(title=f"{result.label}: model vs Bayes posterior predictive by number of examples",
                  title_justify="left", caption=f"TV, {KL_BAYES_MODEL} (bits) and |ΔH| (entropy error, bits) against the"
                  " --prior posterior predictive; TV θ (sd) and KL(θ‖model): against the true θ, mean (std) over marks")
    for name in (*(["layout"] if several_layouts else []), "n", "marks", *[f"{c} model" for c in show_categories],
                 *[f"{c} Bayes" for c in show_categories], "TV", KL_BAYES_MODEL, "|ΔH|",
                 *(["TV θ", "sd", "KL(θ‖model)"] if has_theta else []), "mass"):
        table.add_column(name, justify="left" if name == "layout" else "right")
    for (layout, n), group in by_n.groupby(["layout", "n"], dropna=False, sort=True):
        per_cat = group.set_index("category")
        first = group.iloc[0]
        used, marks = int(first["used"]), int(first["marks"])
        table.add_row(
            *([str(layout)] if several_layouts else []), str(int(n)), str(marks) if used == marks else f"{used}/{marks}",
            *[_number(per_cat.loc[c, "model_prob"], ".3f") for c in show_categories],
            *[_number(per_cat.loc[c, "bayes_prob"], ".3f") for c in show_categories],
            _number(first["tv"], ".3f"), _number(first["kl_bits"], ".3f"), _number(first["entropy_error_bits"], ".3f"),
            *([_number(first["tv_theta"], ".3f"), _number(first["tv_theta_std"], ".3f"),
               _number(first["kl_theta_bits"], ".2f")] if has_theta else []),
            f"{first['mass']:.3f}",
        )
    return table


def _number(value, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _flags(fit: UpdatingPrior) -> str:
    if fit.at_bound:
        return "AT BOUND (α0 → ∞)"
    return "yes" if fit.converged else "NO"


def _fit_table(result: PosteriorResult) -> Table:
    test, scores = result.test, result.scores
    k = test.exact.n_components
    table = Table(title=f"{result.label}: the updating prior (the prior the predictions update from;"
                        f" {k} component{'s' if k > 1 else ''})", title_justify="left")
    for name in ("filter", "weights", "prior mean", "α0", "γ", "converged", "KL(model‖filter) in-sample",
                 "KL(model‖filter) out-of-sample"):
        table.add_column(name, justify="left" if name == "filter" else "right")
    for name, fit, scored in (("exact Bayes (γ = 1)", test.exact, scores.exact_bayes),
                              ("forgetting filter", test.free, scores.forgetting)):
        table.add_row(name, _vector(fit.weights), _vector(fit.prior_mean),
                      _vector(fit.strengths) if k > 1 else f"{fit.alpha0:.3g}", f"{fit.gamma:.3f}", _flags(fit),
                      f"{scored.in_sample.kl_bits:.4f}",
                      f"{scored.out_of_sample.kl_bits:.4f}" if scored.out_of_sample is not None else "n/a")
    low, high = test.gamma_ci
    table.caption = (f"KL(model‖filter) in bits, mean over {result.counts.used} used marks; out-of-sample ="
                     f" fitted on the other of {scores.n_folds} folds of sequences. γ {int(test.level * 100)}%"
                     f" bootstrap CI [{low:.3f}, {high:.3f}] over {result.counts.sequences} sequences"
                     f" ({result.options.bootstrap} resamples). {gamma_test_line(result.summary)}."
                     + _selection_text(test.selection, k))
    return table


def _selection_text(selection: list[dict], chosen: int) -> str:
    if not selection:
        return ""
    cells = ", ".join(f"{row['n_components']}: {row['held_out_kl_bits']:.4f}" for row in selection)
    return f" Components by held-out KL(model‖filter) bits ({cells}): {chosen}."


BASELINE_NAMES = {"never_updating": "never updating (the n = 0 prediction)", "frequency": "frequency follower (α0 → 0)",
                  "recency": "recency (last outcome)", "true_theta": "true θ"}


def _scores_table(result: PosteriorResult) -> Table:
    scores = result.scores
    table = Table(title=f"{result.label}: every predictor scored the same way (mean over used marks)",
                  title_justify="left")
    for name in ("predictor", "KL(model‖·) bits", "TV", "scored"):
        table.add_column(name, justify="left" if name in ("predictor", "scored") else "right")
    where = "out of sample" if scores.out_of_sample else "in sample"
    for label, fitted in (("exact Bayes (γ = 1), updating prior", scores.exact_bayes),
                          ("forgetting filter", scores.forgetting)):
        table.add_row(label, f"{fitted.held.kl_bits:.4f}", f"{fitted.held.tv:.4f}", where)
    for key, label in BASELINE_NAMES.items():
        if key in scores.baselines:
            baseline = scores.baselines[key]
            table.add_row(label, f"{baseline.kl_bits:.4f}", f"{baseline.tv:.4f}", "nothing fitted")
    table.add_row("one shared constant (α0 → ∞)", f"{scores.shared_constant.kl_bits:.4f}",
                  f"{scores.shared_constant.tv:.4f}", where)
    if scores.reference is not None and result.reference is not None:
        table.add_row(f"--prior ({result.reference.source})", f"{scores.reference.kl_bits:.4f}",
                      f"{scores.reference.tv:.4f}", "nothing fitted")
    return table


def _peer_tables(result: PosteriorResult, peers: PeerStatistics) -> Iterator[Table]:
    """``--by template``: per n, mean ± std over templates (docs/experiments.md); ``--gamma-variant``: the
    peer's γ and its objective."""
    if peers.by_template is not None:
        table = Table(title=f"{result.label}: per n, mean ± std over templates (TV/KL to θ, and to the posterior"
                            " predictive)", title_justify="left")
        first = result.categories[0]
        for name in ("n", "templates", "marks", f"P({first}) model", f"P({first}) Bayes", "TV to θ",
                     "KL(θ‖model) bits", "TV to Bayes", f"{KL_BAYES_MODEL} bits"):
            table.add_column(name, justify="right")
        for _, row in peers.by_template["by_n"].iterrows():
            cell = lambda s: f"{row[s + '_mean']:.3f} ± {row[s + '_std']:.3f}"  # noqa: E731
            table.add_row(str(int(row["n"])), str(int(row["templates"])), str(int(row["marks"])),
                          cell("p_first_model"), cell("p_first_bayes"), cell("tvd_theta"), cell("kl_theta_bits"),
                          cell("tvd_bayes"), cell("kl_bayes_bits"))
        yield table
    if peers.gamma is not None:
        fit = peers.gamma
        table = Table(title=f"{result.label}: γ as Gupta et al. fit it (decayed Beta(1,1) pseudo-counts, L1 on"
                            " template means)", title_justify="left")
        for name in ("variant", "γ", "mean |ΔP|", "positions", "marks"):
            table.add_column(name, justify="right" if name != "variant" else "left")
        table.add_row(peers.gamma_variant, f"{fit.gamma:.3f}", f"{fit.mean_abs_error:.4f}", str(fit.n_positions),
                      str(fit.n_marks))
        yield table


def _comparison_table(results: list[PosteriorResult]) -> Table:
    table = Table(title="side by side", title_justify="left")
    table.add_column("n", justify="right")
    for r in results:
        table.add_column(f"{r.label}\n{KL_BAYES_MODEL} bits", justify="right")
        table.add_column("TV", justify="right")
    table.add_row("verdict", *[c for r in results for c in (r.verdict, "")])
    per_trace = [r.by_n.drop_duplicates(["layout", "n"]).groupby("n")[["kl_bits", "tv"]].mean() for r in results]
    for n in sorted(set().union(*[set(p.index) for p in per_trace])):
        cells = []
        for p in per_trace:
            cells += [f"{p.loc[n, 'kl_bits']:.4f}", f"{p.loc[n, 'tv']:.3f}"] if n in p.index else ["", ""]
        table.add_row(str(int(n)), *cells)
    table.add_row("α0", *[c for r in results for c in (f"{r.test.exact.alpha0:.3g}", "")])
    table.add_row("γ", *[c for r in results for c in (f"{r.test.free.gamma:.3f}", "")])
    for i, entry in enumerate(results[0].scorecard.entries()):  # the scorecard's headlines, after the verdict
        values = [r.scorecard.entries()[i].value for r in results]
        table.add_row(SCORECARD_SHORT[entry.key], *[c for v in values for c in ("" if v is None else f"{v:.4g}", "")])
    return table


SCORECARD_SHORT = {"exchangeability": "order spread, bits", "excess_code_length": "excess bits per example",
                   "scaling_law": "scaling law / best baseline", "martingale": "martingale max TV"}


def scorecard_table(label: str, scorecard: Scorecard) -> Table:
    """The field's other tests: each one's number, direction and planted-model reference (after the verdict)."""
    table = Table(title=f"{label}: scorecard — the field's other tests, beside the verdict above (not instead of it)",
                  title_justify="left", caption="Planted-model references: docs/statistics.md, section 6g.")
    for name in ("test", "number", "direction", "planted reference"):
        table.add_column(name, justify="left")
    for entry in scorecard.entries():
        table.add_row(entry.test, entry.display, entry.direction, entry.reference)
    return table


@dataclass(frozen=True)
class ScalingView:
    """``fit-scaling``: one row per law; TSV: the per-n curve and predictions; JSON: the result."""

    result: ScalingResult

    def tables(self) -> Iterator[Table]:
        result, comparison = self.result, self.result.comparison
        fitted = comparison.n[comparison.fitted]
        table = Table(title=f"{result.label}: the ICL curve against the scaling laws, fitted on n ≤"
                            f" {int(fitted.max())} ({fitted.size} of {comparison.n.size} n), scored on the rest",
                      title_justify="left",
                      caption=f"y(n) = {result.measure}; RMSE of y in probability. Bayesian law: y(n) = Σ ρ_j"
                              " P_j^(Kn+1) / Σ ρ_j P_j^(Kn) (Arora et al.); baselines fit the NLL −log y.")
        for name in ("law", "parameters", "RMSE fitted", "RMSE held out"):
            table.add_column(name, justify="left" if name in ("law", "parameters") else "right")
        for name in LAWS:
            fit = comparison.fits[name]
            table.add_row(LAW_NAMES[name], _parameters(fit.parameters), f"{fit.rmse_fit:.4f}",
                          "" if fit.rmse_held_out is None else f"{fit.rmse_held_out:.4f}")
        yield table
        ratio = comparison.error_ratio
        if ratio is not None:
            best = LAW_NAMES[comparison.best_baseline.law]
            yield Text(f"Held-out RMSE of the Bayesian law / the best baseline ({best}): {ratio:.3g}; ICL efficiency"
                       f" K = {comparison.efficiency:.3g}.")

    def beside_data(self, fmt: str) -> Iterator[Table]:
        return self.tables()

    def rows(self) -> pd.DataFrame:
        return self.result.predictions()

    def json(self) -> Iterator[str]:
        yield json.dumps(self.result.to_dict(), indent=1) + "\n"


def _parameters(parameters: dict) -> str:
    return ", ".join(f"{k} {_vector(v) if isinstance(v, list) else format(v, '.3g')}" for k, v in parameters.items())
