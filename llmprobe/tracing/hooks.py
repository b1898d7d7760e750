"""Forward hooks that reduce logits to per-position statistics on the model's device.

Design
------
* A hook is attached to the module that produces the logits (``model.get_output_embeddings()``,
  the ``lm_head`` of a Llama) inside :func:`capture_logits`, a context manager that removes it on
  every exit path, errors included. Plain ``register_forward_hook`` is used, so accelerate's own
  hooks (device maps, offload) stay untouched and the reduction runs wherever the logits live.
* The hook never changes the module's output. It reduces the ``[B, T, V]`` logits to ``[B, T, k]``
  and a few ``[B, T]`` scalars in float32 — log-normalizer, top-k, entropy, the log-probability
  and rank of the actual next token, the first-token log-probabilities of fixed targets — and
  stores them in the :class:`Capture`, one result per forward call (the caller pops it).
  Only these reductions ever leave the device; a full vocabulary row is never copied to the host.
* Reductions are done in chunks of positions, so the float32 working copy of bfloat16 logits is
  bounded by ``chunk * V`` rather than ``B * T * V``. On the CPU a chunk is further cut into blocks of
  rows that fit the cache, so the passes after the first read cached data, not main memory.
* Cost is what benchmark 1 (benchmarks/bench_trace.py) measures against a bare forward pass, so the
  reduction makes as few passes over the vocabulary as it can: top-k comes from block maxima (one
  cheap pass, then a top-k over ``k`` blocks instead of ``V`` values), the row maximum is the first
  top-k value, one ``exp2`` pass into a reused buffer gives both the log-normalizer and the entropy
  (the entropy's ``e * y`` goes into a reused buffer too), and the rank of a next token
  found in the top-k is read off the top-k values; only the other rows get a comparison pass.
  Padding positions (next id :data:`PADDING`) are skipped.
  docs/performance.md has the measurements.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

NO_TOKEN = -1  # next_ids value for "no following token" (end of text)
LOG2_E = 1.4426950408889634
PADDING = -2  # next_ids value for a padding position: not reduced at all (its statistics are NaN / 0)


@dataclass
class StepStats:
    """Reductions of one forward call, all ``[B, T, ...]`` tensors on the logits' device."""

    logsumexp: torch.Tensor  # [B, T] float32
    entropy: torch.Tensor  # [B, T] float32, nats
    topk_ids: torch.Tensor  # [B, T, k] int64
    topk_logprobs: torch.Tensor  # [B, T, k] float32
    next_logprob: torch.Tensor  # [B, T] float32 (NaN where next_ids is NO_TOKEN)
    next_rank: torch.Tensor  # [B, T] int64 (0 where next_ids is NO_TOKEN)
    target_logprobs: torch.Tensor | None  # [B, T, n_targets] float32
    last_logits: torch.Tensor | None  # [B, V] logits of the last position, for choosing the next token


