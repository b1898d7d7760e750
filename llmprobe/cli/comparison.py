"""``compare`` (several models, one set of experiment prompts, one row each) and ``plot-compare`` (its figure)."""

import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from llmprobe.analysis.fit_options import PosteriorOptions
from llmprobe.cli import options as opt
from llmprobe.cli.output import Output
from llmprobe.errors import UsageError
from llmprobe.model.loading import ModelOptions

if TYPE_CHECKING:
    from llmprobe.tracing.ray_options import RayOptions

POSTERIOR_UNDER_TRUE_PRIOR = opt.POSTERIOR.with_defaults(prior="true")
"""fit-posterior's options, ``--prior`` defaulting to the controls' training prior."""


def compare(
    models: Annotated[list[str], typer.Argument(
        metavar="MODEL...", help="Checkpoint directories, .gguf files, default (the embedded SmolLM2), or series (a"
                                 " `wind-tunnel --save-every` directory or its manifest.json, expanded in order).")],
    prompts: Annotated[str, typer.Option(
        "--prompts", metavar="PATH",
        help="Experiment prompts (`llmprobe experiment` JSONL), traced with every model.")],
    output: opt.output("Comparison table, .parquet or .csv: one row per model (default: none, the table only).")
    = None,
    keep_traces: Annotated[Optional[str], typer.Option(
        "--keep-traces", metavar="DIR", help="Also keep each model's trace, as DIR/NNN-NAME.parquet.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Keep the rows an interrupted run committed and run the other models (same arguments).")]
    = False,
    force: opt.Force = False,
    top_k: opt.TopK = 20,
    batch_size: opt.BatchSize = "8",
    ray: "RayOptions | None" = opt.RAY,
    placement: ModelOptions = opt.PLACEMENT,
    options: PosteriorOptions = POSTERIOR_UNDER_TRUE_PRIOR,
    out: Output = opt.RESULT,
) -> None:
    """Trace and fit several models (checkpoints over training, sizes, GGUFs) on the same prompts: one row each."""
    opt.input_path(prompts, "prompt file", stdin=False)
    if resume and output is None:
        raise UsageError("only a comparison written to a file can be resumed; give -o", where="--resume")
    from llmprobe import compare as cmp
    from llmprobe.analysis.comparison import comparison_frame, read_comparison
    from llmprobe.cli.views.comparison import ComparisonView
    from llmprobe.files import check_new_output
    from llmprobe.tracing.prompts import read_prompts
    from llmprobe.tracing.settings import TraceSettings, parse_batch_size

    settings = TraceSettings(top_k=top_k, batch_size=parse_batch_size(batch_size))
    settings.validate()
    entries = cmp.expand_models(models)
    records = read_prompts(prompts)
    cmp.check_prompts(records, prompts)
    prior = cmp.resolve_prior(options.prior, entries, out)
    prior_file = opt.prior_file(prior)
    comparison = cmp.Comparison(entries, records, prompts, settings, replace(options, prior=prior),
                                placement, shlex.join(["llmprobe", *sys.argv[1:]]))
    store = None
    if output is not None:
        store = cmp.RowStore(output, comparison.plan())
        if store.exists and not (resume or force):
            raise UsageError(f"an interrupted comparison left its rows in {store.path}; pass --resume to continue it"
                             " or --force to start over", where=output)
        if resume and not store.exists and Path(output).is_file():
            out.log(f"{output} is complete: no interrupted comparison to resume (pass --force to run it again)")
            out.result(ComparisonView(read_comparison(output).frame))
            return
        if resume and store.exists:
            store.check()
        check_new_output(output, force or resume, inputs=[prompts, *([prior_file] if prior_file else [])])
        if force and not resume:
            store.remove()
    if keep_traces is not None:
        _check_trace_dir(keep_traces, force or resume)
    if ray is None:
        measured = cmp.run_comparison(comparison, store, out, keep_traces, force or resume)
    else:
        measured = cmp.run_on_ray(comparison, store, out, ray, keep_traces, force or resume)
    if output is not None:
        cmp.write_comparison(comparison, measured, output, force or resume)
        store.remove()
        out.log(f"wrote {len(measured)} rows to {output}")
    out.result(ComparisonView(comparison_frame(measured)))


def _check_trace_dir(directory: str, replace_traces: bool) -> None:
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise UsageError("is not a directory", where="--keep-traces")
    if not path.exists() and not path.parent.is_dir():
        raise UsageError(f"directory {str(path.parent)!r} does not exist", where="--keep-traces")
    if path.is_dir() and not replace_traces and any(path.glob("[0-9][0-9][0-9]-*.parquet")):
        raise UsageError(f"{directory} already holds traces of a comparison; pass --force to replace them",
                         where="--keep-traces")


def plot_compare(
    comparison_path: Annotated[str, typer.Argument(metavar="COMPARISON", help="`llmprobe compare -o` table.")],
    output: opt.output("Image file: .png, .svg or .pdf (default: COMPARISON.emergence.png).") = None,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """The measures of becoming Bayesian against training step (a line per size) and parameter count."""
    opt.input_path(comparison_path, "comparison table", stdin=False, missing="no such file")
    from llmprobe.plots.emergence import write_emergence_figure

    Output(quiet).log(f"wrote {write_emergence_figure(comparison_path, output, force=force)}")
