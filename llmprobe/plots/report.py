"""``llmprobe report``: one self-contained HTML file with a run's metadata, figures and summary tables.

The page leads with the answer: with a fit table, the verdict per trace (and beside it, never
alone, the γ = 1 test, γ and its interval, α0, KL and TV in bits), then the scorecard of the field's other
tests (each with its number, direction and planted-model reference: after the verdict, never instead of
it) and the in-context figure; with a comparison (``compare -o``), where each size turns consistent, the
emergence figure and the rows; with sweeps (``ablate -o``, one model), each sweep's headline, the ablation
figure and the components whose ablation moves KL(Bayes‖model) most; then token figures for a few
informative prompts (different true θ where the prompts carry one); then the prior; and last,
collapsed, the details (run metadata, the per-prompt table, every fitted number, rounded).

Everything the page shows is inside the file: figures are ``data:`` URIs (PNG or SVG), the style
sheet is inline, and there are no scripts, fonts or links to fetch, so it opens offline in any
browser and can be mailed around. Text from traces is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any
from collections.abc import Iterable

import numpy as np
import pandas as pd

from llmprobe.version import __version__
from llmprobe.errors import UsageError
from llmprobe.files import check_new_output, write_atomic
from llmprobe.plots.ablation import combined_rows, plot_ablation
from llmprobe.plots.common import data_uri
from llmprobe.plots.emergence import plot_emergence
from llmprobe.plots.icl import MARK_KEY, FitTable, IclSummary, flatten_summary, open_fit, plot_icl, summarize
from llmprobe.analysis.ablation import Sweep, is_sweep, open_sweep
from llmprobe.analysis.comparison import ComparisonTable, is_comparison, read_comparison, turning_points
from llmprobe.analysis.results import KL_BAYES_MODEL, gamma_test_line, verdict_line
from llmprobe.analysis.priors import Prior, read_prior
from llmprobe.plots.prior import plot_prior
from llmprobe.plots.tokens import plot_tokens, select_layer, token_grid
from llmprobe.tracing.interventions import describe
from llmprobe.tracing.reader import read_trace
from llmprobe.tracing.schema import PHASE_GENERATED

LN2 = math.log(2.0)
REPORT_IMAGE_FORMATS = ("png", "svg")
MAX_TABLE_ROWS = 200
REPORT_DPI = 110  # the page stays a few MB; figures are still sharp at page width

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } code, pre { font-size: 0.85em; }
pre { white-space: pre-wrap; word-break: break-all; margin: 0; }
"""


@dataclass(frozen=True)
class ReportInputs:
    """The report's optional inputs, told apart by content: a fit table, a prior, a comparison, sweeps."""

    fit: str | None = None
    prior: str | None = None
    comparison: str | None = None
    sweeps: tuple[str, ...] = ()

    def named(self) -> list[tuple[str, str]]:
        """(what, path) of each input given, in the order the page names them."""
        found = [("fit table", self.fit), ("prior", self.prior), ("comparison", self.comparison)]
        found += [("sweep", path) for path in self.sweeps]
        return [(what, path) for what, path in found if path]


def classify_inputs(paths: Iterable[str]) -> ReportInputs:
    """Sort the optional inputs by content: a JSON document is a prior, a Parquet table carrying a comparison's
    metadata (``llmprobe compare -o``) a comparison, one carrying a sweep's (``llmprobe ablate -o``) a sweep (several
    sweeps of one model are drawn together), anything else a fit table."""
    fit = prior = comparison = None
    sweeps: list[str] = []
    for path in paths:
        is_json = path.lower().endswith(".json") or (Path(path).is_file() and _starts_like_json(Path(path)))
        if is_sweep(path):
            sweeps.append(path)
        elif is_comparison(path):
            if comparison is not None:
                raise UsageError(f"two comparison tables ({comparison} and {path}); give at most one", where=path)
            comparison = path
        elif is_json:
            if prior is not None:
                raise UsageError(f"two prior files ({prior} and {path}); give at most one", where=path)
            prior = path
        else:
            if fit is not None:
                raise UsageError(f"two fit tables ({fit} and {path}); give at most one", where=path)
            fit = path
    return ReportInputs(fit, prior, comparison, tuple(sweeps))


