"""One trace run, end to end: prompts -> model -> engine -> sink, with progress on stderr.

Everything that can be checked without the model (prompt file, output path, option values) is
checked first, so a typo fails in a second rather than after a model load; every prompt is encoded
(length, marks) before the first forward pass, so a bad prompt 90,000 fails before hours of work.

A file output is built in a work directory of committed parts (:mod:`llmprobe.tracing.checkpoint`) and
merged into place at the end, so Ctrl-C, SIGTERM, SIGKILL or a power loss lose at most the batch in
flight and ``--resume`` finishes the run. Ctrl-C and SIGTERM stop at once (the batch in flight is
dropped), end the progress bar, say how to resume and exit 130. Every batch is checked for NaN and
Inf before it is written.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from llmprobe.tracing.checkpoint import WorkDir, check_not_a_link, discard, is_locked, run_fingerprint, work_dir_for
from llmprobe.tracing.engine import TraceSettings, Tracer
from llmprobe.errors import UsageError
from llmprobe.progress import Reporter, plural
from llmprobe.model.loading import ModelOptions
from llmprobe.tracing.prompts import PromptRecord, read_prompts
from llmprobe.tracing.ray_runner import RayOptions, run_trace_ray
from llmprobe.tracing.schema import check_finite
from llmprobe.tracing.writer import check_output, open_trace_sink

class Interrupted(UsageError):
    """Ctrl-C or SIGTERM: reported as one line that says how to resume."""

    exit_code = 130


def default_output(prompts: str) -> str:
    """Stdout when it is a pipe or file, else ``<prompts stem>.parquet`` in the working directory."""
    if not sys.stdout.isatty():
        return "-"
    return "trace.parquet" if prompts == "-" else f"{Path(prompts).stem}.parquet"


def targets_from_records(records: list[PromptRecord]) -> list[str]:
    """The ``targets`` field that experiment prompts carry; all records must agree."""
    found = {tuple(r.meta["targets"]) for r in records if isinstance(r.meta.get("targets"), list)}
    if len(found) > 1:
        raise UsageError("prompts carry different \"targets\" lists; trace them separately or pass --targets")
    return list(found.pop()) if found else []


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
    settings.validate()
    records = read_prompts(prompts, input_format)
    if ray_options is not None:
        if resume:
            raise UsageError("the ray engine does not resume; rerun with --force", where="--resume")
        settings.targets = settings.targets or targets_from_records(records)
        run_trace_ray(records, output, fmt, force, settings, model_options, ray_options,
                      {"command": command, "prompts": prompts, "n_prompts": len(records)}, out)
        return
    if resume and output == "-":
        raise UsageError("a trace written to stdout cannot be resumed; write it to a file with -o", where="--resume")
    if output != "-":
        check_not_a_link(work_dir_for(output), output)
    interrupted = output != "-" and os.path.lexists(work_dir_for(output))
    if interrupted and is_locked(output):
        raise UsageError(f"another llmprobe trace is writing it right now (its work is in {work_dir_for(output)});"
                         " wait for it to finish or choose another -o", where=output)
    if interrupted and not (resume or force):
        raise UsageError(f"an interrupted run left its work in {work_dir_for(output)}; pass --resume to continue"
                         " it or --force to start over", where=output)
    if resume and not interrupted and not force and os.path.isfile(output):
        check_output(output, fmt, True, inputs=[prompts])
        out.log(f"{output} is complete: no interrupted run to resume (pass --force to trace it again)")
        return
    check_output(output, fmt, force or (resume and interrupted), inputs=[prompts])
    replace_output = force or (resume and os.path.lexists(output))  # a merge that crashed after its rename
    if not settings.targets:
        settings.targets = targets_from_records(records)
    loaded = model_options.load(log=out.log)
    tracer = Tracer(loaded, settings, reporter=out)
    refuse_overlong(tracer, records)
    for record in records:
        tracer.encode(record)
    out.log(f"loaded {loaded.source.label} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')})"
            f" in {loaded.load_seconds:.1f} s")
    metadata = {**tracer.metadata(), "command": command, "prompts": prompts, "n_prompts": len(records)}
    if output == "-":
        rows = _stream(tracer, records, fmt, metadata, out)
    else:
        if interrupted and not resume:
            discard(output)
        rows = _checkpointed(tracer, records, output, fmt, metadata, resume_command(command), out, replace_output)
    out.log(f"wrote {plural(rows, 'row')} for {plural(len(records), 'prompt')} to {'stdout' if output == '-' else output}")


def refuse_overlong(tracer: Tracer, records: list[PromptRecord]) -> None:
    """Refuse, before tokenizing it, a prompt too long for the context whatever its tokenization.

    A token covers at most as many characters as the longest vocabulary entry (four times that, for
    tokenizers whose normalizer merges characters), so a prompt with more characters than that many
    times the context cannot fit: a 46 MB line fails in milliseconds instead of after a minute of
    tokenizing. Shorter prompts are measured exactly by :meth:`Tracer.encode`.
    """
    if tracer.settings.truncate is not None or not tracer.max_context:
        return
    limit = tracer.max_context - tracer.settings.max_new_tokens
    chars_per_token = 4 * max(map(len, tracer.tokenizer.get_vocab()), default=1)
    for record in records:
        if len(record.text) > limit * chars_per_token:
            raise UsageError(f"prompt has {len(record.text)} characters, so at least {len(record.text) // chars_per_token}"
                             f" tokens, but the model's context is {tracer.max_context} tokens; shorten it or pass"
                             " --truncate left|right", where=f"prompt {record.id!r} (line {record.line})")


def _stream(tracer: Tracer, records: list[PromptRecord], fmt: str, metadata: dict, out: Reporter) -> int:
    """Straight to stdout for pipelines: nothing to resume, nothing kept on disk."""
    rows = 0
    with out.progress("tracing", total=len(records)) as advance, \
            open_trace_sink("-", fmt, tracer.schema, metadata, tracer.vocab) as sink:
        for batch in tracer.trace(records, on_prompts_done=advance):
            check_finite(batch, records)
            sink.write(batch)
            rows += batch.num_rows
    return rows


def _checkpointed(tracer: Tracer, records: list[PromptRecord], output: str, fmt: str, metadata: dict,
                  resume_with: str, out: Reporter, replace_output: bool = False) -> int:
    """Trace into committed parts, skipping prompts a previous run committed, then merge them into ``output``.

    A resume feeds the engine from the start of the first length-sorting window with unfinished
    prompts, so every batch is composed exactly as in an uninterrupted run (same padding, same
    numbers); batches that were already committed are recomputed once and dropped. Windows whose
    prompts are all committed are skipped, so a part found damaged costs only its own window.
    """
    work = WorkDir.open(output, run_fingerprint(metadata, records, fmt), metadata)
    interrupts = _Interrupts()
    done = work.done_prompts()
    bad_numbers = False
    if work.repaired:
        out.log(f"damaged part(s) {', '.join(work.repaired)} dropped: their prompts are traced again")
    if done:
        out.log(f"resuming: {len(done)} of {len(records)} prompts were done")
    try:
        with interrupts.installed():
            with out.progress("tracing", total=len(records)) as advance:
                advance(len(done))
                for batch in _remaining_batches(tracer, records, done):
                    indices = batch.column("prompt_index")
                    new = sorted(set(indices.to_pylist()) - done)
                    if not new:
                        continue
                    if len(new) < len(set(indices.to_pylist())):
                        batch = batch.filter(pc.is_in(indices, value_set=pa.array(new, indices.type)))
                    try:
                        check_finite(batch, records)
                    except UsageError:  # would fail the same way on every try: nothing worth keeping
                        bad_numbers = True
                        raise
                    with interrupts.deferred():  # so the progress bar and the count we report are exact
                        work.commit(batch, new)
                        done.update(new)
                        advance(len(new))
            rows = 0
            order = processing_ranks(tracer, records) if work.repaired else None
            with open_trace_sink(output, fmt, tracer.schema, work.metadata, tracer.vocab,
                                 replace=replace_output) as sink:
                for table in work.tables(tracer.schema, order):
                    sink.write(table)
                    rows += table.num_rows
            work.remove()
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted with {len(done)} of {len(records)} prompts done and saved in {work.path};"
                          f" resume with: {resume_with}") from None
    except Exception as exc:
        if not isinstance(exc, UsageError) or not bad_numbers:  # the one line then says how to continue
            exc.add_note(f"{len(done)} of {len(records)} prompts are saved in {work.path}; once the cause is fixed,"
                         f" resume with: {resume_with}")
        raise
    finally:  # any other failure (out of memory, a driver error) may pass on a retry: the work stays
        work.close()
        if bad_numbers:
            discard(output)
    return rows


def _remaining_batches(tracer: Tracer, records: list[PromptRecord], done: set[int]) -> Iterator[pa.RecordBatch]:
    """The engine's batches of every window holding unfinished prompts, each window fed from its start."""
    window = tracer.settings.window_prompts
    start = resume_start(done, len(records), window)
    while start < len(records):
        if any(i not in done for i in range(start, min(start + window, len(records)))):
            yield from tracer.trace(records[start:start + window])
        start += window


def processing_ranks(tracer: Tracer, records: list[PromptRecord]) -> list[int]:
    """Each prompt's place in an uninterrupted run's processing order (longest first within each window)."""
    window = tracer.settings.window_prompts
    ranks = [0] * len(records)
    rank = 0
    for start in range(0, len(records), window):
        chunk = records[start:start + window]
        for record in sorted(chunk, key=lambda r: -len(tracer.encode(r).ids)):
            ranks[record.index] = rank
            rank += 1
    return ranks


def resume_start(done: set[int], n_prompts: int, window: int) -> int:
    """Index of the first prompt of the first engine window that has unfinished prompts."""
    first_missing = next((i for i in range(n_prompts) if i not in done), n_prompts)
    return n_prompts if first_missing == n_prompts else first_missing - first_missing % window


def resume_command(command: str) -> str:
    return command if "--resume" in shlex.split(command) else f"{command} --resume"


class _Interrupts:
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
