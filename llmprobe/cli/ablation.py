"""``llmprobe ablate``: a sweep that ablates components one at a time and fits each, as fit-posterior does."""

import shlex
import sys
from typing import TYPE_CHECKING, Annotated, Literal, Optional

import typer

from llmprobe.analysis.fit_options import PosteriorOptions
from llmprobe.cli import options as opt
from llmprobe.cli.output import Output
from llmprobe.errors import UsageError
from llmprobe.model.loading import ModelOptions

if TYPE_CHECKING:
    from llmprobe.tracing.ray_options import RayOptions

SWEEP = "Sweep"


def ablate(
    prompts: Annotated[str, typer.Argument(
        help="Experiment prompts (JSONL from `llmprobe experiment`: marks, counts, outcomes, targets).")],
    over: Annotated[Literal["heads", "layers", "attn", "mlp", "directions"], typer.Option(
        "--over", rich_help_panel=SWEEP,
        help="What to ablate one at a time: every attention head, whole block, attention output or MLP output of"
             " --layers, or the --directions of the residual stream.")],
    output: opt.output("Sweep table (Parquet): one row per component and the baseline; resumable.") = None,
    layers: Annotated[Optional[str], typer.Option(
        "--layers", rich_help_panel=SWEEP, metavar="all|L[,L...]", show_default="all",
        help="The 0-based decoder layers swept.")] = None,
    ablation: opt.in_panel(opt.Ablation, SWEEP) = "zero",
    directions: Annotated[Optional[list[str]], typer.Option(
        "--directions", rich_help_panel=SWEEP, metavar="pca:K@L",
        help="With --over directions: the top K principal components of the residual stream after block L over the"
             " marks (from a first pass), each projected out on its own; repeatable.")] = None,
    random_controls: Annotated[int, typer.Option(
        "--random-controls", rich_help_panel=SWEEP, metavar="N",
        help="With --over directions: also N random unit directions at each such layer (seeded by --seed), the"
             " spread a real direction's change is read against.")] = 0,
    chat: opt.Chat = None,
    batch_size: opt.in_panel(opt.BatchSize, opt.SCALE_PANEL) = "8",
    fit_workers: Annotated[Optional[int], typer.Option(
        "--fit-workers", rich_help_panel=opt.SCALE_PANEL, min=0, metavar="N", show_default="half the CPUs",
        help="Processes that fit components while the model scores the next ones (0: fit in this process).")]
    = None,
    ray: "RayOptions | None" = opt.RAY,
    force: opt.Force = False,
    resume: opt.Resume = False,
    loading: ModelOptions = opt.MODEL,
    fit: PosteriorOptions = opt.FIT,
    out: Output = opt.RESULT,
) -> None:
    """Which components carry the in-context updating? Ablate each in turn, fit each as fit-posterior does, and
    compare with the un-ablated model: KL(Bayes‖model), γ, α0, the verdict."""
    opt.input_path(prompts, "prompt file", stdin=False)
    prior_file = opt.prior_file(fit.prior)
    if output == "-":
        raise UsageError("the sweep table is a Parquet file; give a path (the results table goes to stdout anyway)",
                         where="-o")
    from llmprobe.analysis.ablation import SweepOptions

    options = SweepOptions(over, layers, ablation, tuple(directions or ()), random_controls, fit.seed)
    from llmprobe.analysis.ablation_run import run_ablation
    from llmprobe.cli.views.ablation import SweepView
    from llmprobe.tracing.settings import TraceSettings, parse_batch_size

    settings = TraceSettings(top_k=1, batch_size=parse_batch_size(batch_size),
                             chat=opt.chat_setting(chat))
    sweep = run_ablation(prompts, output, options, fit, settings, loading, out, force=force, resume=resume,
                         ray_options=ray, command=shlex.join(["llmprobe", *sys.argv[1:]]),
                         inputs=[prior_file] if prior_file else [], fit_workers=fit_workers)
    out.result(SweepView(sweep))


def plot_ablate(
    sweep_paths: Annotated[list[str], typer.Argument(
        metavar="SWEEP...", help="`llmprobe ablate -o` tables of one model (heads, attn, mlp, layers, directions).")],
    output: opt.output("Image file: .png, .svg or .pdf (default: SWEEP.ablate.png).") = None,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Where ablation moves the fit: a layer × head heatmap of the change in KL(Bayes‖model), per-layer bars,
    principal directions against random controls; flipped verdicts marked."""
    for path in sweep_paths:
        opt.input_path(path, "sweep table", stdin=False, missing="no such file")
    from llmprobe.plots.ablation import write_ablation_figure

    Output(quiet).log(f"wrote {write_ablation_figure(sweep_paths, output, force=force)}")
