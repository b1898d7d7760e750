"""The sweep engine (issue 22 part 4): one run, many components ablated one at a time, scored at the marks.

``llmprobe ablate`` asks what each component (a head, an attention or MLP output, a block, a direction
of the residual stream) does to the Bayesian score. Tracing once per component would redo, every
time, what ablating a component in block L leaves unchanged, so :class:`SweepEngine` works on one
:class:`~llmprobe.tracing.run.TraceRun` (its engine, its encoded prompts, its plan, its targets
tokenized once) and does:

1. A baseline pass, per batch of the plan (the trace's own batches, so its padding and numbers): the
   model's own forward on the unmodified model, recording the keyword arguments every decoder layer
   is called with (attention mask, rotary embeddings, position ids: reused as they are, never
   recomputed), the baseline scores, and what the components need measured first: the means of a
   mean ablation (:class:`~llmprobe.tracing.editing.MeanMeter`) and the residual stream after block
   L at the marks, whose principal components become the ``pca`` directions.
2. Per component at layer L and per batch: the residual stream entering block L
   (:class:`ResidualCache`: kept per batch within a memory budget and carried forward block by block
   as the components' layers rise, else recomputed by a forward call that stops at block L), run
   through blocks L..last with the component's edit attached (the same
   :class:`~llmprobe.tracing.editing.Edit` that ``trace --ablate`` attaches), the final norm, and the
   output head applied to the scored rows only — each prompt's marks and its last position — through
   the trace's own reduction (:meth:`~llmprobe.tracing.reduction.LogitReducer.reduce_hidden`), so no
   ``[B, T, V]`` logits and no head work at other positions. Targets of several tokens are completed by
   the continuation passes of :mod:`llmprobe.tracing.targets`, with the edit attached.

What comes out per component (:class:`ComponentScores`, host arrays over the scored rows, in the
plan's order): each target's whole-string log-probability (what ``target_seq_logprobs`` holds in a
trace), the entropy and the top-1 token. :meth:`SweepEngine.marks_table` gives those rows as a trace
table, so the fits read them through the same :func:`~llmprobe.analysis.marks.category_marks` as a
trace's. A component's numbers equal ``trace --ablate`` of it to float32 rounding: the same blocks run
on the same batches, but the head's reduction runs over fewer rows (its vocabulary tiles, and so the
rounding of the log-normalizer, depend on how many; tests/tracing/test_sweep.py measures it).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from llmprobe.errors import UsageError
from llmprobe.model.structure import DecoderBlocks, decoder_parts, split_causal_lm
from llmprobe.progress import SILENT, Reporter
from llmprobe.tracing.editing import (
    MEASURED,
    Edit,
    MeanMeter,
    ablation_edit,
    mean_value,
    orthonormal_rows,
    projection_edit,
    residual_entering,
)
from llmprobe.tracing.encoding import EncodedPrompt
from llmprobe.tracing.hooks import Hooks, on_call, outputs_of
from llmprobe.tracing.interventions import SITES
from llmprobe.tracing.reduction import NO_TOKEN, PADDING
from llmprobe.tracing.rows import mark_cells
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.targets import scored_positions, target_sequence_scores

CACHE_BUDGET_CPU = 2 << 30  # bytes of cached residual streams on the CPU
CACHE_FREE_FRACTION = 0.25  # on a GPU: of the memory free when the sweep starts
DIRECTION_KINDS = ("pca", "random")


@dataclass(frozen=True)
class Component:
    """One thing a sweep ablates. ``name``: ``baseline``, ``3.1`` (head), ``3.attn``, ``3.mlp``, ``3``
    (block), ``3.pc1`` (the first principal component after block 3), ``3.random2`` (a random unit
    direction after block 3); ``kind``: baseline, head, attn, mlp, block, pca or random; ``number``: the
    head, or the direction's 0-based rank among its layer's pca (or random) directions."""

    name: str
    kind: str
    layer: int | None = None
    number: int | None = None

    @property
    def head(self) -> int | None:
        return self.number if self.kind == "head" else None


BASELINE = Component("baseline", "baseline")


@dataclass
class ComponentScores:
    """A component's numbers at the sweep's scored rows: whole-string target log-probabilities
    ``[R, targets]`` (float32, as a trace stores them), entropy (nats) and the top-1 token id."""

    target_seq_logprobs: np.ndarray
    entropy: np.ndarray
    top1: np.ndarray


def _keep_rows(seen: dict[int, torch.Tensor], layer: int, rows: torch.Tensor, cols: torch.Tensor, args: tuple,
               kwargs: dict) -> None:
    """An ``on_call`` hook's body: keep the measured rows of the residual stream entering the next module."""
    seen[layer] = args[0][rows, cols].cpu().double()


