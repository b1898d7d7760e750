"""The ``llmprobe`` application: one typer app, its commands, and one place that turns errors into lines.

Each command lives in the module of its group (:mod:`.trace`, :mod:`.fits`, :mod:`.figures`,
:mod:`.analyses`, :mod:`.control`, :mod:`.comparison`) under the command's own name, parses its options (declared once
in :mod:`.options`; the option groups are expanded here, when the command is registered), delegates
to the library, and hands its result to :meth:`.output.Output.result` as a view (:mod:`.views`).
Heavy libraries (torch, transformers, matplotlib) are imported inside the commands, so ``--help``
and option errors are fast.
"""

import errno
import os
import re
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from llmprobe.cli import ablation, analyses, comparison, control, figures, fits, trace, viewer
from llmprobe.cli.options import error_message, fill_optional_values, with_groups
from llmprobe.cli.output import error_line
from llmprobe.errors import UsageError

# Set before numpy loads (commands import it lazily): the Bayesian fits solve thousands of tiny
# problems, and threaded OpenBLAS makes each scipy call up to 30x slower (scipy issues 22438, 23191).
# torch uses its own BLAS (MKL), so tracing is unaffected.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Instrument Llama checkpoints: trace next-token distributions, fit them against Bayesian predictions.",
)

COMMANDS = {
    "trace": trace.trace, "inspect": trace.inspect, "models": trace.models, "version": trace.version,
    "experiment": fits.experiment, "fit-prior": fits.fit_prior, "fit-posterior": fits.fit_posterior,
    "fit-scaling": fits.fit_scaling,
    "plot": figures.plot, "plot-icl": figures.plot_icl, "plot-prior": figures.plot_prior,
    "plot-layers": figures.plot_layers, "report": figures.report,
    "continuity": analyses.continuity, "martingale": analyses.martingale,
    "wind-tunnel": control.wind_tunnel, "compare": comparison.compare, "plot-compare": comparison.plot_compare,
    "view": viewer.view, "serve": viewer.serve, "ablate": ablation.ablate,
    "plot-ablate": ablation.plot_ablate,
}


for name, command in COMMANDS.items():
    app.command(name)(with_groups(command))


def _print_version(value: bool) -> None:
    if value:
        from llmprobe.version import __version__

        print(f"llmprobe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                                help="Print the version and exit.")] = False) -> None:
    """Instrument Llama checkpoints: trace next-token distributions, fit them against Bayesian predictions."""


def tidy_help(group: TyperGroup) -> TyperGroup:
    """One metavar style in every help page: arguments and values upper case (``TRACE``, ``INT``),
    choices as ``a|b|c``, flags bare (typer alone would show ``<str>`` and ``<bool>``)."""
    for command in [group, *group.commands.values()]:
        context = command.context_class(command, help_option_names=group.context_settings["help_option_names"])
        for param in [*command.params, command.get_help_option(context)]:
            if param.param_type_name == "argument":
                param.metavar = param.metavar or param.name.upper()
                param.display_type_rich = lambda ctx: None  # the metavar says it; no "<str>" beside it
            elif getattr(param, "is_flag", False) or getattr(param, "count", False):
                param.metavar = ""
            elif param.metavar is None:
                shown = param.display_type(context).strip("<>")
                is_choice = param.type_descriptor.is_choice
                param.metavar = shown if is_choice else shown.removesuffix(" range").replace("str", "text").upper()
    return group


def main(argv: list[str] | None = None) -> None:
    """Entry point: every expected failure becomes one line on stderr and a non-zero exit.

    The command is invoked through click's context directly rather than through typer's ``main``,
    which in non-standalone mode *returns* an exit code for Ctrl-C (and maps a broken pipe to 1), so
    the interrupt would otherwise pass for success. Here:

    * :class:`UsageError` (bad input, an unwritable output, ...) prints its line, exit 2 (130 for an
      interrupted trace, which says how to resume); a library parameter is named by its flag;
    * Ctrl-C / SIGINT anywhere (model loading, streaming to stdout, a fit) prints one line, exit 130;
    * a closed stdout (``llmprobe ... | head``) exits 141 quietly, as a shell pipeline expects;
    * an option parser error prints its message on one line, exit 2;
    * anything else is a bug or an environment fault: one line naming the exception and
      ``run with LLMPROBE_DEBUG=1 for the traceback``, exit 1 (with ``LLMPROBE_DEBUG=1`` it is raised).
    """
    command = tidy_help(typer.main.get_command(app))
    args = fill_optional_values(sys.argv[1:] if argv is None else list(argv))
    try:
        with command.make_context("llmprobe", args) as ctx:
            command.invoke(ctx)
    except UsageError as exc:
        running = command.commands.get(args[0]) if args else None
        error_line(one_line("; ".join([error_message(exc, running), *getattr(exc, "__notes__", [])])))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        error_line("interrupted: no output file was written, and anything already written to stdout is incomplete")
        sys.exit(130)
    except OSError as exc:
        if not _is_broken_pipe(exc):
            _unexpected(exc)
        _quiet_stdout()
        sys.exit(141)
    except Exception as exc:
        _exit_for_parser_error(exc)
    if _stdout_closed():  # the last write went to a reader that had gone: a pipe cut short
        _quiet_stdout()
        sys.exit(141)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def one_line(message: str) -> str:
    """A message as one plain line: terminal escapes (torch bolds parts of its errors) and line breaks
    from a library's text are removed."""
    return " ".join(ANSI_ESCAPE.sub("", message).split())


def _is_broken_pipe(exc: BaseException) -> bool:
    """EPIPE, whether raised by Python or by pyarrow writing a Parquet stream to stdout."""
    while exc is not None:
        if isinstance(exc, BrokenPipeError) or getattr(exc, "errno", None) == errno.EPIPE:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _stdout_closed() -> bool:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    return False


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain about the pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _unexpected(exc: BaseException) -> None:
    """A bug or an environment fault: one line, or the traceback with LLMPROBE_DEBUG=1."""
    if os.environ.get("LLMPROBE_DEBUG", "") not in ("", "0"):
        raise exc
    detail = one_line(str(exc)) or "no message"
    notes = one_line(" ".join(getattr(exc, "__notes__", [])))
    if len(detail) > 300:
        detail = detail[:297] + "..."
    error_line(f"unexpected {type(exc).__name__}: {detail} (run with LLMPROBE_DEBUG=1 for the traceback)"
               + (f"; {notes}" if notes else ""))
    sys.exit(1)


def _exit_for_parser_error(exc: Exception) -> None:
    """Map the option parser's exceptions (click's, or the copy typer vendors) to exit codes.

    They are matched by shape rather than class because typer has shipped both; anything else is
    :func:`_unexpected`.
    """
    name = type(exc).__name__
    if name == "NoArgsIsHelpError":
        typer.echo(exc.ctx.get_help(), err=True)
        sys.exit(2)
    if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
        error_line(" ".join(exc.format_message().replace("Value error, ", "").split()))
        sys.exit(exc.exit_code)
    if name == "Exit":
        sys.exit(exc.exit_code)
    if name == "Abort":
        error_line("aborted")
        sys.exit(130)
    _unexpected(exc)