def _starts_like_json(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(64).lstrip()[:1] in (b"{", b"[")


def prompt_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: positions, marks, mean entropy and surprisal (bits), top-1 accuracy, text excerpt.

    Surprisal and accuracy are over teacher-forced prompt positions that have a next token, so they
    measure how well the model predicted the given text, not its own generations.
    """
    rows = []
    for prompt_id, group in frame.groupby("prompt_id", sort=False):
        prompt = group[group["phase"] != PHASE_GENERATED]
        generated = group[group["phase"] == PHASE_GENERATED]
        given = prompt["position"] < prompt["position"].max() if len(generated) else True  # next token is text
        scored = prompt[given & prompt["next_logprob"].notna()]
        rows.append({
            "prompt": str(prompt_id),
            "positions": len(prompt),
            "generated": len(generated),
            "marks": int(group["mark_index"].notna().sum()) if "mark_index" in group.columns else 0,
            "mean entropy (bits)": float(group["entropy"].mean() / LN2),
            "mean surprisal (bits/token)": float(-scored["next_logprob"].mean() / LN2) if len(scored) else math.nan,
            "top-1 accuracy": float((scored["next_rank"] == 1).mean()) if len(scored) else math.nan,
            "text": "".join(prompt["token"]) + ("‖" + "".join(generated["token"]) if len(generated) else ""),
        })
    return pd.DataFrame(rows)


def fit_group_summary(fit: FitTable, summary: IclSummary | None = None) -> pd.DataFrame:
    """Per group of sequences (trace, θ): counts, and TV / KL averaged over all marks and at the largest n."""
    summary = summarize(fit) if summary is None else summary
    marks = fit.frame.drop_duplicates(MARK_KEY).merge(summary.members.drop(columns="layout"),
                                                      on=["trace", "prompt_id", "sequence"])
    rows = []
    for group in summary.groups.itertuples():
        mine = marks[marks["group"] == group.group]  # every mark weighs the same, whatever its n
        last = mine[mine["n"] == mine["n"].max()]
        rows.append({
            "group": group.label,
            "sequences": group.sequences,
            "marks": len(mine),
            "mean TV": float(mine["tv"].mean()),
            f"mean {KL_BAYES_MODEL} bits": float(mine["kl_bits"].mean()),
            "largest n": int(last["n"].iloc[0]),
            "TV at largest n": float(last["tv"].mean()),
            f"{KL_BAYES_MODEL} bits at largest n": float(last["kl_bits"].mean()),
            "mean mass on categories": float(mine["mass"].mean()),
        })
    return pd.DataFrame(rows)


def prior_components(prior: Prior) -> pd.DataFrame:
    rows = []
    for j, (weight, alpha) in enumerate(zip(prior.weights, prior.alphas)):
        row: dict[str, Any] = {"component": j + 1, "weight": float(weight), "α₀": float(alpha.sum())}
        for name, a, m in zip(prior.categories, alpha, alpha / alpha.sum()):
            row[f"α {name}"] = float(a)
            row[f"mean {name}"] = float(m)
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return '<td class="num">–</td>'
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    if isinstance(value, (dict, list)):
        return f"<td><pre>{escape(json.dumps(_rounded(value), ensure_ascii=False))}</pre></td>"
    return f"<td>{escape(str(value))}</td>"


def _rounded(value: Any) -> Any:
    """Numbers inside lists and dicts to 4 significant digits, as in the table cells."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def html_table(frame: pd.DataFrame, limit: int = MAX_TABLE_ROWS) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>"
                   for row in frame.head(limit).itertuples(index=False, name=None))
    more = f"<p>… {len(frame) - limit} more rows not shown.</p>" if len(frame) > limit else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def key_value_table(items: dict[str, Any]) -> str:
    body = "".join(f"<tr><th>{escape(str(k))}</th>{_cell(v)}</tr>" for k, v in items.items())
    return f"<table><tbody>{body}</tbody></table>"