@dataclass
class _Batch:
    prompts: list[EncodedPrompt]
    inputs: dict[str, torch.Tensor]
    scored_next: torch.Tensor  # [B, T]: NO_TOKEN at the scored rows, PADDING elsewhere (the head skips those)
    layer_kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)
    stream: torch.Tensor | None = None  # the residual stream entering block stream_layer, when cached
    stream_layer: int = 0


def run_block(block: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class ResidualCache:
    """The residual stream entering a block, per batch, within a byte budget (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, layers: torch.nn.ModuleList, budget: int) -> None:
        self.model = model
        self.layers = layers
        self.budget = budget
        self.used = 0

    def entering(self, batch: _Batch, layer: int) -> torch.Tensor:
        if batch.stream is not None and batch.stream_layer <= layer:
            hidden = batch.stream
            for index in range(batch.stream_layer, layer):  # carried forward through unmodified blocks
                hidden = run_block(self.layers[index], hidden, batch.layer_kwargs[index])
            batch.stream, batch.stream_layer = hidden, layer
            return hidden
        hidden, _ = residual_entering(self.model, layer, batch.inputs)
        size = hidden.numel() * hidden.element_size()
        if batch.stream is not None or self.used + size <= self.budget:
            self.used += 0 if batch.stream is not None else size
            batch.stream, batch.stream_layer = hidden, layer
        return hidden


def default_cache_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * CACHE_FREE_FRACTION)
    return CACHE_BUDGET_CPU


class SweepEngine:
    """Scores components on one started :class:`TraceRun` (see the module docstring).

    ``ablation``: ``zero`` or ``mean``; ``direction_layers``: {layer: number of principal components};
    ``random_controls``: random unit directions per direction layer, drawn from a generator seeded by
    (``seed``, layer); ``sites``: the (site, layer) pairs whose means a mean ablation needs.
    """

    def __init__(self, run: TraceRun, ablation: str = "zero", direction_layers: dict[int, int] | None = None,
                 random_controls: int = 0, seed: int = 0, sites: set[tuple[str, int]] | None = None,
                 cache_budget: int | None = None, reporter: Reporter = SILENT) -> None:
        tracer = run.tracer
        if tracer.parts is None:
            _, why = split_causal_lm(tracer.model)
            raise UsageError(f"the sweep applies the output head itself, which this model does not allow: {why}")
        self.run = run
        self.tracer = tracer
        self.parts = tracer.parts
        self.model = tracer.model
        self.blocks = DecoderBlocks.of(self.model)
        _, self.norm = decoder_parts(self.model)
        self.ablation = ablation
        self.multi_token = any(len(ids) > 1 for ids in tracer.target_tokens)
        self.cache = ResidualCache(self.model, self.blocks.layers,
                                   default_cache_budget(run.tracer.loaded.device) if cache_budget is None
                                   else cache_budget)
        self.meter = MeanMeter(self.blocks, {(MEASURED[s], layer) for s, layer in sites or set()}) \
            if ablation == "mean" and sites else None
        self.direction_layers = dict(direction_layers or {})
        self.directions: dict[str, np.ndarray] = {}
        self._seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.direction_layers}
        self.batches: list[_Batch] = []
        baseline: list[ComponentScores] = []
        with torch.inference_mode(), reporter.progress("baseline pass", total=len(run.prompts)) as advance:
            for window in run.plan.windows:
                for prompts, (batch, normed) in tracer.batched(window, self._prepare):
                    self.batches.append(batch)
                    baseline.append(self._score(batch, normed, []))
                    advance(len(prompts))
        self.baseline = self._concat(baseline)
        self.rows = [(e, p) for b in self.batches for e in b.prompts for p in scored_positions(e)]
        self.measured = np.array([p in e.mark_positions for e, p in self.rows])  # the rows a fit reads
        self._make_directions(random_controls, seed)

    # ----------------------------------------------------------------------------------- baseline pass
    def _prepare(self, prompts: list[EncodedPrompt]) -> tuple[_Batch, torch.Tensor]:
        """One batch's baseline forward: the layers' keyword arguments, the means, the streams for pca;
        returns the batch and its final-normed hidden states."""
        inputs, _ = self.tracer.model_inputs(prompts)
        width = inputs["input_ids"].shape[1]
        scored_next = torch.full((len(prompts), width), PADDING, dtype=torch.long)
        for b, e in enumerate(prompts):
            scored_next[b, [width - len(e.ids) + p for p in scored_positions(e)]] = NO_TOKEN
        batch = _Batch(prompts, inputs, scored_next)
        measured = [(b, width - len(e.ids) + p) for b, e in enumerate(prompts) for p in e.mark_positions]
        rows, cols = (torch.tensor(x, device=inputs["input_ids"].device) for x in zip(*measured))
        with Hooks() as hooks:
            for index, block in enumerate(self.blocks.layers):
                hooks.add(on_call(block, self._kwargs_recorder(batch, index)))
            seen: dict[int, torch.Tensor] = {}  # kept only if the batch completes (see MeanMeter.hooked)
            for layer in self.direction_layers:
                after = self.blocks.layers[layer + 1] if layer + 1 < len(self.blocks) else self.norm
                hooks.add(on_call(after, functools.partial(_keep_rows, seen, layer, rows, cols)))
            live = inputs["attention_mask"].bool()
            with self.meter.hooked(live) if self.meter is not None else nullcontext():
                with outputs_of(self.norm, once=True) as found:
                    self.model(**inputs, use_cache=False,
                               logits_to_keep=torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device))
        for layer, stream in seen.items():
            self._seen[layer].append(stream)
        return batch, found[0]

    @staticmethod
    def _kwargs_recorder(batch: _Batch, index: int):
        def record(args: tuple, kwargs: dict) -> None:
            batch.layer_kwargs[index] = kwargs
        return record

    def _make_directions(self, random_controls: int, seed: int) -> None:
        """The top principal components of the stream after each direction layer over the measured rows
        (centred, float64; each sign fixed so that its largest entry is positive), and the random controls."""
        for layer, count in sorted(self.direction_layers.items()):
            seen = torch.cat(self._seen.pop(layer)).numpy()
            if count > min(seen.shape):
                raise UsageError(f"{count} principal components asked for after block {layer}, but the marks give"
                                 f" {seen.shape[0]} vectors of width {seen.shape[1]}", where="--directions")
            centred = seen - seen.mean(0)
            values, vectors = np.linalg.eigh(centred.T @ centred)
            for rank in range(count):
                vector = vectors[:, -1 - rank]
                vector = vector * np.sign(vector[np.argmax(np.abs(vector))])
                self.directions[f"{layer}.pc{rank + 1}"] = vector
            generator = np.random.default_rng([seed, layer])
            for number in range(random_controls):
                vector = generator.standard_normal(self.blocks.hidden)
                self.directions[f"{layer}.random{number + 1}"] = vector / np.linalg.norm(vector)

    # ----------------------------------------------------------------------------------- components
    def edits(self, component: Component) -> list[Edit]:
        """The edit a component's ablation attaches: the one ``trace --ablate`` (or --ablate-direction) makes."""
        layer = component.layer
        if layer is not None and component.kind in SITES:  # a component kind names the site it ablates
            site = component.kind
            value = None
            if self.ablation != "zero":
                if self.meter is None:
                    raise RuntimeError("a mean ablation's means were not measured (no sites given)")
                value = mean_value(self.meter, self.blocks, site, layer, component.head)
            return [ablation_edit(self.blocks, site, layer, component.head, value)]
        if layer is not None and component.kind in DIRECTION_KINDS:  # orthonormalized as --ablate-direction does
            basis = orthonormal_rows(self.directions[component.name][None], component.name)
            return [projection_edit(self.blocks, layer, basis)]
        raise ValueError(f"not a component to ablate: {component}")

    @torch.inference_mode()
    def scores(self, component: Component) -> ComponentScores:
        """The component's numbers at the scored rows (the baseline's for :data:`BASELINE`)."""
        if component.kind == "baseline":
            return self.baseline
        edits = self.edits(component)
        first = min(edit.layer for edit in edits)
        found = []
        for batch in self.batches:
            hidden = self.cache.entering(batch, first)
            with Hooks() as hooks:
                for edit in edits:
                    edit.attach(hooks)
                for index in range(first, len(self.blocks)):
                    hidden = run_block(self.blocks.layers[index], hidden, batch.layer_kwargs[index])
            found.append(self._score(batch, self.norm(hidden), edits))  # attaches the edits again if it needs them
        return self._concat(found)

    def _score(self, batch: _Batch, normed: torch.Tensor, edits: list[Edit]) -> ComponentScores:
        """The head at the scored rows only; multi-token targets continued with ``edits`` attached."""
        tracer = self.tracer
        stats = tracer.reducer.reduce_hidden(self.parts.head, normed, batch.scored_next)
        width = normed.shape[1]
        first_token, entropy, top1, at = [], [], [], []
        for b, e in enumerate(batch.prompts):
            columns = [width - len(e.ids) + p for p in scored_positions(e)]
            logprobs = np.full((len(e.ids), len(tracer.target_tokens)), np.nan, dtype=np.float32)
            if stats.target_logprobs is not None:  # the run has targets
                logprobs[scored_positions(e)] = stats.target_logprobs[b, columns].cpu().numpy()
            first_token.append(logprobs)
            entropy.append(stats.entropy[b, columns].cpu().numpy())
            top1.append(stats.topk_ids[b, columns, 0].cpu().numpy().astype(np.int32))
            at.append(scored_positions(e))
        if self.multi_token:
            with Hooks() as hooks:
                for edit in edits:
                    edit.attach(hooks)
                whole = target_sequence_scores(self.model, tracer.loaded.device, tracer.tokenizer.pad_token_id,
                                               self.parts, tracer.target_tokens, batch.prompts, first_token)
            sequence = [np.stack([scores[p] for p in positions]) for scores, positions in zip(whole, at)]
        else:
            sequence = [logprobs[positions].astype(np.float64) for logprobs, positions in zip(first_token, at)]
        return ComponentScores(np.concatenate(sequence).astype(np.float32), np.concatenate(entropy),
                               np.concatenate(top1))

    @staticmethod
    def _concat(parts: list[ComponentScores]) -> ComponentScores:
        return ComponentScores(*(np.concatenate([getattr(p, name) for p in parts])
                                 for name in ("target_seq_logprobs", "entropy", "top1")))

    # ----------------------------------------------------------------------------------- rows
    def marks_table(self, scores: ComponentScores) -> pa.Table:
        """The scored rows as a trace table with ``scores``' target log-probabilities: what
        :func:`~llmprobe.analysis.marks.category_marks` reads of a trace."""
        mark_index, mark_json, meta_json = [], [], []
        for e, p in self.rows:
            index, mark, meta = mark_cells(e, [p])
            mark_index += index
            mark_json += mark
            meta_json += meta
        n_targets = len(self.tracer.target_tokens)
        return pa.table({
            "prompt_index": pa.array([e.record.index for e, _ in self.rows], pa.int32()),
            "prompt_id": pa.array([e.record.id for e, _ in self.rows], pa.string()),
            "position": pa.array([p for _, p in self.rows], pa.int32()),
            "target_seq_logprobs": pa.FixedSizeListArray.from_arrays(
                pa.array(scores.target_seq_logprobs.reshape(-1), pa.float32()), n_targets),
            "mark_index": pa.array(mark_index, pa.int32()),
            "mark": pa.array(mark_json, pa.string()),
            "meta": pa.array(meta_json, pa.string()),
        })
