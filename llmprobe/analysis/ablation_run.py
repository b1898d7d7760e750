"""Running ``llmprobe ablate``: prompts in, a sweep table out, one committed row per component.

1. Before the model loads: the options (:class:`~llmprobe.analysis.ablation.SweepOptions`,
   :class:`~llmprobe.analysis.fit_options.PosteriorOptions`), the prompts — read, and checked to be what
   a fit reads (experiment prompts: targets, marks with running counts, outcomes) — and the output
   (:func:`~llmprobe.tracing.checkpoint.plan_output`: an interrupted sweep is resumed with ``--resume``
   or thrown away with ``--force``, never silently).
2. The run is started on the model (on a Ray driver, its weightless skeleton): the prompts encoded
   once, the plan made, the components listed (layers and heads checked against the model).
3. With ``-o``, a work directory beside the output (``.OUTPUT.parts/``,
   :class:`~llmprobe.tracing.checkpoint.WorkDir`, its fingerprint the run's plus the sweep's and the
   fit's options) receives one part per component: a row is done when its part and manifest line are
   durable. A killed sweep continues at the next component (``--resume``); each row depends only on
   the prompts, the model, the options and the baseline pass, which a resume repeats exactly, so the
   rows are those of an uninterrupted sweep. Ctrl-C and SIGTERM wait for a commit in progress.
4. The local engine runs one :class:`~llmprobe.tracing.sweep.SweepEngine` (its baseline pass, then the
   components in order, progress with the time left on stderr); each component's fit (numpy and scipy,
   one core) runs in a worker process (``fit_workers``) while the model scores the next component, so the
   model's forward passes and the fits overlap. A fit is deterministic, so where it runs changes no number.
   ``--engine ray``: each actor of a Ray Data pool loads the model, runs the baseline pass and scores (and
   fits) the components it is handed (:class:`SweepActor`); the driver commits rows as they arrive.
5. The rows are merged in component order, the baseline-relative columns added
   (:func:`~llmprobe.analysis.ablation.finished_table`) and the table written atomically.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.analysis.ablation import (
    SWEEP_FORMAT,
    SWEEP_SCHEMA,
    Sweep,
    FitJob,
    SweepOptions,
    finished_table,
    open_sweep,
    rows_table,
    sweep_components,
    sweep_of,
)
from llmprobe.analysis.fit_options import PosteriorOptions
from llmprobe.analysis.fits import POSTERIOR_INPUT, posterior_marks
from llmprobe.analysis.marks import sequence_inputs
from llmprobe.errors import ParameterError, UsageError, add_note
from llmprobe.files import atomic_file, check_new_output
from llmprobe.model.loading import ModelOptions
from llmprobe.progress import Reporter, plural
from llmprobe.tracing.reader import Trace
from llmprobe.tracing.settings import TraceSettings


def check_fit_inputs(records: list, targets: list[str], source: str) -> None:
    """Refuse, before a model loads, prompts a fit cannot read: the marks and metadata of ``records``
    through the fit's own reader, with placeholder scores."""
    if not targets:
        raise UsageError(f"the prompts carry no targets; a sweep needs {POSTERIOR_INPUT}", where=source)
    rows = [(r, i, mark) for r in records for i, mark in enumerate(r.marks)]
    if not rows:
        raise UsageError(f"the prompts have no marks; a sweep needs {POSTERIOR_INPUT}", where=source)
    table = pa.table({
        "prompt_index": pa.array([r.index for r, _, _ in rows], pa.int32()),
        "prompt_id": pa.array([r.id for r, _, _ in rows], pa.string()),
        "position": pa.array([i for _, i, _ in rows], pa.int32()),
        "target_seq_logprobs": pa.array([[0.0] * len(targets)] * len(rows), pa.list_(pa.float32(), len(targets))),
        "mark_index": pa.array([i for _, i, _ in rows], pa.int32()),
        "mark": pa.array([json.dumps(mark) for _, _, mark in rows], pa.string()),
        "meta": pa.array([json.dumps(r.meta) if r.meta else None for r, _, _ in rows], pa.string()),
    })
    marks = posterior_marks(Trace(table, {"targets": [{"text": t} for t in targets]}, None, source), source)
    if marks.counts is None:
        raise UsageError(f"the marks carry no running counts; a sweep needs {POSTERIOR_INPUT}", where=source)
    sequence_inputs(marks, f"a sweep needs {POSTERIOR_INPUT}")


def fit_job(engine, index: int, component, fit: PosteriorOptions, trace_meta: dict[str, Any]) -> FitJob:
    """A component scored by ``engine`` (a :class:`~llmprobe.tracing.sweep.SweepEngine`), ready to be fitted."""
    scores = engine.scores(component)
    return FitJob(index, component, engine.marks_table(scores), scores, engine.baseline, engine.measured,
                  engine.directions.get(component.name), trace_meta, fit)


