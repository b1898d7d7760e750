"""Host rows of a traced batch, and their assembly into one Arrow record batch in the trace schema.

Row semantics: the row at ``position`` i holds P(. | x_0..x_i); ``next_token`` is x_{i+1}.
Generated tokens get rows of their own (phase ``generated``) until ``max_new_tokens`` or an
end-of-sequence token, which appears as the last row's ``next_token`` but gets no row itself.
A logit-lens trace adds each prompt's rows once per requested layer (column ``layer``).

Within a record batch the rows of each prompt are together: its prompt rows, its generated rows,
then its lens layers in ascending order; prompts in the engine's processing order.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from llmprobe.tracing.encoding import EncodedPrompt
from llmprobe.tracing.lens import InternalsPlan
from llmprobe.tracing.reduction import NO_TOKEN, StepStats
from llmprobe.tracing.schema import PHASE_GENERATED, PHASE_PROMPT


@dataclass
class Rows:
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


def rows_from_stats(stats: StepStats, b: int, cols: slice, first_position: int, phase: str,
                    token_ids: torch.Tensor) -> Rows:
    """Batch row ``b``'s statistics at columns ``cols``, copied to the host; ``next_ids`` left to the caller."""
    n = cols.stop - cols.start
    return Rows(
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


def mark_cells(prompt: EncodedPrompt, positions, marked: bool = True) -> tuple[list, list, list]:
    """The ``mark_index``, ``mark`` (JSON, with ``exact``) and ``meta`` (JSON) cells of a prompt's rows at
    ``positions``; ``marked`` False (generated rows): no marks."""
    meta = json.dumps(prompt.record.meta, ensure_ascii=False) if prompt.record.meta else None
    index, marks = [], []
    for p in positions:
        m = prompt.marks_at.get(int(p)) if marked else None
        index.append(m)
        marks.append(None if m is None else json.dumps({**prompt.record.marks[m], "exact": prompt.marks_exact[int(p)]},
                                                        ensure_ascii=False))
    return index, marks, [meta] * len(index)


_DISPLAY_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def display_vocab(tokenizer, vocab_size: int) -> list[str]:
    """Readable string of every token id (ids past the tokenizer's vocabulary get a placeholder).

    Decoding a 49k-token vocabulary takes about half a second, so it is done once per tokenizer (held
    weakly: a freed model frees its entry) and shared by every run on it (``serve``, notebook calls);
    the list is never modified."""
    memo = _DISPLAY_VOCABS.get(tokenizer)
    if memo is not None and memo[0] == vocab_size:
        return memo[1]
    known = min(len(tokenizer), vocab_size)
    strings = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    vocab = strings + [f"<id {i}>" for i in range(known, vocab_size)]
    _DISPLAY_VOCABS[tokenizer] = (vocab_size, vocab)
    return vocab


class RowAssembly:
    """Builds the record batch of one batch of prompts from its host rows (one per engine)."""

    def __init__(self, schema: pa.Schema, vocab: list[str], internals: InternalsPlan, top_k: int,
                 n_targets: int) -> None:
        self.schema = schema
        self.internals = internals
        self.top_k = top_k
        self.n_targets = n_targets
        self._vocab_array = np.array(vocab, dtype=object)

    def record_batch(self, batch: list[EncodedPrompt], prompt_rows: list[Rows],
                     generated: list[list[Rows]] | None, target_seq: list[dict[int, np.ndarray]] | None,
                     layer_rows: dict[int, list[Rows]] | None = None,
                     embeddings: torch.Tensor | None = None) -> pa.RecordBatch:
        parts: list[tuple[EncodedPrompt, Rows, dict[int, np.ndarray] | None]] = []
        part_layers: list[int] = []  # logit-lens layer of each part (the output layer for the model's own rows)
        embedding_rows: list[int] = []  # row numbers that get an embedding, in the order of `embeddings`
        for b, e in enumerate(batch):
            first_row = sum(len(rows.positions) for _, rows, _ in parts)
            embedding_rows += [first_row + p for p in e.mark_positions]
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
        k = self.top_k
        vocab = self._vocab_array
        columns: dict[str, pa.Array] = {
            "prompt_index": pa.array(np.repeat([e.record.index for e, _, _ in parts], counts), pa.int32()),
            "prompt_id": pa.array(np.repeat(np.array([e.record.id for e, _, _ in parts], dtype=object), counts),
                                  pa.string()),
            "position": pa.array(cat("positions"), pa.int32()),
            "phase": pa.DictionaryArray.from_arrays(
                pa.array(np.repeat([0 if r.phase == PHASE_PROMPT else 1 for _, r, _ in parts], counts), pa.int8()),
                pa.array([PHASE_PROMPT, PHASE_GENERATED])),
            "token_id": pa.array(token_ids, pa.int32()),
            "token": pa.array(vocab[token_ids], pa.string()),
            "next_token_id": pa.array(np.where(has_next, next_ids, 0), pa.int32(), mask=~has_next),
            "next_token": pa.array(vocab[np.where(has_next, next_ids, 0)], pa.string(), mask=~has_next),
            "next_logprob": pa.array(cat("next_logprob").astype(np.float32), pa.float32(), mask=~has_next),
            "next_rank": pa.array(cat("next_rank").astype(np.int32), pa.int32(), mask=~has_next),
            "entropy": pa.array(cat("entropy").astype(np.float32), pa.float32()),
            "topk_ids": pa.FixedSizeListArray.from_arrays(pa.array(cat("topk_ids").reshape(-1), pa.int32()), k),
            "topk_logprobs": pa.FixedSizeListArray.from_arrays(
                pa.array(cat("topk_logprobs").astype(np.float32).reshape(-1), pa.float32()), k),
        }
        if self.n_targets:
            columns["target_logprobs"] = pa.FixedSizeListArray.from_arrays(
                pa.array(cat("target_logprobs").astype(np.float32).reshape(-1), pa.float32()), self.n_targets)
            seq_rows = []
            for _, rows, seq in parts:
                for p in rows.positions:
                    value = seq.get(int(p)) if seq is not None else None
                    seq_rows.append(None if value is None else value.astype(np.float32).tolist())
            columns["target_seq_logprobs"] = pa.array(seq_rows, pa.list_(pa.float32(), self.n_targets))
        mark_index, mark_json, meta_json = [], [], []
        for e, rows, _ in parts:
            index, mark, meta = mark_cells(e, rows.positions, marked=rows.phase == PHASE_PROMPT)
            mark_index += index
            mark_json += mark
            meta_json += meta
        columns["mark_index"] = pa.array(mark_index, pa.int32())
        columns["mark"] = pa.array(mark_json, pa.string())
        columns["meta"] = pa.array(meta_json, pa.string())
        if self.internals.layers:
            columns["layer"] = pa.array(np.repeat(part_layers, counts), pa.int16())
        if self.internals.embedding_dim:
            columns["embedding"] = self.internals.embedding_column(embedding_rows, embeddings, sum(counts))
        return pa.RecordBatch.from_arrays([columns[f.name] for f in self.schema], schema=self.schema)
