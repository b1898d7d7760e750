"""Commands for in-context learning: ``experiment`` (prompts), ``fit-prior`` and ``fit-posterior`` (fits)."""

import json
import sys
from typing import Annotated, Literal, Optional

import typer

from llmprobe.cli import options as opt
from llmprobe.cli.output import Output
from llmprobe.errors import UsageError
from llmprobe.progress import plural


def experiment(
    config: Annotated[str, typer.Argument(
        help="Experiment definition (TOML), e.g. configs/experiments/coin.toml, or - for stdin.")],
    output: opt.output("JSONL file (default: stdout).") = None,
    seed: Annotated[Optional[int], typer.Option(min=0, help="Override the config's seed.")] = None,
    n_max: Annotated[Optional[int], typer.Option(help="Override the number of examples per sequence.")] = None,
    sequences: Annotated[Optional[int], typer.Option(help="Override the sequences per theta.")] = None,
    layout: Annotated[Optional[Literal["marks", "per-n", "both"]], typer.Option(
        help="marks: one prompt, a mark per example; per-n: a prompt per number of examples (default: the config's).")]
    = None,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Generate in-context-learning prompts (JSONL with marks, counts, targets) from a TOML experiment."""
    opt.input_path(config, "experiment file")
    from llmprobe.experiments import generate, write_jsonl
    from llmprobe.files import atomic_file, check_new_output

    to_file = output is not None and output != "-"
    if to_file:
        check_new_output(output, force, inputs=[config])
    records = generate(opt.experiment_config(config), seed=seed, n_max=n_max, sequences=sequences, layout=layout)
    if to_file:
        with atomic_file(output, "w", replace=force) as stream:
            count = write_jsonl(records, stream)
    else:
        count = write_jsonl(records, sys.stdout)
    Output(quiet).log(f"wrote {plural(count, 'prompt')}")


def fit_prior(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE", help="Trace with targets (file, directory or -).")],
    components: Annotated[str, typer.Option(help="Mixture components, or 'auto' to choose by BIC.")] = "1",
    max_components: Annotated[int, typer.Option(min=1, help="Largest K tried with --components auto.")] = 5,
    from_counts: Annotated[bool, typer.Option("--from-counts",
                                              help="Fit a Dirichlet-multinomial to the examples' counts.")] = False,
    n: Annotated[Optional[str], typer.Option("--n", metavar="N[,N...]",
                                             help="Only marks after these numbers of examples.")] = None,
    output: opt.output("Prior JSON for fit-posterior.") = None,
    as_json: Annotated[bool, typer.Option("--json", help="The prior JSON on stdout.")] = False,
    table_format: opt.Format = "table",
    seed: opt.Seed = 0,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Fit the prior over rows: a Dirichlet (mixture) over the spread of a trace's category distributions."""
    fmt = opt.table_format(table_format, as_json)
    opt.input_path(trace_path, "trace file or directory")
    from llmprobe.analysis.fits import fit_prior as fit
    from llmprobe.analysis.marks import category_marks
    from llmprobe.cli.views import fit_prior_rows, show_fit_prior
    from llmprobe.files import check_new_output, write_atomic
    from llmprobe.tracing.reader import open_trace

    counts = opt.parse_counts(n) if n is not None else None
    if output is not None:
        check_new_output(output, force, inputs=[trace_path])
    prior_on_stdout = fmt == "json" or fmt == "table" and output is None and not sys.stdout.isatty()
    out = Output(quiet, stdout_is_data=prior_on_stdout or fmt == "tsv")
    marks = category_marks(open_trace(trace_path))
    result = fit(marks, components, max_components, from_counts, counts, seed)
    show_fit_prior(result, marks.label, out)
    document = json.dumps(result, indent=1) + "\n"
    if output is not None:
        write_atomic(output, document, replace=force)
    if prior_on_stdout:
        out.data_text(document)
    elif fmt == "tsv":
        out.data_tsv(fit_prior_rows(result))


def fit_posterior(
    traces: Annotated[list[str], typer.Argument(metavar="TRACE...", help="Traces of experiment prompts (or -).")],
    prior: Annotated[str, typer.Option(
        help="Reference prior for the per-mark Bayes column: 'fit' (the fitted updating prior), 'uniform',"
             " 'dirichlet:a1,...,aK', a fit-posterior --json file (its updating prior) or a fit-prior JSON"
             " (a prior over rows).")] = "fit",
    prior_components: Annotated[str, typer.Option(
        "--prior-components", metavar="K|auto",
        help="Components of the updating prior (a Dirichlet mixture the predictions update from); 'auto'"
             " chooses by held-out KL.")] = "1",
    max_components: Annotated[int, typer.Option(help="Largest K tried with --prior-components auto.")] = 3,
    min_mass: Annotated[float, typer.Option(
        "--min-mass", help="Leave out marks with less probability than this on the categories.")] = 0.05,
    folds: Annotated[int, typer.Option(help="Folds of sequences for the out-of-sample scores (2 or more).")] = 5,
    output: opt.output("Per-mark table, .parquet or .csv.") = None,
    as_json: opt.Json = False,
    table_format: opt.Format = "table",
    bootstrap: opt.Bootstrap = 200,
    seed: opt.Seed = 0,
    by: Annotated[Optional[Literal["template"]], typer.Option(
        "--by", help="template: also the per-n tables of mean ± std over prompt templates (docs/experiments.md).")]
    = None,
    gamma_variant: Annotated[Optional[Literal["gupta"]], typer.Option(
        "--gamma-variant", help="gupta: also Gupta et al.'s γ (decayed Beta(1,1) pseudo-counts, L1 on template means).")]
    = None,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Does the model update like a Bayesian? The updating prior, the exact-Bayes test, baselines, a verdict."""
    fmt = opt.table_format(table_format, as_json)
    if traces.count("-") > 1:
        raise UsageError("standard input can be read only once", where="TRACE")
    for path in traces:
        opt.input_path(path, "trace file or directory")
    if prior not in ("fit", "uniform") and not prior.startswith("dirichlet:"):
        if prior == "-" and "-" in traces:
            raise UsageError("standard input can be read only once; give the prior or the trace as a file",
                             where="--prior")
        opt.input_path(prior, "prior file")
    from llmprobe.analysis.fits import fit_posterior as fit, parse_components, posterior_marks, write_fit_table
    from llmprobe.cli.views import fit_posterior_rows, show_fit_posterior
    from llmprobe.files import check_new_output
    from llmprobe.analysis import protocols
    from llmprobe.tracing.reader import open_trace

    protocols.check_choice(by, protocols.BY_CHOICES, "--by")
    protocols.check_choice(gamma_variant, protocols.GAMMA_VARIANTS, "--gamma-variant")
    parse_components(prior_components)
    if not 0.0 <= min_mass < 1.0:
        raise UsageError(f"must be in [0, 1), got {min_mass}", where="--min-mass")
    if folds < 2:
        raise UsageError(f"must be 2 or more, got {folds}", where="--folds")
    if max_components < 1:
        raise UsageError(f"must be 1 or more, got {max_components}", where="--max-components")
    if output is not None:
        check_new_output(output, force, inputs=[*traces, *([] if prior in ("fit", "uniform") else [prior])])
    out = Output(quiet, stdout_is_data=fmt != "table")
    results = []
    labels: set[str] = set()
    for path in traces:
        trace = open_trace(path)
        label = _unique_label(trace.meta.get("model") or path, path, labels)
        marks = posterior_marks(trace, label)
        results.append(fit(marks, prior, bootstrap, seed, components=prior_components,
                           max_components=max_components, min_mass=min_mass, folds=folds, reporter=out))
        _peer_statistics(results[-1], marks, by, gamma_variant, out)
    show_fit_posterior(results, out)
    if output is not None:
        write_fit_table(results, output, force)
        out.log(f"wrote the per-mark table to {output}")
    if fmt == "json":
        out.data_text(json.dumps([r.summary for r in results], indent=1) + "\n")
    elif fmt == "tsv":
        out.data_tsv(fit_posterior_rows(results))


def _peer_statistics(result, marks, by: Optional[str], gamma_variant: Optional[str], out: Output) -> None:
    """``--by template`` and ``--gamma-variant``: shown, and added to the JSON summary under their own keys."""
    from llmprobe.analysis import protocols
    from llmprobe.cli.views import show_peer_gamma, show_template_tables

    if by == "template":
        bayes = protocols.bayes_from_fit_table(result.table, marks)
        tables = protocols.template_tables(protocols.per_mark_statistics(marks, bayes))
        show_template_tables(result.label, marks.categories, tables, out)
        result.summary["by_template"] = protocols.tables_to_json(tables)
    if gamma_variant is not None:
        peer = protocols.peer_gamma(marks, gamma_variant)
        show_peer_gamma(result.label, peer, out)
        result.summary["gamma_variants"] = {gamma_variant: peer.to_dict()}


def _unique_label(label: str, path: str, seen: set[str]) -> str:
    """Two traces of one model (e.g. with and without --chat) keep distinct labels."""
    label = str(label) if label not in seen else f"{label} ({path})"
    seen.add(label)
    return label
