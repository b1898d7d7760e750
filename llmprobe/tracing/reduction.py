"""Reductions of logits to per-position statistics on the model's device.

Design
------
* What leaves the device per position: top-k ids and log-probabilities, the log-normalizer, the
  entropy, the log-probability and rank of the actual next token, and the first-token
  log-probabilities of fixed targets (:class:`StepStats`, float32). A full vocabulary row is never
  copied to the host.
* The engine's path (:meth:`LogitReducer.reduce_hidden`) applies the output head itself to the
  final-normed hidden states, so ``[B, T, V]`` logits never exist: the live rows (padding dropped)
  are packed side by side, a pass takes up to ``chunk_positions`` of them — one read of the head's
  weight — and makes their logits one vocabulary tile at a time, each small enough on the CPU to be
  reduced while in cache. :class:`_Running` accumulates every statistic across tiles (an online
  softmax for the log-normalizer and entropy, a top-k merged under a floor, ranks counted per tile).
  On a GPU a tile is the whole vocabulary.
* The hook path, for models whose logits the engine cannot make itself: the hook that
  :func:`llmprobe.tracing.hooks.capture_logits` attaches to the output head hands the logits the
  model produced to :meth:`LogitReducer.reduce`, which reduces them a cache-sized block of whole rows
  at a time by the same :class:`_Running` with a single tile. This module attaches no hook itself.
* Cost is what benchmark 1 (benchmarks/bench_trace.py) measures against a bare forward pass, so each
  tile is passed over as few times as possible: group maxima (one vectorized pass) give the tile's
  maximum and its top-k candidates (only groups above the running k-th value: few after the first
  tile), one pass makes the exponent's argument and one ``exp2`` pass gives both sums; the rank of a
  next token found in the top-k is read off the top-k values, and other rows get a comparison pass
  only in tiles whose maximum exceeds the token's logit. Work buffers are kept between calls (no page
  faults from fresh multi-megabyte temporaries). docs/performance.md has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    Two entry points share one running reduction (:class:`_Running`): :meth:`reduce_hidden` applies an
    output head to hidden rows itself (the engine's path: no ``[B, T, V]`` tensor ever exists) and
    :meth:`reduce` reduces logits the model already produced (the hook path, for models that cannot be
    split). ``chunk_positions`` bounds the hidden rows sent through the head at once.
    """

    TOPK_BLOCK = 16  # vocabulary entries per group of the group-maximum top-k (see top_candidates)
    CPU_BLOCK_BYTES = 4 << 20  # float32 working set per pass over whole rows on the CPU: a core's share of cache
    CPU_TILE_BYTES = 3 << 20  # one tile of head logits on the CPU, [rows, vocabulary slice]: reduced in cache
    TILE_ALIGN = 256  # tile widths are multiples of this
    RANK_FROM_TOPK_ON = ("cpu",)  # on a GPU a full comparison is cheaper than skipping rows (a host sync)

    def __init__(self, top_k: int, target_first_ids: list[int] | None = None, chunk_positions: int = 512) -> None:
        self.top_k = top_k
        self.target_first_ids = target_first_ids or None
        self.chunk_positions = chunk_positions
        self._buffers: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def tile_width(self, device: torch.device, rows: int, vocab: int) -> int:
        """Vocabulary entries per tile of the logits of a pass of ``rows`` hidden rows.

        On the CPU the head's weight (113 MB for the default model) is streamed from memory once per
        matrix product, so a pass takes up to ``chunk_positions`` rows at once and makes their logits one
        vocabulary tile at a time, each small enough (``CPU_TILE_BYTES``) to be reduced while in cache.
        Widths are multiples of ``TILE_ALIGN``: the product is up to 1.5x slower at ragged widths. On
        a GPU a tile is the whole vocabulary.
        """
        if device.type != "cpu":
            return vocab
        width = self.CPU_TILE_BYTES // (4 * max(1, rows)) // self.TILE_ALIGN * self.TILE_ALIGN
        return min(vocab, max(width, self._narrowest_tile()))

    def _narrowest_tile(self) -> int:
        """The narrowest tile: wide enough for the group-maximum top-k (see :func:`top_candidates`)."""
        return -(-2 * self.TOPK_BLOCK * self.top_k // self.TILE_ALIGN) * self.TILE_ALIGN

    def work_buffers(self, device: torch.device, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Flat buffers of at least ``size`` elements, kept between calls (a fresh multi-megabyte buffer per
        block costs page faults): two float32 working copies, a boolean one, a float32 copy of
        lower-precision logits and a tile of logits in the head's dtype."""
        kept = self._buffers.get(device)
        if kept is None or kept[0].numel() < size or kept[4].dtype != dtype:
            float32 = lambda: torch.empty(size, device=device)  # noqa: E731
            kept = (float32(), float32(), torch.empty(size, dtype=torch.bool, device=device),
                    float32() if dtype != torch.float32 else torch.empty(0, device=device),
                    torch.empty(size, dtype=dtype, device=device))
            self._buffers[device] = kept
        return kept

    def _row_step(self, device: torch.device, vocab: int) -> int:
        """Rows of whole-vocabulary logits reduced per pass."""
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
            sink.add_rows(slice(first, stop), flat[first:stop])
        sink.last_logits = logits[:, -1, :]
        return sink.stats()

    @torch.inference_mode()
    def reduce_hidden(self, head, hidden: torch.Tensor, next_ids: torch.Tensor | None,
                      keep_last: bool = False) -> StepStats:
        """Statistics of ``head(hidden)`` for ``[B, T, H]`` final-normed hidden states, never holding
        more than one tile of logits. ``head`` is an :class:`llmprobe.model.structure.OutputHead`: when
        it is ``tileable`` it makes a pass's logits a vocabulary slice at a time
        (``head.logits(rows, first, stop, out)``), otherwise a block of rows at a time (``head(rows)``).
        Padding positions are not sent through the head at all. ``keep_last``: also return the logits
        of each row's last position (for choosing a generated token), copied out of the tiles as they
        pass, so the head is applied once."""
        batch, length, width = hidden.shape
        flat = hidden.reshape(batch * length, width)
        sink = _Reduction(self, batch, length, next_ids, keep_last)
        # the live rows side by side, so that a pass (one read of the head's weight) spans prompts
        rows = flat if sink.live is None else flat.index_select(0, sink.live.to(flat.device))
        for s in range(0, rows.shape[0], self.chunk_positions):
            e = min(s + self.chunk_positions, rows.shape[0])
            where = sink.positions(s, e)
            if head.tileable:
                sink.add_tiles(where, rows[s:e], head, self.tile_width(head.device, e - s, head.vocab_size))
            else:
                sink.add_rows(where, head(rows[s:e]))
        return sink.stats()


class _Running:
    """Statistics of ``n`` rows accumulated over vocabulary tiles seen left to right (an online softmax).

    Kept per row: the running maximum ``peak``; ``total`` = Σ exp(z - peak) and ``spread`` =
    Σ exp(z - peak) (z - peak), both rescaled when the peak rises, so the log-normalizer is
    ``peak + log total`` and the entropy ``log total - spread / total``; the running top-k, merged with
    each tile's; the logits of the next token and of the targets as their tiles pass; and the number
    of entries above the next token's logit. A token that ends in the top-k is ranked from the top-k
    values, exactly. For the others, the token's own tile is compared with the token's logit and every
    other tile with ``threshold``: the same logit computed directly and rounded to the logits' dtype,
    so an entry that ties the token's logit to within float rounding — where two matrix-product
    kernels disagree too — can count either way. A single tile spanning the whole vocabulary (the
    hook path; a GPU) is the plain reduction: nothing merged, no threshold.
    """

    ids: torch.Tensor  # set with valid
    total: torch.Tensor  # set with peak, by the first tile
    spread: torch.Tensor
    top_ids: torch.Tensor  # set with top_values

    def __init__(self, reducer: LogitReducer, next_ids: torch.Tensor | None, n: int, device: torch.device,
                 threshold: torch.Tensor | None = None) -> None:
        self.reducer, self.threshold = reducer, threshold
        self.valid: torch.Tensor | None = None
        if next_ids is not None:
            self.valid, self.ids = next_ids >= 0, next_ids.clamp(min=0)
        self.peak: torch.Tensor | None = None
        self.top_values: torch.Tensor | None = None
        self.own = torch.full((n,), float("nan"), device=device)
        self.larger = torch.zeros(n, dtype=torch.int32, device=device)
        self.targets = torch.full((n, len(reducer.target_first_ids or ())), float("nan"), device=device)

    def add(self, logits: torch.Tensor, first: int, vocab: int, work: tuple[torch.Tensor, ...]) -> None:
        """Fold in the ``[n, w]`` logits of vocabulary entries ``first .. first + w`` (of ``vocab``)."""
        n, w = logits.shape
        stop = first + w
        x = logits if logits.dtype == torch.float32 else _view(work[3], n, w).copy_(logits)
        k = self.reducer.top_k
        floor = None if self.top_values is None else self.top_values[:, -1]
        values, ids, tile_peak = top_candidates(x, k, self.reducer.TOPK_BLOCK, floor)
        if self.top_values is not None:
            values, ids = torch.cat([self.top_values, values], 1), torch.cat([self.top_ids, ids + first], 1)
        if values.shape[1] > k:
            values, where = values.topk(k, dim=-1)
            ids = ids.gather(1, where)
        self.top_values, self.top_ids = values, ids
        peak = tile_peak if self.peak is None else torch.maximum(self.peak, tile_peak)
        # exp(x - peak) as exp2(u) with u = (x - peak) log2 e, made in one pass: torch's exp2 kernel is
        # about twice as fast as exp on the CPU; u <= 0, so it cannot overflow
        u = torch.add((-LOG2_E * peak)[:, None], x, alpha=LOG2_E, out=_view(work[0], n, w))
        e = torch.exp2(u, out=_view(work[1], n, w))
        total, spread = e.sum(-1), torch.mul(e, u, out=u).sum(-1) / LOG2_E  # e * u goes into u's buffer
        if self.peak is not None:
            shift = self.peak - peak  # <= 0: the earlier sums, taken against a lower peak, shrink
            scale = shift.exp()
            total, spread = total + scale * self.total, spread + scale * (self.spread + shift * self.total)
        self.peak, self.total, self.spread = peak, total, spread
        for j, target in enumerate(self.reducer.target_first_ids or ()):
            if first <= target < stop:
                self.targets[:, j] = x[:, target - first]
        if self.valid is not None:
            self._count_larger(self.valid, x, first, stop == vocab, tile_peak, work[2])

    def _count_larger(self, valid: torch.Tensor, x: torch.Tensor, first: int, last: bool, tile_peak: torch.Tensor,
                      buffer: torch.Tensor) -> None:
        n, w = x.shape
        inside = valid & (self.ids >= first) & (self.ids < first + w)
        own = x.gather(1, (self.ids - first).clamp(0, w - 1)[:, None]).squeeze(1)
        self.own = torch.where(inside, own, self.own)
        threshold = self.own if self.threshold is None else torch.where(inside, own, self.threshold)
        if x.device.type not in self.reducer.RANK_FROM_TOPK_ON:
            larger = torch.gt(x, threshold[:, None], out=_view(buffer, n, w)).sum(-1, dtype=torch.int32)
            self.larger += torch.where(valid, larger, 0)
            return
        need = valid & (tile_peak > threshold)  # where the token tops the tile there is nothing to count
        if last:
            need &= ~(self.top_ids == self.ids[:, None]).any(-1)  # ranked from the top-k instead
        rows = need.nonzero().squeeze(-1)
        if len(rows):
            larger = torch.gt(x.index_select(0, rows), threshold[rows, None], out=_view(buffer, len(rows), w))
            self.larger.index_add_(0, rows, larger.sum(-1, dtype=torch.int32))

    def result(self) -> tuple[torch.Tensor, ...]:
        """(log-normalizer, entropy, top-k ids, top-k log-probs, next log-prob, next rank, target log-probs)."""
        if self.peak is None or self.top_values is None:
            raise ValueError("no vocabulary tile was added")
        log_total = self.total.log()
        lse = self.peak + log_total
        entropy = log_total - self.spread / self.total
        if self.valid is None:
            next_lp = torch.full_like(lse, float("nan"))
            next_rank = torch.zeros_like(lse, dtype=torch.long)
        else:
            in_top = (self.top_ids == self.ids[:, None]).any(-1)
            from_top = (self.top_values > self.own[:, None]).sum(-1, dtype=torch.int32)
            rank = torch.where(in_top, from_top, self.larger).long() + 1
            next_lp = torch.where(self.valid, self.own - lse, float("nan"))
            next_rank = torch.where(self.valid, rank, 0)
        return lse, entropy, self.top_ids, self.top_values - lse[:, None], next_lp, next_rank, self.targets - lse[:, None]


class _Reduction:
    """The output tensors of one reduction, filled a block of rows at a time.

    Rows are addressed by ``where``: a slice of flat positions (the hook path reduces runs of live
    positions in place) or a tensor of them (the head path packs the live rows together first)."""

    def __init__(self, reducer: LogitReducer, batch: int, length: int, next_ids: torch.Tensor | None,
                 keep_last: bool = False) -> None:
        self.reducer, self.shape = reducer, (batch, length)
        self.keep_last = keep_last
        self.last_logits: torch.Tensor | None = None  # [B, V]: each row's last position (keep_last, the hook path)
        self.total = batch * length
        self.next_ids = None if next_ids is None else next_ids.reshape(-1)
        self.runs = _live_runs(self.next_ids, self.total)
        # flat positions of the live rows, or None: all of them
        self.live = (None if self.next_ids is None or self.runs == [(0, self.total)]
                     else (self.next_ids.cpu() != PADDING).nonzero().squeeze(1))
        self.out: tuple[torch.Tensor, ...] = ()  # allocated by the first block (_prepare)

    def positions(self, first: int, stop: int) -> slice | torch.Tensor:
        """The flat positions of live rows ``first .. stop``."""
        return slice(first, stop) if self.live is None else self.live[first:stop]

    def _prepare(self, device: torch.device, rows: int, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Allocate the output tensors (once) and return work buffers of at least ``rows x width``."""
        if not self.out:
            total, k = self.total, self.reducer.top_k
            n_targets = len(self.reducer.target_first_ids or [])
            nan = float("nan")
            self.out = (torch.full((total,), nan, device=device), torch.full((total,), nan, device=device),
                        torch.zeros((total, k), dtype=torch.long, device=device),
                        torch.full((total, k), nan, device=device), torch.full((total,), nan, device=device),
                        torch.zeros((total,), dtype=torch.long, device=device),
                        torch.full((total, n_targets), nan, device=device))
            if self.next_ids is not None:
                self.next_ids = self.next_ids.to(device)
        return self.reducer.work_buffers(device, rows * width, dtype)

    def _last_rows(self, where: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(indices into the rows at ``where``, their batch rows) for the rows that are a last position."""
        if not self.keep_last:
            return None
        flat = torch.arange(where.start, where.stop) if isinstance(where, slice) else where.cpu()
        length = self.shape[1]
        found = (flat % length == length - 1).nonzero().squeeze(-1)
        return (found, flat[found] // length) if len(found) else None

    def _keep(self, last: tuple[torch.Tensor, torch.Tensor] | None, logits: torch.Tensor, first: int, vocab: int) -> None:
        """Copy the last positions' logits of vocabulary entries ``first ..`` out of a tile."""
        if last is None:
            return
        if self.last_logits is None:
            self.last_logits = torch.empty(self.shape[0], vocab, dtype=logits.dtype, device=logits.device)
        rows, batch_rows = (t.to(logits.device) for t in last)
        self.last_logits[batch_rows, first : first + logits.shape[1]] = logits.index_select(0, rows)

    def _next(self, where: slice | torch.Tensor) -> torch.Tensor | None:
        if self.next_ids is None:
            return None
        return self.next_ids[where] if isinstance(where, slice) else self.next_ids[where.to(self.next_ids.device)]

    def _store(self, where: slice | torch.Tensor, values: tuple[torch.Tensor, ...]) -> None:
        if not isinstance(where, slice):
            where = where.to(self.out[0].device)
        for target, value in zip(self.out, values):
            target[where] = value

    def add_rows(self, where: slice | torch.Tensor, logits: torch.Tensor) -> None:
        """Reduce ``[n, V]`` logits of the rows at ``where``, a cache-sized block at a time."""
        n, vocab = logits.shape
        step = min(self.reducer._row_step(logits.device, vocab), n)
        work = self._prepare(logits.device, step, vocab, logits.dtype)
        self._keep(self._last_rows(where), logits, 0, vocab)
        for s in range(0, n, step):
            e = min(s + step, n)
            part = slice(where.start + s, where.start + e) if isinstance(where, slice) else where[s:e]
            running = _Running(self.reducer, self._next(part), e - s, logits.device)
            running.add(logits[s:e], 0, vocab, work)
            self._store(part, running.result())

    def add_tiles(self, where: slice | torch.Tensor, hidden: torch.Tensor, head, width: int) -> None:
        """Reduce the head's logits for the ``[n, H]`` hidden rows at ``where``, made ``width`` vocabulary
        entries at a time (a remainder narrower than the narrowest tile joins the last tile)."""
        n, vocab = hidden.shape[0], head.vocab_size
        edges = list(range(0, vocab, width))
        if len(edges) > 1 and vocab - edges[-1] < self.reducer._narrowest_tile():
            edges.pop()
        edges.append(vocab)
        widest = max(b - a for a, b in zip(edges, edges[1:]))
        device = head.device
        work = self._prepare(device, n, widest, head.dtype)
        nxt = self._next(where)
        threshold = None if nxt is None or len(edges) == 2 else head.token_logits(hidden, nxt.clamp(min=0))
        running = _Running(self.reducer, nxt, n, device, threshold)
        rows = hidden.to(device, head.dtype)  # once, not per tile
        last = self._last_rows(where)
        for first, stop in zip(edges, edges[1:]):
            logits = head.logits(rows, first, stop, out=_view(work[4], n, stop - first))
            self._keep(last, logits, first, vocab)
            running.add(logits, first, vocab, work)
        self._store(where, running.result())

    def stats(self) -> StepStats:
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
            last_logits=self.last_logits,
        )


def _view(buffer: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """A contiguous ``[rows, width]`` view of the start of a flat work buffer."""
    return buffer[: rows * width].view(rows, width)


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
    """``x.topk(k)`` of a contiguous ``[n, V]`` tensor, via the maxima of groups of ``block`` entries
    (see :func:`top_candidates`)."""
    values, columns, _ = top_candidates(x, k, block)
    if values.shape[1] == k:
        return values, columns
    values, where = values.topk(k, dim=-1)
    return values, columns.gather(1, where)


def top_candidates(x: torch.Tensor, k: int, block: int, floor: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries of a contiguous ``[n, V]`` tensor that include its top k — or, given ``floor`` ``[n]``,
    every entry above the floor among its top k — as (values, columns), and each row's maximum.

    The k largest entries lie in the k groups of ``block`` entries with the largest maxima (those k
    maxima are k entries at least as large as the k-th largest), so a top-k over those groups' entries
    is exact. An entry above the floor lies in a group whose maximum is, so only as many groups are
    taken as the row with the most such groups has (a running top-k's k-th value as the floor: few,
    after the first tile of a vocabulary). Group g holds columns g, g + G, g + 2G, ... (G groups), so
    the maxima are one vectorized pass over ``block`` rows of G contiguous values.
    """
    n, vocab = x.shape
    groups = vocab // block
    if groups < (4 if floor is None else 2) * k:  # small vocabularies: the plain top-k is as cheap
        values, columns = x.topk(min(k, vocab), dim=-1)
        return values, columns, values[:, 0]
    maxima = x[:, : groups * block].view(n, block, groups).amax(1)
    row_max = maxima.amax(-1)
    picks = k if floor is None else min(k, int((maxima > floor[:, None]).sum(-1).max()))
    chosen = maxima.topk(picks, dim=-1).indices
    columns = (chosen[:, :, None] + groups * torch.arange(block, device=x.device)).view(n, picks * block)
    if vocab > groups * block:  # the ragged tail is always a candidate
        tail = torch.arange(groups * block, vocab, device=x.device).expand(n, -1)
        columns = torch.cat([columns, tail], dim=1)
        row_max = torch.maximum(row_max, x[:, groups * block :].amax(-1))
    return x.gather(1, columns), columns, row_max


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
