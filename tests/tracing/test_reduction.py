"""The logit reductions (llmprobe/tracing/reduction.py) against plain float64 computations."""

from __future__ import annotations

import pytest
import torch

from llmprobe.tracing.reduction import NO_TOKEN, PADDING, LogitReducer, block_topk


@pytest.mark.parametrize("vocab", [300, 4096, 4099, 49152])
def test_block_topk_equals_topk(vocab):
    torch.manual_seed(vocab)
    x = torch.randn(7, vocab) * 3
    x[0, -1] = 50.0  # the maximum in the ragged tail (or the last block)
    x[1, :40] = 40.0 + torch.arange(40.0)  # the top entries crowd into two neighbouring blocks
    values, ids = block_topk(x, 20, 32)
    expected = x.topk(20, dim=-1)
    assert torch.equal(values, expected.values)
    assert torch.equal(x.gather(1, ids), expected.values)


def test_block_topk_with_ties_returns_the_tied_values():
    x = torch.zeros(3, 4096)
    x[:, 100:140] = 1.0  # 40 equal maxima across two blocks, k = 20
    values, ids = block_topk(x, 20, 32)
    assert torch.equal(values, torch.ones(3, 20))
    assert bool(((ids >= 100) & (ids < 140)).all()) and all(len(set(r.tolist())) == 20 for r in ids)


@pytest.mark.parametrize("rank_from_topk", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 512])
@pytest.mark.parametrize("vocab", [300, 5000])
def test_reducer_equals_float64_reference(chunk, vocab, rank_from_topk, monkeypatch):
    """Both ways of ranking (the top-k shortcut used on the CPU, the full comparison used on GPUs)."""
    monkeypatch.setattr(LogitReducer, "RANK_FROM_TOPK_ON", ("cpu",) if rank_from_topk else ())
    torch.manual_seed(chunk + vocab)
    logits = torch.randn(3, 11, vocab) * 4
    logits[0, 0, 7] = 60.0  # a near-certain token: entropy close to 0 must stay accurate
    next_ids = torch.randint(0, vocab, (3, 11))
    next_ids[:, -1] = NO_TOKEN
    next_ids[1, :4] = logits[1, :4].argsort(-1, descending=True)[:, 2]  # next tokens inside the top-k
    targets = [3, vocab - 1]
    stats = LogitReducer(5, targets, chunk_positions=chunk).reduce(logits, next_ids)
    ref = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(stats.logsumexp.double(), torch.logsumexp(logits.double(), -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.entropy.double(), -(ref.exp() * ref).sum(-1), atol=1e-5, rtol=0)
    top = ref.topk(5, dim=-1)
    torch.testing.assert_close(stats.topk_logprobs.double(), top.values, atol=1e-5, rtol=0)
    assert torch.equal(stats.topk_ids, top.indices)
    torch.testing.assert_close(stats.target_logprobs.double(), ref[..., targets], atol=1e-5, rtol=0)
    safe = next_ids.clamp(min=0)
    chosen = ref.gather(-1, safe[..., None])
    valid = next_ids >= 0
    torch.testing.assert_close(stats.next_logprob[valid].double(), chosen[..., 0][valid], atol=1e-5, rtol=0)
    assert torch.equal(stats.next_rank[valid], ((logits > logits.gather(-1, safe[..., None])).sum(-1) + 1)[valid])
    assert bool(stats.next_logprob[~valid].isnan().all()) and bool((stats.next_rank[~valid] == 0).all())
    assert torch.equal(stats.last_logits, logits[:, -1])


def test_padding_positions_are_skipped_and_the_rest_unchanged():
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 4096) * 4
    next_ids = torch.randint(0, 4096, (2, 6))
    next_ids[:, -1] = NO_TOKEN
    padded = next_ids.clone()
    padded[0, :3] = PADDING  # left padding of the first row
    reducer = LogitReducer(5, [1, 2], chunk_positions=2)
    full, skipped = reducer.reduce(logits, next_ids), reducer.reduce(logits, padded)
    live = padded != PADDING
    for name in ("logsumexp", "entropy", "topk_logprobs", "next_logprob", "target_logprobs"):
        a, b = getattr(full, name), getattr(skipped, name)
        assert torch.equal(a[live].nan_to_num(), b[live].nan_to_num())
        assert bool(b[~live].isnan().all())
    assert torch.equal(full.topk_ids[live], skipped.topk_ids[live]) and bool((skipped.topk_ids[~live] == 0).all())
    assert torch.equal(full.next_rank[live], skipped.next_rank[live]) and bool((skipped.next_rank[~live] == 0).all())


class PlainHead:
    """A weight matrix in :class:`llmprobe.model.structure.OutputHead`'s shape: tileable rows -> logits."""

    def __init__(self, weight: torch.Tensor) -> None:
        from llmprobe.model.structure import OutputHead

        self.head = OutputHead(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype))
        self.head.module.weight.data.copy_(weight)

    def __getattr__(self, name):
        return getattr(self.head, name)

    def __call__(self, rows):
        return self.head(rows)


