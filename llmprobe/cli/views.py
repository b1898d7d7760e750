"""Terminal views: every table llmprobe shows people, one function per command.

Views take results (a DataFrame, a fit summary, a dataclass) and render them with rich through
:class:`~llmprobe.cli.output.Output`; they compute nothing. Token strings are never wrapped (their
whitespace is the point).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pandas as pd
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from llmprobe.analysis.continuity import ContinuityResult
from llmprobe.analysis.fits import KL_BAYES_MODEL, PosteriorResult, gamma_test_line
from llmprobe.analysis.martingale import MartingaleResult
from llmprobe.analysis.priors import PRIOR_OVER_ROWS
from llmprobe.cli.output import Output
from llmprobe.tracing.reader import visible

MAX_CATEGORY_COLUMNS = 3  # per-category columns in the per-n table; wider sets show TV/KL only


# ------------------------------------------------------------------------------------------ inspect, models
def show_trace(frame: pd.DataFrame, top: int, as_json: bool, out: Output) -> None:
    """``inspect``: one table per prompt (token, candidates, actual next token, entropy), or JSON lines."""
    if as_json:
        for row in frame.itertuples(index=False):
            out.data_text(json.dumps(_row_json(row, top), ensure_ascii=False) + "\n")
        return
    meta = frame.attrs["llmprobe"]
    if "layer" in frame.columns:  # a logit-lens trace: the layer x position grid, not 30 copies of the positions
        for prompt_id, rows in frame.groupby("prompt_id", sort=False):
            out.show(_lens_table(rows, meta, prompt_id))
        return
    for prompt_id, rows in frame.groupby("prompt_id", sort=False):
        table = Table(title=f"{meta.get('model')} — prompt {prompt_id}", title_justify="left")
        # token strings are never wrapped (their whitespace is the point); candidates go one per line
        table.add_column("pos", justify="right")
        table.add_column("token", no_wrap=True)
        table.add_column(f"top-{top} candidates", no_wrap=True)
        table.add_column("actual next", no_wrap=True)
        for name in ("P(next)", "rank", "H (bits)"):
            table.add_column(name, justify="right")
        for row in rows.itertuples(index=False):
            candidates = "\n".join(f"{visible(t)} {math.exp(lp):.3f}"
                                   for t, lp in zip(row.topk_tokens[:top], row.topk_logprobs[:top]))
            has_next = row.next_token is not None and not _isnan(row.next_logprob)
            position = f"{row.position}*" if row.phase == "generated" else str(row.position)
            table.add_row(
                position, visible(row.token), candidates, visible(row.next_token),
                _probability(math.exp(row.next_logprob)) if has_next else "",
                str(int(row.next_rank)) if has_next else "",
                f"{row.entropy / math.log(2):.2f}",
            )
        if (rows["phase"] == "generated").any():
            table.caption = "* generated token"
        out.show(table)


def _lens_table(rows: pd.DataFrame, meta: dict, prompt_id: str) -> Table:
    """The logit lens: the top-1 next token and its probability per layer (rows, output first) and
    position (columns, headed by the input token); bold where it is the token that actually follows."""
    positions = sorted(set(int(p) for p in rows["position"]))
    layers = sorted(set(int(v) for v in rows["layer"]), reverse=True)
    output = rows[rows["layer"] == layers[0]].set_index("position")
    table = Table(title=f"{meta.get('model')} — prompt {prompt_id}: logit lens, top-1 next token and its"
                        " probability by layer (bold: the actual next token)", title_justify="left")
    table.add_column("layer", justify="right")
    for position in positions:
        table.add_column(f"{position}\n{visible(output.loc[position, 'token'])}", no_wrap=True)
    cells = {(int(r.layer), int(r.position)): r for r in rows.itertuples(index=False)}
    for layer in layers:
        row_cells = []
        for position in positions:
            r = cells.get((layer, position))
            if r is None:
                row_cells.append("")
                continue
            top = r.topk_tokens[0] if hasattr(r, "topk_tokens") else str(int(r.topk_ids[0]))
            text = f"{visible(top)} {math.exp(r.topk_logprobs[0]):.2f}"
            is_next = r.next_token_id is not None and not pd.isna(r.next_token_id) \
                and int(r.topk_ids[0]) == int(r.next_token_id)
            row_cells.append(f"[bold]{escape(text)}[/bold]" if is_next else escape(text))
        table.add_row(f"{layer} (output)" if layer == layers[0] else str(layer), *row_cells)
    return table


def _probability(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def _isnan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))



def _row_json(row, top: int) -> dict:
    has_next = not _isnan(row.next_logprob)
    return {
        "prompt_id": row.prompt_id,
        **({"layer": int(row.layer)} if hasattr(row, "layer") else {}),
        "position": int(row.position),
        "phase": row.phase,
        "token": row.token,
        "top": [{"token": t, "id": int(i), "prob": math.exp(float(lp))}
                for t, i, lp in zip(row.topk_tokens[:top], row.topk_ids[:top], row.topk_logprobs[:top])],
        "next_token": row.next_token if has_next else None,
        "next_prob": math.exp(float(row.next_logprob)) if has_next else None,
        "next_rank": int(row.next_rank) if has_next else None,
        "entropy_bits": float(row.entropy) / math.log(2),
    }


def show_models(inventory: dict, as_json: bool, out: Output) -> None:
    """``models``: the default model and the cached conversions (see :func:`llmprobe.model.gguf.inventory`)."""
    if as_json:
        out.data_text(json.dumps(inventory, indent=1) + "\n")
        return
    default = inventory["default"]
    out.show(f"default model: {default['name']} ({default['quantization']} GGUF, de-quantized to"
             f" {default['loaded_as']}) — "
            + (f"GGUF at {default['gguf']}" if default["gguf"] else f"not installed ({default['install']})"))
    table = Table(title=f"cached conversions in {inventory['cache_dir']}", title_justify="left")
    for name in ("source", "sha256", "quantization", "size", "converted (UTC)", "path"):
        table.add_column(name)
    for entry in inventory["cached"]:
        table.add_row(entry["source"], entry.get("source_sha256", "")[:12], entry.get("quantization") or "",
                      f"{entry['bytes'] / 2**20:.0f} MiB", entry["converted_utc"], entry["path"])
    out.show(table)


def show_pruned(removed: list[dict], out: Output) -> None:
    """``models --prune``: what was removed and why."""
    freed = sum(entry["bytes"] for entry in removed) / 2**20
    out.show(f"pruned {len(removed)} cache entr{'y' if len(removed) == 1 else 'ies'}, {freed:.0f} MiB freed")
    for entry in removed:
        out.show(f"  {entry['path']}: {entry['reason']}")


# ------------------------------------------------------------------------------------------ fits
def show_fit_prior(result: dict, label: str, out: Output) -> None:
    """``fit-prior``: the components, then the BIC table."""
    mixture = result["mixture"]
    table = Table(title=f"{label}: prior over rows — a Dirichlet over {', '.join(result['categories'])} fitted to the"
                        f" spread of {result['n_rows']} rows ({result['data']}); not the updating prior"
                        " (fit-posterior)", title_justify="left")
    table.add_column("component")
    table.add_column("weight", justify="right")
    table.add_column("α0 (strength)", justify="right")
    table.add_column("mean", justify="left")
    table.add_column("α", justify="left")
    for j, (w, a0, mean, alpha) in enumerate(zip(mixture["weights"], mixture["concentrations"],
                                                 mixture["means"], mixture["alphas"])):
        table.add_row(str(j + 1), f"{w:.3f}", f"{a0:.3g}", _vector(mean), _vector(alpha))
    out.show(table)
    bic = Table(title="components by BIC (lower is better)", title_justify="left")
    for name in ("K", "log-likelihood", "BIC"):
        bic.add_column(name, justify="right")
    for row in result["selection"]:
        bic.add_row(str(row["n_components"]), f"{row['loglik']:.2f}", f"{row['bic']:.2f}")
    out.show(bic)


def show_fit_posterior(results: list[PosteriorResult], out: Output) -> None:
    """``fit-posterior``: per trace the verdict in one sentence, its warnings, the per-n table, the
    fitted updating prior and every predictor's scores; several traces side by side."""
    for result in results:
        s = result.summary
        out.show(Text(f"{result.label}: {s['verdict_sentence']}", style="bold"))
        for warning in _warnings(s):
            out.show(Text(f"warning: {warning}"))
        out.show(_per_n_table(result))
        out.show(_fit_table(result))
        out.show(_scores_table(result))
    if len(results) > 1:
        out.show(_comparison_table(results))


