"""``llmprobe compare``: several models on one set of experiment prompts, one row of Bayesian numbers per model.
The command is :func:`compare_models` (the CLI parses and prints; a notebook calls it the same way).

A comparison is a list of models (:func:`expand_models`: checkpoint directories, GGUF files, ``default``,
and series — a ``wind-tunnel`` series directory or its ``manifest.json``, expanded in the manifest's
order), one set of experiment prompts (:func:`check_prompts`: marks with counts and categories, since every
model is fitted against Bayes), one set of trace settings and one set of ``fit-posterior`` options
(:class:`~llmprobe.analysis.fit_options.PosteriorOptions`). Each model is then

1. loaded (one at a time; the previous one is released first),
2. traced by its own :class:`~llmprobe.tracing.run.TraceRun` — with its own tokenizer, marks placed by
   character offset as ``trace`` places them — where runs whose encoders are equal share one encoding
   (:class:`~llmprobe.tracing.run.SharedEncodings`: the prompts are tokenized once per distinct tokenizer),
3. fitted by :func:`llmprobe.analysis.fits.fit_posterior` with the comparison's options, exactly as
   ``fit-posterior`` fits a trace file (so a comparison of one model gives ``trace`` + ``fit-posterior``'s
   numbers), and
4. reduced to one :class:`~llmprobe.analysis.comparison.ComparisonRow` (verdict, KL(Bayes‖model), KL to the
   best filter, γ and its interval, α0, entropy error, mass on the categories; step, layers, width,
   parameters) by :func:`~llmprobe.analysis.comparison.measure`.

The KL to Bayes is under ``--prior``; its default here, ``true``, is the prior the compared controls were
trained under (their ``prior.json``, which must agree), applied to every model of the comparison, or the
fitted updating prior when no model is a control (:func:`resolve_prior`).

Resumable per model: each finished row (with its fit summary) is committed atomically into a work
directory beside the output (``.OUTPUT.rows/``, with the plan it belongs to); ``--resume`` keeps those rows
and runs the rest; the output table is written atomically at the end and the work directory removed. A
failure (a corrupt checkpoint, Ctrl-C) is one line saying how many rows are kept and how to resume.
``--engine ray`` runs each model on its own Ray actor (:func:`run_on_ray`), the driver encoding the prompts
once per tokenizer and committing rows as actors finish.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from llmprobe.analysis.comparison import (COMPARISON_FORMAT, META_KEY, ComparisonRow, Measured, ModelEntry,
                                          comparison_frame, measure, model_facts, read_comparison)
from llmprobe.analysis.fit_options import TRUE_PRIOR, PosteriorOptions
from llmprobe.analysis.fit_tables import write_table_file
from llmprobe.control.series import manifest_path, read_series
from llmprobe.errors import UsageError, add_note
from llmprobe.files import check_new_output, write_atomic
from llmprobe.model.loading import ModelOptions
from llmprobe.model.sources import DEFAULT_MODEL_NAME, looks_like_path
from llmprobe.progress import Reporter, plural
from llmprobe.tracing.checkpoint import prompts_digest
from llmprobe.tracing.prompts import PromptRecord, read_prompts
from llmprobe.tracing.ray_options import RayOptions
from llmprobe.tracing.reader import Trace
from llmprobe.tracing.run import SharedEncodings, TraceRun, release_device_memory
from llmprobe.tracing.runner import Interrupted, resume_command
from llmprobe.tracing.settings import TraceSettings
from llmprobe.version import __version__

DEFAULT = "default"
CONTROL_PRIOR = "prior.json"  # what wind-tunnel writes beside a control's weights: its training prior
PROMPTS_NEED = ("compare fits every model against Bayes, so it needs experiment prompts (`llmprobe experiment`)"
                " with categories, targets and marks with running counts")


def expand_models(specs: list[str]) -> list[ModelEntry]:
    """The models ``compare`` was given, series expanded in order; one line naming a path that is not a model (a
    name that is not a path is a hub id, which loading looks up in the local cache)."""
    if not specs:
        raise UsageError("give at least one model (a checkpoint directory, a .gguf file, default, or a series)",
                         where="MODEL")
    entries: list[ModelEntry] = []
    for spec in specs:
        manifest = manifest_path(spec) if spec != DEFAULT else None
        if manifest is not None:
            for checkpoint, directory in read_series(manifest):
                entries.append(ModelEntry(len(entries), str(directory), checkpoint.name, checkpoint.size,
                                          checkpoint.step, _control_prior(directory)))
            continue
        path = Path(spec)
        if spec == DEFAULT:
            entries.append(ModelEntry(len(entries), spec, DEFAULT_MODEL_NAME, None, None, None))
        elif path.is_file() and path.suffix.lower() == ".gguf":
            entries.append(ModelEntry(len(entries), spec, spec, None, None, None))
        elif path.is_dir() and (path / "config.json").is_file():
            entries.append(ModelEntry(len(entries), spec, spec, None, _control_step(path), _control_prior(path)))
        elif path.is_dir():
            raise UsageError("is neither a model directory (no config.json) nor a series (no manifest.json)",
                             where=spec)
        elif path.exists():
            raise UsageError("expected a model directory, a .gguf file, default, or a series directory or"
                             " manifest.json", where=spec)
        elif not looks_like_path(spec):  # a hub id: loading finds it in the local cache, or says it is not there
            entries.append(ModelEntry(len(entries), spec, spec, None, None, None))
        else:
            raise UsageError("no such model, series or manifest", where=spec)
    return entries


def _control_prior(directory: Path) -> str | None:
    path = directory / CONTROL_PRIOR
    return str(path) if path.is_file() else None


def _control_step(directory: Path) -> int | None:
    """A control's training step, from its training.json (older controls: their number of steps)."""
    try:
        training = json.loads((directory / "training.json").read_text(encoding="utf-8"))
        step = training.get("step", training.get("settings", {}).get("steps"))
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def check_prompts(records: list[PromptRecord], source: str) -> None:
    """Every prompt is an experiment prompt with categories and marks with counts (else one line naming it)."""
    if not records:
        raise UsageError("no prompts", where=source)
    for record in records:
        categories = record.meta.get("categories")
        if not (isinstance(categories, list) and categories and isinstance(record.meta.get("targets"), list)):
            raise UsageError(f"prompt {record.id!r} (line {record.line}) has no categories and targets; {PROMPTS_NEED}",
                             where=source)
        if not record.marks or not all("counts" in mark for mark in record.marks):
            raise UsageError(f"prompt {record.id!r} (line {record.line}) has no marks with counts; {PROMPTS_NEED}",
                             where=source)


