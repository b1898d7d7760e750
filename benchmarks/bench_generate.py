"""Benchmark 6: traced generation against ``model.generate`` with the same settings.

Run: python benchmarks/bench_generate.py [--quick] [--max-new-tokens 64]

One batch of prompts, greedy decoding, ``max_new_tokens`` new tokens: the trace engine (KV cache,
every step reduced by the hook to top-k 20, entropy, rank) against Hugging Face ``generate`` on the
same left-padded batch with no instrumentation. Both decode the same tokens (checked); positions per
second count generated tokens. Goal (issue 5): ratio trace / generate >= 0.9.
"""

from __future__ import annotations

import argparse

import _common  # noqa: F401  (sets LLMPROBE_CACHE)
import torch
from _common import emit, interleaved, machine, median

from llmprobe.model.loading import load_model
from llmprobe.tracing.prompts import PromptRecord
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.schema import PHASE_GENERATED
from llmprobe.tracing.settings import TraceSettings

GOAL = 0.9
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "I just flipped a coin, and it came up heads, then tails, then",
    "The three laws of thermodynamics are",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed repeats instead of 5")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)

    loaded = load_model(None, device=args.device, dtype=args.dtype)
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    records = [PromptRecord(index=i, id=str(i), text=t, line=i + 1) for i, t in enumerate(PROMPTS)]
    run = TraceRun(TraceSettings(top_k=20, max_new_tokens=args.max_new_tokens, batch_size=len(PROMPTS)),
                   records).start(loaded)
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict[str, object] = {}

    def generate() -> None:
        out["generate"] = model.generate(**encoded, max_new_tokens=args.max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id, top_p=None, top_k=None,
                                         temperature=None)
        synchronize()

    def trace() -> None:
        out["trace"] = list(run.batches())
        synchronize()

    times = interleaved({"generate": generate, "trace": trace}, repeats)
    rows = sorted((row for batch in out["trace"] for row in batch.to_pylist()), key=lambda r: r["position"])
    traced = {i: [r["token_id"] for r in rows if r["prompt_index"] == i and r["phase"] == PHASE_GENERATED]
              for i in range(len(PROMPTS))}
    width = encoded["input_ids"].shape[1]
    reference = {i: seq[width:].tolist() for i, seq in enumerate(out["generate"])}
    same = all(reference[i][: len(traced[i])] == traced[i] for i in traced)
    generated = sum(map(len, traced.values()))
    # other jobs only ever add time: the headline compares the fastest runs; the median ratio is printed too
    repeat_ratios = [g / t for g, t in zip(times["generate"], times["trace"])]
    fastest = {name: min(values) for name, values in times.items()}
    ratio = fastest["generate"] / fastest["trace"]
    print(f"machine: {machine()}")
    print(f"{len(PROMPTS)} prompts in one batch, greedy, max_new_tokens={args.max_new_tokens}, {generated} tokens"
          f" generated; same tokens as generate: {same}")
    print(f"model.generate {generated / fastest['generate']:8.1f} positions/s (fastest of {repeats}: {fastest['generate']:.2f} s)")
    print(f"trace          {generated / fastest['trace']:8.1f} positions/s (fastest of {repeats}: {fastest['trace']:.2f} s)")
    print(f"ratio trace/generate {ratio:.3f}; median of repeats {median(repeat_ratios):.3f}; goal >= {GOAL}:"
          f" {'met' if ratio >= GOAL else 'NOT met'}")
    if not same:
        raise SystemExit("the trace decoded different tokens than model.generate")
    emit({"benchmark": "generate", "ratio": round(ratio, 4), "median_repeat_ratio": round(median(repeat_ratios), 4),
          "goal": GOAL, "device": str(device), "dtype": args.dtype,
          "generate_positions_per_s": round(generated / fastest["generate"], 1),
          "trace_positions_per_s": round(generated / fastest["trace"], 1)})


if __name__ == "__main__":
    main()
