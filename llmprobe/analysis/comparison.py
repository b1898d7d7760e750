"""``llmprobe compare``: several models on one set of experiment prompts, one row of Bayesian numbers per model.

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
4. reduced to one :class:`ComparisonRow` (verdict, KL(Bayes‖model), KL to the best filter, γ and its
   interval, α0, entropy error, mass on the categories; step, layers, width, parameters).

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
import math
import re
import shlex
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.version import __version__
from llmprobe.analysis.fit_options import PosteriorOptions
from llmprobe.analysis.fit_tables import write_table_file
from llmprobe.analysis.fits import fit_posterior, posterior_marks
from llmprobe.analysis.marks import CategoryMarks
from llmprobe.analysis.priors import reference_prior
from llmprobe.analysis.results import PosteriorResult
from llmprobe.bayes import mixture_posterior_predictive
from llmprobe.bayes.metrics import kl_bits, total_variation
from llmprobe.control.series import manifest_path, read_series
from llmprobe.errors import ParameterError, UsageError
from llmprobe.files import write_atomic
from llmprobe.model.loading import ModelOptions
from llmprobe.model.sources import DEFAULT_MODEL_NAME, looks_like_path
from llmprobe.progress import Reporter, plural
from llmprobe.tracing.checkpoint import prompts_digest
from llmprobe.tracing.prompts import PromptRecord
from llmprobe.tracing.reader import Trace
from llmprobe.tracing.run import SharedEncodings, TraceRun, release_device_memory
from llmprobe.tracing.settings import TraceSettings

COMPARISON_FORMAT = "llmprobe.comparison/1"
META_KEY = b"llmprobe.comparison"
TRUE_PRIOR = "true"
DEFAULT = "default"
CONTROL_PRIOR = "prior.json"  # what wind-tunnel writes beside a control's weights: its training prior
LOW_MASS = "low-mass"
"""A row's verdict when too few marks carry ``min_mass`` on the categories to fit anything (an untrained
checkpoint): no verdict, since the model is not predicting a category there."""
PROMPTS_NEED = ("compare fits every model against Bayes, so it needs experiment prompts (`llmprobe experiment`)"
                " with categories, targets and marks with running counts")


# ------------------------------------------------------------------------------------------ the models
@dataclass(frozen=True)
class ModelEntry:
    """One model of a comparison as listed; a series contributes one entry per checkpoint."""

    index: int
    spec: str  # what --model takes: a directory, a .gguf file, or "default"
    name: str  # how rows and figures name it
    series: str | None  # a series checkpoint's size (L2-H32), else None
    step: int | None  # training step, where known (a series, or a control's training.json)
    true_prior: str | None  # a control's prior.json: the prior it was trained under


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
    contents = {}
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


# ------------------------------------------------------------------------------------------ one row per model
@dataclass(frozen=True)
class ModelFacts:
    """What a comparison records about a model itself, read from it once loaded."""

    label: str  # the trace metadata's model name
    layers: int | None
    hidden: int | None
    parameters: int
    weights_sha256: str | None


@dataclass(frozen=True)
class ComparisonRow:
    """One model's numbers: the verdict (fit-posterior's, or :data:`LOW_MASS`) and the measures the emergence
    figure draws (the column names of the table).

    ``kl_bits``: mean over marks of KL(Bayes‖model) in bits under ``prior``; ``kl_best_filter_bits``: the mean
    KL(model‖best filter) the verdict reads (the forgetting filter, out of sample where sequences could be held
    out); ``gamma`` and its bootstrap interval; ``alpha0``: the exact-Bayes filter's prior strength;
    ``entropy_mae_bits``: mean |entropy(model) − entropy(Bayes)|; ``mass``: mean probability on the categories."""

    index: int
    name: str
    model: str
    series: str | None
    step: int | None
    layers: int | None
    hidden: int | None
    parameters: int
    verdict: str
    kl_bits: float
    kl_best_filter_bits: float
    gamma: float
    gamma_low: float
    gamma_high: float
    exact_bayes_rejected: bool
    alpha0: float
    entropy_mae_bits: float
    mass: float
    tv: float
    marks: int
    marks_used: int
    prior: str
    weights_sha256: str | None
    load_seconds: float
    trace_seconds: float
    fit_seconds: float

    @classmethod
    def of(cls, entry: ModelEntry, facts: ModelFacts, result: PosteriorResult, prior: str,
           seconds: tuple[float, float, float]) -> ComparisonRow:
        test, distances = result.test, result.distances
        return cls(
            index=entry.index, name=entry.name, model=entry.spec, series=entry.series, step=entry.step,
            layers=facts.layers, hidden=facts.hidden, parameters=facts.parameters, verdict=result.verdict,
            kl_bits=distances.mean_kl_bits, kl_best_filter_bits=result.scores.forgetting.held.kl_bits,
            gamma=float(test.free.gamma), gamma_low=float(test.gamma_ci[0]), gamma_high=float(test.gamma_ci[1]),
            exact_bayes_rejected=bool(test.rejected), alpha0=float(test.exact.alpha0),
            entropy_mae_bits=distances.entropy_mae_bits, mass=distances.mean_mass, tv=distances.mean_tv,
            marks=result.counts.marks, marks_used=result.counts.used, prior=prior,
            weights_sha256=facts.weights_sha256, load_seconds=seconds[0], trace_seconds=seconds[1],
            fit_seconds=seconds[2])


COLUMNS = tuple(f.name for f in fields(ComparisonRow))


@dataclass
class Measured:
    """A model's row, its fit summary (the ``fit-posterior --json`` document) and, when kept, its trace."""

    row: ComparisonRow
    summary: dict[str, Any]
    trace: Trace | None = None


