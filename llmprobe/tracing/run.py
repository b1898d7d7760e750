"""One trace run: settings and prompts in, checked record batches and their metadata out.

Every way of tracing goes through :class:`TraceRun`: the local runner (``llmprobe trace``, streamed or
checkpointed and resumable), the Ray runner's driver and actors, the notebook API
(:func:`llmprobe.api.trace_table`) and the benchmarks. It is the one place that builds the engine
(:class:`~llmprobe.tracing.engine.Tracer`), and does each step of the pipeline once:

1. ``TraceRun(settings, records, context)``, no model needed: the settings are validated (once, before
   the prompts are read: ``records`` may be a function that reads them, so a bad option fails before
   stdin is consumed); the targets are settled (``--targets``, else the ``targets`` field the prompts
   carry) into the run's own copy of the settings, the caller's left as they were.
2. :meth:`TraceRun.start` with a loaded model (or a weightless skeleton, on a Ray driver): the engine
   is built (the checks that need the model), every prompt is encoded once (over-long ones refused
   before any is tokenized), the run is planned (:class:`TracePlan`), and what its interventions need
   first is done (:meth:`~llmprobe.tracing.engine.Tracer.prepare`: a patch's donors read and matched,
   a mean ablation's first pass over the plan's batches).
3. :meth:`TraceRun.batches`: the plan's windows through the engine, each record batch checked for NaN
   and Inf before it is handed out; a resume passes the prompts already committed, and gets the
   windows that still hold others, rows of committed prompts dropped. :meth:`TraceRun.metadata` is
   the trace's key-value metadata (model, settings, targets, versions, and the caller's context).

Invariants: a prompt is tokenized once per run (a resume or a repair reuses the encoded prompts and
the plan; a Ray driver encodes, its actors only trace, :meth:`TraceRun.for_prompts`); the processing
order — windows of ``window_prompts`` consecutive prompts, each longest first, cut into batches in
that order — exists only in :class:`TracePlan`, and resuming, repairing and merging derive from it,
so a resumed run forms exactly the batches (same padding, same numbers) of an uninterrupted one.

Where later work plugs in
-------------------------
* Interventions (issue 22): a field of :class:`~llmprobe.tracing.settings.TraceSettings` describes
  them (:mod:`llmprobe.tracing.interventions`), so they are recorded in the metadata and the resume
  fingerprint; the engine attaches their edits (:mod:`llmprobe.tracing.editing`) in the per-batch hook
  block. A sweep over components (:mod:`llmprobe.tracing.sweep`) is one run too: it reuses this run's
  engine, encoded prompts and plan, and per batch runs the residual stream entering block L through
  blocks >= L once per component.
* Model comparisons (``llmprobe compare``): one run per model over the same records. An encoding
  depends only on the tokenizer, the context length and the settings
  (:meth:`~llmprobe.tracing.encoding.PromptEncoder.key`), so :meth:`TraceRun.start` takes a
  :class:`SharedEncodings` and reuses the encoded prompts and plan of an earlier run whose encoder has
  the same key: the prompts are tokenized, and the run planned, once per distinct tokenizer.
"""

from __future__ import annotations

import copy
import gc
import platform
import time
from dataclasses import asdict, replace
from typing import Any
from collections.abc import Callable, Collection, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from llmprobe.version import __version__
from llmprobe.errors import UsageError
from llmprobe.model.loading import LoadedModel
from llmprobe.progress import SILENT, Reporter
from llmprobe.tracing.encoding import EncodedPrompt, PromptEncoder
from llmprobe.tracing.engine import Tracer
from llmprobe.tracing.prompts import PromptRecord
from llmprobe.tracing.schema import check_finite
from llmprobe.tracing.settings import TraceSettings


def targets_from_records(records: Sequence[PromptRecord]) -> list[str]:
    """The ``targets`` field that experiment prompts carry; all records must agree."""
    found = {tuple(r.meta["targets"]) for r in records if isinstance(r.meta.get("targets"), list)}
    if len(found) > 1:
        raise UsageError("prompts carry different \"targets\" lists; trace them separately or pass --targets")
    return list(found.pop()) if found else []


def release_device_memory() -> None:
    """Collect what the last model left (a comparison drops each model before loading the next) and hand
    cached accelerator memory back to the device."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompts_in(batch: pa.RecordBatch) -> list[int]:
    """The prompt indices whose rows a record batch holds, ascending."""
    return sorted(set(batch.column("prompt_index").to_pylist()))


class TracePlan:
    """The order a run traces its prompts in: windows of ``window_prompts`` consecutive prompts (input
    order), each sorted longest first (ties in input order), which the engine cuts into batches in
    that order. Length-sorting within a window keeps padding low; a window is also the unit a resume
    restarts at, since its batches depend on every prompt in it."""

    def __init__(self, prompts: Sequence[EncodedPrompt], window_prompts: int) -> None:
        self.windows: list[list[EncodedPrompt]] = [
            sorted(prompts[start : start + window_prompts], key=lambda e: -len(e.ids))
            for start in range(0, len(prompts), window_prompts)]

    def remaining(self, done: Collection[int]) -> list[list[EncodedPrompt]]:
        """The windows holding a prompt not in ``done`` (prompt indices), each to be traced from its start."""
        return [window for window in self.windows if any(e.record.index not in done for e in window)]

    def ranks(self) -> dict[int, int]:
        """Each prompt's place in the processing order (the merge's row order after a repair)."""
        return {e.record.index: rank for rank, e in enumerate(e for window in self.windows for e in window)}


class SharedEncodings:
    """Encoded prompts and their plan, shared by runs over the same records whose encoders have equal keys."""

    def __init__(self) -> None:
        self._found: dict[str, tuple[list[PromptRecord], list[EncodedPrompt], TracePlan]] = {}
        self.encoded = 0  # how many runs encoded their prompts (the others reused an earlier run's)

    @staticmethod
    def key(encoder: PromptEncoder, settings: TraceSettings) -> str | None:
        """What must be equal for two runs to share an encoding: the encoder, and the plan's windows."""
        encoder_key = encoder.key()
        return None if encoder_key is None else f"{encoder_key}/{settings.window_prompts}"

    def get(self, key: str | None, records: list[PromptRecord]) -> tuple[list[EncodedPrompt], TracePlan] | None:
        found = self._found.get(key) if key is not None else None
        if found is None or found[0] != records:
            return None
        return found[1], found[2]

    def add(self, key: str | None, records: list[PromptRecord], prompts: list[EncodedPrompt], plan: TracePlan) -> None:
        self.encoded += 1
        if key is not None:
            self._found[key] = (records, prompts, plan)


