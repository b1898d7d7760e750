"""``compare`` (several models, one set of experiment prompts, one row each) and ``plot-compare`` (its figure)."""

import shlex
import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from llmprobe.analysis.fit_options import TRUE_PRIOR, PosteriorOptions
from llmprobe.cli import options as opt
from llmprobe.cli.output import Output
from llmprobe.model.loading import ModelOptions

if TYPE_CHECKING:
    from llmprobe.tracing.ray_options import RayOptions

POSTERIOR_UNDER_TRUE_PRIOR = opt.POSTERIOR.with_defaults(prior=TRUE_PRIOR)
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
    if options.prior != TRUE_PRIOR:
        opt.prior_file(options.prior)
    from llmprobe.cli.views.comparison import ComparisonView
    from llmprobe.compare import compare_models
    from llmprobe.tracing.settings import TraceSettings, parse_batch_size

    settings = TraceSettings(top_k=top_k, batch_size=parse_batch_size(batch_size))
    settings.validate()
    frame = compare_models(models, prompts, output, settings, options, placement, ray, keep_traces=keep_traces,
                           resume=resume, force=force, command=shlex.join(["llmprobe", *sys.argv[1:]]), reporter=out)
    out.result(ComparisonView(frame))


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
