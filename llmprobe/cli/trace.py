"""Commands over traces: ``trace`` (run a model), ``inspect`` (read one back), ``models``, ``version``."""

import shlex
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Literal, Optional

import typer

from llmprobe.cli import options as opt
from llmprobe.cli.output import Output
from llmprobe.errors import UsageError
from llmprobe.model.loading import ModelOptions

if TYPE_CHECKING:
    from llmprobe.tracing.ray_options import RayOptions

INPUT, CAPTURE, GENERATION, OUTPUT, SCALE = "Input", "Capture", "Generation", "Output", opt.SCALE_PANEL
INTERVENTIONS = "Interventions"


def trace(
    prompts: Annotated[str, typer.Argument(help="Prompt file (text: one per line; .jsonl: records), or - for stdin.")],
    output: opt.in_panel(opt.output("Trace file, or - for stdout (default: stdout when piped, else PROMPTS.parquet)."),
                         OUTPUT) = None,
    fmt: Annotated[Literal["parquet", "jsonl", "csv"], typer.Option(
        "--format", rich_help_panel=OUTPUT,
        help="jsonl starts with a header record (metadata, vocabulary) that every reader takes.")] = "parquet",
    force: opt.in_panel(opt.Force, OUTPUT) = False,
    resume: opt.in_panel(opt.Resume, OUTPUT) = False,
    quiet: opt.in_panel(opt.Quiet, OUTPUT) = False,
    input_format: Annotated[Literal["auto", "text", "jsonl", "parquet"], typer.Option(
        rich_help_panel=INPUT, help="auto: by extension (Parquet by content); parquet: a table with a prompt column.")]
    = "auto",
    chat: opt.in_panel(opt.Chat, INPUT) = None,
    truncate: Annotated[Optional[Literal["left", "right"]], typer.Option(
        rich_help_panel=INPUT, help="Cut prompts longer than the model's context from this side instead of failing.")]
    = None,
    loading: ModelOptions = opt.MODEL,
    top_k: opt.in_panel(opt.TopK, CAPTURE) = 20,
    targets: Annotated[Optional[str], typer.Option(
        rich_help_panel=CAPTURE, metavar="TEXT[,TEXT...]",
        help="Comma-separated target strings scored exactly at every position (spaces kept).")] = None,
    targets_file: Annotated[Optional[str], typer.Option(rich_help_panel=CAPTURE, metavar="PATH",
                                                        help="Target strings, one per line.")] = None,
    layers: Annotated[Optional[str], typer.Option(
        rich_help_panel=CAPTURE, metavar="all|L[,L...]",
        help="Logit lens: all decoder layers or 0-based ones like 0,4,8; adds a layer column (output layer included).")]
    = None,
    save_embeddings: Annotated[bool, typer.Option(
        "--save-embeddings", rich_help_panel=CAPTURE,
        help="Keep the final-normed hidden state at each mark (else the last position), for `continuity`.")] = False,
    ablate: Annotated[Optional[list[str]], typer.Option(
        "--ablate", rich_help_panel=INTERVENTIONS, metavar="L.H|L.attn|L.mlp|L",
        help="Ablate attention head H of layer L (its slice before o_proj), the attention or MLP output of layer L,"
             " or the whole block L (the residual stream passes it unchanged); repeatable; layers and heads 0-based.")]
    = None,
    ablation: opt.in_panel(opt.Ablation, INTERVENTIONS) = "zero",
    ablate_direction: Annotated[Optional[list[str]], typer.Option(
        "--ablate-direction", rich_help_panel=INTERVENTIONS, metavar="FILE@L",
        help="Project the directions in FILE (.npy, [k, hidden]; orthonormalized) out of the residual stream after"
             " block L, at every position; repeatable.")] = None,
    patch_from: Annotated[Optional[str], typer.Option(
        "--patch-from", rich_help_panel=INTERVENTIONS, metavar="DONOR",
        help="Prompt file whose records (same ids, same token lengths) give the residual stream for --patch-at.")]
    = None,
    patch_at: Annotated[Optional[str], typer.Option(
        "--patch-at", rich_help_panel=INTERVENTIONS, metavar="L[:marks|all|P,P...]",
        help="Replace the residual stream after block L by the donor's at these positions (default: the marks).")]
    = None,
    max_new_tokens: Annotated[int, typer.Option(
        rich_help_panel=GENERATION, help="Tokens to generate (and trace) after each prompt.")] = 0,
    sample: Annotated[bool, typer.Option("--sample", rich_help_panel=GENERATION,
                                         help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(rich_help_panel=GENERATION, help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(rich_help_panel=GENERATION, help="Nucleus sampling mass.")] = 1.0,
    seed: opt.in_panel(opt.Seed, GENERATION) = 0,
    batch_size: opt.in_panel(opt.BatchSize, SCALE) = "8",
    ray: "RayOptions | None" = opt.RAY,
    ray_prompts_per_task: Annotated[Optional[int], typer.Option(
        rich_help_panel=SCALE, min=1, show_default="sized from the prompt count",
        help="Prompts per actor call (about one part file each).")] = None,
) -> None:
    """Trace top-k next-token probabilities at every position of every prompt into Parquet."""
    opt.input_path(prompts, "prompt file")
    if top_k < 1:  # the engine checks every setting too, but only after torch is imported
        raise UsageError(f"must be 1 or more, got {top_k}", where="--top-k")
    if targets_file is not None:
        opt.input_path(targets_file, "targets file", stdin=False)
    from llmprobe.tracing.interventions import from_options
    from llmprobe.tracing.settings import TraceSettings, parse_batch_size
    from llmprobe.tracing.runner import default_output, read_targets_file, run_trace

    if targets and targets_file:
        raise UsageError("give --targets or --targets-file, not both", where="--targets")
    target_list = (read_targets_file(targets_file) if targets_file
                   else targets.split(",") if targets is not None else [])  # --targets "" is an error, not none
    settings = TraceSettings(top_k=top_k, targets=target_list, max_new_tokens=max_new_tokens, sample=sample,
                             temperature=temperature, top_p=top_p, seed=seed, batch_size=parse_batch_size(batch_size),
                             chat=opt.chat_setting(chat), truncate=truncate, layers=layers,
                             save_embeddings=save_embeddings,
                             interventions=from_options(ablate, ablation, ablate_direction, patch_from, patch_at))
    if ray_prompts_per_task is not None:
        if ray is None:
            raise UsageError("only applies with --engine ray", where="--ray-prompts-per-task")
        ray = replace(ray, prompts_per_task=ray_prompts_per_task)
    run_trace(prompts, output or default_output(prompts), fmt, force, input_format, settings, loading,
              shlex.join(["llmprobe", *sys.argv[1:]]), Output(quiet), resume=resume, ray_options=ray)


def inspect(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE", help="Trace file or directory, or - for stdin.")],
    prompt: Annotated[Optional[str], typer.Option(metavar="ID", help="Only this prompt id.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", metavar="K", help="Candidates shown per position.")] = 5,
    out: Output = opt.RESULT,
) -> None:
    """Show a trace position by position: token, top candidates, the actual next token, entropy."""
    if top_k < 1:
        raise UsageError("must be 1 or more", where="--top-k")
    opt.input_path(trace_path, "trace file or directory")
    from llmprobe.cli.views.traces import TraceView
    from llmprobe.tracing.reader import read_trace

    frame = read_trace(trace_path)
    if prompt is not None:
        frame = frame[frame["prompt_id"] == prompt]
        if frame.empty:
            raise UsageError(f"no prompt with id {prompt!r} in the trace", where="--prompt")
    out.result(TraceView(frame, top_k))


def models(
    prune: Annotated[bool, typer.Option("--prune", help="Remove duplicate, orphaned and half-made conversions first.")]
    = False,
    out: Output = opt.RESULT,
) -> None:
    """The default model and the cached GGUF conversions (keyed by the GGUF's sha256)."""
    from llmprobe.cli.views.traces import ModelsView
    from llmprobe.model.gguf import inventory, prune_conversions

    removed = prune_conversions(out.log) if prune else None
    out.result(ModelsView(inventory(), removed))


def version() -> None:
    """Print the llmprobe version (also: llmprobe --version)."""
    from llmprobe.version import __version__

    print(f"llmprobe {__version__}")
