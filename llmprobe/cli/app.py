"""The ``llmprobe`` application: one typer app, its commands, and one place that turns errors into lines.

Each command lives in the module of its group (:mod:`.trace`, :mod:`.fits`, :mod:`.figures`,
:mod:`.analyses`) under the command's own name, parses its options (declared once in
:mod:`.options`), delegates to the library, and shows the result with :mod:`.views`. Heavy
libraries (torch, transformers, matplotlib) are imported inside the commands, so ``--help`` and
option errors are fast.
"""

import functools
import os
import sys
from typing import Annotated, Callable

import typer
from typer.core import TyperGroup

from llmprobe.cli import analyses, figures, fits, trace
from llmprobe.cli.options import fill_optional_values
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
    "plot": figures.plot, "plot-icl": figures.plot_icl, "plot-prior": figures.plot_prior,
    "plot-layers": figures.plot_layers, "report": figures.report,
    "continuity": analyses.continuity, "martingale": analyses.martingale,
}


class StdoutClosed(Exception):
    """The reader of stdout went away (``llmprobe ... | head -1``); not an OSError, so typer leaves it to us."""


def _pipe_safe(command: Callable) -> Callable:
    @functools.wraps(command)  # typer reads the signature through __wrapped__
    def run(*args, **kwargs):
        try:
            command(*args, **kwargs)
            sys.stdout.flush()  # here, not at exit, so a closed pipe is seen below
        except BrokenPipeError:
            raise StdoutClosed() from None
    return run


for name, command in COMMANDS.items():
    app.command(name)(_pipe_safe(command))


def _print_version(value: bool) -> None:
    if value:
        from llmprobe import __version__

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
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    command = tidy_help(typer.main.get_command(app))
    try:
        command.main(args=fill_optional_values(sys.argv[1:] if argv is None else argv), prog_name="llmprobe",
                     standalone_mode=False)
    except UsageError as exc:
        error_line(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        error_line("interrupted; nothing was written for the unfinished output")
        sys.exit(130)
    except (BrokenPipeError, StdoutClosed):
        # Like other Unix tools: stop quietly, keep what was written; the exit status a shell shows for SIGPIPE.
        # stdout goes to /dev/null so the interpreter's final flush cannot complain.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout without a descriptor (captured in tests)
            pass
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
        error_line(" ".join(exc.format_message().replace("Value error, ", "").split()))
        sys.exit(exc.exit_code)
    if name == "Exit":
        sys.exit(exc.exit_code)
    if name == "Abort":
        error_line("aborted")
        sys.exit(130)
    raise exc