def score_component(engine, index: int, component, fit: PosteriorOptions, trace_meta: dict[str, Any]) -> dict:
    """One component's row, scored and fitted here."""
    return fit_job(engine, index, component, fit, trace_meta).row()


def fitted_row(job: FitJob) -> dict:
    """A worker process's task: one component's fit."""
    return job.row()


def default_fit_workers() -> int:
    """Processes that fit while the model scores: half the CPUs (the model keeps the other half busy), at least 1."""
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass
class FitPool:
    """Worker processes for the fits (:func:`fit_pool`)."""

    executor: ProcessPoolExecutor
    workers: int


@contextmanager
def fit_pool(workers: int) -> Iterator[FitPool | None]:
    """``workers`` processes for the fits (None: fit in this process). They ignore Ctrl-C (the sweep handles it);
    on the way out, fits not started are dropped and running ones finish."""
    if workers == 0:
        yield None
        return
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    try:
        yield FitPool(executor, workers)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def make_engine(run, options: SweepOptions, components: list, reporter: Reporter):
    from llmprobe.tracing.sweep import SweepEngine

    return SweepEngine(run, options.ablation, options.direction_layers() if options.over == "directions" else {},
                       options.random_controls, options.seed, options.sites(components), reporter=reporter)


class SweepActor:
    """One per Ray actor: loads the model once, runs the baseline pass, then scores the components it is handed."""

    def __init__(self, model_options: ModelOptions, settings: TraceSettings, prompts: list[str],
                 options: SweepOptions, fit: PosteriorOptions, components: list, trace_meta: dict[str, Any]) -> None:
        from llmprobe.progress import SILENT
        from llmprobe.tracing.encoding import EncodedPrompt
        from llmprobe.tracing.run import TraceRun

        run = TraceRun(settings, []).start(model_options.load())
        run = run.for_prompts([EncodedPrompt.from_json(text) for text in prompts])
        self.engine = make_engine(run, options, components, SILENT)
        self.components, self.fit, self.trace_meta = components, fit, trace_meta

    def __call__(self, block: pa.Table) -> pa.Table:
        return rows_table([score_component(self.engine, index, self.components[index], self.fit, self.trace_meta)
                           for index in block.column("index").to_pylist()])


def run_ablation(prompts: str, output: str | None, options: SweepOptions, fit: PosteriorOptions,
                 settings: TraceSettings, model_options: ModelOptions, out: Reporter, *, command: str,
                 force: bool = False, resume: bool = False, ray_options=None, input_format: str = "auto",
                 inputs: Sequence[str] = (), fit_workers: int | None = None) -> Sweep:
    """A sweep, end to end (see the module docstring); returns the finished table. ``inputs``: files besides
    the prompts that the output must not be (a prior file); ``fit_workers``: processes that fit components
    while the model scores the next ones (None: :func:`default_fit_workers`; 0: fit in this process)."""
    from llmprobe.model.structure import DecoderBlocks
    from llmprobe.tracing.checkpoint import WorkDir, discard, plan_output, run_fingerprint
    from llmprobe.tracing.prompts import read_prompts
    from llmprobe.tracing.run import TraceRun
    from llmprobe.tracing.runner import Interrupted, Interrupts, resume_command

    if resume and output is None:
        raise UsageError("a sweep without -o cannot be resumed; write it to a file with -o", where="--resume")
    if ray_options is not None:
        ray_options.validate()
    fit_workers = default_fit_workers() if fit_workers is None else fit_workers
    if fit_workers < 0:
        raise ParameterError("fit_workers", f"must be 0 or more, got {fit_workers}")
    run = TraceRun(settings, lambda: read_prompts(prompts, input_format),
                   {"command": command, "prompts": prompts, "engine": "local" if ray_options is None else "ray"})
    check_fit_inputs(run.records, run.settings.targets, prompts)
    plan = None
    if output is not None:
        plan = plan_output(output, force, resume,
                           lambda replace: check_new_output(output, replace, inputs=[prompts, *inputs]), what="sweep")
        if plan.complete:
            out.log(f"{output} is complete: no interrupted sweep to resume (pass --force to run it again)")
            return open_sweep(output)
    loaded = model_options.skeleton(log=out.log) if ray_options is not None else model_options.load(log=out.log)
    run.start(loaded, reporter=out)
    blocks = DecoderBlocks.of(loaded.model)
    components = sweep_components(options, len(blocks), blocks.n_heads)
    metadata = {**run.metadata(), "format": SWEEP_FORMAT, "sweep": asdict(options), "fit": asdict(fit),
                "components": [c.name for c in components]}
    trace_meta = {"model": metadata.get("model"), "targets": metadata["targets"]}
    done: dict[int, pa.Table] = {}
    work = None
    if output is not None:
        if plan.interrupted and not resume:
            discard(output)
        fingerprint = {**run_fingerprint(metadata, run.records, "sweep"), "sweep": metadata["sweep"],
                       "fit": metadata["fit"], "components": metadata["components"]}
        work = WorkDir.open(output, fingerprint, metadata)
        if work.repaired:
            out.log(f"damaged part(s) {', '.join(work.repaired)} dropped: their components are scored again")
        for table in work.tables(SWEEP_SCHEMA):
            done.update({index: table.slice(i, 1) for i, index in enumerate(table.column("index").to_pylist())})
        if done:
            out.log(f"resuming: {len(done)} of {len(components)} components were done")
    interrupts = Interrupts()
    pending = [i for i in range(len(components)) if i not in done]

    def commit(row: dict) -> None:
        with interrupts.deferred():
            batch = rows_table([row])
            if work is not None:
                work.commit(batch.to_batches()[0], [row["index"]])
            done[row["index"]] = batch

    out.log(f"ablating {plural(len(components) - 1, 'component')} one at a time, over"
            f" {plural(len(run.records), 'prompt')}" + (" on Ray" if ray_options is not None else ""))
    try:
        with interrupts.installed():
            engine = make_engine(run, options, components, out) if ray_options is None and pending else None
            with out.progress("ablating", total=len(components)) as advance:
                advance(len(done))
                if engine is not None:
                    _sweep_here(engine, components, pending, fit, trace_meta, fit_workers, commit, advance)
                elif pending:
                    _sweep_on_ray(run, options, fit, components, pending, trace_meta, model_options, ray_options,
                                  commit, advance, out)
            table = finished_table(list(done.values()), metadata)
            if output is not None:
                with atomic_file(output, "wb", replace=plan.replace) as stream:
                    pq.write_table(table, stream)
                work.remove()
                out.log(f"wrote {plural(table.num_rows, 'row')} (the baseline and"
                        f" {plural(table.num_rows - 1, 'component')}) to {output}")
    except KeyboardInterrupt:
        where = f" and saved in {work.path}; resume with: {resume_command(command)}" if work is not None else ""
        raise Interrupted(f"interrupted with {len(done)} of {len(components)} components done{where}") from None
    except Exception as exc:
        if work is not None:
            add_note(exc, f"{len(done)} of {len(components)} components are saved in {work.path}; once the cause is"
                         f" fixed, resume with: {resume_command(command)}")
        raise
    finally:
        if work is not None:
            work.close()
    return sweep_of(table)


