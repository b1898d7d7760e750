"""Commands for in-context learning: ``experiment`` (prompts), ``fit-prior``, ``fit-posterior`` and
``fit-scaling`` (fits)."""

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from llmprobe.analysis.fit_options import DEFAULT_MIN_MASS, PosteriorOptions
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
    permutations: Annotated[Optional[int], typer.Option(
        "--permutations", min=0, metavar="K",
        help="Also render each sequence in K shuffled orders of its examples (fit-posterior's exchangeability test;"
             " default: the config's, else 0).")] = None,
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
    records = generate(opt.experiment_config(config), seed=seed, n_max=n_max, sequences=sequences, layout=layout,
                       permutations=permutations)
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
    seed: opt.Seed = 0,
    force: opt.Force = False,
    out: Output = opt.RESULT,
) -> None:
    """Fit the prior over rows: a Dirichlet (mixture) over the spread of a trace's category distributions."""
    opt.input_path(trace_path, "trace file or directory")
    from llmprobe.analysis import fits
    from llmprobe.analysis.marks import category_marks
    from llmprobe.cli.views.fits import PriorView
    from llmprobe.files import check_new_output, write_atomic
    from llmprobe.tracing.reader import open_trace

    counts = opt.parse_counts(n) if n is not None else None
    if output is not None:
        check_new_output(output, force, inputs=[trace_path])
    if out.format == "table" and output is None and not sys.stdout.isatty():
        out = Output(out.quiet, format="json")  # piped on without -o: the prior JSON is the data
    marks = category_marks(open_trace(trace_path))
    view = PriorView(fits.fit_prior(marks, components, max_components, from_counts, counts, seed), marks.label)
    if output is not None:
        write_atomic(output, view.document(), replace=force)
    out.result(view)


def fit_posterior(
    traces: Annotated[list[str], typer.Argument(metavar="TRACE...", help="Traces of experiment prompts (or -).")],
    options: PosteriorOptions = opt.POSTERIOR,
    output: opt.output("Per-mark table, .parquet or .csv.") = None,
    martingale: Annotated[Optional[list[str]], typer.Option(
        "--martingale", metavar="FILE",
        help="`llmprobe martingale ... --json` output on the same model: its statistic and p-value per n join the"
             " scorecard (one file per TRACE, in order).")] = None,
    force: opt.Force = False,
    out: Output = opt.RESULT,
) -> None:
    """Does the model update like a Bayesian? The updating prior, the exact-Bayes test, baselines, a verdict;
    then the scorecard of the field's other tests."""
    if traces.count("-") > 1:
        raise UsageError("standard input can be read only once", where="TRACE")
    for path in traces:
        opt.input_path(path, "trace file or directory")
    if martingale and len(martingale) != len(traces):
        raise UsageError(f"give one martingale file per trace ({len(traces)} traces, {len(martingale)} files)",
                         where="--martingale")
    for path in martingale or []:
        if path == "-" or not Path(path).is_file():
            raise UsageError(f"{path}: {'give a file' if path == '-' else 'no such martingale file'}",
                             where="--martingale")
    prior_file = opt.prior_file(options.prior, stdin_taken="-" in traces)
    from llmprobe.analysis import fits
    from llmprobe.analysis.fit_tables import write_fit_table
    from llmprobe.cli.views.fits import PosteriorView
    from llmprobe.files import check_new_output
    from llmprobe.tracing.reader import open_trace

    from llmprobe.analysis.scorecard import read_martingale

    if output is not None:
        check_new_output(output, force, inputs=[*traces, *([prior_file] if prior_file else []),
                                                *(martingale or [])])
    runs = [read_martingale(path) for path in martingale] if martingale else [None] * len(traces)
    results = []
    labels: set[str] = set()
    for path, run in zip(traces, runs):
        trace = open_trace(path)
        label = _unique_label(trace.meta.get("model") or path, path, labels)
        results.append(fits.fit_posterior(fits.posterior_marks(trace, label), **asdict(options), martingale=run,
                                            reporter=out))
    if output is not None:
        write_fit_table(results, output, force)
        out.log(f"wrote the per-mark table to {output}")
    out.result(PosteriorView(results))


def _unique_label(label: str, path: str, seen: set[str]) -> str:
    """Two traces of one model (e.g. with and without --chat) keep distinct labels."""
    label = str(label) if label not in seen else f"{label} ({path})"
    seen.add(label)
    return label


def fit_scaling(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE",
                                              help="Trace of experiment prompts (file, directory or -).")],
    tasks: Annotated[int, typer.Option(
        "--tasks", metavar="M", help="Latent tasks of the Bayesian law (its prior has M weights).")] = 2,
    fit_fraction: Annotated[float, typer.Option(
        "--fit-fraction", metavar="F", help="Fit every law on this first fraction of the numbers of examples; score"
                                            " the rest (out of sample).")] = 0.5,
    min_mass: opt.MinMass = DEFAULT_MIN_MASS,
    output: opt.output("Per-n curve and every law's prediction, .parquet or .csv.") = None,
    force: opt.Force = False,
    out: Output = opt.RESULT,
) -> None:
    """The ICL curve against the Bayesian scaling law (Arora et al.) and the power, bounded power and logistic laws."""
    from llmprobe.analysis.fit_options import ScalingOptions

    ScalingOptions(tasks, fit_fraction, min_mass)
    opt.input_path(trace_path, "trace file or directory")
    from llmprobe.analysis import fits
    from llmprobe.analysis.scaling import fit_scaling as fit, write_predictions
    from llmprobe.cli.views.fits import ScalingView
    from llmprobe.files import check_new_output
    from llmprobe.tracing.reader import open_trace

    if output is not None:
        check_new_output(output, force, inputs=[trace_path])
    result = fit(fits.posterior_marks(open_trace(trace_path)), tasks, fit_fraction, min_mass)
    if output is not None:
        write_predictions(result, output, force)
        out.log(f"wrote the per-n predictions to {output}")
    out.result(ScalingView(result))
