"""Prompts to token ids (the chat template, marks placed on tokens, the context limit), and token ids
to the model's left-padded inputs.

:class:`PromptEncoder` turns a :class:`~llmprobe.tracing.prompts.PromptRecord` into an
:class:`EncodedPrompt`: its token ids and, for each mark (a character offset), the token that ends
at it. What it produces depends only on the tokenizer, the model's context length and the settings
``chat``, ``truncate`` and ``max_new_tokens``; a run encodes each prompt once
(:class:`llmprobe.tracing.run.TraceRun`) and everything after that works on the encoded prompts.

Chat modes (``--chat``): "user" (or ``True``) renders the prompt as the user turn followed by the
generation prompt; "prefill" renders ``prompt[:split]`` (trailing whitespace dropped) as the user turn
and ``prompt[split:]`` as the start of the assistant's reply, left open (no end-of-turn token), where
``split`` is the record's field of that name (``llmprobe experiment`` writes it for templates with an
instruction). The text around each turn is found from the template's structure (rendered once with
sentinel contents), never by searching the rendered text for the prompt, so a prompt that also
occurs in a system prompt is still placed right; marks keep referring to the original prompt text.

A prompt longer than the context (less the tokens to generate) is refused, or cut with ``--truncate``
(left: a leading BOS stays; marks on cut tokens are dropped). :meth:`PromptEncoder.encode_all` first
refuses, without tokenizing it, any prompt too long whatever its tokenization.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any
from collections.abc import Callable

import numpy as np
import torch

from llmprobe.errors import UsageError
from llmprobe.tracing.prompts import PromptRecord
from llmprobe.tracing.reduction import NO_TOKEN, PADDING
from llmprobe.tracing.settings import TraceSettings

_SENTINELS = ("\ue000llmprobe user turn\ue001", "\ue000llmprobe assistant turn\ue001")  # private-use marks


@dataclass
class EncodedPrompt:
    record: PromptRecord
    ids: list[int]
    marks_at: dict[int, int]  # token position -> index into record.marks
    marks_exact: dict[int, bool]  # position -> does the token end exactly at the mark's offset

    @property
    def mark_positions(self) -> list[int]:
        """Where the prompt is read at its marks: every mark's position, else its last position (an embedding
        is kept there, a fit reads it there, a patch defaults to it)."""
        return sorted(self.marks_at) or [len(self.ids) - 1]

    def to_json(self) -> str:
        """One line of JSON that :meth:`from_json` turns back into this prompt (a Ray task's input)."""
        marks = [[p, m, self.marks_exact[p]] for p, m in self.marks_at.items()]
        return json.dumps({"record": asdict(self.record), "ids": self.ids, "marks": marks}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> EncodedPrompt:
        data = json.loads(text)
        return cls(PromptRecord(**data["record"]), data["ids"], {p: m for p, m, _ in data["marks"]},
                   {p: exact for p, _, exact in data["marks"]})


def context_length(model: torch.nn.Module) -> int:
    """The model's context in tokens (0: unknown, no limit)."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


class PromptEncoder:
    """Encodes prompts for one tokenizer, context length and set of settings."""

    def __init__(self, tokenizer, settings: TraceSettings, max_context: int) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_context = max_context
        self._chat_frame: tuple[str, ...] | None = None  # the template's text around the turns, found once

    @classmethod
    def for_model(cls, loaded, settings: TraceSettings) -> PromptEncoder:
        return cls(loaded.tokenizer, settings, context_length(loaded.model))

    def key(self) -> str | None:
        """A digest of everything :meth:`encode` depends on: the tokenizer's whole definition (vocabulary,
        merges, normalizer, pre- and post-processor, added tokens), its chat template and special-token
        flags, the context length and the settings ``chat``, ``truncate`` and ``max_new_tokens``. Encoders
        with equal keys encode every prompt identically, so runs may share their encoded prompts (a
        comparison tokenizes once per distinct tokenizer). None: the tokenizer's definition cannot be read
        (no sharing)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        digest = hashlib.sha256()
        for part in (backend.to_str(), type(self.tokenizer).__name__, str(self.tokenizer.chat_template),
                     str(getattr(self.tokenizer, "add_bos_token", None)),
                     str(getattr(self.tokenizer, "add_eos_token", None)), str(self.max_context),
                     str(self.settings.chat_mode), str(self.settings.truncate), str(self.settings.max_new_tokens)):
            digest.update(part.encode("utf-8"))
            digest.update(b"\0")
        return digest.hexdigest()

    def encode_all(self, records: list[PromptRecord]) -> list[EncodedPrompt]:
        """Every prompt encoded, after refusing those too long whatever their tokenization."""
        self.refuse_overlong(records)
        return [self.encode(record) for record in records]

    def refuse_overlong(self, records: list[PromptRecord]) -> None:
        """Refuse, before tokenizing it, a prompt too long for the context whatever its tokenization.

        A token covers at most as many characters as the longest vocabulary entry (four times that, for
        tokenizers whose normalizer merges characters), so a prompt with more characters than that many
        times the context cannot fit: a 46 MB line fails in milliseconds instead of after a minute of
        tokenizing. Shorter prompts are measured exactly by :meth:`encode`.
        """
        if self.settings.truncate is not None or not self.max_context:
            return
        limit = self.max_context - self.settings.max_new_tokens
        chars_per_token = 4 * max(map(len, self.tokenizer.get_vocab()), default=1)
        for record in records:
            if len(record.text) > limit * chars_per_token:
                raise UsageError(f"prompt has {len(record.text)} characters, so at least"
                                 f" {len(record.text) // chars_per_token} tokens, but the model's context is"
                                 f" {self.max_context} tokens; shorten it or pass --truncate left|right",
                                 where=where(record))

    def encode(self, record: PromptRecord) -> EncodedPrompt:
        text = record.text
        shift: int | Callable[[int], int] = 0
        mode = self.settings.chat_mode
        if mode is not None:
            text, shift = self._chat_text(record, mode)
        enc = self.tokenizer(text, add_special_tokens=mode is None, return_offsets_mapping=True)
        ids, spans = list(enc["input_ids"]), enc["offset_mapping"]
        if not ids:
            raise UsageError("prompt tokenizes to nothing", where=where(record))
        marks_at, exact = map_marks(record.marks, spans, shift, record)
        limit = self.max_context - self.settings.max_new_tokens if self.max_context else None
        if limit is not None and len(ids) > limit:
            head = 1 if spans[0][0] == spans[0][1] else 0  # a leading BOS stays when the left end is cut
            if self.settings.truncate is None or limit <= head:
                raise UsageError(
                    f"prompt has {len(ids)} tokens (+{self.settings.max_new_tokens} to generate) but the model's"
                    f" context is {self.max_context} tokens; shorten it or pass --truncate left|right",
                    where=where(record))
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
                                 where=where(record))
            return text, lambda offset: offset + len(frame[0])
        split = record.meta.get("split")
        if split is None:
            raise UsageError("--chat prefill needs a split point: the record has no \"split\" field (the character"
                             " offset where the assistant turn starts; `llmprobe experiment` writes it for templates"
                             " with an instruction)", where=where(record))
        if isinstance(split, bool) or not isinstance(split, int) or not 0 < split < len(record.text):
            raise UsageError(f"\"split\" must be an offset inside the prompt (1..{len(record.text) - 1}), got {split!r}",
                             where=where(record))
        user, assistant = record.text[:split].rstrip(), record.text[split:]
        if not user:
            raise UsageError("the user turn (the prompt before \"split\") is empty", where=where(record))
        for i, mark in enumerate(record.marks):
            if mark["offset"] < split:
                raise UsageError(f"mark {i}: offset {mark['offset']} lies in the user turn (before split {split});"
                                 " with --chat prefill marks belong to the assistant turn", where=where(record))
        start = len(frame[0]) + len(user) + len(frame[1])
        text = frame[0] + user + frame[1] + assistant
        expected = self._render_chat([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                                     open_turn=True)
        if not expected.startswith(text):
            raise UsageError("the chat template altered the prompt text; marks cannot be placed",
                             where=where(record))
        return text, lambda offset: offset - split + start


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
            raise UsageError(f"mark {i}: offset {mark['offset']} precedes the first token", where=where(record))
        position = int(candidates[-1])
        if position in at:
            raise UsageError(f"marks {at[position]} and {i} fall in the same token (position {position})",
                             where=where(record))
        at[position] = i
        exact[position] = bool(ends[position] == offset)
    return at, exact


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


def where(record: PromptRecord) -> str:
    """How an error names a prompt: its id and line."""
    return f"prompt {record.id!r} (line {record.line})"