def _figure(uri: str, alt: str, caption: str) -> str:
    return (f'<figure><img src="{escape(uri)}" alt="{escape(alt)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def build_report(trace_source: str, extras: list[str], *, prompts: list[str] | None = None, max_prompts: int = 3,
                 max_positions: int = 48, top: int = 10, image_format: str = "png", layer: int | None = None) -> str:
    """The report's HTML. Token figures cover ``prompts`` (default: the first ``max_prompts``), each its
    last ``max_positions`` positions."""
    if image_format not in REPORT_IMAGE_FORMATS:
        raise UsageError(f"expected one of {', '.join(REPORT_IMAGE_FORMATS)}", where="--image-format")
    if max_prompts < 0:
        raise UsageError("must be 0 or more", where="--max-prompts")
    if max_positions < 1:
        raise UsageError("must be 1 or more", where="--max-positions")
    inputs = classify_inputs(extras)
    frame = select_layer(read_trace(trace_source), layer)
    fit = open_fit(inputs.fit) if inputs.fit else None
    prior = read_prior(inputs.prior) if inputs.prior else None
    comparison = read_comparison(inputs.comparison) if inputs.comparison else None
    sweeps = [open_sweep(path) for path in inputs.sweeps]
    meta = frame.attrs["llmprobe"]
    model = str(meta.get("model", "unknown model"))
    parts = [f"<h1>llmprobe report — {escape(model)}</h1>",
             f"<p>Trace <code>{escape(trace_source)}</code>"
             + "".join(f", {what} <code>{escape(path)}</code>" for what, path in inputs.named())
             + f". Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by llmprobe {escape(__version__)}.</p>"]
    changed = describe((meta.get("settings") or {}).get("interventions") or [])
    if changed:  # under the title: these are not the model's own numbers
        parts.append(f'<p class="interventions"><strong>{escape(changed)}</strong></p>')
    summary = prompt_summary(frame)
    if fit is not None:
        parts += _answer_section(fit.summaries)
        parts += _scorecard_section(fit.summaries)
        parts += _fit_section(fit, image_format)
    if comparison is not None:
        parts += _comparison_section(comparison, image_format)
    if sweeps:
        parts += _sweep_section(sweeps, image_format)
    parts += ["<h2>Prompts</h2>"]
    parts += _token_section(frame, trace_source, summary, prompts, max_prompts, max_positions, top, image_format)
    if prior is not None:
        parts += _prior_section(prior, image_format)
    parts += ["<h2>Details</h2>",
              _details("Run metadata", key_value_table(meta)),
              _details(f"Per-prompt summary ({len(summary)} prompts)",
                       "<p>Surprisal and top-1 accuracy are over the prompt's own tokens (teacher-forced); "
                       "‖ separates the prompt from generated text.</p>" + html_table(summary))]
    for fit_summary in fit.summaries if fit is not None else []:
        parts.append(_details(f"Fit of {fit_summary.get('trace', 'the trace')}: every number",
                              key_value_table(flatten_summary(fit_summary))))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>llmprobe report — {escape(model)}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def _token_section(frame: pd.DataFrame, source: str, summary: pd.DataFrame, prompts: list[str] | None,
                   max_prompts: int, max_positions: int, top: int, image_format: str) -> list[str]:
    unknown = [p for p in prompts or [] if p not in set(summary["prompt"])]
    if unknown:
        raise UsageError(f"no prompt with id {unknown[0]!r} in the trace", where="--prompt")
    chosen = prompts or informative_prompts(frame, list(summary["prompt"]), max_prompts)
    parts = []
    for prompt_id in chosen:
        rows = frame[frame["prompt_id"] == prompt_id]
        first = int(rows["position"].max()) + 1 - max_positions
        positions = f"{first}:" if first > int(rows["position"].min()) else None
        grid = token_grid(frame, source, prompt_id, positions, top)
        shown = "all positions" if positions is None else f"its last {max_positions} positions"
        parts.append(_figure(data_uri(plot_tokens(grid), image_format, REPORT_DPI),
                             f"top-{top} candidates, prompt {prompt_id}",
                             f"Prompt {prompt_id}, {shown}: top-{grid.probs.shape[1]} next-token candidates per "
                             "position (red box: the actual next token), entropy and surprisal underneath."))
    if len(summary) > len(chosen):
        parts.append(f"<p>Figures for {len(chosen)} of {len(summary)} prompts; "
                     f"<code>llmprobe plot TRACE --prompt ID</code> draws any other.</p>")
    return parts


def _fit_section(fit: FitTable, image_format: str) -> list[str]:
    summary = summarize(fit)
    parts = ["<h2>In-context learning against the Bayesian posterior predictive</h2>",
             _figure(data_uri(plot_icl(summary, fit.summaries), image_format, REPORT_DPI), "in-context learning curves",
                     "One panel per θ: mean over sequences (band: 10th–90th percentile) of the model's probability "
                     "(with two categories, of the first), the Bayesian prediction and the true θ; below, over all "
                     f"groups, TV, {KL_BAYES_MODEL}, entropy and mass."),
             html_table(fit_group_summary(fit, summary))]
    return parts


