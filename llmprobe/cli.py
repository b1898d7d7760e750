"""The ``llmprobe`` command line: parse options, delegate, turn user errors into one stderr line."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Annotated, Optional

import typer

from llmprobe._output import Output, error_line
from llmprobe.errors import UsageError

# Set before numpy loads (commands import it lazily): the Bayesian fits solve thousands of tiny
# problems, and threaded OpenBLAS makes each scipy call up to 30x slower (scipy issues 22438, 23191).
# torch uses its own BLAS (MKL), so tracing is unaffected.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Instrument Llama checkpoints: trace next-token distributions, fit them against Bayesian predictions.",
)

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model directory, .gguf file or cached hub id (default: embedded SmolLM2-135M-Instruct).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or logs on stderr.")]


@app.command()
def trace(
    prompts: Annotated[str, typer.Argument(help="Prompt file (text: one per line; .jsonl: records), or - for stdin.")],
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", help="Trace file, or - for stdout (default: stdout when piped, else PROMPTS.parquet).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="parquet, jsonl or csv.")] = "parquet",
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: Annotated[Optional[str], typer.Option(help="'auto' hands placement to accelerate.")] = None,
    max_memory: Annotated[Optional[str], typer.Option(
        help="With --device-map: per-device limits, e.g. 0=20GiB,1=20GiB,cpu=64GiB.")] = None,
    offload_folder: Annotated[Optional[str], typer.Option(
        help="With --device-map: folder for weights offloaded to disk.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the checkpoint's own Python code.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickle weights (.bin/.pt).")] = False,
    input_format: Annotated[str, typer.Option(help="auto (by extension), text or jsonl.")] = "auto",
    chat: Annotated[bool, typer.Option(help="Wrap each prompt in the tokenizer's chat template.")] = False,
    top_k: Annotated[int, typer.Option(help="Candidates kept per position.")] = 20,
    targets: Annotated[Optional[str], typer.Option(
        help="Comma-separated target strings scored exactly at every position (spaces kept).")] = None,
    targets_file: Annotated[Optional[str], typer.Option(help="Target strings, one per line.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (and trace) after each prompt.")] = 0,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    batch_size: Annotated[str, typer.Option(
        help="Prompts per forward pass, or auto: as many as fit, halving on out-of-memory.")] = "8",
    force: Annotated[bool, typer.Option(help="Replace an existing output, or discard an interrupted run.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run writing OUTPUT (same arguments).")] = False,
    truncate: Annotated[Optional[str], typer.Option(
        help="left or right: cut prompts longer than the model's context instead of failing.")] = None,
    layers: Annotated[Optional[str], typer.Option(
        help="Logit lens: 'all' or 0-based decoder layers '0,4,8'; adds a layer column (output layer included).")] = None,
    save_embeddings: Annotated[bool, typer.Option(
        help="Keep the final-normed hidden state at each mark (else the last position), for `continuity`.")] = False,
    engine: Annotated[str, typer.Option(
        help="local, or ray: a Ray Data actor pool writes OUTPUT as a directory of part files.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(
        help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray).")] = None,
    ray_actors: Annotated[Optional[int], typer.Option(help="Model replicas (Ray actors); default 1.")] = None,
    ray_cpus_per_actor: Annotated[Optional[float], typer.Option(help="CPUs each actor reserves; default 1.")] = None,
    ray_gpus_per_actor: Annotated[Optional[float], typer.Option(help="GPUs each actor reserves; default 0.")] = None,
    ray_prompts_per_task: Annotated[Optional[int], typer.Option(
        help="Prompts per actor call (about one part file each); default sized from the prompt count.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Trace top-k next-token probabilities at every position of every prompt into Parquet."""
    from llmprobe.engine import TraceSettings, parse_batch_size
    from llmprobe.models import parse_max_memory
    from llmprobe.ray_engine import ray_options_for
    from llmprobe.run import ModelOptions, default_output, read_targets_file, run_trace

    if targets and targets_file:
        raise UsageError("give --targets or --targets-file, not both", where="--targets")
    target_list = (read_targets_file(targets_file) if targets_file
                   else targets.split(",") if targets is not None else [])  # --targets "" is an error, not none
    settings = TraceSettings(top_k=top_k, targets=target_list, max_new_tokens=max_new_tokens, sample=sample,
                             temperature=temperature, top_p=top_p, seed=seed, batch_size=parse_batch_size(batch_size), chat=chat,
                             truncate=truncate, layers=layers, save_embeddings=save_embeddings)
    ray_options = ray_options_for(engine, ray_address, ray_actors, ray_cpus_per_actor, ray_gpus_per_actor,
                                  ray_prompts_per_task)
    model_options = ModelOptions(model, device, dtype, device_map, trust_remote_code, allow_pickle,
                                 parse_max_memory(max_memory) if max_memory else None, offload_folder)
    run_trace(prompts, output or default_output(prompts), fmt, force, input_format, settings, model_options,
              shlex.join(["llmprobe", *sys.argv[1:]]), Output(quiet), resume=resume, ray_options=ray_options)


