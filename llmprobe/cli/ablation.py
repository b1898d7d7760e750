"""``llmprobe ablate``: a sweep that ablates components one at a time and fits each, as fit-posterior does."""

import shlex
import sys
from typing import Annotated, Literal, Optional

import typer

from llmprobe.analysis.fit_options import PosteriorOptions
from llmprobe.cli import options as opt
from llmprobe.cli.output import Output
from llmprobe.errors import UsageError
from llmprobe.model.loading import ModelOptions

SWEEP, FIT, SCALE = "Sweep", "Fit (as fit-posterior)", "Scale-out"


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
    batch_size: opt.in_panel(opt.BatchSize, SCALE) = "8",
    engine: opt.in_panel(opt.Engine, SCALE) = "local",
    ray_address: opt.in_panel(opt.RayAddress, SCALE) = None,
    ray_actors: opt.in_panel(opt.RayActors, SCALE) = None,
    ray_cpus_per_actor: opt.in_panel(opt.RayCpus, SCALE) = None,
    ray_gpus_per_actor: opt.in_panel(opt.RayGpus, SCALE) = None,
    force: opt.Force = False,
    resume: opt.Resume = False,
    loading: ModelOptions = opt.MODEL,
    fit: PosteriorOptions = opt.FIT,
    out: Output = opt.RESULT,
) -> None:
    """Which components carry the in-context updating? Ablate each in turn, fit each as fit-posterior does, and
    compare with the un-ablated model: KL(Bayes‖model), γ, α0, the verdict."""
    opt.input_path(prompts, "prompt file", stdin=False)
    prior_inputs = opt.prior_file(fit.prior)
    from llmprobe.analysis.ablation import SweepOptions

    options = SweepOptions(over, layers, ablation, tuple(directions or ()), random_controls, fit.seed)
    from llmprobe.analysis.ablation_run import run_ablation
    from llmprobe.cli.views.ablation import SweepView
    from llmprobe.tracing.ray_runner import ray_options_for
    from llmprobe.tracing.settings import TraceSettings, parse_batch_size

    if output == "-":
        raise UsageError("the sweep table is a Parquet file; give a path (the results table goes to stdout anyway)",
                         where="-o")
    ray_options = ray_options_for(engine, ray_address, ray_actors, ray_cpus_per_actor, ray_gpus_per_actor, None)
    settings = TraceSettings(top_k=1, batch_size=parse_batch_size(batch_size),
                             chat={None: False, "user": True}.get(chat, chat))
    sweep = run_ablation(prompts, output, options, fit, settings, loading, out, force=force, resume=resume,
                         ray_options=ray_options, command=shlex.join(["llmprobe", *sys.argv[1:]]),
                         inputs=prior_inputs)
    out.result(SweepView(sweep))