def _answer_section(summaries: list[dict[str, Any]]) -> list[str]:
    """The verdict first (:func:`~llmprobe.analysis.results.verdict_line`), the γ = 1 test and the key numbers
    beside it: the test alone would read as a conclusion it is not (a poor fit is "not rejected" too)."""
    def number(summary: dict, *keys: str) -> float:
        value: Any = summary
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return float(value) if isinstance(value, (int, float)) else math.nan

    parts, rows = ["<h2>Answer</h2>"], []
    for s in summaries:
        verdict = s.get("verdict") if isinstance(s.get("verdict"), str) else "none"
        gamma, alpha0 = number(s, "forgetting", "gamma"), number(s, "exact_bayes", "alpha0")
        low, high = (list(s.get("gamma_ci") or []) + [math.nan, math.nan])[:2]
        parts.append(f'<p class="verdict" data-verdict="{escape(verdict)}"><b>{escape(str(s.get("trace", "trace")))}'
                     f"</b>: {escape(verdict_line(s))}</p>"
                     f"<p>{escape(gamma_test_line(s))}; prior strength α0 = {alpha0:.3g}.</p>")
        rows.append({"trace": str(s.get("trace")), "verdict": verdict,
                     "γ = 1 test": {True: "rejected", False: "not rejected"}.get(s.get("exact_bayes_rejected"), "none"),
                     "γ": gamma, "γ CI low": float(low), "γ CI high": float(high), "α0": alpha0,
                     f"mean {KL_BAYES_MODEL} bits": number(s, "mean_kl_bits"), "mean TV": number(s, "mean_tv"),
                     "mass on categories": number(s, "mean_mass")})
    parts.append(html_table(pd.DataFrame(rows)))
    return parts


SCORECARD_COLUMNS = {"test": "test", "display": "number", "direction": "direction", "reference": "planted reference"}


def _scorecard_section(summaries: list[dict[str, Any]]) -> list[str]:
    """The field's other tests, one row each (``scorecard`` of every summary that has one), after the Answer."""
    rows = [{"trace": str(s.get("trace")),
             **{label: str(entry.get(key, "")) for key, label in SCORECARD_COLUMNS.items()}}
            for s in summaries if isinstance(s.get("scorecard"), dict)
            for entry in s["scorecard"].values() if isinstance(entry, dict)]
    if not rows:
        return []
    return ["<h2>Scorecard: the field's other tests</h2>",
            "<p>The verdict above is the conclusion. These are the tests other papers use, each with its number, its"
            " direction and what planted models score (docs/statistics.md, section 6g); a test that could not be"
            " computed says why.</p>", html_table(pd.DataFrame(rows))]


COMPARISON_COLUMNS = {"name": "model", "step": "step", "layers": "layers", "hidden": "hidden",
                      "parameters": "parameters", "verdict": "verdict", "kl_bits": f"{KL_BAYES_MODEL} bits",
                      "kl_best_filter_bits": "KL(model‖best filter) bits", "gamma": "γ", "gamma_low": "γ CI low",
                      "gamma_high": "γ CI high", "alpha0": "α0", "entropy_mae_bits": "entropy MAE bits",
                      "mass": "mass on categories"}


def _comparison_section(comparison: ComparisonTable, image_format: str) -> list[str]:
    """A comparison of models (``compare -o``): where each size turns consistent, the figure, the rows."""
    turns = "".join(f"<li><b>{escape(t.group)}</b> ({t.parameters:,} parameters): "
                    + (f"consistent from step {t.step}" if t.step is not None else
                       f"{escape(t.last_verdict)} at its last checkpoint" + (f" (step {t.last_step})"
                                                                              if t.last_step is not None else ""))
                    + "</li>" for t in turning_points(comparison.frame))
    frame = comparison.frame[[c for c in COMPARISON_COLUMNS if c in comparison.frame.columns]]
    return ["<h2>Over training and size: when the model becomes Bayesian</h2>",
            f"<p>{len(comparison.frame)} models compared on the same prompts; where the verdict turns consistent"
            f" for good:</p><ul>{turns}</ul>",
            _figure(data_uri(plot_emergence(comparison), image_format, REPORT_DPI), "emergence figure",
                    "Each measure against the training step (a line per size) and the parameter count (each size at its"
                    " last checkpoint; other models as stars); markers show the verdict, dotted lines where a size"
                    " turns consistent."),
            html_table(frame.rename(columns=COMPARISON_COLUMNS))]


SWEEP_COLUMNS = {"component": "component", "kind": "kind", "delta_kl_bits": f"Δ {KL_BAYES_MODEL} bits",
                 "mean_kl_bits": f"{KL_BAYES_MODEL} bits", "kl_model_filter_bits": "KL(model‖filter) bits",
                 "gamma": "γ", "gamma_ci_low": "γ CI low", "gamma_ci_high": "γ CI high", "alpha0": "α0",
                 "verdict": "verdict", "verdict_flipped": "flipped", "mass": "mass on categories",
                 "delta_entropy_bits": "Δ entropy bits", "top1_agreement": "top-1 agreement"}
