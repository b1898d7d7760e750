"""The explorer's commands: ``view`` (a trace and its fit as one self-contained page) and ``serve`` (the live probe)."""

import signal
import sys
from typing import Annotated, Optional

import typer

from llmprobe.cli import options as opt
from llmprobe.cli.output import Output
from llmprobe.model.loading import ModelOptions


def view(
    trace_path: Annotated[str, typer.Argument(metavar="TRACE", help="Trace file or directory, or - for stdin.")],
    fit_path: Annotated[Optional[str], typer.Argument(
        metavar="[FIT]", help="fit-posterior table of this trace (Parquet or CSV): the posterior beside the model.")]
    = None,
    baseline: Annotated[Optional[str], typer.Option(
        "--baseline", metavar="PLAIN",
        help="Trace of the same prompts without TRACE's intervention (same tokens): both models side by side,"
             " and the change per position.")] = None,
    output: opt.output("HTML file (default: TRACE.view.html).") = None,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Explore a trace in the browser: tokens by surprisal, top-k per position, fit, logit lens, an intervention
    against its baseline (one file, offline)."""
    opt.input_path(trace_path, "trace file or directory")
    if fit_path is not None:
        opt.input_path(fit_path, "fit table", stdin=False, missing="no such file")
    if baseline is not None:
        opt.input_path(baseline, "baseline trace", stdin=trace_path != "-",
                       missing="no such baseline trace file or directory (--baseline)")
    from llmprobe.viewer.page import write_view

    path = write_view(trace_path, fit_path, output, force=force, baseline_source=baseline)
    Output(quiet).log(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def serve(
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port; the URL is printed).")]
    = 8765,
    host: Annotated[str, typer.Option(help="Address to listen on; other than loopback only with --allow-remote.")]
    = "127.0.0.1",
    allow_remote: Annotated[bool, typer.Option(
        "--allow-remote", help="Let --host be an address other machines reach (anyone who reaches it runs the model).")]
    = False,
    top_k: opt.TopK = 20,
    limit_prompt_chars: Annotated[int, typer.Option(min=1, help="Longest prompt a request may send, in characters.")]
    = 20_000,
    limit_new_tokens: Annotated[int, typer.Option(min=0, help="Most tokens a request may ask to generate.")] = 64,
    loading: ModelOptions = opt.MODEL,
    quiet: opt.Quiet = False,
) -> None:
    """The live probe: a local page where you type a prompt and see the trace view from the loaded model."""
    from llmprobe.errors import UsageError

    if top_k < 1:
        raise UsageError(f"must be 1 or more, got {top_k}", where="--top-k")
    from llmprobe.viewer.server import Limits, Probe, bind, start, url_of

    out = Output(quiet)
    server = bind(host, port, allow_remote=allow_remote)
    try:
        if allow_remote:  # shown even with -q: it is about who can use this machine
            sys.stderr.write(f"llmprobe: warning: serving on {host}: anyone who reaches port"
                             f" {server.server_address[1]} can run the model\n")
        loaded = loading.load(log=out.log)
        probe = Probe(loaded, top_k=top_k, limits=Limits(limit_prompt_chars, limit_new_tokens),
                      model_name=str(loaded.source.label))
        start(server, probe, out.log)
        out.data_text(f"serving {url_of(server)} (Ctrl-C stops)\n")
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            out.log("stopped")
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        server.server_close()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