def model_facts(loaded) -> ModelFacts:
    config = loaded.model.config
    return ModelFacts(loaded.source.label, getattr(config, "num_hidden_layers", None),
                      getattr(config, "hidden_size", None), sum(p.numel() for p in loaded.model.parameters()),
                      loaded.source.weights_sha256)


def measure(entry: ModelEntry, run: TraceRun, facts: ModelFacts, options: PosteriorOptions, load_seconds: float,
            reporter: Reporter, keep_trace: bool = False) -> Measured:
    """Trace ``entry`` with its started ``run`` and fit it: ``fit-posterior``'s numbers for its trace (or, when
    too few marks carry ``min_mass`` on the categories to fit, a :data:`LOW_MASS` row)."""
    started = time.perf_counter()
    with reporter.progress(f"{entry.name}: tracing", total=len(run.records)) as advance:
        table = pa.Table.from_batches(list(run.batches(on_prompts_done=advance)), schema=run.schema)
    trace = Trace(table, run.metadata(), run.vocab, entry.name)
    traced = time.perf_counter()
    marks = posterior_marks(trace, facts.label)
    try:
        result = fit_posterior(marks, **asdict(options), reporter=reporter)
    except ParameterError as exc:
        if exc.parameter != "min_mass":
            raise
        reporter.log(f"{entry.name}: {exc.message}; recorded as {LOW_MASS}")
        row, summary = _low_mass(entry, facts, marks, options, (load_seconds, traced - started, 0.0), exc.message)
        return Measured(row, summary, trace if keep_trace else None)
    row = ComparisonRow.of(entry, facts, result, options.prior,
                           (load_seconds, traced - started, time.perf_counter() - traced))
    return Measured(row, result.summary, trace if keep_trace else None)


