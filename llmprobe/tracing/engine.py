"""The trace engine: batches of encoded prompts in, Arrow record batches in the trace schema out.

It knows nothing about the command line, files or the order of a run's prompts
(:class:`llmprobe.tracing.run.TraceRun` plans that and is the one place that builds a :class:`Tracer`).
Given one length-sorted window of encoded prompts it cuts batches (a fixed size, or ``auto``: as many
as fit, halved on out-of-memory) and, per batch, runs one teacher-forced forward pass (left-padded,
explicit position ids, so padded batches give the numbers of one prompt at a time), optionally
continues with KV-cached generation (:mod:`llmprobe.tracing.generation`), scores multi-token targets
at marks (:mod:`llmprobe.tracing.targets`), and emits one :class:`pyarrow.RecordBatch`
(:mod:`llmprobe.tracing.rows`).

The full ``[batch, length, vocabulary]`` logits never exist. The engine runs the model's forward with
``logits_to_keep`` set so that it projects no position (the reduction keeps each prompt's last logits
when a generated token is to be chosen from them), captures the final norm's output (a one-shot hook,
:mod:`llmprobe.tracing.hooks`, on the norm :func:`llmprobe.model.structure.split_causal_lm` names)
and sends those hidden states through the output head itself, a pass of positions at a time, each
pass's logits made and reduced one cache-sized vocabulary tile at a time
(:meth:`llmprobe.tracing.reduction.LogitReducer.reduce_hidden`; padding positions skip the head). The
same path serves the output layer, the logit lens, generation steps and multi-token targets; prompt
embeddings are read off the captured final-normed states. A model that cannot be split that way is
traced through a hook on its output head instead (its own forward then holds the logits), with a
one-line notice.

Every hook is attached (by :mod:`llmprobe.tracing.hooks`) for the forward passes it serves and
removed when they end, on every path. A batch's hooks live in one ``ExitStack`` of
:meth:`Tracer._trace_batch`: first the interventions' edits (:mod:`llmprobe.tracing.editing`; a
residual patch first runs the batch's donors), then the captures, so the edits act on exactly the
traced passes — the prompt's, each generation step's, the multi-token targets' continuations — and
the logit lens reads the edited stream. A mean ablation's first pass (:meth:`Tracer.prepare`) runs
the plan's batches through the unmodified model before anything is traced.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack
from typing import Any
from collections.abc import Callable, Iterator

import pyarrow as pa
import torch

from llmprobe.errors import ParameterError, UsageError
from llmprobe.model.loading import LoadedModel
from llmprobe.model.structure import split_causal_lm
from llmprobe.progress import SILENT, Reporter
from llmprobe.tracing.editing import Editor
from llmprobe.tracing.encoding import EncodedPrompt, PromptEncoder, padded_inputs
from llmprobe.tracing.generation import Generation, eos_ids
from llmprobe.tracing.hooks import Hooks, capture_logits, outputs_of
from llmprobe.tracing.lens import InternalsPlan, probe_internals
from llmprobe.tracing.reduction import LogitReducer, StepStats
from llmprobe.tracing.rows import RowAssembly, display_vocab, rows_from_stats
from llmprobe.tracing.schema import PHASE_PROMPT, trace_schema
from llmprobe.tracing.settings import AUTO, AUTO_MAX_BATCH, TraceSettings
from llmprobe.tracing.targets import target_sequence_scores, tokenize_targets

AUTO_BUDGET_CPU = 1 << 30  # bytes of activations (or, on the hook path, logits) one auto batch may take on the CPU
AUTO_FREE_FRACTION = 0.25  # on a GPU: of the memory free when tracing starts


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the allocators' messages on the CPU and MPS."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Tracer:
    """The engine for one loaded model and one set of (validated) settings.

    Building it makes the checks that need the model: ``top_k`` within the vocabulary, targets that
    tokenize, lens layers that exist.
    """

    def __init__(self, loaded: LoadedModel, settings: TraceSettings, reporter: Reporter = SILENT) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.settings = settings
        vocab_size = loaded.vocab_size
        if settings.top_k > vocab_size:
            raise ParameterError("top_k", f"must be between 1 and the vocabulary size {vocab_size},"
                                          f" got {settings.top_k}")
        self.target_tokens = tokenize_targets(self.tokenizer, settings.targets)
        self.reducer = LogitReducer(settings.top_k, [t[0] for t in self.target_tokens])
        self.vocab = display_vocab(self.tokenizer, vocab_size)
        self.internals = InternalsPlan.build(self.model, settings.layers, settings.save_embeddings)
        self.schema = trace_schema(settings.top_k, len(self.target_tokens), layers=bool(self.internals.layers),
                                   embedding_dim=self.internals.embedding_dim)
        self.rows = RowAssembly(self.schema, self.vocab, self.internals, settings.top_k, len(self.target_tokens))
        self.generation = Generation(settings, eos_ids(self.model, self.tokenizer), loaded.device)
        self._auto_limit = AUTO_MAX_BATCH  # --batch-size auto: halved on every out-of-memory error
        self._auto_budget: int | None = None  # bytes a batch may take, set on first use
        forward_parameters = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_parameters else "past_key_values"
        self.editor = Editor(self.model, settings.interventions)
        if self.editor.has_patch and any(len(ids) > 1 for ids in self.target_tokens):
            raise UsageError("a residual patch acts on the prompt's own pass, but targets of several tokens are scored"
                             " by extra passes over prefix + target that it cannot follow; use single-token targets",
                             where="--patch-from")
        self.parts, why_not = split_causal_lm(self.model)  # None: trace through a hook on the output head
        if self.parts is None:
            reporter.log(f"notice: {why_not}; tracing through a hook on the output head, which holds the"
                         " [batch, length, vocabulary] logits")

    # ----------------------------------------------------------------------------------- batching
    def trace(self, window: list[EncodedPrompt],
              on_prompts_done: Callable[[int], None] = lambda n: None) -> Iterator[pa.RecordBatch]:
        """Yield one record batch per batch of ``window``'s prompts, taken in the window's order."""
        for batch, result in self.batched(window, self._trace_batch):
            yield result
            on_prompts_done(len(batch))

    def batched(self, window: list[EncodedPrompt], work: Callable[[list[EncodedPrompt]], Any],
                ) -> Iterator[tuple[list[EncodedPrompt], Any]]:
        """``work`` done on each batch of ``window``'s prompts, taken in the window's order: (batch, result).

        With ``--batch-size auto`` a batch that runs out of memory is retried in halves, and the size
        that fit stays the limit for the rest of the run.
        """
        start = 0
        while start < len(window):
            batch = window[start : start + self._batch_size(len(window[start].ids))]
            failed = False
            try:
                result = work(batch)
            except RuntimeError as exc:
                if self.settings.batch_size != AUTO or len(batch) == 1 or not is_out_of_memory(exc):
                    raise
                self._auto_limit = len(batch) // 2
                failed = True
            if failed:  # outside the handler, so the failed batch's tensors are free
                if self.loaded.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start += len(batch)
            yield batch, result

    def model_inputs(self, batch: list[EncodedPrompt]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A batch's left-padded model inputs on the device (``input_ids``, ``attention_mask``,
        ``position_ids``) and its next-token ids on the host (:func:`padded_inputs`)."""
        pad = self.tokenizer.pad_token_id
        input_ids, attention, position_ids, next_ids = padded_inputs([e.ids for e in batch], pad)
        device = self.loaded.device
        return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
                "position_ids": position_ids.to(device)}, next_ids

    def prepare(self, encoder: PromptEncoder, prompts: list[EncodedPrompt], windows: list[list[EncodedPrompt]]) -> None:
        """What the interventions need before the run traces: the donors of a residual patch, read and
        checked against ``prompts``, and a mean ablation's first pass over the run's batches (``windows``:
        the plan's), on the unmodified model."""
        if not self.editor:
            return
        self.editor.bind(encoder, prompts)
        if self.editor.needs_first_pass:
            def run_pass(measure: Callable[[dict[str, torch.Tensor]], None]) -> None:
                for window in windows:  # each batch's forward inside batched(), so auto halves it on out-of-memory
                    for _ in self.batched(window, lambda batch: measure(self.model_inputs(batch)[0])):
                        pass
            with torch.inference_mode():
                self.editor.measure_means(run_pass)

    def _batch_size(self, width: int) -> int:
        """Prompts in the next batch, whose longest prompt has ``width`` tokens."""
        if self.settings.batch_size != AUTO:
            return int(self.settings.batch_size)
        if self._auto_budget is None:
            device = self.loaded.device
            self._auto_budget = (int(torch.cuda.mem_get_info(device)[0] * AUTO_FREE_FRACTION)
                                 if device.type == "cuda" else AUTO_BUDGET_CPU)
        return max(1, min(self._auto_limit, self._auto_budget // self._bytes_per_prompt(width)))

    def _bytes_per_prompt(self, width: int) -> int:
        """Peak working memory one prompt of ``width`` tokens (+ generation) adds to a batch.

        The split path never holds logits of more than one block (a fixed size), so a prompt costs its
        activations: the residual stream and its norms, attention's q/k/v/output, the MLP's three
        intermediate tensors, the KV cache of every layer, and one layer's attention scores (heads x
        T x T, float32, where the attention kernel materializes them). The hook path adds T x V float32.
        """
        config = self.model.config
        tokens = width + self.settings.max_new_tokens
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv_dim = int(getattr(config, "num_key_value_heads", heads) or heads) * (
            int(getattr(config, "head_dim", 0) or 0) or hidden // heads)
        element = torch.finfo(self.loaded.dtype).bits // 8 if self.loaded.dtype.is_floating_point else 4
        per_token = element * (6 * hidden + 3 * int(getattr(config, "intermediate_size", 4 * hidden))
                               + 2 * int(config.num_hidden_layers) * kv_dim)
        per_prompt = tokens * per_token + heads * tokens * tokens * 4
        if self.parts is None:
            per_prompt += tokens * self.loaded.vocab_size * 4
        return per_prompt

    # ----------------------------------------------------------------------------------- one batch
    @torch.inference_mode()
    def _trace_batch(self, batch: list[EncodedPrompt]) -> pa.RecordBatch:
        device = self.loaded.device
        lengths = [len(e.ids) for e in batch]
        width = max(lengths)
        inputs, next_ids = self.model_inputs(batch)
        input_ids, attention = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()
        generate = self.settings.max_new_tokens > 0
        embed_at: tuple[list[int], list[int]] | None = None
        if self.internals.embedding_dim:
            at = [(b, width - len(e.ids) + p) for b, e in enumerate(batch) for p in e.mark_positions]
            embed_at = ([b for b, _ in at], [c for _, c in at])
        with Hooks() as edits:  # the interventions, for every pass of this batch; removed on every way out
            for edit in self.editor.edits(batch, inputs):
                edit.attach(edits)
            with ExitStack() as stack:  # the captures, attached after the edits so that they see edited passes
                capture = (None if self.parts is not None
                           else stack.enter_context(capture_logits(self.model.get_output_embeddings(), self.reducer)))
                with probe_internals(self.model, self.reducer, self.internals.hooked, next_ids,
                                     embed_at if capture is not None else None) as inside:
                    stats, cache, normed = self._forward(capture, inputs["input_ids"], inputs["attention_mask"],
                                                         inputs["position_ids"], next_ids, None, keep_last=generate)
                embeddings = inside.embeddings
                if embed_at is not None and normed is not None:
                    rows, cols = (torch.tensor(i, device=normed.device) for i in embed_at)
                    embeddings = normed[rows, cols].to(torch.float16).cpu()
                del normed
                prompt_rows = self._prompt_rows(stats, batch, input_ids)
                generated = None
                if generate:
                    def step(ids, mask, positions, kv):
                        return self._forward(capture, ids, mask, positions, None, kv, keep_last=True)[:2]

                    generated = self.generation.run(step, batch, stats, cache, attention, lengths, prompt_rows)
            target_seq = None
            if self.target_tokens:  # the continuations are edited passes too
                target_seq = target_sequence_scores(self.model, device, self.tokenizer.pad_token_id, self.parts,
                                                    self.target_tokens, batch, [r.target_logprobs for r in prompt_rows])
        layer_rows = {layer: self._prompt_rows(st, batch, input_ids) for layer, st in inside.layer_stats.items()}
        return self.rows.record_batch(batch, prompt_rows, generated, target_seq, layer_rows, embeddings)

    def _prompt_rows(self, stats: StepStats, batch: list[EncodedPrompt], input_ids: torch.Tensor) -> list:
        """The prompt positions' rows of each prompt, with their next tokens."""
        width = input_ids.shape[1]
        prompt_rows = []
        for b, e in enumerate(batch):
            n = len(e.ids)
            rows = rows_from_stats(stats, b, slice(width - n, width), 0, PHASE_PROMPT, input_ids[b, width - n :])
            rows.next_ids[:-1] = e.ids[1:]
            prompt_rows.append(rows)
        return prompt_rows

    def _forward(self, capture, input_ids: torch.Tensor, attention: torch.Tensor, position_ids: torch.Tensor,
                 next_ids: torch.Tensor | None, cache, keep_last: bool) -> tuple[StepStats, Any, torch.Tensor | None]:
        """One forward call: its statistics, its KV cache (when ``keep_last``: generation follows) and,
        on the split path, the final-normed hidden states."""
        kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                                      use_cache=keep_last)
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        if self.parts is None:
            capture.next_ids = next_ids
            out = self.model(**kwargs)
            return capture.pop(), _cache_of(out), None
        # the model projects no position: the reduction applies the head, once, and keeps the last logits
        with outputs_of(self.parts.norm, once=True) as found:
            out = self.model(**kwargs, logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device))
        (hidden,) = found
        stats = self.reducer.reduce_hidden(self.parts.head, hidden, next_ids, keep_last=keep_last)
        return stats, _cache_of(out), hidden


def _cache_of(out):
    """The KV cache a forward call returned (transformers 5 names it ``cache``)."""
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)
