"""Every command-line option that more than one command takes, declared once.

Help looks the same everywhere: values are shown as upper-case metavars (``PATH``, ``K``, ``INT``),
choices as ``a|b|c`` (``Literal`` annotations, checked by the parser), flags bare, defaults as
``[default: …]`` (see :func:`llmprobe.cli.app.tidy_help`). One name per idea, everywhere:
``-o/--output`` and ``--force`` on every command that writes a file, ``-q/--quiet`` on every command
that reports progress, ``--top-k``, ``--seed``, ``--bootstrap``, ``--n``. A command module uses these
aliases as parameter annotations and so never spells an option's flags or help itself.

Groups of options travel together (:class:`Group`): a command asks for one by a parameter whose
default is the group, and receives what the group builds, once the app has expanded it
(:func:`with_groups`, applied to every command when it is registered):

* ``out: Output = opt.RESULT``: ``--json``, ``--format table|tsv|json`` and ``-q``, checked once and
  turned into the :class:`~llmprobe.cli.output.Output` that writes the command's result in that format;
* ``loading: ModelOptions = opt.MODEL``: the model options (``--model``, ``--device``, ``--dtype``,
  ``--device-map``, ``--max-memory``, ``--offload-folder``, ``--trust-remote-code``, ``--allow-pickle``,
  ``--attn-implementation``) of every command that loads a model, as one ``ModelOptions``;
  ``opt.PLACEMENT`` is the same without ``--model``, for a command that names its models otherwise (``compare``);
* ``options: PosteriorOptions = opt.POSTERIOR``: every option of ``fit-posterior`` (``--prior``,
  ``--prior-components``, ``--max-components``, ``--min-mass``, ``--folds``, ``--bootstrap``, ``--seed``,
  ``--by``, ``--gamma-variant``), checked when built, for every command that fits the posterior;
  ``opt.FIT`` is the fit's options alone (no per-n tables), for ``ablate``;
* ``ray: RayOptions | None = opt.RAY``: ``--engine local|ray`` and the ``--ray-*`` options of every command
  that can spread its work over Ray actors (``trace``, ``compare``, ``ablate``).

Library errors name a function's parameter (:class:`~llmprobe.errors.ParameterError`); a command's
parameters carry the library's names, so :func:`error_message` shows the flag that sets it instead.
This module is free of ``from __future__ import annotations`` on purpose: typer reads the aliases at
definition time.
"""

import copy
import functools
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args
from collections.abc import Callable

import typer

from llmprobe.analysis.fit_options import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_FOLDS,
    DEFAULT_MAX_COMPONENTS,
    DEFAULT_MIN_MASS,
    PosteriorOptions,
)
from llmprobe.cli.output import Output
from llmprobe.errors import ParameterError, UsageError
from llmprobe.model.loading import ModelOptions, check_attn_implementation, parse_max_memory

MODEL_PANEL = "Model"


def output(help: str) -> Any:
    """``-o/--output PATH`` with a command's own description of what is written."""
    return Annotated[Optional[str], typer.Option("--output", "-o", help=help, metavar="PATH")]


Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or logs on stderr.")]
Json = Annotated[bool, typer.Option("--json", help="The result as JSON on stdout.")]
Format = Annotated[Literal["table", "tsv", "json"], typer.Option(
    "--format", help="table: for people; tsv: a header line and tab-separated rows at full precision (tabs,"
                     " newlines and backslashes in text escaped as \\t \\n \\\\); json: the same as --json.")]
Seed = Annotated[int, typer.Option("--seed", min=0, help="Random seed (0 or more).")]
Bootstrap = Annotated[int, typer.Option("--bootstrap", min=1, metavar="B", help="Bootstrap resamples.")]
TopK = Annotated[int, typer.Option("--top-k", metavar="K", help="Candidates per position.")]
Prompt = Annotated[Optional[str], typer.Option("--prompt", metavar="ID",
                                               help="Prompt id (needed when the trace has several).")]
Layer = Annotated[Optional[int], typer.Option("--layer", help="Layer of a per-layer trace (default: the last).")]
AttnImplementation = Annotated[Optional[str], typer.Option(
    "--attn-implementation", rich_help_panel=MODEL_PANEL, metavar="sdpa|eager",
    help="Attention kernel (default: transformers' choice, usually sdpa); recorded in the trace metadata.")]

Chat = Annotated[Optional[str], typer.Option(
    "--chat", metavar="[user|prefill]",
    help="Wrap each prompt in the tokenizer's chat template: user (the default when given alone) makes it the"
         " user turn; prefill makes prompt[:split] the user turn and the rest the open assistant turn.")]