def _low_mass(entry: ModelEntry, facts: ModelFacts, marks: CategoryMarks, options: PosteriorOptions,
              seconds: tuple[float, float, float], reason: str) -> tuple[ComparisonRow, dict[str, Any]]:
    """The row of a model that puts (almost) no mass on the categories: no fit, no verdict; the mass and, under
    a reference prior, the descriptive KL(Bayes‖model) and TV over every mark (the model renormalized over the
    categories, as fit-posterior averages them)."""
    marks = marks.originals()
    kl = tv = math.nan
    if options.prior != "fit":
        mixture = reference_prior(options.prior, marks.categories).mixture
        bayes = mixture_posterior_predictive(mixture.weights, mixture.alphas, marks.counts)
        kl = float(kl_bits(bayes, marks.probs).mean())
        tv = float(total_variation(bayes, marks.probs).mean())
    mass = float(marks.mass.mean())
    nan = math.nan
    row = ComparisonRow(
        index=entry.index, name=entry.name, model=entry.spec, series=entry.series, step=entry.step,
        layers=facts.layers, hidden=facts.hidden, parameters=facts.parameters, verdict=LOW_MASS, kl_bits=kl,
        kl_best_filter_bits=nan, gamma=nan, gamma_low=nan, gamma_high=nan, exact_bayes_rejected=False, alpha0=nan,
        entropy_mae_bits=nan, mass=mass, tv=tv, marks=len(marks),
        marks_used=int((marks.mass >= options.min_mass).sum()),
        prior=options.prior, weights_sha256=facts.weights_sha256, load_seconds=seconds[0], trace_seconds=seconds[1],
        fit_seconds=seconds[2])
    summary = {"trace": facts.label, "categories": marks.categories, "verdict": LOW_MASS,
               "verdict_sentence": f"no verdict: {reason}", "mean_kl_bits": kl, "mean_tv": tv, "mean_mass": mass}
    return row, summary


# ------------------------------------------------------------------------------------------ resuming
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


# ------------------------------------------------------------------------------------------ the run
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


class _Interrupted(UsageError):
    exit_code = 130


@contextmanager
def _resumable(comparison: Comparison, store: RowStore | None, done: dict[int, Measured]) -> Iterator[None]:
    """Ctrl-C or any failure mid-comparison: the rows committed so far stay, and the line says how to resume."""
    try:
        yield
    except KeyboardInterrupt:
        raise _Interrupted(f"interrupted{_kept(comparison, store, done)}; resume with: {_resume(comparison)}") from None
    except Exception as exc:
        if done and store is not None:
            exc.add_note(f"({_kept(comparison, store, done).removeprefix('; ')}; once the cause is fixed, resume"
                         f" with: {_resume(comparison)})")
        raise


def _kept(comparison: Comparison, store: RowStore | None, done: dict[int, Measured]) -> str:
    if not done or store is None:
        return ""
    return f"; {len(done)} of {len(comparison.entries)} rows are kept in {store.path}"


def _resume(comparison: Comparison) -> str:
    command = comparison.command
    return command if "--resume" in shlex.split(command) else f"{command} --resume"


def trace_path(directory: str, row: ComparisonRow) -> Path:
    """Where ``--keep-traces`` puts a model's trace: ``DIR/003-L2-H32@400.parquet``."""
    return Path(directory) / f"{row.index:03d}-{re.sub(r'[^A-Za-z0-9._@-]+', '_', row.name).strip('_')}.parquet"


def _write_trace(trace: Trace, path: Path, replace_existing: bool) -> None:
    from llmprobe.tracing.writer import open_trace_sink

    with open_trace_sink(str(path), "parquet", trace.table.schema, trace.meta, trace.vocab,
                         replace=replace_existing) as sink:
        for batch in trace.table.to_batches():
            sink.write(batch)


# ------------------------------------------------------------------------------------------ Ray
def run_on_ray(comparison: Comparison, store: RowStore | None, reporter: Reporter, ray_options,
               keep_traces: str | None = None, replace_traces: bool = False) -> list[Measured]:
    """:func:`run_comparison` with each model on its own Ray actor (at most ``ray_options.actors`` at a time).

    The driver encodes the prompts once per distinct tokenizer (on weightless skeletons) and sends each actor
    its model's encoded prompts; an actor loads its model, traces and fits it, and is ended when its row is
    back; rows are committed as they arrive."""
    from llmprobe.tracing.ray_runner import ray_session, worker_env

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
                measured = ray.get(finished[0])
            except Exception as exc:  # Ray wraps what the actor raised
                from llmprobe.tracing.ray_runner import usage_error_in

                cause = usage_error_in(exc)
                raise (cause or exc) from None
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