@pytest.mark.parametrize(("tile_bytes", "width"), [(4 * 16 * 32, 48), (4 * 16 * 300, 288), (8 << 20, 2003)])
@pytest.mark.parametrize("on_cpu_path", [True, False])
def test_vocabulary_tiles_equal_the_float64_reference(tile_bytes, width, on_cpu_path, monkeypatch):
    """The head applied one vocabulary tile at a time (an online softmax, a merged top-k, ranks across
    tiles) gives the whole-row reduction's numbers: planted maxima in the first, a middle and the last
    tile, a next token inside and outside the top-k, a target in each tile."""
    monkeypatch.setattr(LogitReducer, "TOPK_BLOCK", 4)
    monkeypatch.setattr(LogitReducer, "TILE_ALIGN", 16)
    monkeypatch.setattr(LogitReducer, "CPU_TILE_BYTES", tile_bytes)
    monkeypatch.setattr(LogitReducer, "RANK_FROM_TOPK_ON", ("cpu",) if on_cpu_path else ())
    torch.manual_seed(tile_bytes)
    vocab, hidden_size = 2003, 24
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64)
    weight[5] *= 6
    weight[1000] *= 6
    weight[vocab - 1] *= 6  # large logits in the first, a middle and the last tile
    hidden = torch.randn(3, 16, hidden_size, dtype=torch.float64)
    logits64 = hidden @ weight.t()
    hidden32, head = hidden.float(), PlainHead(weight.float())
    next_ids = torch.randint(0, vocab, (3, 16))
    next_ids[:, -1] = NO_TOKEN
    next_ids[0, :5] = logits64[0, :5].argsort(-1, descending=True)[:, 3]  # inside the top-k
    next_ids[2, 3] = PADDING
    targets = [0, 999, vocab - 1]
    reducer = LogitReducer(5, targets, chunk_positions=16)
    # 41 tiles of 48 (the narrowest for k = 5; the last 83 wide), 7 tiles (6 of 288, one of 275), or one
    assert reducer.tile_width(torch.device("cpu"), 16, vocab) == width
    stats = reducer.reduce_hidden(head, hidden32, next_ids, keep_last=True)
    ref = torch.log_softmax(logits64, -1)
    live = next_ids != PADDING
    torch.testing.assert_close(stats.logsumexp.double()[live], torch.logsumexp(logits64, -1)[live], atol=1e-4, rtol=0)
    torch.testing.assert_close(stats.entropy.double()[live], -(ref.exp() * ref).sum(-1)[live], atol=1e-4, rtol=0)
    top = ref.topk(5, dim=-1)
    torch.testing.assert_close(stats.topk_logprobs.double()[live], top.values[live], atol=1e-4, rtol=0)
    assert torch.equal(stats.topk_ids[live], top.indices[live])
    torch.testing.assert_close(stats.target_logprobs.double()[live], ref[..., targets][live], atol=1e-4, rtol=0)
    valid = next_ids >= 0
    chosen = ref.gather(-1, next_ids.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(stats.next_logprob[valid].double(), chosen[valid], atol=1e-4, rtol=0)
    expected_rank = (logits64 > logits64.gather(-1, next_ids.clamp(min=0)[..., None])).sum(-1) + 1
    assert torch.equal(stats.next_rank[valid], expected_rank[valid])
    assert bool(stats.next_logprob[~valid].isnan().all()) and bool((stats.next_rank[~valid] == 0).all())
    assert bool(stats.entropy[~live].isnan().all())
    torch.testing.assert_close(stats.last_logits.double(), logits64[:, -1], atol=1e-4, rtol=0)


def test_a_near_certain_token_in_a_late_tile_keeps_the_entropy_accurate(monkeypatch):
    """The running peak rises by a lot in the last tile: earlier sums are rescaled, not lost or overflowed."""
    monkeypatch.setattr(LogitReducer, "TOPK_BLOCK", 4)
    monkeypatch.setattr(LogitReducer, "TILE_ALIGN", 16)
    monkeypatch.setattr(LogitReducer, "CPU_TILE_BYTES", 4 * 4 * 100)
    weight = torch.randn(1000, 8, dtype=torch.float64) * 0.1
    weight[990] = 20.0  # logit 160 for an all-ones hidden state, the rest near 0
    hidden = torch.ones(1, 4, 8, dtype=torch.float64)
    logits64 = hidden @ weight.t()
    stats = LogitReducer(3, chunk_positions=4).reduce_hidden(PlainHead(weight.float()), hidden.float(), None)
    ref = torch.log_softmax(logits64, -1)
    torch.testing.assert_close(stats.entropy.double(), -(ref.exp() * ref).sum(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.logsumexp.double(), torch.logsumexp(logits64, -1), atol=1e-4, rtol=0)
    assert bool((stats.topk_ids[..., 0] == 990).all())
