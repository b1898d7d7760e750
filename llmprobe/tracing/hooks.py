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
    last_logits: torch.Tensor  # [B, V] logits of the last position, for choosing the next token


class LogitReducer:
    """Turns logits into :class:`StepStats`; shared by the output head and the logit lens.

    ``chunk_positions`` bounds the positions reduced at once (and so the float32 working memory); the
    logit lens also unembeds that many positions at a time.
    """

    TOPK_BLOCK = 32  # vocabulary entries per group of the group-maximum top-k (see block_topk)
    CPU_BLOCK_BYTES = 4 << 20  # float32 working set per pass on the CPU: about a core's share of cache
    RANK_FROM_TOPK_ON = ("cpu",)  # on a GPU a full comparison is cheaper than the shortcut's host sync

    def __init__(self, top_k: int, target_first_ids: list[int] | None = None, chunk_positions: int = 512) -> None:
        self.top_k = top_k
        self.target_first_ids = target_first_ids or None
        self.chunk_positions = chunk_positions

    @torch.inference_mode()
    def reduce(self, logits: torch.Tensor, next_ids: torch.Tensor | None) -> StepStats:
        batch, length, vocab = logits.shape
        total = batch * length
        flat = logits.reshape(total, vocab)
        device = logits.device
        step = self.chunk_positions
        if device.type == "cpu":
            step = max(1, min(step, self.CPU_BLOCK_BYTES // (4 * vocab)))
        step = min(step, total)
        k, n_targets = self.top_k, len(self.target_first_ids or [])
        nan = float("nan")
        out = (torch.full((total,), nan, device=device), torch.full((total,), nan, device=device),
               torch.zeros((total, k), dtype=torch.long, device=device), torch.full((total, k), nan, device=device),
               torch.full((total,), nan, device=device), torch.zeros((total,), dtype=torch.long, device=device),
               torch.full((total, n_targets), nan, device=device))
        work = (torch.empty(step, vocab, dtype=torch.float32, device=device),
                torch.empty(step, vocab, dtype=torch.float32, device=device),
                torch.empty(step, vocab, dtype=torch.bool, device=device))
        nxt = None if next_ids is None else next_ids.reshape(-1)
        runs = _live_runs(nxt, total)
        nxt = None if nxt is None else nxt.to(device)
        for first, stop in runs:
            for s in range(first, stop, step):
                e = min(s + step, stop)
                rows = self._reduce_rows(flat[s:e], None if nxt is None else nxt[s:e], work)
                for target, value in zip(out, rows):
                    target[s:e] = value
        lse, entropy, top_ids, top_lp, next_lp, next_rank, target_lp = out
        shape = (batch, length)
        return StepStats(
            logsumexp=lse.view(shape),
            entropy=entropy.view(shape),
            topk_ids=top_ids.view(*shape, -1),
            topk_logprobs=top_lp.view(*shape, -1),
            next_logprob=next_lp.view(shape),
            next_rank=next_rank.view(shape),
            target_logprobs=target_lp.view(*shape, -1) if self.target_first_ids else None,
            last_logits=logits[:, -1, :],
        )

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