BatchSize = Annotated[str, typer.Option(
    "--batch-size", metavar="N|auto", help="Prompts per forward pass; auto: as many as fit, halving on out-of-memory.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run writing OUTPUT (same arguments).")]
Ablation = Annotated[Literal["zero", "mean"], typer.Option(
    "--ablation", help="zero, or mean: the activation's mean over this run's positions (a first pass; kept in the"
                       " metadata).")]

# fit-posterior's fit, shared by every command that runs it: :data:`FIT` (and :data:`POSTERIOR`)
Prior = Annotated[str, typer.Option(
    "--prior", help="Reference prior for the per-mark Bayes column: 'fit' (the fitted updating prior), 'uniform',"
                    " 'dirichlet:a1,...,aK', a fit-posterior --json file (its updating prior) or a fit-prior JSON"
                    " (a prior over rows); compare also takes 'true', its default: the prior the compared controls"
                    " were trained under.")]
PriorComponents = Annotated[str, typer.Option(
    "--prior-components", metavar="K|auto",
    help="Components of the updating prior (a Dirichlet mixture the predictions update from); 'auto' chooses by"
         " held-out KL.")]
MaxComponents = Annotated[int, typer.Option("--max-components", help="Largest K tried with --prior-components auto.")]
MinMass = Annotated[float, typer.Option(
    "--min-mass", help="Leave out marks with less probability than this on the categories.")]
Folds = Annotated[int, typer.Option("--folds", help="Folds of sequences for the out-of-sample scores (2 or more).")]

# Ray Data (``--engine ray``), for every command that spreads work over actors: :data:`RAY`
SCALE_PANEL = "Scale-out"
Engine = Annotated[Literal["local", "ray"], typer.Option(
    "--engine", rich_help_panel=SCALE_PANEL,
    help="ray: a Ray Data actor pool does the work (pip install 'llmprobe[ray]').")]
RayAddress = Annotated[Optional[str], typer.Option(
    "--ray-address", rich_help_panel=SCALE_PANEL, metavar="ADDRESS", show_default="RAY_ADDRESS, else a local Ray",
    help="Ray cluster to use.")]
RayActors = Annotated[Optional[int], typer.Option("--ray-actors", rich_help_panel=SCALE_PANEL, min=1, show_default="1",
                                                  help="Model replicas (Ray actors).")]
RayCpus = Annotated[Optional[float], typer.Option("--ray-cpus-per-actor", rich_help_panel=SCALE_PANEL, min=0,
                                                  show_default="1", help="CPUs each actor reserves.")]
RayGpus = Annotated[Optional[float], typer.Option("--ray-gpus-per-actor", rich_help_panel=SCALE_PANEL, min=0,
                                                  show_default="0", help="GPUs each actor reserves.")]

# Options whose value may be left out: `--chat` alone means `--chat user`. typer has no optional
# values, so the command line is rewritten before parsing (see :func:`fill_optional_values`).
OPTIONAL_VALUES = {"--chat": ("user", ("user", "prefill"))}

# The model options, the same for every command that loads a model (trace, martingale): :data:`MODEL`.
Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", rich_help_panel=MODEL_PANEL,
    help="Model directory, .gguf file or cached hub id (default: embedded SmolLM2-135M-Instruct).")]
Device = Annotated[str, typer.Option("--device", rich_help_panel=MODEL_PANEL, metavar="auto|cpu|cuda[:N]|mps",
                                     help="Where the model runs (auto: the first CUDA GPU, else the CPU).")]
Dtype = Annotated[Literal["auto", "float32", "bfloat16", "float16"], typer.Option(
    "--dtype", rich_help_panel=MODEL_PANEL, help="auto: bfloat16 on CUDA, else float32.")]
DeviceMap = Annotated[Optional[str], typer.Option("--device-map", rich_help_panel=MODEL_PANEL,
                                                  help="'auto' hands placement to accelerate.")]
MaxMemory = Annotated[Optional[str], typer.Option(
    "--max-memory", rich_help_panel=MODEL_PANEL,
    help="With --device-map: per-device limits, e.g. 0=20GiB,1=20GiB,cpu=64GiB.")]
OffloadFolder = Annotated[Optional[str], typer.Option("--offload-folder", rich_help_panel=MODEL_PANEL,
                                                      help="With --device-map: folder for weights offloaded to disk.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", rich_help_panel=MODEL_PANEL,
                                               help="Allow the checkpoint's own Python code.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", rich_help_panel=MODEL_PANEL,
                                           help="Allow pickle weights (.bin/.pt).")]

