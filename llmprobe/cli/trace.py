"""Commands over traces: ``trace`` (run a model), ``inspect`` (read one back), ``models``, ``version``."""

import shlex
import sys
from typing import Annotated, Optional

import typer

from llmprobe.cli import options as opt
from llmprobe.cli.output import Output
from llmprobe.errors import UsageError

CAPTURE, GENERATION, OUTPUT, SCALE = "Capture", "Generation", "Output", "Scale-out"


def trace(
    prompts: Annotated[str, typer.Argument(help="Prompt file (text: one per line; .jsonl: records), or - for stdin.")],
    output: opt.output("Trace file, or - for stdout (default: stdout when piped, else PROMPTS.parquet).") = None,
    fmt: Annotated[str, typer.Option("--format", rich_help_panel=OUTPUT, help="parquet, jsonl or csv.")] = "parquet",
    model: opt.Model = None,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    device_map: opt.DeviceMap = None,
    max_memory: opt.MaxMemory = None,
    offload_folder: opt.OffloadFolder = None,
    trust_remote_code: opt.TrustRemoteCode = False,
    allow_pickle: opt.AllowPickle = False,
    attn_implementation: opt.AttnImplementation = None,
    input_format: Annotated[str, typer.Option(help="auto (by extension; Parquet by content), text, jsonl or parquet (a prompt column).")] = "auto",
    chat: Annotated[Optional[str], typer.Option(
        "--chat", metavar="[user|prefill]",
        help="Wrap each prompt in the tokenizer's chat template: user (the default when given alone) makes it the"
             " user turn; prefill makes prompt[:split] the user turn and the rest the open assistant turn.")] = None,
    top_k: opt.TopK = 20,
    targets: Annotated[Optional[str], typer.Option(
        rich_help_panel=CAPTURE, help="Comma-separated target strings scored exactly at every position (spaces kept).")]
    = None,
    targets_file: Annotated[Optional[str], typer.Option(rich_help_panel=CAPTURE, help="Target strings, one per line.")]
    = None,
    max_new_tokens: Annotated[int, typer.Option(
        rich_help_panel=GENERATION, help="Tokens to generate (and trace) after each prompt.")] = 0,
    sample: Annotated[bool, typer.Option("--sample", rich_help_panel=GENERATION,
                                         help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(rich_help_panel=GENERATION, help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(rich_help_panel=GENERATION, help="Nucleus sampling mass.")] = 1.0,
    seed: opt.Seed = 0,
    batch_size: Annotated[str, typer.Option(
        help="Prompts per forward pass, or auto: as many as fit, halving on out-of-memory.")] = "8",
    force: opt.Force = False,
    resume: Annotated[bool, typer.Option("--resume", rich_help_panel=OUTPUT,
                                         help="Continue the interrupted run writing OUTPUT (same arguments).")] = False,
    truncate: Annotated[Optional[str], typer.Option(
        help="left or right: cut prompts longer than the model's context instead of failing.")] = None,
    layers: Annotated[Optional[str], typer.Option(
        rich_help_panel=CAPTURE,
        help="Logit lens: 'all' or 0-based decoder layers '0,4,8'; adds a layer column (output layer included).")]
    = None,
    save_embeddings: Annotated[bool, typer.Option(
        "--save-embeddings", rich_help_panel=CAPTURE,
        help="Keep the final-normed hidden state at each mark (else the last position), for `continuity`.")] = False,
    engine: Annotated[str, typer.Option(
        rich_help_panel=SCALE, help="local, or ray: a Ray Data actor pool writes OUTPUT as a directory of part files.")]
    = "local",
    ray_address: Annotated[Optional[str], typer.Option(
        rich_help_panel=SCALE, help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray).")] = None,
    ray_actors: Annotated[Optional[int], typer.Option(rich_help_panel=SCALE,
                                                      help="Model replicas (Ray actors); default 1.")] = None,
    ray_cpus_per_actor: Annotated[Optional[float], typer.Option(rich_help_panel=SCALE,
                                                                help="CPUs each actor reserves; default 1.")] = None,
    ray_gpus_per_actor: Annotated[Optional[float], typer.Option(rich_help_panel=SCALE,
                                                                help="GPUs each actor reserves; default 0.")] = None,
    ray_prompts_per_task: Annotated[Optional[int], typer.Option(
        rich_help_panel=SCALE, help="Prompts per actor call (about one part file each); default sized from the prompt count.")]
    = None,
    quiet: opt.Quiet = False,
) -> None:
    """Trace top-k next-token probabilities at every position of every prompt into Parquet."""
    from llmprobe.tracing.engine import TraceSettings, parse_batch_size
    from llmprobe.tracing.ray_runner import ray_options_for
    from llmprobe.tracing.runner import default_output, read_targets_file, run_trace

    if targets and targets_file:
        raise UsageError("give --targets or --targets-file, not both", where="--targets")
    target_list = (read_targets_file(targets_file) if targets_file
                   else targets.split(",") if targets is not None else [])  # --targets "" is an error, not none
    settings = TraceSettings(top_k=top_k, targets=target_list, max_new_tokens=max_new_tokens, sample=sample,
                             temperature=temperature, top_p=top_p, seed=seed, batch_size=parse_batch_size(batch_size),
                             chat={None: False, "user": True}.get(chat, chat), truncate=truncate, layers=layers, save_embeddings=save_embeddings)
    ray_options = ray_options_for(engine, ray_address, ray_actors, ray_cpus_per_actor, ray_gpus_per_actor,
                                  ray_prompts_per_task)
    loading = opt.model_options(model, device, dtype, device_map, max_memory, offload_folder, trust_remote_code,
                                allow_pickle, attn_implementation)
    run_trace(prompts, output or default_output(prompts), fmt, force, input_format, settings, loading,
              shlex.join(["llmprobe", *sys.argv[1:]]), Output(quiet), resume=resume, ray_options=ray_options)


def inspect(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE", help="Trace file or directory, or - for stdin.")],
    prompt: Annotated[Optional[str], typer.Option(metavar="ID", help="Only this prompt id.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", metavar="K", help="Candidates shown per position.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines on stdout instead of tables.")] = False,
) -> None:
    """Show a trace position by position: token, top candidates, the actual next token, entropy."""
    from llmprobe.cli.views import show_trace
    from llmprobe.tracing.reader import read_trace

    if top_k < 1:
        raise UsageError("must be 1 or more", where="--top-k")
    frame = read_trace(trace_path)
    if prompt is not None:
        frame = frame[frame["prompt_id"] == prompt]
        if frame.empty:
            raise UsageError(f"no prompt with id {prompt!r} in the trace", where="--prompt")
    show_trace(frame, top_k, as_json, Output())


def models(as_json: opt.Json = False) -> None:
    """The default model and the cached GGUF conversions."""
    from llmprobe.cli.views import show_models
    from llmprobe.model.loading import inventory

    show_models(inventory(), as_json, Output())


def version() -> None:
    """Print the llmprobe version."""
    from llmprobe import __version__

    print(__version__)