SWEEP_SHOWN = 20


def _sweep_section(sweeps: list[Sweep], image_format: str) -> list[str]:
    """Ablation sweeps (``ablate -o``) of one model: each sweep's headline, the figure, and the components whose
    ablation moves KL(Bayes‖model) most (every sweep's together; every row is in the sweep tables)."""
    lines = "".join(f"<li><code>{escape(s.source)}</code> ({escape(str(s.meta.get('sweep', {}).get('ablation')))}"
                    f"-ablation over {escape(str(s.meta.get('sweep', {}).get('over')))}, {len(s.frame) - 1}"
                    f" components): {escape(s.headline())}</li>" for s in sweeps)
    base = sweeps[0].baseline
    rows = combined_rows(sweeps).sort_values("delta_kl_bits", ascending=False, na_position="last", kind="stable")
    shown = pd.concat([sweeps[0].frame.iloc[:1], rows.head(SWEEP_SHOWN)])[list(SWEEP_COLUMNS)]
    return ["<h2>Where in the network: components ablated one at a time</h2>",
            f"<p>The un-ablated model: verdict <b>{escape(str(base['verdict']))}</b>, {KL_BAYES_MODEL}"
            f" {base['mean_kl_bits']:.4g} bits. Each component ablated alone and fitted as fit-posterior fits a trace:"
            f"</p><ul>{lines}</ul>",
            _figure(data_uri(plot_ablation(sweeps), image_format, REPORT_DPI), "ablation figure",
                    f"The change of {KL_BAYES_MODEL} when each component is ablated (red: further from Bayes); heads"
                    " as a layer × head heatmap, attention and MLP outputs and blocks as bars per layer, principal"
                    " directions beside random ones; open markers: the verdict flipped."),
            f"<p>The baseline and the {min(SWEEP_SHOWN, len(rows))} of {len(rows)} components whose ablation raises"
            f" {KL_BAYES_MODEL} most:</p>",
            html_table(shown.rename(columns=SWEEP_COLUMNS))]


def informative_prompts(frame: pd.DataFrame, ids: list[str], count: int) -> list[str]:
    """Up to ``count`` prompts that differ: one per true θ, spread from the lowest θ to the highest, when
    the prompts carry a θ (experiments); else the first ``count``."""
    if "meta" not in frame.columns or count == 0:
        return ids[:count]
    first_per_theta: dict[tuple, str] = {}
    for prompt_id, meta in zip(frame["prompt_id"], frame["meta"]):
        meta = json.loads(meta) if isinstance(meta, str) else meta
        theta = meta.get("theta") if isinstance(meta, dict) else None
        if isinstance(theta, list):
            first_per_theta.setdefault(tuple(theta), str(prompt_id))
    if len(first_per_theta) < 2:
        return ids[:count]
    ordered = [first_per_theta[t] for t in sorted(first_per_theta)]
    picks = np.unique(np.linspace(0, len(ordered) - 1, min(count, len(ordered))).round().astype(int))
    return [ordered[i] for i in picks]


def _details(summary: str, content: str) -> str:
    return f"<details><summary>{escape(summary)}</summary>{content}</details>"


def _prior_section(prior: Prior, image_format: str) -> list[str]:
    parts = ["<h2>Fitted prior</h2>",
             _figure(data_uri(plot_prior(prior), image_format, REPORT_DPI), "fitted prior",
                     "The fitted prior over the categories' probabilities; component means marked."),
             html_table(prior_components(prior))]
    if prior.facts:
        parts.append(key_value_table(prior.facts))
    return parts


def write_report(trace_source: str, extras: list[str], output: str | None, *, force: bool, **options: Any) -> Path:
    """Build the page, then write it atomically; returns its path."""
    if output is None:
        if trace_source == "-":
            raise UsageError("give an output file when the trace comes from stdin", where="-o")
        output = str(Path(trace_source).with_suffix("")) + ".report.html"
    path = Path(output)
    if path.suffix.lower() not in (".html", ".htm"):
        raise UsageError("the report is HTML; name it *.html", where=output)
    check_new_output(path, force, inputs=[trace_source, *extras])
    html = build_report(trace_source, extras, **options)
    write_atomic(path, html.encode("utf-8"), replace=force)
    return path
