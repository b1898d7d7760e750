"""``llmprobe trace --engine ray``: the same trace, computed by a pool of Ray actors.

Ray Data does the scheduling: the driver's :class:`~llmprobe.tracing.run.TraceRun`, started on a
weightless skeleton of the model, checks everything it can without weights (options, the model
source, settings, every prompt) and encodes every prompt, once; the encoded prompts become a dataset,
``map_batches`` sends blocks of them to an actor pool whose members each load the model once (with
the CPUs/GPUs asked for) and trace each block with the same run (:meth:`TraceRun.for_prompts`: the
block is planned, never tokenized again), and ``write_parquet`` writes the Arrow tables they return
as part files. Each table carries the local engine's schema and key-value metadata, so a trace
directory reads exactly like a local trace file (``open_trace`` accepts both). The directory is
written beside the target under a hidden name and renamed into place only when complete.

Ray is an optional dependency, imported only here and only when this engine is chosen.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.errors import UsageError, first_line
from llmprobe.files import atomic_dir, check_new_output
from llmprobe.model.loading import ModelOptions
from llmprobe.progress import Reporter, plural
from llmprobe.tracing.encoding import EncodedPrompt
from llmprobe.tracing.ray_options import RayOptions
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.schema import META_KEY, encode_metadata
from llmprobe.tracing.settings import TraceSettings

INSTALL_HINT = "pip install 'llmprobe[ray]'"
# Worker processes may start without the driver's environment (always so on other nodes).
PASSED_ENV = ("LLMPROBE_CACHE", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError(f"the ray engine needs Ray Data, which is not installed; install it with: {INSTALL_HINT}",
                         where="--engine") from None
    return ray


class TraceActor:
    """One per Ray actor: loads the model once, then traces each block of encoded prompts it is handed."""

    def __init__(self, model_options: ModelOptions, settings: TraceSettings, context: dict[str, Any]) -> None:
        self.run = TraceRun(settings, [], context).start(model_options.load())
        self.schema = self.run.schema.with_metadata(encode_metadata(self.run.metadata(), self.run.vocab))

    def __call__(self, block: pa.Table) -> pa.Table:
        prompts = [EncodedPrompt.from_json(text) for text in block.column("prompt").to_pylist()]
        return pa.Table.from_batches(list(self.run.for_prompts(prompts).batches()), schema=self.schema)


def run_trace_ray(run: TraceRun, output: str, fmt: str, force: bool, model_options: ModelOptions,
                  ray_options: RayOptions, out: Reporter) -> None:
    from llmprobe.model.loading import check_placement

    ray_options.validate()
    if any(i.needs_first_pass for i in run.settings.interventions):
        raise UsageError("a mean ablation takes its mean over every prompt of the run, but the ray engine traces"
                         " blocks of prompts apart; use --engine local", where="--ablation")
    check_placement(model_options.device_map, model_options.max_memory, model_options.offload_folder)
    prompts_file = run.context.get("prompts")
    target = check_output_dir(output, fmt, force, inputs=[prompts_file] if prompts_file else [])
    import_ray()
    run.start(model_options.skeleton(log=out.log))  # on the driver, in seconds, what would fail in every actor
    with ray_session(ray_options, out) as ray:
        try:
            _run_on_ray(ray, run, target, model_options, ray_options, out, force)
        except FileExistsError:
            raise UsageError("was created by another run while this one worked; it was kept, nothing was replaced;"
                             " pass --force to replace it", where=output) from None


@contextlib.contextmanager
def ray_session(ray_options: RayOptions, out: Reporter) -> Iterator[Any]:
    """Ray for one command (``trace``, ``compare``): started here unless it already runs (and then shut down
    after), a local Ray checked to hold the actors asked for, and Ray's prints kept off stdout; yields ``ray``."""
    ray = import_ray()
    local = ray_options.address is None and not os.environ.get("RAY_ADDRESS")
    with _ray_prints_off_stdout(out.quiet):
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=ray_options.address, include_dashboard=False, log_to_driver=not out.quiet,
                         logging_level="ERROR" if out.quiet else "WARNING")
            except ConnectionError as exc:  # not running, or it refused this process (token authentication)
                raise UsageError(f"cannot connect to the Ray cluster ({first_line(exc)}): is it running, and if it"
                                 " uses token authentication (`ray start` turns it on by default since Ray 2.59),"
                                 " does this process have its RAY_AUTH_MODE=token and RAY_AUTH_TOKEN?"
                                 " (docs/scale-out.md)", where="--ray-address") from None
        try:
            if local:
                check_local_resources(ray.cluster_resources(), ray_options)
            _tame_ray_data_logs(out.quiet)
            yield ray
        finally:
            if started_here:
                ray.shutdown()


@contextlib.contextmanager
def _ray_prints_off_stdout(quiet: bool):
    """Ray prints its workers' errors to stdout, which carries data: send them to stderr (nowhere with -q).

    With -q, file descriptor 2 is pointed at /dev/null while Ray runs too: Ray's C++ core worker writes
    its own warnings there, past Python's ``sys.stderr``. It is restored before any error is reported.
    """
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(os.devnull, "w")) if quiet else sys.stderr
        stack.enter_context(contextlib.redirect_stdout(sink))
        if quiet:
            stack.enter_context(_fd2_to(sink))
        yield