@app.command()
def inspect(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE", help="Trace file or directory, or - for stdin.")],
    prompt: Annotated[Optional[str], typer.Option(help="Only this prompt id.")] = None,
    top: Annotated[int, typer.Option(help="Candidates shown per position.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines on stdout instead of tables.")] = False,
) -> None:
    """Show a trace position by position: token, top candidates, the actual next token, entropy."""
    from llmprobe.inspect_view import inspect_trace

    inspect_trace(trace_path, prompt, top, as_json, Output())


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False) -> None:
    """The default model and the cached GGUF conversions."""
    from llmprobe.inspect_view import show_models

    show_models(as_json, Output())


@app.command()
def version() -> None:
    """Print the llmprobe version."""
    from llmprobe import __version__

    print(__version__)



@app.command()
def experiment(
    config: Annotated[str, typer.Argument(help="Experiment definition (TOML), e.g. configs/experiments/coin.toml.")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="JSONL file (default: stdout).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Override the config's seed.")] = None,
    n_max: Annotated[Optional[int], typer.Option(help="Override the number of examples per sequence.")] = None,
    sequences: Annotated[Optional[int], typer.Option(help="Override the sequences per theta.")] = None,
    layout: Annotated[Optional[str], typer.Option(help="marks (one prompt, a mark per example), per-n, or both.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate in-context-learning prompts (JSONL with marks, counts, targets) from a TOML experiment."""
    from llmprobe.fit_view import run_experiment

    run_experiment(config, output, force, seed, n_max, sequences, layout, Output(quiet))


@app.command("fit-prior")
def fit_prior(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE", help="Trace with targets (file, directory or -).")],
    components: Annotated[str, typer.Option(help="Mixture components, or 'auto' to choose by BIC.")] = "1",
    max_components: Annotated[int, typer.Option(help="Largest K tried with --components auto.")] = 5,
    from_counts: Annotated[bool, typer.Option(help="Fit a Dirichlet-multinomial to the examples' counts.")] = False,
    n: Annotated[Optional[int], typer.Option("--n", help="Only marks after this many examples.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Prior JSON for fit-posterior.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The prior JSON on stdout.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the mixture's EM starts.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Fit a Dirichlet (or a K-component Dirichlet mixture) to a trace's category distributions."""
    from llmprobe.fit_view import run_fit_prior

    run_fit_prior(trace_path, components, max_components, from_counts, n, output, force, as_json, seed, Output())


@app.command("fit-posterior")
def fit_posterior(
    traces: Annotated[list[str], typer.Argument(metavar="TRACE...", help="Traces of experiment prompts (or -).")],
    prior: Annotated[str, typer.Option(
        help="'fit' (the exact-Bayes prior fitted to the predictions), 'uniform', or a fit-prior JSON file.")] = "fit",
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", help="Per-mark table, .parquet or .csv.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Summary JSON on stdout.")] = False,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the test of γ = 1.")] = 200,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Compare a model's in-context predictions with the Bayesian posterior predictive, mark by mark."""
    from llmprobe.fit_view import run_fit_posterior

    if bootstrap < 1:
        raise UsageError("must be 1 or more", where="--bootstrap")
    run_fit_posterior(traces, prior, output, force, as_json, bootstrap, seed, Output())


@app.command("plot-layers")
def plot_layers(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE", help="Trace written with --layers.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Image file (.png, .svg or .pdf).")],
    prompt: Annotated[Optional[str], typer.Option(help="Prompt id (needed when the trace has several).")] = None,
    show: Annotated[str, typer.Option(
        help="next: P(actual next token) per layer and position; targets: P(each target) vs layer at marks.")] = "next",
    force: Annotated[bool, typer.Option(help="Replace an existing image.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Logit lens figure: how the eventual answer's probability rises through the layers."""
    from llmprobe.plots_layers import plot_layers as run

    run(trace_path, prompt, output, show, force, Output(quiet))


@app.command()
def continuity(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE", help="Trace written with --save-embeddings.")],
    over: Annotated[str, typer.Option(
        help="topk: union of top-k sets + remainder; targets: whole target strings + remainder (exact).")] = "topk",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Scatter plot (.png, .svg, .pdf).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout instead of a table.")] = False,
    max_pairs: Annotated[int, typer.Option(help="Pairs compared (a random subset above this).")] = 50_000,
    quantile: Annotated[float, typer.Option(help="Quantile of the distance ratio reported as the Lipschitz bound.")]
    = 0.95,
    seed: Annotated[int, typer.Option(help="Seed for choosing pairs.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace an existing image.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Embedding distance vs next-token distribution distance over pairs of prompts (continuity)."""
    from llmprobe.continuity import run_continuity

    run_continuity(trace_path, over, output, as_json, max_pairs, quantile, seed, force, Output(quiet))


@app.command()
def martingale(
    config: Annotated[str, typer.Argument(help="Experiment TOML (configs/experiments/coin.toml, die.toml, ...).")],
    n: Annotated[str, typer.Option("--n", help="Comma-separated numbers of in-context examples to test at.")]
    = "0,1,2,4,8,16",
    sequences: Annotated[Optional[int], typer.Option(help="Sequences per theta (default: the TOML's).")] = None,
    paths: Annotated[int, typer.Option(help="Continuations sampled from the model per state.")] = 32,
    horizon: Annotated[int, typer.Option(help="Examples sampled per continuation.")] = 1,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the p-value.")] = 2000,
    alpha: Annotated[float, typer.Option(help="Significance level for the verdict column.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed for sampling paths and the bootstrap.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 16,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines on stdout instead of a table.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Martingale test (Falck, Wang & Holmes): does sampling from the model's own predictive keep it unchanged?"""
    from llmprobe.martingale import run_martingale

    run_martingale(config, n, sequences, paths, horizon, seed, bootstrap, alpha, batch_size, model, device, dtype,
                   as_json, Output(quiet))


@app.command()
def plot(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE", help="Trace file or directory, or - for stdin.")],
    prompt: Annotated[Optional[str], typer.Option(help="Prompt id (needed when the trace has several).")] = None,
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", help="Image file: .png, .svg or .pdf (default: TRACE.PROMPT.png).")] = None,
    positions: Annotated[Optional[str], typer.Option(
        help="START:END range of positions, END exclusive (e.g. 0:32, 40:).")] = None,
    top: Annotated[int, typer.Option(help="Candidates shown per position.")] = 10,
    wrap: Annotated[int, typer.Option(help="Positions per row of panels.")] = 16,
    layer: Annotated[Optional[int], typer.Option(help="Layer of a per-layer trace (default: the last).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing image.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Heatmap of one prompt's top-k next-token candidates per position, entropy underneath."""
    from llmprobe.plots.tokens import plot_trace_tokens

    path = plot_trace_tokens(trace_path, prompt, output, positions=positions, top=top, wrap=wrap, layer=layer,
                             force=force)
    Output(quiet).log(f"wrote {path}")


@app.command("plot-icl")
def plot_icl(
    fit_path: Annotated[str, typer.Argument(metavar="FIT", help="fit-posterior table (Parquet or CSV), or -.")],
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", help="Image file: .png, .svg or .pdf (default: FIT.icl.png).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing image.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Model vs Bayesian posterior predictive as examples accumulate; TV, KL, entropy collapse."""
    from llmprobe.plots.icl import plot_fit_icl

    Output(quiet).log(f"wrote {plot_fit_icl(fit_path, output, force=force)}")


@app.command("plot-prior")
def plot_prior(
    prior_path: Annotated[str, typer.Argument(metavar="PRIOR", help="fit-prior JSON.")],
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", help="Image file: .png, .svg or .pdf (default: PRIOR.prior.png).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing image.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """The fitted Dirichlet (mixture) prior: Beta density, ternary map, or marginals."""
    from llmprobe.plots.prior import plot_prior_file

    Output(quiet).log(f"wrote {plot_prior_file(prior_path, output, force=force)}")


@app.command()
def report(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE", help="Trace file or directory, or - for stdin.")],
    extras: Annotated[Optional[list[str]], typer.Argument(
        metavar="[FIT] [PRIOR]", help="fit-posterior table and/or fit-prior JSON (told apart by content).")] = None,
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", help="HTML file (default: TRACE.report.html).")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        help="Prompt id to draw a token figure for (repeat for several; default: the first --max-prompts).")] = None,
    max_prompts: Annotated[int, typer.Option(help="Prompts that get a token figure when --prompt is not given.")] = 3,
    max_positions: Annotated[int, typer.Option(help="Last positions of each prompt shown in its figure.")] = 48,
    top: Annotated[int, typer.Option(help="Candidates per position in the token figures.")] = 10,
    image_format: Annotated[str, typer.Option(help="png or svg, embedded in the page.")] = "png",
    layer: Annotated[Optional[int], typer.Option(help="Layer of a per-layer trace (default: the last).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing report.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """One self-contained HTML page (no network): run metadata, figures, summary tables."""
    from llmprobe.report import write_report

    write_report(trace_path, extras or [], output, force=force, out=Output(quiet), prompts=prompt,
                 max_prompts=max_prompts, max_positions=max_positions, top=top, image_format=image_format, layer=layer)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="llmprobe", standalone_mode=False)
    except UsageError as exc:
        error_line(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        error_line("interrupted; nothing was written for the unfinished output")
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(141)
    except Exception as exc:
        _exit_for_parser_error(exc)


def _exit_for_parser_error(exc: Exception) -> None:
    """Map the option parser's exceptions (click's, or the copy typer vendors) to exit codes.

    They are matched by shape rather than class because typer has shipped both.
    """
    name = type(exc).__name__
    if name == "NoArgsIsHelpError":
        typer.echo(exc.ctx.get_help(), err=True)
        sys.exit(2)
    if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
        error_line(" ".join(exc.format_message().split()))
        sys.exit(exc.exit_code)
    if name == "Exit":
        sys.exit(exc.exit_code)
    if name == "Abort":
        error_line("aborted")
        sys.exit(130)
    raise exc


if __name__ == "__main__":
    main()