def _warnings(s: dict) -> list[str]:
    lines = list(s["verdict_warnings"])
    if s["n_marks_low_mass"]:
        lines.append(f"{s['n_marks_low_mass']} of {s['n_marks']} marks left out: less than"
                     f" {s['thresholds']['min_mass']:g} probability on the categories (--min-mass)")
    if s["prior"].get("role") == PRIOR_OVER_ROWS:
        lines.append(f"--prior {s['prior']['source']} is a prior over rows (fit-prior: the spread of predictions"
                     " across prompts), not the prior a model updates from; pass a fit-posterior --json file for that")
    if s["n_marks_inexact"]:
        lines.append(f"{s['n_marks_inexact']} marks are inexact (the mark falls inside a token; column 'exact'):"
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


def _flags(fit: dict) -> str:
    if fit["at_bound"]:
        return "AT BOUND (α0 → ∞)"
    return "yes" if fit["converged"] else "NO"


def _fit_table(result: PosteriorResult) -> Table:
    s = result.summary
    updating = s["updating_prior"]
    k = len(updating["exact"]["weights"])
    table = Table(title=f"{result.label}: the updating prior (the prior the predictions update from;"
                        f" {k} component{'s' if k > 1 else ''})", title_justify="left")
    for name in ("filter", "weights", "prior mean", "α0", "γ", "converged", "KL(model‖filter) in-sample",
                 "KL(model‖filter) out-of-sample"):
        table.add_column(name, justify="left" if name == "filter" else "right")
    scores = s["scores"]
    for name, key in (("exact Bayes (γ = 1)", "exact_bayes"), ("forgetting filter", "forgetting")):
        fit = s[key]
        strengths = [sum(a) for a in fit["alphas"]]
        table.add_row(name, _vector(fit["weights"]), _vector(fit["prior_mean"]),
                      _vector(strengths) if k > 1 else f"{fit['alpha0']:.3g}", f"{fit['gamma']:.3f}", _flags(fit),
                      f"{scores[key]['kl_bits_in_sample']:.4f}",
                      f"{scores[key]['kl_bits_out_of_sample']:.4f}" if scores["out_of_sample"] else "n/a")
    low, high = s["gamma_ci"]
    table.caption = (f"KL(model‖filter) in bits, mean over {s['n_marks_used']} used marks; out-of-sample ="
                     f" fitted on the other of {scores['n_folds']} folds of sequences. γ {int(s['gamma_ci_level'] * 100)}%"
                     f" bootstrap CI [{low:.3f}, {high:.3f}] over {s['n_sequences']} sequences"
                     f" ({s['n_bootstrap']} resamples). {gamma_test_line(s)}."
                     + _selection_text(updating["selection"], k))
    return table


def _selection_text(selection: list[dict], chosen: int) -> str:
    if not selection:
        return ""
    cells = ", ".join(f"{row['n_components']}: {row['held_out_kl_bits']:.4f}" for row in selection)
    return f" Components by held-out KL(model‖filter) bits ({cells}): {chosen}."


SCORE_NAMES = {"exact_bayes": "exact Bayes (γ = 1), updating prior", "forgetting": "forgetting filter",
               "never_updating": "never updating (the n = 0 prediction)", "frequency": "frequency follower (α0 → 0)",
               "recency": "recency (last outcome)", "true_theta": "true θ", "reference_prior": "--prior"}


def _scores_table(result: PosteriorResult) -> Table:
    scores = result.summary["scores"]
    table = Table(title=f"{result.label}: every predictor scored the same way (mean over used marks)",
                  title_justify="left")
    for name in ("predictor", "KL(model‖·) bits", "TV", "scored"):
        table.add_column(name, justify="left" if name in ("predictor", "scored") else "right")
    where = "out of sample" if scores["out_of_sample"] else "in sample"
    for key, label in SCORE_NAMES.items():
        if key not in scores:
            continue
        row = scores[key]
        if "kl_bits" in row:
            extra = f" ({result.summary['prior']['source']})" if key == "reference_prior" else ""
            table.add_row(label + extra, f"{row['kl_bits']:.4f}", f"{row['tv']:.4f}", "nothing fitted")
        else:
            held = "out_of_sample" if scores["out_of_sample"] else "in_sample"
            table.add_row(label, f"{row[f'kl_bits_{held}']:.4f}", f"{row[f'tv_{held}']:.4f}", where)
    return table


def _comparison_table(results: list[PosteriorResult]) -> Table:
    table = Table(title="side by side", title_justify="left")
    table.add_column("n", justify="right")
    for r in results:
        table.add_column(f"{r.label}\n{KL_BAYES_MODEL} bits", justify="right")
        table.add_column("TV", justify="right")
    table.add_row("verdict", *[c for r in results for c in (r.summary["verdict"], "")])
    per_trace = [r.by_n.drop_duplicates(["layout", "n"]).groupby("n")[["kl_bits", "tv"]].mean() for r in results]
    for n in sorted(set().union(*[set(p.index) for p in per_trace])):
        cells = []
        for p in per_trace:
            cells += [f"{p.loc[n, 'kl_bits']:.4f}", f"{p.loc[n, 'tv']:.3f}"] if n in p.index else ["", ""]
        table.add_row(str(int(n)), *cells)
    table.add_row("α0", *[c for r in results for c in (f"{r.summary['exact_bayes']['alpha0']:.3g}", "")])
    table.add_row("γ", *[c for r in results for c in (f"{r.summary['forgetting']['gamma']:.3f}", "")])
    return table


# ------------------------------------------------------------------------------------------ analyses
def continuity_table(result: ContinuityResult) -> Table:
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
    return table


def martingale_table(results: list[MartingaleResult], alpha: float, name: str) -> Table:
    first = results[0]
    table = Table(title=f"martingale test, {name}: {first.states} states per n, {first.paths} paths of"
                        f" {first.horizon} examples")
    for column in ("n", "mean TV |E p_n+m − p_n|", "statistic", "p-value", f"reject at {alpha:g}", "P(categories)"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(str(r.n), f"{r.mean_tv_deviation:.4f}", f"{r.statistic:.3g}", f"{r.p_value:.3g}",
                      "yes" if r.rejected(alpha) else "no",
                      "" if r.mean_category_mass is None else f"{r.mean_category_mass:.3f}")
    return table


def show_template_tables(label: str, categories: list[str], tables, out: Output) -> None:
    """``fit-posterior --by template``: per n, mean ± std over templates (docs/experiments.md)."""
    by_n = tables["by_n"]
    table = Table(title=f"{label}: per n, mean ± std over templates (TV/KL to θ, and to the posterior predictive)",
                  title_justify="left")
    first = categories[0]
    for name in ("n", "templates", "marks", f"P({first}) model", f"P({first}) Bayes", "TV to θ", "KL(θ‖model) bits",
                 "TV to Bayes", f"{KL_BAYES_MODEL} bits"):
        table.add_column(name, justify="right")
    for _, row in by_n.iterrows():
        cell = lambda s: f"{row[s + '_mean']:.3f} ± {row[s + '_std']:.3f}"  # noqa: E731
        table.add_row(str(int(row["n"])), str(int(row["templates"])), str(int(row["marks"])),
                      cell("p_first_model"), cell("p_first_bayes"), cell("tvd_theta"), cell("kl_theta_bits"),
                      cell("tvd_bayes"), cell("kl_bayes_bits"))
    out.show(table)


def show_peer_gamma(label: str, fit, out: Output) -> None:
    """``fit-posterior --gamma-variant``: the peer's γ and its objective."""
    table = Table(title=f"{label}: γ as Gupta et al. fit it (decayed Beta(1,1) pseudo-counts, L1 on template means)",
                  title_justify="left")
    for name in ("variant", "γ", "mean |ΔP|", "positions", "marks"):
        table.add_column(name, justify="right" if name != "variant" else "left")
    table.add_row("gupta", f"{fit.gamma:.3f}", f"{fit.mean_abs_error:.4f}", str(fit.n_positions), str(fit.n_marks))
    out.show(table)


# ------------------------------------------------------------------------------------------ --format tsv
# The same results as the tables above, one row per table row, every number at full precision; each
# command writes one table (docs/cli.md names which); everything else is in its JSON.
def trace_rows(frame: pd.DataFrame, top: int) -> pd.DataFrame:
    """``inspect --format tsv``: one row per position (and layer), the top candidates as columns."""
    rows = []
    for row in frame.itertuples(index=False):
        record = _row_json(row, top)
        candidates = record.pop("top")
        for i in range(top):
            candidate = candidates[i] if i < len(candidates) else {"token": None, "id": None, "prob": None}
            record.update({f"top{i + 1}_token": candidate["token"], f"top{i + 1}_id": candidate["id"],
                           f"top{i + 1}_prob": candidate["prob"]})
        rows.append(record)
    table = pd.DataFrame(rows)
    integers = ["next_rank", *[f"top{i + 1}_id" for i in range(top)]]
    return table.astype({c: "Int64" for c in integers if c in table.columns})  # missing stays missing, not 2.0


def models_rows(inventory: dict) -> pd.DataFrame:
    """``models --format tsv``: the cached conversions (the default model's record is in the JSON)."""
    columns = ["source", "source_sha256", "quantization", "bytes", "converted_utc", "path"]
    return pd.DataFrame([{c: entry.get(c) for c in columns} for entry in inventory["cached"]], columns=columns)


def fit_prior_rows(result: dict) -> pd.DataFrame:
    """``fit-prior --format tsv``: one row per mixture component (the BIC selection is in the JSON)."""
    mixture, categories = result["mixture"], result["categories"]
    rows = []
    for j, (w, a0, mean, alpha) in enumerate(zip(mixture["weights"], mixture["concentrations"], mixture["means"],
                                                 mixture["alphas"])):
        rows.append({"component": j + 1, "weight": w, "alpha0": a0, **{f"mean_{c}": m for c, m in zip(categories, mean)},
                     **{f"alpha_{c}": a for c, a in zip(categories, alpha)}})
    return pd.DataFrame(rows)


def fit_posterior_rows(results: list[PosteriorResult]) -> pd.DataFrame:
    """``fit-posterior --format tsv``: the per-n table, long (one row per trace, layout, n, category)."""
    return pd.concat([r.by_n for r in results], ignore_index=True)


def continuity_rows(result: ContinuityResult) -> pd.DataFrame:
    """``continuity --format tsv``: measure and value, one row per number of the result."""
    values = asdict(result)
    rows = [(name, value) for name, value in values.items() if name != "by_kind"]
    for kind in values["by_kind"]:
        rows += [(f"{kind['kind']}.{name}", value) for name, value in kind.items() if name != "kind"]
    return pd.DataFrame(rows, columns=["measure", "value"], dtype=object)


def martingale_rows(results: list[MartingaleResult], alpha: float) -> pd.DataFrame:
    """``martingale --format tsv``: one row per n, with the verdict at ``alpha``."""
    return pd.DataFrame([{**asdict(r), "rejected": r.rejected(alpha)} for r in results])
