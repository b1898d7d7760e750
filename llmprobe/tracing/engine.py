"""The trace engine: prompts in, Arrow record batches in the trace schema out.

It knows nothing about the command line or files. For each batch of prompts it runs one
teacher-forced forward pass (left-padded, explicit position ids, so padded batches give the numbers
of one prompt at a time), optionally continues with KV-cached generation, scores multi-token targets
at marks, and emits one :class:`pyarrow.RecordBatch` per batch of prompts.

The full ``[batch, length, vocabulary]`` logits never exist. The engine runs the model's forward with
``logits_to_keep`` set so that it projects no position (the reduction keeps each prompt's last logits
when a generated token is to be chosen from them), captures the final norm's output (:func:`llmprobe.model.structure.split_causal_lm`)
and sends those hidden states through the output head itself, a pass of positions at a time, each
pass's logits made and reduced one cache-sized vocabulary tile at a time
(:meth:`llmprobe.tracing.reduction.LogitReducer.reduce_hidden`; padding positions skip the head). The same path serves the output layer, the logit lens, generation steps and multi-token
targets; prompt embeddings are read off the captured final-normed states. A model that cannot be
split that way is traced through a hook on its output head instead (its own forward then holds the
logits), with a one-line notice.

Chat modes (``--chat``): "user" (or ``True``) renders the prompt as the user turn followed by the
generation prompt; "prefill" renders ``prompt[:split]`` (trailing whitespace dropped) as the user turn
and ``prompt[split:]`` as the start of the assistant's reply, left open (no end-of-turn token), where
``split`` is the record's field of that name (``llmprobe experiment`` writes it for templates with an
instruction). The text around each turn is found from the template's structure (rendered once with
sentinel contents), never by searching the rendered text for the prompt, so a prompt that also
occurs in a system prompt is still placed right; marks keep referring to the original prompt text.

Row semantics: the row at ``position`` i holds P(. | x_0..x_i); ``next_token`` is x_{i+1}.
Generated tokens get rows of their own (phase ``generated``) until ``max_new_tokens`` or an
end-of-sequence token, which appears as the last row's ``next_token`` but gets no row itself.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from contextlib import ExitStack
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from llmprobe import __version__
from llmprobe.errors import UsageError
from llmprobe.tracing.reduction import NO_TOKEN, PADDING, LogitReducer, StepStats, capture_logits, token_logprob_and_rank
from llmprobe.tracing.lens import InternalsPlan, embed_positions, parse_layers, probe_internals
from llmprobe.model.loading import LoadedModel
from llmprobe.model.structure import CausalLMParts, split_causal_lm
from llmprobe.progress import SILENT, Reporter
from llmprobe.tracing.prompts import PromptRecord
from llmprobe.tracing.schema import PHASE_GENERATED, PHASE_PROMPT, trace_schema

FLOAT32_EPS = float(np.finfo(np.float32).eps)
SORT_WINDOW_BATCHES = 32  # prompts are length-sorted within windows of this many batches
AUTO = "auto"  # --batch-size auto: as many prompts as fit, halving on out-of-memory
AUTO_MAX_BATCH = 64  # the most prompts --batch-size auto puts in one batch (and its planning size)
AUTO_BUDGET_CPU = 1 << 30  # bytes of activations (or, on the hook path, logits) one auto batch may take on the CPU
AUTO_FREE_FRACTION = 0.25  # on a GPU: of the memory free when tracing starts
CHAT_MODES = ("user", "prefill")
_SENTINELS = ("\ue000llmprobe user turn\ue001", "\ue000llmprobe assistant turn\ue001")  # private-use marks


@dataclass
class TraceSettings:
    top_k: int = 20
    targets: list[str] = field(default_factory=list)
    max_new_tokens: int = 0
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int | str = 8  # or AUTO
    chat: bool | str = False  # False, True (= "user") or one of CHAT_MODES
    truncate: str | None = None  # "left" | "right": cut prompts longer than the context instead of failing
    layers: str | None = None  # logit lens: "all" or "0,4,8" (0-based decoder layers; docs/analyses.md)
    save_embeddings: bool = False  # keep the output head's input at marks (else the last position)

    def validate(self) -> None:
        """The checks that need no model, so bad options fail before a model load."""
        if self.chat not in (False, True, *CHAT_MODES):
            raise UsageError(f"expected {' or '.join(CHAT_MODES)}, got {self.chat!r}", where="--chat")
        if self.truncate not in (None, "left", "right"):
            raise UsageError(f"expected left or right, got {self.truncate!r}", where="--truncate")
        if self.top_k < 1:
            raise UsageError(f"must be 1 or more, got {self.top_k}", where="--top-k")
        if self.max_new_tokens < 0:
            raise UsageError(f"must be 0 or more, got {self.max_new_tokens}", where="--max-new-tokens")
        if self.batch_size != AUTO and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise UsageError(f"must be 1 or more, or auto; got {self.batch_size}", where="--batch-size")
        if self.sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise UsageError("sampling needs --temperature > 0 and 0 < --top-p <= 1", where="--sample")
        if self.sample and self.top_p < FLOAT32_EPS:  # the float32 nucleus cut would drop every token
            raise UsageError(f"must be at least {FLOAT32_EPS:.2g} (float32 resolution), got {self.top_p:g}",
                             where="--top-p")
        if self.layers is not None:
            parse_layers(self.layers, None)
            if self.max_new_tokens:
                raise UsageError("the logit lens covers prompt positions only; trace generated text as a prompt"
                                 " instead of combining it with --max-new-tokens", where="--layers")

    @property
    def chat_mode(self) -> str | None:
        """None (no chat template), "user" or "prefill"."""
        return "user" if self.chat is True else self.chat or None

    @property
    def batch_prompts(self) -> int:
        """Prompts per batch to plan with: the fixed size, or the most that ``auto`` puts in a batch."""
        return AUTO_MAX_BATCH if self.batch_size == AUTO else int(self.batch_size)

    @property
    def window_prompts(self) -> int:
        """Prompts per length-sorting window (a resume restarts at a window's first prompt)."""
        return self.batch_prompts * SORT_WINDOW_BATCHES


def parse_batch_size(text: str) -> int | str:
    """``--batch-size``: a positive integer or ``auto``."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"expected a positive integer or auto, got {text!r}", where="--batch-size") from None
    if value < 1:
        raise UsageError(f"must be 1 or more, or auto; got {value}", where="--batch-size")
    return value


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the allocators' messages on the CPU and MPS."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class EncodedPrompt:
    record: PromptRecord
    ids: list[int]
    marks_at: dict[int, int]  # token position -> index into record.marks
    marks_exact: dict[int, bool]  # position -> does the token end exactly at the mark's offset


@dataclass
class _Rows:
    """Per-row host arrays for one prompt, concatenated across prompts into a record batch."""

    positions: np.ndarray
    phase: str
    token_ids: np.ndarray
    next_ids: np.ndarray  # NO_TOKEN where none
    next_logprob: np.ndarray
    next_rank: np.ndarray
    entropy: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray | None


class Tracer:
    def __init__(self, loaded: LoadedModel, settings: TraceSettings, reporter: Reporter = SILENT) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.settings = settings
        vocab_size = loaded.vocab_size
        settings.validate()
        if settings.top_k > vocab_size:
            raise UsageError(f"must be between 1 and the vocabulary size {vocab_size}, got {settings.top_k}",
                             where="--top-k")
        self.target_tokens = self._tokenize_targets(settings.targets)
        self.reducer = LogitReducer(settings.top_k, [t[0] for t in self.target_tokens])
        self.vocab = display_vocab(self.tokenizer, vocab_size)
        self._vocab_array = np.array(self.vocab, dtype=object)
        self.internals = InternalsPlan.build(self.model, settings.layers, settings.save_embeddings)
        self.schema = trace_schema(settings.top_k, len(self.target_tokens), layers=bool(self.internals.layers),
                                   embedding_dim=self.internals.embedding_dim)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self._auto_limit = AUTO_MAX_BATCH  # --batch-size auto: halved on every out-of-memory error
        self._auto_budget: int | None = None  # bytes a batch may take, set on first use
        self._cache_kwarg = "cache" if "cache" in _parameters(self.model) else "past_key_values"
        self._chat_frame: tuple[str, ...] | None = None  # the template's text around the turns, found once
        self.parts, why_not = split_causal_lm(self.model)  # None: trace through a hook on the output head
        if self.parts is None:
            reporter.log(f"notice: {why_not}; tracing through a hook on the output head, which holds the"
                         " [batch, length, vocabulary] logits")

    # ----------------------------------------------------------------------------------- set-up
    def _tokenize_targets(self, targets: list[str]) -> list[list[int]]:
        if len(set(targets)) != len(targets):
            dupes = sorted({t for t in targets if targets.count(t) > 1})
            raise UsageError(f"duplicate target(s): {', '.join(map(repr, dupes))}", where="--targets")
        tokens = []
        for target in targets:
            ids = self.tokenizer(target, add_special_tokens=False)["input_ids"]
            if not ids:
                raise UsageError(f"target {target!r} tokenizes to nothing", where="--targets")
            tokens.append(list(ids))
        return tokens

    def metadata(self) -> dict[str, Any]:
        import transformers

        return {
            "llmprobe_version": __version__,
            **self.loaded.provenance(),
            "settings": asdict(self.settings),
            "targets": [
                {"text": t, "token_ids": ids, "tokens": [self.vocab[i] for i in ids]}
                for t, ids in zip(self.settings.targets, self.target_tokens)
            ],
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "python_version": platform.python_version(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **self.internals.metadata(self.model),
        }

    # ----------------------------------------------------------------------------------- encoding
    def encode(self, record: PromptRecord) -> EncodedPrompt:
        text, shift = record.text, 0
        mode = self.settings.chat_mode
        if mode is not None:
            text, shift = self._chat_text(record, mode)
        enc = self.tokenizer(text, add_special_tokens=mode is None, return_offsets_mapping=True)
        ids, spans = list(enc["input_ids"]), enc["offset_mapping"]
        if not ids:
            raise UsageError("prompt tokenizes to nothing", where=_where(record))
        marks_at, exact = map_marks(record.marks, spans, shift, record)
        limit = self.max_context - self.settings.max_new_tokens if self.max_context else None
        if limit is not None and len(ids) > limit:
            head = 1 if spans[0][0] == spans[0][1] else 0  # a leading BOS stays when the left end is cut
            if self.settings.truncate is None or limit <= head:
                raise UsageError(
                    f"prompt has {len(ids)} tokens (+{self.settings.max_new_tokens} to generate) but the model's"
                    f" context is {self.max_context} tokens; shorten it or pass --truncate left|right",
                    where=_where(record))
            kept = ([*range(head), *range(len(ids) - limit + head, len(ids))] if self.settings.truncate == "left"
                    else list(range(limit)))
            new_position = {old: new for new, old in enumerate(kept)}  # marks on cut tokens are dropped
            ids = [ids[i] for i in kept]
            marks_at = {new_position[p]: m for p, m in marks_at.items() if p in new_position}
            exact = {new_position[p]: e for p, e in exact.items() if p in new_position}
        return EncodedPrompt(record, ids, marks_at, exact)

    def _render_chat(self, messages: list[dict[str, str]], open_turn: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=not open_turn, tokenize=False)

    def _frame(self, mode: str) -> tuple[str, ...]:
        """The template's text before, between and after the turns, from one rendering with sentinels.

        "user": (before the user text, after it up to the end of the generation prompt).
        "prefill": (before the user text, between it and the assistant text); nothing follows.
        """
        if self._chat_frame is None:
            user, assistant = _SENTINELS
            try:
                if mode == "user":
                    rendered = self._render_chat([{"role": "user", "content": user}], open_turn=False)
                else:
                    rendered = self._render_chat([{"role": "user", "content": user},
                                                  {"role": "assistant", "content": assistant}], open_turn=True)
            except Exception as exc:  # no template, or one that rejects these roles
                raise UsageError(f"cannot apply the tokenizer's chat template: {str(exc).splitlines()[0]}",
                                 where="--chat") from None
            if rendered.count(user) != 1 or (mode == "prefill" and rendered.count(assistant) != 1):
                raise UsageError("the chat template does not show each turn's text once; marks cannot be placed",
                                 where="--chat")
            before, rest = rendered.split(user)
            if mode == "user":
                self._chat_frame = (before, rest)
            else:
                self._chat_frame = (before, rest.split(assistant)[0])
        return self._chat_frame

    def _chat_text(self, record: PromptRecord, mode: str) -> tuple[str, Callable[[int], int]]:
        """The prompt in the chat template, and where each original character offset lands in it."""
        frame = self._frame(mode)
        if mode == "user":
            text = frame[0] + record.text + frame[1]
            expected = self._render_chat([{"role": "user", "content": record.text}], open_turn=False)
            if text != expected:
                raise UsageError("the chat template altered the prompt text; marks cannot be placed",
                                 where=_where(record))
            return text, lambda offset: offset + len(frame[0])
        split = record.meta.get("split")
        if split is None:
            raise UsageError("--chat prefill needs a split point: the record has no \"split\" field (the character"
                             " offset where the assistant turn starts; `llmprobe experiment` writes it for templates"
                             " with an instruction)", where=_where(record))
        if isinstance(split, bool) or not isinstance(split, int) or not 0 < split < len(record.text):
            raise UsageError(f"\"split\" must be an offset inside the prompt (1..{len(record.text) - 1}), got {split!r}",
                             where=_where(record))
        user, assistant = record.text[:split].rstrip(), record.text[split:]
        if not user:
            raise UsageError("the user turn (the prompt before \"split\") is empty", where=_where(record))
        for i, mark in enumerate(record.marks):
            if mark["offset"] < split:
                raise UsageError(f"mark {i}: offset {mark['offset']} lies in the user turn (before split {split});"
                                 " with --chat prefill marks belong to the assistant turn", where=_where(record))
        start = len(frame[0]) + len(user) + len(frame[1])
        text = frame[0] + user + frame[1] + assistant
        expected = self._render_chat([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                                     open_turn=True)
        if not expected.startswith(text):
            raise UsageError("the chat template altered the prompt text; marks cannot be placed",
                             where=_where(record))
        return text, lambda offset: offset - split + start

    # ----------------------------------------------------------------------------------- tracing
    def trace(self, records: Iterable[PromptRecord],
              on_prompts_done: Callable[[int], None] = lambda n: None) -> Iterator[pa.RecordBatch]:
        """Yield one record batch per batch of prompts, in processing (length-sorted) order.

        With ``--batch-size auto`` a batch that runs out of memory is retried in halves, and the size
        that fit stays the limit for the rest of the run.
        """
        for window in self._windows(records):
            start = 0
            while start < len(window):
                batch = window[start : start + self._batch_size(len(window[start].ids))]
                try:
                    result = self._trace_batch(batch)
                except RuntimeError as exc:
                    if self.settings.batch_size != AUTO or len(batch) == 1 or not is_out_of_memory(exc):
                        raise
                    self._auto_limit = len(batch) // 2
                    result = None
                if result is None:  # outside the handler, so the failed batch's tensors are free
                    _release_memory(self.loaded.device)
                    continue
                start += len(batch)
                yield result
                on_prompts_done(len(batch))

    def _windows(self, records: Iterable[PromptRecord]) -> Iterator[list[EncodedPrompt]]:
        """Encoded prompts, longest first within each window of ``window_prompts`` prompts."""
        window: list[PromptRecord] = []
        for record in records:
            window.append(record)
            if len(window) == self.settings.window_prompts:
                yield sorted((self.encode(r) for r in window), key=lambda e: -len(e.ids))
                window = []
        if window:
            yield sorted((self.encode(r) for r in window), key=lambda e: -len(e.ids))

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

    @torch.inference_mode()
    def _trace_batch(self, batch: list[EncodedPrompt]) -> pa.RecordBatch:
        device = self.loaded.device
        lengths = [len(e.ids) for e in batch]
        width = max(lengths)
        input_ids, attention, position_ids, next_ids = padded_inputs([e.ids for e in batch], self.tokenizer.pad_token_id)
        generate = self.settings.max_new_tokens > 0
        embed_at = None
        if self.internals.embedding_dim:
            embed_at = tuple(map(list, zip(*[(b, width - len(e.ids) + p) for b, e in enumerate(batch)
                                             for p in embed_positions(e.ids, e.marks_at)])))
        with ExitStack() as stack:
            capture = (None if self.parts is not None
                       else stack.enter_context(capture_logits(self.model.get_output_embeddings(), self.reducer)))
            with probe_internals(self.model, self.reducer, self.internals.hooked, next_ids,
                                 embed_at if capture is not None else None) as inside:
                stats, cache, normed = self._forward(capture, input_ids.to(device), attention.to(device),
                                                     position_ids.to(device), next_ids, None, keep_last=generate)
            embeddings = inside.embeddings
            if embed_at is not None and normed is not None:
                rows, cols = (torch.tensor(i, device=normed.device) for i in embed_at)
                embeddings = normed[rows, cols].to(torch.float16).cpu()
            del normed
            prompt_rows = [
                self._rows_from_stats(stats, b, slice(width - n, width), 0, PHASE_PROMPT, input_ids[b, width - n :])
                for b, n in enumerate(lengths)
            ]
            for rows, e in zip(prompt_rows, batch):
                rows.next_ids[:-1] = e.ids[1:]
            generated = self._generate(batch, capture, stats, cache, attention, lengths, prompt_rows) if generate else None
        target_seq = self._target_sequence_scores(batch, prompt_rows) if self.target_tokens else None
        layer_rows = {layer: [self._rows_from_stats(st, b, slice(width - n, width), 0, PHASE_PROMPT,
                                                    input_ids[b, width - n :]) for b, n in enumerate(lengths)]
                      for layer, st in inside.layer_stats.items()}
        for rows_of_layer in layer_rows.values():
            for rows, e in zip(rows_of_layer, batch):
                rows.next_ids[:-1] = e.ids[1:]
        return self._record_batch(batch, prompt_rows, generated, target_seq, layer_rows, embeddings)

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
        with self.parts.final_hidden() as found:
            out = self.model(**kwargs, logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device))
        (hidden,) = found
        stats = self.reducer.reduce_hidden(self.parts.head, hidden, next_ids, keep_last=keep_last)
        return stats, _cache_of(out), hidden

    def _rows_from_stats(self, stats, b: int, cols: slice, first_position: int, phase: str,
                         token_ids: torch.Tensor) -> _Rows:
        n = cols.stop - cols.start
        return _Rows(
            positions=np.arange(first_position, first_position + n, dtype=np.int32),
            phase=phase,
            token_ids=token_ids.cpu().numpy().astype(np.int32),
            next_ids=np.full(n, NO_TOKEN, dtype=np.int64),  # filled by the caller
            next_logprob=stats.next_logprob[b, cols].cpu().numpy(),
            next_rank=stats.next_rank[b, cols].cpu().numpy(),
            entropy=stats.entropy[b, cols].cpu().numpy(),
            topk_ids=stats.topk_ids[b, cols].cpu().numpy().astype(np.int32),
            topk_logprobs=stats.topk_logprobs[b, cols].cpu().numpy(),
            target_logprobs=None if stats.target_logprobs is None else stats.target_logprobs[b, cols].cpu().numpy(),
        )

    def _generate(self, batch, capture, stats, cache, attention, lengths, prompt_rows) -> list[list[_Rows]]:
        """KV-cached generation; every step goes through the same unembed-and-reduce path (or hook)."""
        device = self.loaded.device
        generators = [self._generator(e.record.index) for e in batch]
        attention = attention.to(device)
        positions = torch.tensor(lengths, device=device)[:, None]
        finished = torch.zeros(len(batch), dtype=torch.bool)
        previous_rows: list[_Rows] = list(prompt_rows)
        generated: list[list[_Rows]] = [[] for _ in batch]
        last_logits, last_lse = stats.last_logits, stats.logsumexp[:, -1]
        for _ in range(self.settings.max_new_tokens):
            chosen = self._choose(last_logits, generators)
            logprob, rank = token_logprob_and_rank(last_logits.float(), last_lse.to(last_logits.device), chosen)
            chosen_host, logprob, rank = chosen.cpu(), logprob.cpu().numpy(), rank.cpu().numpy()
            for b, rows in enumerate(previous_rows):
                if not finished[b]:
                    rows.next_ids[-1], rows.next_logprob[-1], rows.next_rank[-1] = chosen_host[b], logprob[b], rank[b]
            finished |= torch.tensor([int(t) in self.eos_ids for t in chosen_host])
            if bool(finished.all()):
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            step, cache, _ = self._forward(capture, chosen[:, None].to(device), attention, positions, None, cache,
                                           keep_last=True)
            for b in range(len(batch)):
                if not finished[b]:
                    rows = self._rows_from_stats(step, b, slice(0, 1), int(positions[b]), PHASE_GENERATED,
                                                 chosen_host[b : b + 1])
                    generated[b].append(rows)
                    previous_rows[b] = rows
            positions = positions + 1
            last_logits, last_lse = step.last_logits, step.logsumexp[:, -1]
        return generated

    def _generator(self, prompt_index: int) -> torch.Generator | None:
        """One generator per prompt, so sampled text does not depend on batch composition."""
        if not self.settings.sample:
            return None
        seed = int(np.random.SeedSequence([self.settings.seed, prompt_index]).generate_state(1)[0])
        return torch.Generator(device=self.loaded.device).manual_seed(seed)

    def _choose(self, logits: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        if not self.settings.sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.settings.temperature, dim=-1)
        if not bool(torch.isfinite(probs).all()):
            raise UsageError("sampling probabilities are NaN or infinite: the model's logits overflowed or its weights"
                             " are corrupt (try --dtype float32 or a larger --temperature); not written",
                             where="--sample")
        if self.settings.top_p < 1:
            sorted_probs, order = probs.sort(-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.settings.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])

    def _target_sequence_scores(self, batch: list[EncodedPrompt], prompt_rows: list[_Rows]) -> list[dict[int, np.ndarray]]:
        """Whole-string target log-probabilities at every mark and at the last prompt position.

        A target of several tokens is scored as a continuation: the first token's log-probability
        comes from the trace itself, the rest from extra forward passes over prefix + target.
        """
        scores: list[dict[int, np.ndarray]] = []
        pending: list[tuple[int, int, int, list[int], list[int]]] = []  # (b, position, target, prefix, target ids)
        for b, (e, rows) in enumerate(zip(batch, prompt_rows)):
            wanted = sorted({*e.marks_at, len(e.ids) - 1})
            scores.append({p: rows.target_logprobs[p].astype(np.float64) for p in wanted})
            for p in wanted:
                for t, ids in enumerate(self.target_tokens):
                    if len(ids) > 1:
                        pending.append((b, p, t, e.ids[: p + 1], ids))
        if pending:
            rest = continuation_logprobs(self.model, self.loaded.device, self.tokenizer.pad_token_id,
                                         [(prefix, ids) for _, _, _, prefix, ids in pending], len(batch), self.parts)
            for (b, p, t, _, _), value in zip(pending, rest):
                scores[b][p][t] += value
        return scores

    # ----------------------------------------------------------------------------------- output
    def _record_batch(self, batch, prompt_rows, generated, target_seq, layer_rows=None,
                      embeddings=None) -> pa.RecordBatch:
        parts: list[tuple[EncodedPrompt, _Rows, dict[int, np.ndarray] | None]] = []
        part_layers: list[int] = []  # logit-lens layer of each part (the output layer for the model's own rows)
        embedding_rows: list[int] = []  # row numbers that get an embedding, in the order of `embeddings`
        for b, e in enumerate(batch):
            first_row = sum(len(rows.positions) for _, rows, _ in parts)
            embedding_rows += [first_row + p for p in embed_positions(e.ids, e.marks_at)]
            parts.append((e, prompt_rows[b], target_seq[b] if target_seq else None))
            parts += [(e, rows, None) for rows in (generated[b] if generated else [])]
            part_layers += [self.internals.output_layer] * (len(parts) - len(part_layers))
            for layer, rows_of_layer in sorted((layer_rows or {}).items()):
                parts.append((e, rows_of_layer[b], None))
                part_layers.append(layer)
        cat = lambda name: np.concatenate([getattr(rows, name) for _, rows, _ in parts])  # noqa: E731
        counts = [len(rows.positions) for _, rows, _ in parts]
        token_ids, next_ids = cat("token_ids"), cat("next_ids")
        has_next = next_ids != NO_TOKEN
        k = self.settings.top_k
        columns: dict[str, pa.Array] = {
            "prompt_index": pa.array(np.repeat([e.record.index for e, _, _ in parts], counts), pa.int32()),
            "prompt_id": pa.array(np.repeat(np.array([e.record.id for e, _, _ in parts], dtype=object), counts),
                                  pa.string()),
            "position": pa.array(cat("positions"), pa.int32()),
            "phase": pa.DictionaryArray.from_arrays(
                pa.array(np.repeat([0 if r.phase == PHASE_PROMPT else 1 for _, r, _ in parts], counts), pa.int8()),
                pa.array([PHASE_PROMPT, PHASE_GENERATED])),
            "token_id": pa.array(token_ids, pa.int32()),
            "token": pa.array(self._vocab_array[token_ids], pa.string()),
            "next_token_id": pa.array(np.where(has_next, next_ids, 0), pa.int32(), mask=~has_next),
            "next_token": pa.array(self._vocab_array[np.where(has_next, next_ids, 0)], pa.string(), mask=~has_next),
            "next_logprob": pa.array(cat("next_logprob").astype(np.float32), pa.float32(), mask=~has_next),
            "next_rank": pa.array(cat("next_rank").astype(np.int32), pa.int32(), mask=~has_next),
            "entropy": pa.array(cat("entropy").astype(np.float32), pa.float32()),
            "topk_ids": pa.FixedSizeListArray.from_arrays(pa.array(cat("topk_ids").reshape(-1), pa.int32()), k),
            "topk_logprobs": pa.FixedSizeListArray.from_arrays(
                pa.array(cat("topk_logprobs").astype(np.float32).reshape(-1), pa.float32()), k),
        }
        if self.target_tokens:
            n_t = len(self.target_tokens)
            columns["target_logprobs"] = pa.FixedSizeListArray.from_arrays(
                pa.array(cat("target_logprobs").astype(np.float32).reshape(-1), pa.float32()), n_t)
            seq_rows = []
            for _, rows, seq in parts:
                for p in rows.positions:
                    value = seq.get(int(p)) if seq is not None else None
                    seq_rows.append(None if value is None else value.astype(np.float32).tolist())
            columns["target_seq_logprobs"] = pa.array(seq_rows, pa.list_(pa.float32(), n_t))
        mark_index, mark_json, meta_json = [], [], []
        for e, rows, _ in parts:
            meta = json.dumps(e.record.meta, ensure_ascii=False) if e.record.meta else None
            for p in rows.positions:
                m = e.marks_at.get(int(p)) if rows.phase == PHASE_PROMPT else None
                mark_index.append(m)
                mark_json.append(None if m is None else json.dumps(
                    {**e.record.marks[m], "exact": e.marks_exact[int(p)]}, ensure_ascii=False))
                meta_json.append(meta)
        columns["mark_index"] = pa.array(mark_index, pa.int32())
        columns["mark"] = pa.array(mark_json, pa.string())
        columns["meta"] = pa.array(meta_json, pa.string())
        if self.internals.layers:
            columns["layer"] = pa.array(np.repeat(part_layers, counts), pa.int16())
        if self.internals.embedding_dim:
            columns["embedding"] = self.internals.embedding_column(embedding_rows, embeddings, sum(counts))
        return pa.RecordBatch.from_arrays([columns[f.name] for f in self.schema], schema=self.schema)


def _cache_of(out):
    """The KV cache a forward call returned (transformers 5 names it ``cache``)."""
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _parameters(module: torch.nn.Module):
    import inspect

    return inspect.signature(module.forward).parameters


def _release_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def padded_inputs(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Left-padded ``input_ids``, ``attention_mask``, ``position_ids`` and next-token ids (NO_TOKEN at
    the end, PADDING on padding, which the reducer skips) on the host; explicit positions make each
    row's numbers those of the row alone."""
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    next_ids = torch.full((len(sequences), width), PADDING, dtype=torch.long)
    for b, ids in enumerate(sequences):
        start = width - len(ids)
        input_ids[b, start:] = torch.tensor(ids)
        attention[b, start:] = 1
        next_ids[b, start : width - 1] = torch.tensor(ids[1:], dtype=torch.long)
        next_ids[b, width - 1] = NO_TOKEN
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention, position_ids, next_ids


def continuation_logprobs(model, device, pad_id: int, items: list[tuple[list[int], list[int]]],
                          batch_size: int, parts: CausalLMParts | None = None) -> list[float]:
    """For each (prefix, target ids), the sum of log P(target[j] | prefix + target[:j]) over j >= 1.

    Each item needs the logits of the token sequence prefix + target[:-1]. Logits are causal, so one
    forward pass over a longer sequence that starts with that one serves it too: items are grouped
    under the longest sequences that extend them ("carriers"): identical continuations (targets
    sharing all but their last token) and a mark's continuation that the prompt itself goes on to
    spell out (the recorded outcome, a prefix of the next mark's) need no pass of their own.
    With ``parts`` (the split model) only the rows that score a target token go through the head.
    """
    needed = [tuple(prefix + target[:-1]) for prefix, target in items]
    carriers: list[tuple[int, ...]] = []
    carrier_of: dict[tuple[int, ...], int] = {}
    for sequence in sorted(set(needed), key=len, reverse=True):
        host = next((i for i, c in enumerate(carriers) if c[: len(sequence)] == sequence), None)
        if host is None:
            carriers.append(sequence)
            host = len(carriers) - 1
        carrier_of[sequence] = host
    by_carrier: dict[int, list[int]] = {}
    for item, sequence in enumerate(needed):
        by_carrier.setdefault(carrier_of[sequence], []).append(item)
    totals = [0.0] * len(items)
    for start in range(0, len(carriers), batch_size):
        chunk = list(range(start, min(start + batch_size, len(carriers))))
        input_ids, attention, position_ids, _ = padded_inputs([list(carriers[c]) for c in chunk], pad_id)
        inputs = dict(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                      position_ids=position_ids.to(device), use_cache=False)
        if parts is None:
            logits = model(**inputs).logits
            unembed = lambda row, cols: logits[row, cols]  # noqa: E731
        else:
            with parts.final_hidden() as found:
                model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
            hidden = found[0]
            unembed = lambda row, cols: parts.head(hidden[row, cols])  # noqa: E731
        width = input_ids.shape[1]
        for row, c in enumerate(chunk):
            offset = width - len(carriers[c])
            for item in by_carrier[c]:
                prefix, target = items[item]
                # the logits at positions len(prefix) .. len(prefix)+m-2 predict target[1:]
                first = offset + len(prefix)
                rows = unembed(row, slice(first, first + len(target) - 1)).float()
                wanted = torch.tensor(target[1:], device=rows.device)
                totals[item] = float((rows.gather(-1, wanted[:, None]).squeeze(-1) - torch.logsumexp(rows, -1)).sum())
    return totals


def map_marks(marks: list[dict[str, Any]], spans, shift: int | Callable[[int], int],
              record: PromptRecord) -> tuple[dict[int, int], dict[int, bool]]:
    """Place each mark (a character offset) on the token that ends at it.

    ``shift`` maps an offset in the record's text to one in the tokenized text: a number added to it,
    or a function (a chat template places the turns' texts at different shifts).

    The row used is the last token that starts before the offset. When the offset falls inside that
    token (the tokenizer merged characters across it), the row conditions on the whole token; the
    mark then carries ``"exact": false``.
    """
    starts = np.array([s for s, e in spans])
    ends = np.array([e for s, e in spans])
    real = ends > starts  # special tokens have empty spans
    at: dict[int, int] = {}
    exact: dict[int, bool] = {}
    place = shift if callable(shift) else (lambda o: o + shift)
    for i, mark in enumerate(marks):
        offset = place(mark["offset"])
        candidates = np.nonzero(real & (starts < offset))[0]
        if len(candidates) == 0:
            raise UsageError(f"mark {i}: offset {mark['offset']} precedes the first token", where=_where(record))
        position = int(candidates[-1])
        if position in at:
            raise UsageError(f"marks {at[position]} and {i} fall in the same token (position {position})",
                             where=_where(record))
        at[position] = i
        exact[position] = bool(ends[position] == offset)
    return at, exact


def display_vocab(tokenizer, vocab_size: int) -> list[str]:
    """Readable string of every token id (ids past the tokenizer's vocabulary get a placeholder)."""
    known = min(len(tokenizer), vocab_size)
    strings = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    return strings + [f"<id {i}>" for i in range(known, vocab_size)]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    return set(ids if isinstance(ids, list) else [] if ids is None else [ids])


def _where(record: PromptRecord) -> str:
    return f"prompt {record.id!r} (line {record.line})"

