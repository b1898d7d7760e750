"""Commands that test the paper's claims inside the model: ``continuity`` and ``martingale``."""

from typing import Annotated, Literal, Optional

import typer

from llmprobe.cli import options as opt
from llmprobe.cli.output import Output
from llmprobe.errors import UsageError
from llmprobe.model.loading import ModelOptions


def continuity(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE",
                                              help="Trace written with --save-embeddings, or - for stdin.")],
    over: Annotated[Literal["topk", "targets"], typer.Option(
        help="topk: union of top-k sets + remainder; targets: whole target strings + remainder (exact).")] = "topk",
    output: opt.output("Scatter plot (.png, .svg, .pdf).") = None,
    max_pairs: Annotated[int, typer.Option(help="Pairs compared (a random subset above this).")] = 50_000,
    quantile: Annotated[float, typer.Option(help="Quantile of the distance ratio reported as the Lipschitz bound.")]
    = 0.95,
    seed: opt.Seed = 0,
    force: opt.Force = False,
    out: Output = opt.RESULT,
) -> None:
    """Embedding distance vs next-token distribution distance over pairs of prompts (continuity)."""
    opt.input_path(trace_path, "trace file or directory")
    from llmprobe.analysis.continuity import continuity as analyse
    from llmprobe.cli.views.analyses import ContinuityView

    if output is not None:
        from llmprobe.plots.common import check_image_output

        check_image_output(output, force, inputs=[trace_path])
    result, pairs, meta = analyse(trace_path, over=over, max_pairs=max_pairs, quantile=quantile, seed=seed)
    out.result(ContinuityView(result))
    if output is not None:
        from llmprobe.plots.common import save_figure
        from llmprobe.plots.continuity import continuity_figure

        save_figure(continuity_figure(result, pairs, meta.get("model", "")), output, replace=force)
        out.log(f"wrote {output}")


def martingale(
    config: Annotated[str, typer.Argument(
        help="Experiment TOML (configs/experiments/coin.toml, die.toml, ...), or - for stdin.")],
    n: Annotated[str, typer.Option("--n", metavar="N[,N...]", help="Numbers of in-context examples to test at.")]
    = "0,1,2,4,8,16",
    sequences: Annotated[Optional[int], typer.Option(help="Sequences per theta (default: the TOML's).")] = None,
    paths: Annotated[int, typer.Option(min=2, help="Continuations sampled from the model per state.")] = 32,
    horizon: Annotated[int, typer.Option(min=1, help="Examples sampled per continuation.")] = 1,
    bootstrap: opt.Bootstrap = 2000,
    alpha: Annotated[float, typer.Option(help="Significance level for the verdict column.")] = 0.05,
    seed: opt.Seed = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")] = 16,
    loading: ModelOptions = opt.MODEL,
    out: Output = opt.RESULT,
) -> None:
    """Martingale test (Falck, Wang & Holmes): does sampling from the model's own predictive keep it unchanged?"""
    opt.input_path(config, "experiment file")
    ns = opt.parse_counts(n)
    if not 0 < alpha < 1:
        raise UsageError(f"must be between 0 and 1, got {alpha}", where="--alpha")
    from llmprobe.analysis.martingale import model_martingale
    from llmprobe.cli.views.analyses import MartingaleView

    exp = opt.experiment_config(config)
    exp = exp.with_overrides(n_max=ns[-1] + horizon, sequences=sequences)
    loaded = loading.load(log=out.log)
    results = model_martingale(loaded, exp, ns, paths=paths, horizon=horizon, seed=seed, n_bootstrap=bootstrap,
                               batch_size=batch_size, out=out)
    out.result(MartingaleView(results, alpha, exp.name))
