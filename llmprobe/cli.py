"""The ``llmprobe`` command line: parse options, delegate, turn user errors into one stderr line."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated, Optional

import typer

from llmprobe._output import Output, error_line
from llmprobe.errors import UsageError

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
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 8,
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Trace top-k next-token probabilities at every position of every prompt into Parquet."""
    from llmprobe.engine import TraceSettings
    from llmprobe.run import ModelOptions, default_output, read_targets_file, run_trace

    if targets and targets_file:
        raise UsageError("give --targets or --targets-file, not both", where="--targets")
    target_list = read_targets_file(targets_file) if targets_file else (targets.split(",") if targets else [])
    settings = TraceSettings(top_k=top_k, targets=target_list, max_new_tokens=max_new_tokens, sample=sample,
                             temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, chat=chat)
    run_trace(prompts, output or default_output(prompts), fmt, force, input_format, settings,
              ModelOptions(model, device, dtype, device_map, trust_remote_code, allow_pickle),
              shlex.join(["llmprobe", *sys.argv[1:]]), Output(quiet))


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