class LogitReducer:
    """Turns logits into :class:`StepStats`; shared by the output head, the logit lens and generation.

    Two entry points share one block-wise reduction: :meth:`reduce_hidden` applies an output head to a
    block of hidden rows at a time and reduces each block at once (the engine's path: no ``[B, T, V]``
    tensor ever exists), :meth:`reduce` reduces logits the model already produced (the hook path, for
    models that cannot be split). ``chunk_positions`` bounds the positions reduced at once on a GPU.
    """

    TOPK_BLOCK = 32  # vocabulary entries per group of the group-maximum top-k (see block_topk)
    CPU_BLOCK_BYTES = 4 << 20  # float32 working set per pass on the CPU: about a core's share of cache
    CPU_HEAD_BLOCK_BYTES = 32 << 20  # logits per output-head product on the CPU (rows enough to amortize W)
    RANK_FROM_TOPK_ON = ("cpu",)  # on a GPU a full comparison is cheaper than the shortcut's host sync

    def __init__(self, top_k: int, target_first_ids: list[int] | None = None, chunk_positions: int = 512) -> None:
        self.top_k = top_k
        self.target_first_ids = target_first_ids or None
        self.chunk_positions = chunk_positions

    def head_rows(self, device: torch.device, vocab: int) -> int:
        """Hidden rows sent through the output head at once: the most that keep its logits small."""
        if device.type == "cpu":
            return min(self.chunk_positions, max(self._step(device, vocab), self.CPU_HEAD_BLOCK_BYTES // (4 * vocab)))
        return self.chunk_positions

    def _step(self, device: torch.device, vocab: int) -> int:
        """Rows reduced per pass over the vocabulary."""
        if device.type == "cpu":
            return max(1, min(self.chunk_positions, self.CPU_BLOCK_BYTES // (4 * vocab)))
        return self.chunk_positions

    @torch.inference_mode()
    def reduce(self, logits: torch.Tensor, next_ids: torch.Tensor | None) -> StepStats:
        """Statistics of ``[B, T, V]`` logits computed elsewhere (the hook path)."""
        batch, length, vocab = logits.shape
        flat = logits.reshape(batch * length, vocab)
        sink = _Reduction(self, batch, length, next_ids)
        for first, stop in sink.runs:
            sink.add(first, flat[first:stop])
        return sink.stats(last_logits=logits[:, -1, :])

    @torch.inference_mode()
    def reduce_hidden(self, head, hidden: torch.Tensor, next_ids: torch.Tensor | None,
                      keep_last: bool = False) -> StepStats:
        """Statistics of ``head(hidden)`` for ``[B, T, H]`` final-normed hidden states, never holding
        more than one block of logits: ``head(rows, out=buffer)`` maps ``[n, H]`` to ``[n, V]`` logits
        (:class:`llmprobe.model.structure.OutputHead`, or the logit lens's unembedding). Padding
        positions are not sent through the head at all. ``keep_last``: also return the logits of
        each row's last position (for choosing a generated token)."""
        batch, length, width = hidden.shape
        flat = hidden.reshape(batch * length, width)
        vocab = head.vocab_size
        rows = self.head_rows(flat.device, vocab)
        buffer = None
        sink = _Reduction(self, batch, length, next_ids)
        for first, stop in sink.runs:
            for s in range(first, stop, rows):
                e = min(s + rows, stop)
                if buffer is None:
                    buffer = torch.empty(min(rows, stop - s), vocab, dtype=flat.dtype, device=flat.device)
                elif buffer.shape[0] < e - s:
                    buffer = torch.empty(rows, vocab, dtype=flat.dtype, device=flat.device)
                sink.add(s, head(flat[s:e], out=buffer))
        return sink.stats(last_logits=head(hidden[:, -1, :].contiguous()) if keep_last else None)

    def _reduce_rows(self, rows: torch.Tensor, next_ids: torch.Tensor | None,
                     work: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        n = rows.shape[0]
        x = rows.float().contiguous()  # a copy of this chunk only when the model runs in (b)float16
        top_values, top_ids = block_topk(x, self.top_k, self.TOPK_BLOCK)
        peak = top_values[:, 0]
        y = torch.sub(x, peak[:, None], out=work[0][:n])  # <= 0, so exp cannot overflow
        # exp(y) as exp2(y log2 e): torch's exp2 kernel is about twice as fast as exp on the CPU
        e = torch.exp2(torch.mul(y, LOG2_E, out=work[1][:n]), out=work[1][:n])
        total = e.sum(-1)
        log_total = total.log()
        lse = peak + log_total
        # H = -sum p log p with p = e / total and log p = y - log total; e * y goes into y's buffer
        entropy = log_total - torch.mul(e, y, out=y).sum(-1) / total
        top_lp = top_values - lse[:, None]
        if next_ids is None:
            next_lp = torch.full_like(lse, float("nan"))
            next_rank = torch.zeros_like(lse, dtype=torch.long)
        elif x.device.type in self.RANK_FROM_TOPK_ON:
            next_lp, next_rank = _logprob_and_rank_via_topk(x, lse, next_ids, top_values, top_ids, work[2])
        else:
            next_lp, next_rank = token_logprob_and_rank(x, lse, next_ids, out=work[2][:n])
        if self.target_first_ids:
            target_lp = x[:, self.target_first_ids] - lse[:, None]
        else:
            target_lp = lse[:, None][:, :0]
        return lse, entropy, top_ids, top_lp, next_lp, next_rank, target_lp


class _Reduction:
    """The output tensors of one reduction, filled block by block at flat position offsets."""

    def __init__(self, reducer: LogitReducer, batch: int, length: int, next_ids: torch.Tensor | None) -> None:
        self.reducer, self.shape = reducer, (batch, length)
        self.total = batch * length
        self.next_ids = None if next_ids is None else next_ids.reshape(-1)
        self.runs = _live_runs(self.next_ids, self.total)
        self.out: tuple[torch.Tensor, ...] | None = None
        self.work: tuple[torch.Tensor, ...] | None = None
        self.step = 0

    def _allocate(self, device: torch.device, vocab: int) -> None:
        total, k = self.total, self.reducer.top_k
        n_targets = len(self.reducer.target_first_ids or [])
        nan = float("nan")
        self.out = (torch.full((total,), nan, device=device), torch.full((total,), nan, device=device),
                    torch.zeros((total, k), dtype=torch.long, device=device), torch.full((total, k), nan, device=device),
                    torch.full((total,), nan, device=device), torch.zeros((total,), dtype=torch.long, device=device),
                    torch.full((total, n_targets), nan, device=device))
        self.step = min(self.reducer._step(device, vocab), self.total)
        self.work = (torch.empty(self.step, vocab, dtype=torch.float32, device=device),
                     torch.empty(self.step, vocab, dtype=torch.float32, device=device),
                     torch.empty(self.step, vocab, dtype=torch.bool, device=device))
        if self.next_ids is not None:
            self.next_ids = self.next_ids.to(device)

    def add(self, offset: int, logits: torch.Tensor) -> None:
        """Reduce ``[n, V]`` logits of flat positions ``offset .. offset + n``, a cache-sized block at a time."""
        if self.out is None:
            self._allocate(logits.device, logits.shape[1])
        for s in range(0, logits.shape[0], self.step):
            e = min(s + self.step, logits.shape[0])
            nxt = None if self.next_ids is None else self.next_ids[offset + s : offset + e]
            for target, value in zip(self.out, self.reducer._reduce_rows(logits[s:e], nxt, self.work)):
                target[offset + s : offset + e] = value

    def stats(self, last_logits: torch.Tensor | None) -> StepStats:
        lse, entropy, top_ids, top_lp, next_lp, next_rank, target_lp = self.out
        shape = self.shape
        return StepStats(
            logsumexp=lse.view(shape),
            entropy=entropy.view(shape),
            topk_ids=top_ids.view(*shape, -1),
            topk_logprobs=top_lp.view(*shape, -1),
            next_logprob=next_lp.view(shape),
            next_rank=next_rank.view(shape),
            target_logprobs=target_lp.view(*shape, -1) if self.reducer.target_first_ids else None,
            last_logits=last_logits,
        )


def _live_runs(next_ids: torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    """[start, stop) runs of flat positions that are not :data:`PADDING`."""
    if next_ids is None:
        return [(0, total)]
    live = (next_ids != PADDING).cpu().numpy()
    if live.all():
        return [(0, total)]
    edges = np.diff(np.concatenate([[0], live.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def block_topk(x: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k)`` of a contiguous ``[n, V]`` tensor, via the maxima of groups of ``block`` entries.

    The k largest entries lie in the k groups with the largest maxima (those k maxima are k entries
    at least as large as the k-th largest), so a top-k over those groups' entries is exact. Group g
    holds columns g, g + G, g + 2G, ... (G groups), so the maxima are one vectorized pass over
    ``block`` rows of G contiguous values.
    """
    n, vocab = x.shape
    groups = vocab // block
    if groups < 4 * k:  # small vocabularies: the plain top-k is as cheap
        return x.topk(k, dim=-1)
    maxima = x[:, : groups * block].view(n, block, groups).amax(1)
    chosen = maxima.topk(k, dim=-1).indices
    columns = (chosen[:, :, None] + groups * torch.arange(block, device=x.device)).view(n, k * block)
    if vocab > groups * block:  # the ragged tail is always a candidate
        tail = torch.arange(groups * block, vocab, device=x.device).expand(n, -1)
        columns = torch.cat([columns, tail], dim=1)
    values, where = x.gather(1, columns).topk(k, dim=-1)
    return values, columns.gather(1, where)


def _logprob_and_rank_via_topk(x: torch.Tensor, lse: torch.Tensor, token_ids: torch.Tensor, top_values: torch.Tensor,
                               top_ids: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logprob_and_rank`, scanning only the rows whose token is not in the top-k.

    Every entry larger than a top-k value is itself in the top-k, so for a token found there the
    rank counts larger top-k values; usually most next tokens are, which saves a pass over ``V``.
    """
    valid = token_ids >= 0
    safe = token_ids.clamp(min=0)
    chosen = x.gather(-1, safe[:, None]).squeeze(-1)
    rank = (top_values > chosen[:, None]).sum(-1) + 1
    scan = (valid & ~(top_ids == safe[:, None]).any(-1)).nonzero().squeeze(-1)
    if len(scan):
        rows = x.index_select(0, scan)
        larger = torch.gt(rows, chosen[scan, None], out=out[: len(scan)]).sum(-1, dtype=torch.int32)
        rank[scan] = larger.long() + 1
    logprob = torch.where(valid, chosen - lse, torch.full_like(chosen, float("nan")))
    return logprob, torch.where(valid, rank, torch.zeros_like(rank))


def token_logprob_and_rank(
    logits32: torch.Tensor, lse: torch.Tensor, token_ids: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability and 1-based rank of ``token_ids`` in each row (rank = 1 + #strictly larger).

    Rows whose id is :data:`NO_TOKEN` get NaN and rank 0. ``out``: a reusable boolean buffer shaped like
    ``logits32``.
    """
    valid = token_ids >= 0
    safe = token_ids.clamp(min=0)
    chosen = logits32.gather(-1, safe[:, None]).squeeze(-1)
    # an int32 sum of the booleans is several times faster than the default int64 one on the CPU
    rank = torch.gt(logits32, chosen[:, None], out=out).sum(-1, dtype=torch.int32).long() + 1
    logprob = torch.where(valid, chosen - lse, torch.full_like(chosen, float("nan")))
    return logprob, torch.where(valid, rank, torch.zeros_like(rank))


class Capture:
    """Holds what the hook computed; the engine sets ``next_ids`` before each forward call."""

    def __init__(self, reducer: LogitReducer) -> None:
        self.reducer = reducer
        self.next_ids: torch.Tensor | None = None
        self._results: list[StepStats] = []

    def hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        logits = output[0] if isinstance(output, tuple) else output
        self._results.append(self.reducer.reduce(logits, self.next_ids))

    def pop(self) -> StepStats:
        if len(self._results) != 1:
            raise RuntimeError(f"expected one captured forward call, found {len(self._results)}")
        return self._results.pop()


@contextmanager
def capture_logits(module: torch.nn.Module, reducer: LogitReducer) -> Iterator[Capture]:
    """Attach a reducing forward hook to ``module`` for the duration of the block."""
    capture = Capture(reducer)
    handle = module.register_forward_hook(capture.hook)
    try:
        yield capture
    finally:
        handle.remove()
