"""What ``experiment``, ``fit-prior`` and ``fit-posterior`` show and write (tables to stderr, data to stdout)."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from rich.table import Table

from llmprobe._output import Output
from llmprobe.errors import UsageError
from llmprobe.fitting import PosteriorResult, fit_posterior, fit_prior, write_fit_table
from llmprobe.icl import category_marks
from llmprobe.reader import open_trace

MAX_CATEGORY_COLUMNS = 3  # per-category columns in the per-n table; wider sets show TV/KL only


def run_experiment(config: str, output: str | None, force: bool, seed: int | None, n_max: int | None,
                   sequences: int | None, layout: str | None, out: Output) -> None:
    from llmprobe.experiments import generate, load_experiment, write_jsonl

    experiment = load_experiment(Path(config))
    records = generate(experiment, seed=seed, n_max=n_max, sequences=sequences, layout=layout)
    if output is None or output == "-":
        count = write_jsonl(records, sys.stdout)
    else:
        with _atomic_text(output, force) as stream:
            count = write_jsonl(records, stream)
    out.log(f"wrote {count} prompts")


def run_fit_prior(trace_path: str, components: str, max_components: int, from_counts: bool, n_filter: int | None,
                  output: str | None, force: bool, as_json: bool, seed: int, out: Output) -> None:
    cm = category_marks(open_trace(trace_path))
    result = fit_prior(cm, components, max_components, from_counts, n_filter, seed)
    mixture = result["mixture"]
    table = Table(title=f"{cm.label}: Dirichlet prior over {', '.join(cm.categories)} ({result['data']},"
                        f" {result['n_rows']} rows)", title_justify="left")
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
    document = json.dumps(result, indent=1)
    if output is not None:
        _write_text(output, document + "\n", force)
    if as_json or output is None and not sys.stdout.isatty():
        out.data_text(document + "\n")


def run_fit_posterior(traces: list[str], prior: str, output: str | None, force: bool, as_json: bool,
                      n_bootstrap: int, seed: int, out: Output) -> None:
    if traces.count("-") > 1:
        raise UsageError("standard input can be read only once", where="TRACE")
    results: list[PosteriorResult] = []
    labels: set[str] = set()
    for path in traces:
        trace = open_trace(path)
        label = _unique_label(trace.meta.get("model") or path, path, labels)
        results.append(fit_posterior(category_marks(trace, label), prior, n_bootstrap, seed))
    for result in results:
        out.show(_per_n_table(result))
        out.show(_fit_table(result))
    if len(results) > 1:
        out.show(_comparison_table(results))
    if output is not None:
        write_fit_table(results, output, force)
        out.log(f"wrote the per-mark table to {output}")
    if as_json:
        out.data_text(json.dumps([r.summary for r in results], indent=1) + "\n")


def _unique_label(label: str, path: str, seen: set[str]) -> str:
    """Two traces of one model (e.g. with and without --chat) keep distinct labels."""
    label = str(label) if label not in seen else f"{label} ({path})"
    seen.add(label)
    return label


def _vector(values) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def _per_n_table(result: PosteriorResult) -> Table:
    by_n = result.by_n
    show_categories = result.categories if len(result.categories) <= MAX_CATEGORY_COLUMNS else []
    table = Table(title=f"{result.label}: model vs Bayes posterior predictive by number of examples",
                  title_justify="left")
    for name in ("layout", "n", "marks", *[f"P({c}) model" for c in show_categories],
                 *[f"P({c}) Bayes" for c in show_categories], "TV", "KL bits", "mass"):
        table.add_column(name, justify="left" if name == "layout" else "right")
    for (layout, n), group in by_n.groupby(["layout", "n"], dropna=False, sort=True):
        per_cat = group.set_index("category")
        first = group.iloc[0]
        table.add_row(
            str(layout), str(int(n)), str(int(first["marks"])),
            *[f"{per_cat.loc[c, 'model_prob']:.3f}" for c in show_categories],
            *[f"{per_cat.loc[c, 'bayes_prob']:.3f}" for c in show_categories],
            f"{first['tv']:.3f}", f"{first['kl_bits']:.4f}", f"{first['mass']:.3f}",
        )
    return table


def _fit_table(result: PosteriorResult) -> Table:
    s = result.summary
    table = Table(title=f"{result.label}: the Bayesian model that best explains the predictions",
                  title_justify="left")
    for name in ("model", "prior mean", "α0", "γ", "KL(model‖filter) bits"):
        table.add_column(name, justify="right" if name != "model" else "left")
    for name, fit in (("exact Bayes (γ = 1)", s["exact_bayes"]), ("forgetting filter", s["forgetting"])):
        table.add_row(name, _vector(fit["prior_mean"]), f"{fit['alpha0']:.3g}", f"{fit['gamma']:.3f}",
                      f"{fit['mean_kl_bits_model_to_filter']:.4f}")
    low, high = s["gamma_ci"]
    table.caption = (f"γ {int(s['gamma_ci_level'] * 100)}% bootstrap CI [{low:.3f}, {high:.3f}] over"
                     f" {s['n_sequences']} sequences ({s['n_bootstrap']} resamples): exact Bayes "
                     + ("REJECTED" if s["exact_bayes_rejected"] else "not rejected")
                     + ("" if s["gamma_identifiable"] else " (but the predictions do not respond to the"
                        " examples: α0 → ∞, so γ is not identifiable)")
                     + f". Overall vs the {s['prior']['kind']} prior: mean KL(Bayes‖model) {s['mean_kl_bits']:.4f}"
                     f" bits, mean TV {s['mean_tv']:.4f}, mean mass on the categories {s['mean_mass']:.3f}.")
    return table


def _comparison_table(results: list[PosteriorResult]) -> Table:
    table = Table(title="side by side", title_justify="left")
    table.add_column("n", justify="right")
    for r in results:
        table.add_column(f"{r.label}\nKL bits", justify="right")
        table.add_column("TV", justify="right")
    per_trace = [r.by_n.drop_duplicates(["layout", "n"]).groupby("n")[["kl_bits", "tv"]].mean() for r in results]
    for n in sorted(set().union(*[set(p.index) for p in per_trace])):
        cells = []
        for p in per_trace:
            cells += [f"{p.loc[n, 'kl_bits']:.4f}", f"{p.loc[n, 'tv']:.3f}"] if n in p.index else ["", ""]
        table.add_row(str(int(n)), *cells)
    table.add_row("α0", *[c for r in results for c in (f"{r.summary['exact_bayes']['alpha0']:.3g}", "")])
    table.add_row("γ", *[c for r in results for c in (f"{r.summary['forgetting']['gamma']:.3f}", "")])
    return table


def _write_text(output: str, text: str, force: bool) -> None:
    with _atomic_text(output, force) as stream:
        stream.write(text)


@contextmanager
def _atomic_text(output: str, force: bool) -> Iterator[TextIO]:
    """A text file that appears at ``output`` only when the block completes."""
    path = Path(output)
    if path.exists() and not force:
        raise UsageError("already exists; pass --force to replace it", where=output)
    if not path.parent.is_dir():
        raise UsageError(f"directory {str(path.parent)!r} does not exist", where=output)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as stream:
            yield stream
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