class TraceRun:
    """One trace run (see the module docstring): construct, :meth:`start` with a model, then :meth:`batches`."""

    tracer: Tracer  # these three are set by start()
    encoder: PromptEncoder
    plan: TracePlan

    def __init__(self, settings: TraceSettings, records: Sequence[PromptRecord] | Callable[[], list[PromptRecord]],
                 context: dict[str, Any] | None = None) -> None:
        settings.validate()
        self.records: list[PromptRecord] = list(records() if callable(records) else records)
        self.settings = replace(settings, targets=list(settings.targets) or targets_from_records(self.records))
        self.context = dict(context or {})  # the caller's metadata: command, prompts file, engine...
        self.context.setdefault("n_prompts", len(self.records))
        self.prompts: list[EncodedPrompt] = []

    def start(self, loaded: LoadedModel, reporter: Reporter = SILENT,
              shared: SharedEncodings | None = None) -> TraceRun:
        """Build the engine for ``loaded``, encode every prompt (once) and plan the run; returns the run.
        With ``shared``, prompts another run encoded with an equal encoder are reused, not encoded again."""
        self.tracer = Tracer(loaded, self.settings, reporter)
        self.encoder = PromptEncoder.for_model(loaded, self.settings)
        key = None if shared is None else shared.key(self.encoder, self.settings)
        found = None if shared is None else shared.get(key, self.records)
        if found is not None:
            self.prompts, self.plan = found
        else:
            self._with(self.encoder.encode_all(self.records))
            if shared is not None:
                shared.add(key, self.records, self.prompts, self.plan)
        self.tracer.prepare(self.encoder, self.prompts, self.plan.windows)
        return self

    def for_prompts(self, prompts: list[EncodedPrompt]) -> TraceRun:
        """This run — settings, engine, metadata — over prompts encoded elsewhere (a Ray actor's block,
        encoded by the driver), planned afresh and never tokenized again."""
        return copy.copy(self)._with(prompts)

    def _with(self, prompts: list[EncodedPrompt]) -> TraceRun:
        self.prompts = prompts
        self.records = [e.record for e in prompts]
        self.plan = TracePlan(prompts, self.settings.window_prompts)
        return self

    @property
    def schema(self) -> pa.Schema:
        return self.tracer.schema

    @property
    def vocab(self) -> list[str]:
        return self.tracer.vocab

    def metadata(self) -> dict[str, Any]:
        """The trace's key-value metadata: what produced it (model, settings, targets, versions), then the context."""
        import torch
        import transformers

        tracer = self.tracer
        return {
            "llmprobe_version": __version__,
            **tracer.loaded.provenance(),
            "settings": asdict(self.settings),
            "targets": [
                {"text": t, "token_ids": ids, "tokens": [tracer.vocab[i] for i in ids]}
                for t, ids in zip(self.settings.targets, tracer.target_tokens)
            ],
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "python_version": platform.python_version(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **tracer.internals.metadata(tracer.model),
            **({"interventions": tracer.editor.metadata()} if tracer.editor else {}),
            **self.context,
        }

    def batches(self, done: Collection[int] = frozenset(),
                on_prompts_done: Callable[[int], None] = lambda n: None) -> Iterator[pa.RecordBatch]:
        """The run's record batches in processing order, each checked for NaN and Inf.

        ``done``: prompt indices already traced (a resume). Only the plan's windows that hold other
        prompts are traced, each from its start so its batches are formed as in an uninterrupted run;
        rows of prompts in ``done`` are dropped, and a batch left empty is not handed out.
        """
        done = frozenset(done)
        by_index = {e.record.index: e.record for e in self.prompts}
        for window in self.plan.remaining(done):
            for batch in self.tracer.trace(window, on_prompts_done):
                if done:
                    present = prompts_in(batch)
                    new = [i for i in present if i not in done]
                    if not new:
                        continue
                    if len(new) < len(present):
                        indices = batch.column("prompt_index")
                        batch = batch.filter(pc.is_in(indices, value_set=pa.array(new, indices.type)))
                check_finite(batch, by_index)
                yield batch

    def table(self) -> pa.Table:
        """Every record batch of the run, as one table in processing order."""
        return pa.Table.from_batches(list(self.batches()), schema=self.schema)
