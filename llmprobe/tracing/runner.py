"""``llmprobe trace``, end to end: prompts -> :class:`~llmprobe.tracing.run.TraceRun` -> sink, with progress
on stderr (``--engine ray``: :mod:`llmprobe.tracing.ray_runner`).

Everything that can be checked without the model (option values, prompt file, output path) is
checked first, so a typo fails in a second rather than after a model load; every prompt is encoded
(length, marks) before the first forward pass, so a bad prompt 90,000 fails before hours of work.

A file output is built in a work directory of committed parts (:mod:`llmprobe.tracing.checkpoint`) and
merged into place at the end, so Ctrl-C, SIGTERM, SIGKILL or a power loss lose at most the batch in
flight and ``--resume`` finishes the run. Ctrl-C and SIGTERM stop at once (the batch in flight is
dropped), end the progress bar, say how to resume and exit 130. Every batch is checked for NaN and
Inf before it is written.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

from llmprobe.errors import UsageError, add_note
from llmprobe.model.loading import ModelOptions
from llmprobe.progress import Reporter, plural
from llmprobe.tracing.checkpoint import (DamagedPart, WorkDir, discard, plan_output,
                                        run_fingerprint)
from llmprobe.tracing.prompts import read_prompts
from llmprobe.tracing.ray_runner import RayOptions, run_trace_ray
from llmprobe.tracing.run import TraceRun, prompts_in
from llmprobe.tracing.schema import NonFiniteError
from llmprobe.tracing.settings import TraceSettings
from llmprobe.tracing.writer import check_output, open_trace_sink

class Interrupted(UsageError):
    """Ctrl-C or SIGTERM: reported as one line that says how to resume."""

    exit_code = 130


def default_output(prompts: str) -> str:
    """Stdout when it is a pipe or file, else ``<prompts stem>.parquet`` in the working directory."""
    if not sys.stdout.isatty():
        return "-"
    return "trace.parquet" if prompts == "-" else f"{Path(prompts).stem}.parquet"


def read_targets_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").split("\n")  # -sig: a leading BOM is not a target
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read targets file: {exc}", where=path) from None
    targets = [line.removesuffix("\r") for line in lines if line.strip()]
    if not targets:
        raise UsageError("no targets in file", where=path)
    return targets


def run_trace(prompts: str, output: str, fmt: str, force: bool, input_format: str, settings: TraceSettings,
              model_options: ModelOptions, command: str, out: Reporter, resume: bool = False,
              ray_options: RayOptions | None = None) -> None:
    run = TraceRun(settings, lambda: read_prompts(prompts, input_format), {"command": command, "prompts": prompts})
    if ray_options is not None:
        if resume:
            raise UsageError("the ray engine does not resume; rerun with --force", where="--resume")
        run_trace_ray(run, output, fmt, force, model_options, ray_options, out)
        return
    plan = plan_output(output, force, resume, lambda replace: check_output(output, fmt, replace, inputs=[prompts]))
    if plan.complete:
        out.log(f"{output} is complete: no interrupted run to resume (pass --force to trace it again)")
        return
    loaded = model_options.load(log=out.log)
    run.start(loaded, reporter=out)
    out.log(f"loaded {loaded.source.label} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')})"
            f" in {loaded.load_seconds:.1f} s")
    if output == "-":
        rows = _stream(run, fmt, out)
    else:
        if plan.interrupted and not resume:
            discard(output)
        rows = _checkpointed(run, output, fmt, resume_command(command), out, plan.replace)
    out.log(f"wrote {plural(rows, 'row')} for {plural(len(run.records), 'prompt')} to"
            f" {'stdout' if output == '-' else output}")


def _stream(run: TraceRun, fmt: str, out: Reporter) -> int:
    """Straight to stdout for pipelines: nothing to resume, nothing kept on disk."""
    rows = 0
    with out.progress("tracing", total=len(run.records)) as advance, \
            open_trace_sink("-", fmt, run.schema, run.metadata(), run.vocab) as sink:
        for batch in run.batches(on_prompts_done=advance):
            sink.write(batch)
            rows += batch.num_rows
    return rows


def _checkpointed(run: TraceRun, output: str, fmt: str, resume_with: str, out: Reporter,
                  replace_output: bool = False) -> int:
    """Trace into committed parts, skipping prompts a previous run committed, then merge them into ``output``.

    A resume feeds the engine the plan's windows that still hold unfinished prompts, each from its
    start, so every batch is composed exactly as in an uninterrupted run (same padding, same numbers);
    rows of prompts already committed are recomputed once and dropped. A part found damaged costs only
    its own window; the merge then restores the plan's processing order.
    """
    metadata = run.metadata()
    work = WorkDir.open(output, run_fingerprint(metadata, run.records, fmt), metadata)
    interrupts = Interrupts()
    done = work.done_prompts()
    total = len(run.records)
    bad_numbers = False
    if work.repaired:
        out.log(f"damaged part(s) {', '.join(work.repaired)} dropped: their prompts are traced again")
    if done:
        out.log(f"resuming: {len(done)} of {total} prompts were done")
    try:
        with interrupts.installed():
            with out.progress("tracing", total=total) as advance:
                advance(len(done))
                for batch in run.batches(done):
                    new = prompts_in(batch)
                    with interrupts.deferred():  # so the progress bar and the count we report are exact
                        work.commit(batch, new)
                        done.update(new)
                        advance(len(new))
            rows = 0
            order = run.plan.ranks() if work.repaired else None
            with open_trace_sink(output, fmt, run.schema, work.metadata, run.vocab,
                                 replace=replace_output) as sink:
                for table in work.tables(run.schema, order):
                    sink.write(table)
                    rows += table.num_rows
            work.remove()
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted with {len(done)} of {total} prompts done and saved in {work.path};"
                          f" resume with: {resume_with}") from None
    except Exception as exc:
        bad_numbers = isinstance(exc, NonFiniteError)  # would fail the same way on every try: nothing worth keeping
        if isinstance(exc, DamagedPart):
            add_note(exc, f"resume with: {resume_with}")
        elif not bad_numbers:  # the one line then says how to continue
            add_note(exc, f"{len(done)} of {total} prompts are saved in {work.path}; once the cause is fixed,"
                         f" resume with: {resume_with}")
        raise
    finally:  # any other failure (out of memory, a driver error) may pass on a retry: the work stays
        work.close()
        if bad_numbers:
            discard(output)
    return rows


def resume_command(command: str) -> str:
    return command if "--resume" in shlex.split(command) else f"{command} --resume"


class Interrupts:
    """Ctrl-C and SIGTERM (a job scheduler's stop) end the run at once, except inside a commit, which
    completes first; either way the committed work stays resumable."""

    def __init__(self) -> None:
        self._deferring = False
        self._pending = False

    def _handle(self, signum, frame) -> None:
        if self._deferring:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt
