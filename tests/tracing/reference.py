"""The independent reference every trace number is checked against: a plain ``model(input_ids)``
forward pass, one prompt at a time, no padding, ``log_softmax`` in float64."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from llmprobe.tracing.prompts import PromptRecord


PROMPTS = [
    "The capital of France is",
    "I just flipped a coin, and it came up heads, then tails, then",
    "Once upon a time",
    "blick means zorp. dax means",
    "I just rolled a six-sided die, and it showed 3, then 5, then 1, then",
]


TARGETS = [" heads", " tails", " Paris is"]  # the last spans several tokens


TOL = 1e-4


def records(texts=PROMPTS) -> list[PromptRecord]:
    return [PromptRecord(index=i, id=f"p{i}", text=t, line=i + 1) for i, t in enumerate(texts)]


def reference(model, ids: list[int]) -> np.ndarray:
    """log P(. | x_0..x_i) for every position i, float64, from one unpadded forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def trace_rows(loaded, settings: TraceSettings, recs=None) -> list[dict]:
    table = TraceRun(settings, recs or records()).start(loaded).table()
    return sorted(table.to_pylist(), key=lambda r: (r["prompt_index"], r["position"]))


def check_rows_against_reference(loaded, rows: list[dict], top_k: int, targets: list[str]) -> int:
    """Compare every row with the plain forward pass over the prompt plus its generated tokens."""
    tok = loaded.tokenizer
    target_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in targets]
    checked = 0
    for index in sorted({r["prompt_index"] for r in rows}):
        mine = [r for r in rows if r["prompt_index"] == index]
        ids = [r["token_id"] for r in mine]
        if mine[-1]["next_token_id"] is not None:
            ids.append(mine[-1]["next_token_id"])  # a generated end-of-sequence token has no row
        ref = reference(loaded.model, ids)
        for row in mine:
            p = row["position"]
            lp = ref[p]
            order = np.argsort(-lp, kind="stable")[:top_k]
            np.testing.assert_allclose(row["topk_logprobs"], lp[order], atol=TOL)
            # ids can legitimately swap where log-probs tie to within the tolerance
            np.testing.assert_allclose(lp[row["topk_ids"]], lp[order], atol=TOL)
            probs = np.exp(lp)
            assert row["entropy"] == pytest.approx(-(probs * lp).sum(), abs=TOL)
            if row["next_token_id"] is not None:
                nxt = row["next_token_id"]
                assert row["next_logprob"] == pytest.approx(lp[nxt], abs=TOL)
                assert row["next_rank"] == 1 + int((lp > lp[nxt] + 1e-9).sum())
            if targets:
                np.testing.assert_allclose(row["target_logprobs"], [lp[t[0]] for t in target_ids], atol=TOL)
            checked += 1
    return checked