@contextlib.contextmanager
def _fd2_to(sink):
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(sink.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _run_on_ray(ray, run: TraceRun, target: Path, model_options: ModelOptions, ray_options: RayOptions,
                out: Reporter, replace: bool) -> None:
    n_prompts = len(run.records)
    per_task = ray_options.task_size(n_prompts, run.settings)
    items = [{"prompt_index": e.record.index, "prompt": e.to_json()} for e in run.prompts]
    dataset = ray.data.from_items(items, override_num_blocks=math.ceil(n_prompts / per_task))
    traced = dataset.map_batches(
        TraceActor,
        fn_constructor_args=(model_options, run.settings, {**run.context, "engine": "ray",
                                                           "ray_version": ray.__version__,
                                                           "ray_actors": ray_options.actors}),
        batch_size=per_task,
        **actor_pool(ray, ray_options),
    )
    out.log(f"tracing {plural(n_prompts, 'prompt')} on Ray ({plural(ray_options.actors, 'actor')},"
            f" {plural(per_task, 'prompt')} per task)")
    with atomic_dir(target, replace=replace) as staging:
        with actor_errors():
            traced.write_parquet(str(staging), write_page_checksum=True)
        rows, parts = check_parts(staging)
    out.log(f"wrote {plural(rows, 'row')} for {plural(n_prompts, 'prompt')} to {target}/"
            f" ({plural(parts, 'part file')})")


def actor_pool(ray, ray_options: RayOptions) -> dict[str, Any]:
    """``map_batches`` arguments for a pool of ``ray_options.actors`` actors with the asked-for resources."""
    return {"batch_format": "pyarrow", "compute": ray.data.ActorPoolStrategy(size=ray_options.actors),
            "num_cpus": ray_options.cpus_per_actor, "num_gpus": ray_options.gpus_per_actor,
            "runtime_env": {"env_vars": worker_env()}}


@contextlib.contextmanager
def actor_errors() -> Iterator[None]:
    """Inside the block, a user error an actor raised reaches the driver as itself (one line), not in
    Ray's wrapping."""
    try:
        yield
    except Exception as exc:  # Ray wraps what the actors raised in its own exception types
        cause = usage_error_in(exc)
        if cause is None:
            raise
        raise cause from None


def check_output_dir(output: str, fmt: str, force: bool, inputs: Sequence[str] = ()) -> Path:
    if fmt != "parquet":
        raise UsageError("the ray engine writes Parquet part files only", where="--format")
    if output == "-":
        raise UsageError("the ray engine writes a directory of Parquet part files, not a stream; pass -o DIR",
                         where="-o")
    return check_new_output(output, force, directory=True, inputs=inputs)


def check_local_resources(resources: dict[str, float], options: RayOptions) -> None:
    """A local Ray never grows, so an actor pool it cannot hold would wait forever."""
    for name, per_actor, flag in (("CPU", options.cpus_per_actor, "--ray-cpus-per-actor"),
                                  ("GPU", options.gpus_per_actor, "--ray-gpus-per-actor")):
        need, have = options.actors * per_actor, resources.get(name, 0.0)
        if need > have:
            raise UsageError(f"{options.actors} actor(s) need {need:g} {name}(s) but the local Ray has {have:g};"
                             f" lower --ray-actors or {flag}, or pass --ray-address", where=flag)


def worker_env() -> dict[str, str]:
    env = {name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def usage_error_in(exc: BaseException) -> UsageError | None:
    """The user error an actor raised, found in Ray's wrapping (chained, or only in the message text)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UsageError):
            return UsageError(str(current))
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    found = re.findall(r"llmprobe\.errors\.UsageError: (.+)", str(exc))
    return UsageError(found[-1].strip()) if found else None


def check_parts(directory: Path) -> tuple[int, int]:
    """Rows and part files written; every part must carry the trace metadata readers rely on."""
    parts = sorted(directory.rglob("*.parquet"))
    if not parts:
        raise RuntimeError(f"Ray wrote no part files to {directory}")
    rows = 0
    for part in parts:
        footer = pq.ParquetFile(part)
        if META_KEY not in (footer.schema_arrow.metadata or {}):
            raise RuntimeError(f"Ray dropped the trace metadata from {part}")
        rows += footer.metadata.num_rows
    return rows, len(parts)


class _RayDataConsole(logging.Filter):
    """Ray Data logs progress (INFO) and every failure with its stack (ERROR) to stderr. A failure also
    reaches the driver as an exception, reported once (a user error as one line), so its console copy
    is dropped; Ray's log file in the session directory keeps everything. With -q nothing passes."""

    quiet = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.quiet and record.levelno < logging.ERROR


_RAY_DATA_CONSOLE = _RayDataConsole()


def _tame_ray_data_logs(quiet: bool) -> None:
    from ray.data import DataContext

    _RAY_DATA_CONSOLE.quiet = quiet
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and _RAY_DATA_CONSOLE not in handler.filters:
            handler.addFilter(_RAY_DATA_CONSOLE)
    DataContext.get_current().enable_progress_bars = not quiet