def _sweep_here(engine, components: list, pending: list[int], fit: PosteriorOptions, trace_meta: dict[str, Any],
                workers: int, commit: Callable[[dict], None], advance: Callable[[int], None]) -> None:
    """The baseline fitted first, here (nothing can be read without it), then the other components."""
    if pending and pending[0] == 0:
        commit(score_component(engine, 0, components[0], fit, trace_meta))
        advance(1)
        pending = pending[1:]
    with fit_pool(workers) as pool:
        score_components(engine, components, pending, fit, trace_meta, pool, commit, advance)


def score_components(engine, components: list, indices: list[int], fit: PosteriorOptions, trace_meta: dict[str, Any],
                     pool: FitPool | None, commit: Callable[[dict], None],
                     advance: Callable[[int], None]) -> None:
    """``components[indices]`` scored in order by the model, each fitted in ``pool`` (None: here) while the model
    scores the next ones; rows are committed as their fits finish (in any order), with at most two fits per
    worker waiting."""
    running: set[Future] = set()

    def settle(until: int) -> None:
        nonlocal running
        while len(running) > until:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                commit(future.result())
                advance(1)
    for index in indices:
        job = fit_job(engine, index, components[index], fit, trace_meta)
        if pool is None:
            commit(job.row())
            advance(1)
            continue
        running.add(pool.executor.submit(fitted_row, job))
        settle(2 * pool.workers)
    settle(0)


def _sweep_on_ray(run, options: SweepOptions, fit: PosteriorOptions, components: list, pending: list[int],
                  trace_meta: dict[str, Any], model_options: ModelOptions, ray_options, commit: Callable[[dict], None],
                  advance: Callable[[int], None], out: Reporter) -> None:
    """The pending components spread over a Ray Data actor pool (:class:`SweepActor`), one component per task;
    rows are committed as they arrive, in whatever order."""
    from llmprobe.tracing.ray_runner import actor_errors, actor_pool, ray_session

    with ray_session(ray_options, out) as ray:
        dataset = ray.data.from_items([{"index": i} for i in pending], override_num_blocks=len(pending))
        scored = dataset.map_batches(
            SweepActor, fn_constructor_args=(model_options, run.settings, [e.to_json() for e in run.prompts], options,
                                             fit, components, trace_meta),
            batch_size=1, **actor_pool(ray, ray_options))
        with actor_errors():
            for block in scored.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in block.to_pylist():
                    commit(row)
                    advance(1)