# The per-n tables' options, with the fit's above: :data:`POSTERIOR` (fit-posterior, compare).
By = Annotated[Optional[Literal["template"]], typer.Option(
    "--by", help="template: also the per-n tables of mean ± std over prompt templates (docs/experiments.md).")]
GammaVariant = Annotated[Optional[Literal["gupta"]], typer.Option(
    "--gamma-variant", help="gupta: also Gupta et al.'s γ (decayed Beta(1,1) pseudo-counts, L1 on template means).")]


def chat_setting(chat: Optional[str]) -> bool | str:
    """``--chat``'s value as :class:`~llmprobe.tracing.settings.TraceSettings` takes it: absent is False, ``user``
    (also ``--chat`` alone) True, ``prefill`` itself."""
    return {None: False, "user": True}.get(chat, chat)


def in_panel(alias: Any, panel: str) -> Any:
    """A shared option alias shown under a help panel of one command (``trace`` groups its options)."""
    kind, info, *rest = get_args(alias)
    info = copy.copy(info)
    info.rich_help_panel = panel
    return Annotated[(kind, info, *rest)]


def result_output(as_json: bool, table_format: str, quiet: bool) -> Output:
    """The :class:`Output` of a command that prints a result: ``--json`` is ``--format json``; it conflicts with tsv."""
    if as_json and table_format == "tsv":
        raise UsageError("--json is --format json; give one of them", where="--format")
    return Output(quiet, format="json" if as_json else table_format)


def input_path(source: str, what: str, *, stdin: bool = True, missing: Optional[str] = None) -> str:
    """Check a command's input before any heavy import, so a typo fails at once (``-``: stdin).

    ``missing`` is the message for a path that does not exist (default: "no such WHAT")."""
    if source == "-":
        if not stdin:
            raise UsageError(f"the {what} cannot come from standard input; give a file", where="-")
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError(f"expected the {what} on standard input, but it is a terminal", where="-")
        return source
    path = Path(source)
    if not path.exists():
        raise UsageError(missing or f"no such {what}", where=source)
    return source


def prior_file(prior: str, *, stdin_taken: bool = False) -> Optional[str]:
    """The file ``--prior`` names, checked like any input; None for 'fit', 'uniform' and 'dirichlet:...'."""
    if prior in ("fit", "uniform") or prior.startswith("dirichlet:"):
        return None
    if prior == "-" and stdin_taken:
        raise UsageError("standard input can be read only once; give the prior or the trace as a file",
                         where="--prior")
    return input_path(prior, "prior file")


def experiment_config(config: str) -> Any:
    """An experiment TOML from a file or, for ``-``, standard input (checked by :func:`input_path`)."""
    from llmprobe.experiments import load_experiment, loads_experiment

    if config == "-":
        return loads_experiment(sys.stdin.read(), where="<stdin>")
    return load_experiment(config)


def model_options(model: Optional[str], device: str, dtype: str, device_map: Optional[str],
                  max_memory: Optional[str], offload_folder: Optional[str], trust_remote_code: bool,
                  allow_pickle: bool, attn_implementation: Optional[str]) -> ModelOptions:
    """The parsed model options."""
    return ModelOptions(model, device, dtype, device_map, trust_remote_code, allow_pickle,
                        parse_max_memory(max_memory) if max_memory else None, offload_folder,
                        check_attn_implementation(attn_implementation))


# ------------------------------------------------------------------------------------------ groups
@dataclass(frozen=True)
class Group:
    """Options that travel together: their declarations, and what ``build`` makes of their values."""

    options: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]

    def with_defaults(self, **defaults: Any) -> "Group":
        """The same options, some with another default (one command's own default for a shared option)."""
        return Group(tuple(o.replace(default=defaults[o.name]) if o.name in defaults else o for o in self.options),
                     self.build)


def _option(name: str, alias: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=alias)


RESULT: Any = Group((_option("as_json", Json, False), _option("table_format", Format, "table"),
                     _option("quiet", Quiet, False)), result_output)
"""``--json``, ``--format``, ``-q`` -> the :class:`Output` that writes the command's result."""

_PLACEMENT_OPTIONS = (
    _option("device", Device, "auto"), _option("dtype", Dtype, "auto"),
    _option("device_map", DeviceMap, None), _option("max_memory", MaxMemory, None),
    _option("offload_folder", OffloadFolder, None), _option("trust_remote_code", TrustRemoteCode, False),
    _option("allow_pickle", AllowPickle, False), _option("attn_implementation", AttnImplementation, None),
)
MODEL: Any = Group((_option("model", Model, None), *_PLACEMENT_OPTIONS), model_options)
"""The model options -> one :class:`ModelOptions`."""