def resolve_prior(prior: str, entries: list[ModelEntry], reporter: Reporter) -> str:
    """``--prior`` for every model: ``true`` becomes the controls' training prior (one file; they must agree),
    or ``fit`` when no model is a control; anything else as given."""
    if prior != TRUE_PRIOR:
        return prior
    files = {entry.true_prior: entry.name for entry in entries if entry.true_prior is not None}
    if not files:
        reporter.log("no model is a control with a known training prior: KL(Bayes‖model) is to the fitted updating"
                     " prior (--prior fit)")
        return "fit"
    contents: dict[str, list[str]] = {}
    for path, name in files.items():
        try:
            mixture = json.loads(Path(path).read_text(encoding="utf-8")).get("mixture")
        except (OSError, ValueError, AttributeError) as exc:
            raise UsageError(f"cannot read the training prior of {name}: {exc}", where=path) from None
        contents.setdefault(json.dumps(mixture, sort_keys=True), []).append(name)
    if len(contents) > 1:
        described = "; ".join(f"{', '.join(names[:2])}{' ...' if len(names) > 2 else ''}: {mixture}"
                              for mixture, names in contents.items())
        raise UsageError(f"the controls were trained under different priors ({described}); give the prior to compare"
                         " them under", where="--prior")
    return next(iter(files))


def work_dir_for(output: str) -> Path:
    path = Path(output)
    return path.parent / f".{path.name}.rows"


