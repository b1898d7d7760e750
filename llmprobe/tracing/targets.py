"""Fixed target strings (``--targets``): tokenized once per engine, scored at every mark.

A target's first token is scored by the trace's own reduction at every position (the
``target_logprobs`` column, from :class:`~llmprobe.tracing.reduction.LogitReducer`); the whole string
(``target_seq_logprobs``, at marks and the last prompt position) adds the log-probabilities of its
further tokens, computed as continuations by extra forward passes over prefix + target
(:func:`continuation_logprobs`), which share passes wherever one sequence extends another.
"""

from __future__ import annotations

import numpy as np
import torch

from llmprobe.errors import ParameterError
from llmprobe.model.structure import CausalLMParts
from llmprobe.tracing.encoding import EncodedPrompt, padded_inputs
from llmprobe.tracing.hooks import outputs_of


def tokenize_targets(tokenizer, targets: list[str]) -> list[list[int]]:
    """Each target's token ids (no special tokens); duplicates and targets that tokenize to nothing are refused."""
    if len(set(targets)) != len(targets):
        dupes = sorted({t for t in targets if targets.count(t) > 1})
        raise ParameterError("targets", f"duplicate target(s): {', '.join(map(repr, dupes))}")
    tokens = []
    for target in targets:
        ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ParameterError("targets", f"target {target!r} tokenizes to nothing")
        tokens.append(list(ids))
    return tokens


def scored_positions(prompt: EncodedPrompt) -> list[int]:
    """Where whole-string target scores are kept: every mark and the last prompt position."""
    return sorted({*prompt.marks_at, len(prompt.ids) - 1})


def target_sequence_scores(model, device, pad_id: int, parts: CausalLMParts | None, target_tokens: list[list[int]],
                           batch: list[EncodedPrompt], first_token: list[np.ndarray]) -> list[dict[int, np.ndarray]]:
    """Whole-string target log-probabilities at every mark and at the last prompt position.

    A target of several tokens is scored as a continuation: the first token's log-probability
    comes from the trace itself (``first_token``: per prompt, [positions, targets], read at the scored
    positions only), the rest from extra forward passes over prefix + target.
    """
    scores: list[dict[int, np.ndarray]] = []
    pending: list[tuple[int, int, int, list[int], list[int]]] = []  # (b, position, target, prefix, target ids)
    for b, (e, logprobs) in enumerate(zip(batch, first_token)):
        wanted = scored_positions(e)
        scores.append({p: logprobs[p].astype(np.float64) for p in wanted})
        for p in wanted:
            for t, ids in enumerate(target_tokens):
                if len(ids) > 1:
                    pending.append((b, p, t, e.ids[: p + 1], ids))
    if pending:
        rest = continuation_logprobs(model, device, pad_id, [(prefix, ids) for _, _, _, prefix, ids in pending],
                                     len(batch), parts)
        for (b, p, t, _, _), value in zip(pending, rest):
            scores[b][p][t] += value
    return scores


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
            with outputs_of(parts.norm, once=True) as found:
                model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
            (hidden,) = found
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