PLACEMENT: Any = Group(_PLACEMENT_OPTIONS, functools.partial(model_options, None))
"""The model options but ``--model`` -> a :class:`ModelOptions` without a model, for a command that names its
models as arguments."""


_FIT_OPTIONS = (
    _option("prior", Prior, "fit"), _option("components", PriorComponents, "1"),
    _option("max_components", MaxComponents, DEFAULT_MAX_COMPONENTS), _option("min_mass", MinMass, DEFAULT_MIN_MASS),
    _option("folds", Folds, DEFAULT_FOLDS), _option("bootstrap", Bootstrap, DEFAULT_BOOTSTRAP),
    _option("seed", Seed, 0),
)
FIT: Any = Group(_FIT_OPTIONS, PosteriorOptions)  # checked when built: a bad one names its flag
"""The fit's own options -> one checked :class:`PosteriorOptions`, for a command that reads only the fit's
numbers (``ablate``)."""

POSTERIOR: Any = Group((*_FIT_OPTIONS, _option("by", By, None), _option("gamma_variant", GammaVariant, None)),
                       PosteriorOptions)
"""Every fit-posterior option (the fit's, and the per-n tables' ``--by`` and ``--gamma-variant``) -> one checked
:class:`PosteriorOptions`."""


def ray_choice(engine: str, ray_address: Optional[str], ray_actors: Optional[int], ray_cpus_per_actor: Optional[float],
               ray_gpus_per_actor: Optional[float]) -> Any:
    """``--engine`` and the ``--ray-*`` options -> the Ray options of ``--engine ray``, None for the local engine."""
    from llmprobe.tracing.ray_options import ray_options_for

    return ray_options_for(engine, ray_address, ray_actors, ray_cpus_per_actor, ray_gpus_per_actor, None)


RAY: Any = Group((
    _option("engine", Engine, "local"), _option("ray_address", RayAddress, None), _option("ray_actors", RayActors, None),
    _option("ray_cpus_per_actor", RayCpus, None), _option("ray_gpus_per_actor", RayGpus, None),
), ray_choice)
"""``--engine`` and the ``--ray-*`` options -> ``RayOptions`` (``--engine ray``) or None."""


def with_groups(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` as typer should see it: each parameter whose default is a :class:`Group` becomes the
    group's options, and the command is called with what the group builds of them."""
    signature = inspect.signature(command)
    groups = {p.name: p.default for p in signature.parameters.values() if isinstance(p.default, Group)}
    if not groups:
        return command

    @functools.wraps(command)
    def run(**values: Any) -> None:
        for name, group in groups.items():
            values[name] = group.build(**{option.name: values.pop(option.name) for option in group.options})
        command(**values)

    expanded = [option for p in signature.parameters.values()
                for option in (groups[p.name].options if p.name in groups else [p])]
    run.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in expanded])
    # typer reads the annotations too: the expanded options', not the group parameters' (which may name a
    # type that is imported for type checkers only, so that --help never loads it)
    run.__annotations__ = {p.name: p.annotation for p in expanded}
    return run


def error_message(error: UsageError, command: Any) -> str:
    """The line for a user error; a library parameter's name becomes the flag that sets it in ``command``
    (the click command that ran; None: none did)."""
    if isinstance(error, ParameterError) and command is not None:
        flags = {param.name: max(param.opts, key=len) for param in command.params if param.param_type_name == "option"}
        if error.parameter in flags:
            return f"{flags[error.parameter]}: {error.message}"
    return str(error)


def fill_optional_values(argv: list[str]) -> list[str]:
    """``--chat`` not followed by one of its values becomes ``--chat=user`` (up to a ``--``)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg in OPTIONAL_VALUES:
            default, values = OPTIONAL_VALUES[arg]
            if i + 1 >= len(argv) or argv[i + 1] not in values:
                arg = f"{arg}={default}"
        out.append(arg)
    return out


def parse_counts(spec: str, option: str = "--n") -> list[int]:
    """``--n 0,2,8``: sorted distinct numbers of in-context examples."""
    try:
        ns = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        raise UsageError(f"expected comma-separated example counts, got {spec!r}", where=option) from None
    if ns[0] < 0:
        raise UsageError("example counts must be 0 or more", where=option)
    return ns