class RowStore:
    """The committed rows of an unfinished comparison (see the module docstring): ``plan.json`` (what the rows
    belong to) and ``row-NNNNN.json`` per finished model, each written atomically."""

    def __init__(self, output: str, plan: dict[str, Any]) -> None:
        self.path = work_dir_for(output)
        self.plan = plan

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def check(self) -> None:
        """The rows kept belong to this comparison (same models, prompts, settings and options)."""
        try:
            kept = json.loads((self.path / "plan.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            kept = None
        if kept != self.plan:
            raise UsageError(f"the rows kept in {self.path} are from a different comparison (other models, prompts"
                             " or options); pass --force to start over", where="--resume")

    def done(self) -> dict[int, Measured]:
        """The rows committed so far, by model index; an unreadable row file is left out (its model runs again)."""
        found: dict[int, Measured] = {}
        for path in sorted(self.path.glob("row-*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                row = ComparisonRow(**data["row"])
            except (OSError, ValueError, TypeError, KeyError):
                continue
            found[row.index] = Measured(row, data["summary"])
        return found

    def commit(self, measured: Measured) -> None:
        if not self.path.exists():
            self.path.mkdir()
            write_atomic(self.path / "plan.json", json.dumps(self.plan, indent=1) + "\n")
        write_atomic(self.path / f"row-{measured.row.index:05d}.json",
                     json.dumps({"row": asdict(measured.row), "summary": measured.summary}) + "\n", replace=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class Comparison:
    """A comparison to run: models, prompts and options, checked; :func:`run_comparison` runs it."""

    entries: list[ModelEntry]
    records: list[PromptRecord]
    prompts: str  # the prompts file, as given
    settings: TraceSettings
    options: PosteriorOptions  # with --prior resolved (see resolve_prior)
    placement: ModelOptions  # device, dtype...; the model is each entry's
    command: str = ""

    def plan(self) -> dict[str, Any]:
        """What the committed rows belong to; ``--resume`` refuses rows of another plan."""
        return {"format": COMPARISON_FORMAT, "llmprobe_version": __version__,
                "models": [[e.spec, e.name] for e in self.entries], "prompts_sha256": prompts_digest(self.records),
                "settings": asdict(self.settings), "options": asdict(self.options),
                "placement": {"device": self.placement.device, "dtype": self.placement.dtype}}

    def model_options(self, entry: ModelEntry) -> ModelOptions:
        return replace(self.placement, model=None if entry.spec == DEFAULT else entry.spec)

    def run(self, entry: ModelEntry) -> TraceRun:
        return TraceRun(self.settings, self.records, {"command": self.command, "prompts": self.prompts,
                                                      "comparison_model": entry.name})


def run_comparison(comparison: Comparison, store: RowStore | None, reporter: Reporter,
                   keep_traces: str | None = None, replace_traces: bool = False) -> list[Measured]:
    """Every model's row, in order: the rows ``store`` holds, then each other model loaded, traced, fitted and
    committed in turn (the previous model released before the next loads). ``store`` None: nothing is kept
    (no output file, nothing to resume)."""
    done = store.done() if store is not None else {}
    if done:
        reporter.log(f"resuming: {len(done)} of {len(comparison.entries)} models were done")
    shared = SharedEncodings()
    pending = [e for e in comparison.entries if e.index not in done]
    with _resumable(comparison, store, done):
        for entry in pending:
            measured = _measure_one(comparison, entry, shared, reporter, keep_traces is not None)
            release_device_memory()  # the model went out of scope with _measure_one
            _commit(measured, store, done, keep_traces, replace_traces, reporter, len(comparison.entries))
    if pending and shared.encoded:
        reporter.log(f"tokenized the prompts {plural(shared.encoded, 'time')} for {plural(len(pending), 'model')}")
    return [done[e.index] for e in comparison.entries]


def _measure_one(comparison: Comparison, entry: ModelEntry, shared: SharedEncodings, reporter: Reporter,
                 keep_trace: bool) -> Measured:
    loaded = comparison.model_options(entry).load(log=reporter.log)
    run = comparison.run(entry).start(loaded, reporter, shared)
    return measure(entry, run, model_facts(loaded), comparison.options, loaded.load_seconds, reporter, keep_trace)


def _commit(measured: Measured, store: RowStore | None, done: dict[int, Measured], keep_traces: str | None,
            replace_traces: bool, reporter: Reporter, total: int) -> None:
    row = measured.row
    if keep_traces is not None and measured.trace is not None:
        Path(keep_traces).mkdir(exist_ok=True)
        _write_trace(measured.trace, trace_path(keep_traces, row), replace_traces)
    measured.trace = None
    if store is not None:
        store.commit(measured)
    done[row.index] = measured
    reporter.log(f"{row.name} ({len(done)} of {total}): verdict {row.verdict}, {row.kl_bits:.3g} bits"
                 f" KL(Bayes‖model); load {row.load_seconds:.1f} s, trace {row.trace_seconds:.1f} s, fit"
                 f" {row.fit_seconds:.1f} s")


@contextmanager
def _resumable(comparison: Comparison, store: RowStore | None, done: dict[int, Measured]) -> Iterator[None]:
    """Ctrl-C or any failure mid-comparison: the rows committed so far stay, and the line says how to resume."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted{_kept(comparison, store, done)}; resume with:"
                          f" {resume_command(comparison.command)}") from None
    except Exception as exc:
        if done and store is not None:
            add_note(exc, f"({_kept(comparison, store, done).removeprefix('; ')}; once the cause is fixed, resume"
                         f" with: {resume_command(comparison.command)})")
        raise


def _kept(comparison: Comparison, store: RowStore | None, done: dict[int, Measured]) -> str:
    if not done or store is None:
        return ""
    return f"; {len(done)} of {len(comparison.entries)} rows are kept in {store.path}"


def trace_path(directory: str, row: ComparisonRow) -> Path:
    """Where ``--keep-traces`` puts a model's trace: ``DIR/003-L2-H32@400.parquet``."""
    return Path(directory) / f"{row.index:03d}-{re.sub(r'[^A-Za-z0-9._@-]+', '_', row.name).strip('_')}.parquet"


def _write_trace(trace: Trace, path: Path, replace_existing: bool) -> None:
    from llmprobe.tracing.writer import open_trace_sink

    with open_trace_sink(str(path), "parquet", trace.table.schema, trace.meta, trace.vocab,
                         replace=replace_existing) as sink:
        for batch in trace.table.to_batches():
            sink.write(batch)


def run_on_ray(comparison: Comparison, store: RowStore | None, reporter: Reporter, ray_options: RayOptions,
               keep_traces: str | None = None, replace_traces: bool = False) -> list[Measured]:
    """:func:`run_comparison` with each model on its own Ray actor (at most ``ray_options.actors`` at a time).

    The driver encodes the prompts once per distinct tokenizer (on weightless skeletons) and sends each actor
    its model's encoded prompts; an actor loads its model, traces and fits it, and is ended when its row is
    back; rows are committed as they arrive."""
    from llmprobe.tracing.ray_runner import actor_errors, ray_session, worker_env

    done = store.done() if store is not None else {}
    if done:
        reporter.log(f"resuming: {len(done)} of {len(comparison.entries)} models were done")
    pending = [e for e in comparison.entries if e.index not in done]
    shared = SharedEncodings()
    encoded: dict[int, list[str]] = {}  # id of a shared encoding -> its prompts as JSON lines, made once
    with _resumable(comparison, store, done), ray_session(ray_options, reporter) as ray:
        actor_class = ray.remote(ModelActor)
        waiting = list(pending)
        running: dict[Any, tuple[Any, ModelEntry]] = {}
        while waiting or running:
            while waiting and len(running) < ray_options.actors:
                entry = waiting.pop(0)
                run = comparison.run(entry).start(comparison.model_options(entry).skeleton(log=reporter.log),
                                                  reporter, shared)
                if id(run.prompts) not in encoded:
                    encoded[id(run.prompts)] = [e.to_json() for e in run.prompts]
                prompts = encoded[id(run.prompts)]
                actor = actor_class.options(num_cpus=ray_options.cpus_per_actor, num_gpus=ray_options.gpus_per_actor,
                                            runtime_env={"env_vars": worker_env()}).remote()
                future = actor.measure.remote(comparison, entry, prompts, keep_traces is not None)
                running[future] = (actor, entry)
            finished, _ = ray.wait(list(running), num_returns=1)
            actor, entry = running.pop(finished[0])
            try:
                with actor_errors():
                    measured = ray.get(finished[0])
            finally:
                ray.kill(actor)
            _commit(measured, store, done, keep_traces, replace_traces, reporter, len(comparison.entries))
    return [done[e.index] for e in comparison.entries]


class ModelActor:
    """One Ray actor per model: load it, trace the prompts the driver encoded, fit, return the row."""

    def measure(self, comparison: Comparison, entry: ModelEntry, prompts: list[str], keep_trace: bool) -> Measured:
        from llmprobe.progress import SILENT
        from llmprobe.tracing.encoding import EncodedPrompt

        loaded = comparison.model_options(entry).load()
        run = comparison.run(entry).start(loaded).for_prompts([EncodedPrompt.from_json(text) for text in prompts])
        return measure(entry, run, model_facts(loaded), comparison.options, loaded.load_seconds, SILENT, keep_trace)


def write_comparison(comparison: Comparison, measured: list[Measured], output: str, replace_existing: bool) -> None:
    """The table (Parquet, or CSV by suffix), with the comparison and every fit summary in its metadata."""
    document = {**comparison.plan(), "prompts": comparison.prompts, "summaries": [m.summary for m in measured]}
    write_table_file(comparison_frame(measured), output, replace_existing,
                     {META_KEY: json.dumps(document).encode("utf-8")})


def compare_models(models: list[str], prompts: str, output: str | None, settings: TraceSettings,
                   options: PosteriorOptions, placement: ModelOptions, ray_options: RayOptions | None = None, *,
                   keep_traces: str | None = None, resume: bool = False, force: bool = False, command: str = "",
                   reporter: Reporter) -> pd.DataFrame:
    """A comparison end to end (see the module docstring): the models expanded, the prompts read and checked,
    ``--prior true`` resolved, the rows an interrupted run kept (``resume``) or a fresh start (``force``), every
    other model measured (on Ray with ``ray_options``), the table written atomically to ``output`` (None: not
    written, nothing resumable); returns the table. Every refusal is one line before any model loads."""
    if resume and output is None:
        raise UsageError("only a comparison written to a file can be resumed; give -o", where="--resume")
    entries = expand_models(models)
    records = read_prompts(prompts)
    check_prompts(records, prompts)
    prior = resolve_prior(options.prior, entries, reporter)
    comparison = Comparison(entries, records, prompts, settings, replace(options, prior=prior), placement, command)
    store = None
    if output is not None:
        store = RowStore(output, comparison.plan())
        if store.exists and not (resume or force):
            raise UsageError(f"an interrupted comparison left its rows in {store.path}; pass --resume to continue it"
                             " or --force to start over", where=output)
        if resume and not store.exists and Path(output).is_file():
            reporter.log(f"{output} is complete: no interrupted comparison to resume (pass --force to run it again)")
            return read_comparison(output).frame
        if resume and store.exists:
            store.check()
        prior_file = prior if Path(prior).is_file() else None
        check_new_output(output, force or resume, inputs=[prompts, *([prior_file] if prior_file else [])])
        if force and not resume:
            store.remove()
    if keep_traces is not None:
        _check_trace_dir(keep_traces, force or resume)
    if ray_options is None:
        measured = run_comparison(comparison, store, reporter, keep_traces, force or resume)
    else:
        measured = run_on_ray(comparison, store, reporter, ray_options, keep_traces, force or resume)
    if output is not None and store is not None:
        write_comparison(comparison, measured, output, force or resume)
        store.remove()
        reporter.log(f"wrote {len(measured)} rows to {output}")
    return comparison_frame(measured)


def _check_trace_dir(directory: str, replace_traces: bool) -> None:
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise UsageError("is not a directory", where="--keep-traces")
    if not path.exists() and not path.parent.is_dir():
        raise UsageError(f"directory {str(path.parent)!r} does not exist", where="--keep-traces")
    if path.is_dir() and not replace_traces and any(path.glob("[0-9][0-9][0-9]-*.parquet")):
        raise UsageError(f"{directory} already holds traces of a comparison; pass --force to replace them",
                         where="--keep-traces")