# ------------------------------------------------------------------------------------------ the table
def comparison_frame(measured: list[Measured]) -> pd.DataFrame:
    return pd.DataFrame([asdict(m.row) for m in measured], columns=list(COLUMNS))


def write_comparison(comparison: Comparison, measured: list[Measured], output: str, replace_existing: bool) -> None:
    """The table (Parquet, or CSV by suffix), with the comparison and every fit summary in its metadata."""
    document = {**comparison.plan(), "prompts": comparison.prompts, "summaries": [m.summary for m in measured]}
    write_table_file(comparison_frame(measured), output, replace_existing,
                     {META_KEY: json.dumps(document).encode("utf-8")})


@dataclass
class ComparisonTable:
    """A comparison read back (``plot-compare``, ``report``): the rows and, from Parquet, the metadata."""

    frame: pd.DataFrame
    meta: dict[str, Any]
    source: str


def is_comparison(path: str | Path) -> bool:
    """Whether ``path`` is a comparison table (a Parquet file carrying the comparison metadata)."""
    try:
        return META_KEY in (pq.read_schema(path).metadata or {})
    except (OSError, pa.ArrowException):
        return False


def read_comparison(source: str) -> ComparisonTable:
    """A ``compare -o`` table (Parquet or CSV); one line naming the file when it is not one."""
    path = Path(source)
    if not path.is_file():
        raise UsageError("no such file", where=source)
    meta: dict[str, Any] = {}
    try:
        if path.read_bytes()[:4] == b"PAR1":
            table = pq.read_table(path)
            raw = (table.schema.metadata or {}).get(META_KEY)
            meta = json.loads(raw) if raw else {}
            frame = table.to_pandas()
        else:
            frame = pd.read_csv(path, dtype={"name": str, "model": str, "series": str, "verdict": str})
    except (OSError, ValueError, pa.ArrowException, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UsageError(f"not a readable comparison table ({str(exc).splitlines()[0]})", where=source) from None
    missing = [c for c in ("name", "step", "parameters", "verdict", "kl_bits") if c not in frame.columns]
    if missing:
        raise UsageError(f"not a comparison table (`llmprobe compare -o`): no {', '.join(missing)} column(s)",
                         where=source)
    if frame.empty:
        raise UsageError("the comparison table has no rows", where=source)
    return ComparisonTable(frame, meta, source)


# ------------------------------------------------------------------------------------------ reading it
@dataclass(frozen=True)
class Turn:
    """Where one group of a comparison (a series' size, else one model) becomes consistent: ``step`` is the first
    checkpoint from which every later one is consistent (None: its last is not)."""

    group: str
    parameters: int
    step: int | None
    last_step: int | None
    last_verdict: str


def group_of(frame: pd.DataFrame) -> pd.Series:
    """Each row's group: its series' size, else its own name."""
    return frame["series"].where(frame["series"].notna(), frame["name"]).astype(str)


def turning_points(frame: pd.DataFrame) -> list[Turn]:
    """Per group, in the table's order, the step at which the verdict turns consistent (see :class:`Turn`)."""
    turns = []
    for group, rows in frame.assign(_group=group_of(frame)).groupby("_group", sort=False):
        rows = rows.sort_values("step", na_position="first")
        consistent = (rows["verdict"] == "consistent").to_numpy()
        tail = len(consistent)
        while tail and consistent[tail - 1]:
            tail -= 1
        step = rows["step"].iloc[tail] if tail < len(rows) else None
        last = rows.iloc[-1]
        turns.append(Turn(str(group), int(last["parameters"]), None if step is None or pd.isna(step) else int(step),
                          None if pd.isna(last["step"]) else int(last["step"]), str(last["verdict"])))
    return turns
