"""Commands that draw: ``plot``, ``plot-icl``, ``plot-prior``, ``plot-layers`` and the HTML ``report``."""

from typing import Annotated, Literal, Optional

import typer

from llmprobe.cli import options as opt
from llmprobe.cli.output import Output


def plot(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE", help="Trace file or directory, or - for stdin.")],
    prompt: opt.Prompt = None,
    output: opt.output("Image file: .png, .svg or .pdf (default: TRACE.PROMPT.png).") = None,
    positions: Annotated[Optional[str], typer.Option(
        metavar="START:END", help="Range of positions, END exclusive (e.g. 0:32, 40:).")] = None,
    top_k: opt.TopK = 10,
    wrap: Annotated[int, typer.Option(help="Positions per row of panels.")] = 16,
    layer: opt.Layer = None,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Heatmap of one prompt's top-k next-token candidates per position, entropy underneath."""
    opt.input_path(trace_path, "trace file or directory")
    from llmprobe.plots.tokens import write_tokens_figure

    path = write_tokens_figure(trace_path, prompt, output, positions=positions, top=top_k, wrap=wrap, layer=layer,
                               force=force)
    Output(quiet).log(f"wrote {path}")


def plot_icl(
    fit_path: Annotated[str, typer.Argument(metavar="FIT", help="fit-posterior table (Parquet or CSV), or -.")],
    output: opt.output("Image file: .png, .svg or .pdf (default: FIT.icl.png).") = None,
    yscale: Annotated[Literal["auto", "linear", "log"], typer.Option(
        help="Y axis of the probability and KL panels; auto: log when a plotted value is below 1 %.")] = "auto",
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Model vs Bayesian posterior predictive as examples accumulate, one panel per θ; TV, KL, entropy."""
    opt.input_path(fit_path, "fit table", missing="no such file")
    from llmprobe.plots.icl import write_icl_figure

    Output(quiet).log(f"wrote {write_icl_figure(fit_path, output, force=force, yscale=yscale)}")


def plot_prior(
    prior_path: Annotated[str, typer.Argument(metavar="PRIOR", help="fit-prior JSON, or - for stdin.")],
    output: opt.output("Image file: .png, .svg or .pdf (default: PRIOR.prior.png).") = None,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """The fitted Dirichlet (mixture) prior: Beta density, ternary map, or marginals."""
    opt.input_path(prior_path, "prior file", missing="no such file")
    from llmprobe.plots.prior import write_prior_figure

    Output(quiet).log(f"wrote {write_prior_figure(prior_path, output, force=force)}")


def plot_layers(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE", help="Trace written with --layers, or - for stdin.")],
    output: Annotated[str, typer.Option("--output", "-o", metavar="PATH", help="Image file (.png, .svg or .pdf).")],
    prompt: opt.Prompt = None,
    show: Annotated[Literal["next", "targets"], typer.Option(
        help="next: P(actual next token) per layer and position; targets: P(each target) vs layer at marks.")] = "next",
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Logit lens figure: how the eventual answer's probability rises through the layers."""
    opt.input_path(trace_path, "trace file or directory")
    from llmprobe.plots.layers import write_layers_figure

    summary = write_layers_figure(trace_path, prompt, output, show, force)
    Output(quiet).log(f"{summary}; wrote {output}")


def report(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE", help="Trace file or directory, or - for stdin.")],
    extras: Annotated[Optional[list[str]], typer.Argument(
        metavar="[FIT] [PRIOR] [COMPARISON] [SWEEP...]",
        help="fit-posterior table, fit-prior JSON, `compare -o` table and/or `ablate -o` sweeps of one model (told"
             " apart by content).")] = None,
    output: opt.output("HTML file (default: TRACE.report.html).") = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        metavar="ID", help="Prompt id to draw a token figure for (repeat for several; default: the first --max-prompts).")]
    = None,
    max_prompts: Annotated[int, typer.Option(help="Prompts that get a token figure when --prompt is not given.")] = 3,
    max_positions: Annotated[int, typer.Option(help="Last positions of each prompt shown in its figure.")] = 48,
    top_k: opt.TopK = 10,
    image_format: Annotated[Literal["png", "svg"], typer.Option(help="How figures are embedded in the page.")]
    = "png",
    layer: opt.Layer = None,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """One self-contained HTML page (no network): run metadata, figures, summary tables."""
    opt.input_path(trace_path, "trace file or directory")
    for extra in extras or []:
        opt.input_path(extra, "fit table, prior file, comparison or sweep", stdin=False, missing="no such file")
    from llmprobe.plots.report import write_report

    path = write_report(trace_path, extras or [], output, force=force, prompts=prompt, max_prompts=max_prompts,
                        max_positions=max_positions, top=top_k, image_format=image_format, layer=layer)
    Output(quiet).log(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
