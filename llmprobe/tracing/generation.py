"""Generated continuations (``--max-new-tokens``): KV-cached decoding, every step traced.

Each step runs the model on one new token per prompt through the engine's own forward and reduction
(:meth:`llmprobe.tracing.engine.Tracer._forward`), so a generated row carries the same statistics as a
prompt row. The token is chosen from the logits the reduction kept of each prompt's last position:
greedily, or sampled (``--sample``, with temperature and nucleus cut) from a generator seeded per
prompt, so sampled text does not depend on batch composition. A prompt stops at an end-of-sequence
token, which becomes its last row's ``next_token`` and gets no row itself.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import numpy as np
import torch

from llmprobe.tracing.encoding import EncodedPrompt
from llmprobe.tracing.reduction import StepStats, token_logprob_and_rank
from llmprobe.tracing.rows import Rows, rows_from_stats
from llmprobe.tracing.schema import PHASE_GENERATED, NonFiniteError
from llmprobe.tracing.settings import TraceSettings

# one decoding step: (token ids [B, 1], attention mask, position ids, KV cache) -> (statistics, KV cache)
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[StepStats, Any]]


def eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end generation: the model's generation config, else the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    return set(ids if isinstance(ids, list) else [] if ids is None else [ids])


class Generation:
    """Decodes ``max_new_tokens`` after each prompt of a batch (see the module docstring)."""

    def __init__(self, settings: TraceSettings, end_ids: set[int], device: torch.device) -> None:
        self.settings = settings
        self.end_ids = end_ids
        self.device = device

    def run(self, step: Step, batch: list[EncodedPrompt], stats: StepStats, cache, attention: torch.Tensor,
            lengths: list[int], prompt_rows: list[Rows]) -> list[list[Rows]]:
        """Each prompt's generated rows; fills in the ``next_*`` fields of each prompt's last row."""
        device = self.device
        generators = [self._generator(e.record.index) for e in batch]
        attention = attention.to(device)
        positions = torch.tensor(lengths, device=device)[:, None]
        finished = torch.zeros(len(batch), dtype=torch.bool)
        previous_rows: list[Rows] = list(prompt_rows)
        generated: list[list[Rows]] = [[] for _ in batch]
        last_logits, last_lse = stats.last_logits, stats.logsumexp[:, -1]
        for _ in range(self.settings.max_new_tokens):
            if last_logits is None:
                raise RuntimeError("the forward pass kept no last-position logits to generate from")
            chosen = self._choose(last_logits, generators)
            logprob, rank = token_logprob_and_rank(last_logits.float(), last_lse.to(last_logits.device), chosen)
            chosen_host, logprobs, ranks = chosen.cpu(), logprob.cpu().numpy(), rank.cpu().numpy()
            for b, rows in enumerate(previous_rows):
                if not finished[b]:
                    rows.next_ids[-1], rows.next_logprob[-1], rows.next_rank[-1] = chosen_host[b], logprobs[b], ranks[b]
            finished |= torch.tensor([int(t) in self.end_ids for t in chosen_host])
            if bool(finished.all()):
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            stepped, cache = step(chosen[:, None].to(device), attention, positions, cache)
            for b in range(len(batch)):
                if not finished[b]:
                    rows = rows_from_stats(stepped, b, slice(0, 1), int(positions[b]), PHASE_GENERATED,
                                           chosen_host[b : b + 1])
                    generated[b].append(rows)
                    previous_rows[b] = rows
            positions = positions + 1
            last_logits, last_lse = stepped.last_logits, stepped.logsumexp[:, -1]
        return generated

    def _generator(self, prompt_index: int) -> torch.Generator | None:
        """One generator per prompt, so sampled text does not depend on batch composition."""
        if not self.settings.sample:
            return None
        seed = int(np.random.SeedSequence([self.settings.seed, prompt_index]).generate_state(1)[0])
        return torch.Generator(device=self.device).manual_seed(seed)

    def _choose(self, logits: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        if not self.settings.sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.settings.temperature, dim=-1)
        if not bool(torch.isfinite(probs).all()):
            raise NonFiniteError("sampling probabilities are NaN or infinite: the model's logits overflowed or its"
                                 " weights are corrupt (try --dtype float32 or a larger --temperature); not written",
                                 where="--sample")
        if self.settings.top_p < 1:
            sorted_probs, order = probs.sort(-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.settings.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
