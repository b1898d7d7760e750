"""Benchmark 8: the same job done by llmprobe, nnsight and TransformerLens, each against the bare forward.

Run (peers installed: ``pip install -e '.[peers]'``, in a virtual environment of its own):
    python benchmarks/bench_peers.py [--quick] [--batch 8] [--tokens 128] [--batches 3]

The job: top-20 next tokens with their log-probabilities and the entropy of the next-token
distribution at every position of the same batches (equal-length prompts, so no padding: each tool's
simplest correct use), on the default model in float32 on the CPU. The bare forward is
``model(input_ids)`` with its output head, the reductions left undone. Each tool does the job its
documented way:

* llmprobe: the engine's ``_trace_batch`` (a :class:`~llmprobe.tracing.run.TraceRun`'s engine; it also
  computes next-token log-prob and rank and two targets);
* nnsight: ``LanguageModel(model).trace(ids)`` saving ``lm_head.output``, reduced with torch;
* TransformerLens: ``TransformerBridge.boot_transformers`` on the same checkpoint directory (its own
  copy of the weights, eager attention as it forces), ``bridge(ids, return_type="logits")``, reduced
  with torch.

Runs alternate tool by tool within every repeat (A B C D, D C B A, ...), so load from other jobs
falls on all alike; a tool's time is its fastest repeat per batch, summed, and each ratio is
bare / tool. A tool that is not installed is reported as such. Each tool's top-20 log-probabilities
are checked against llmprobe's (max absolute difference printed).
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (sets LLMPROBE_CACHE)
import torch
from _common import emit, machine

from llmprobe.model.loading import load_model
from llmprobe.tracing.encoding import EncodedPrompt
from llmprobe.tracing.prompts import PromptRecord
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings

TOP_K = 20
TEXT = "I just flipped a coin, and it came up heads, then tails, then heads, then tails, then heads, then"


def reduce_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the peers compute from full logits: top-k log-probs and ids, entropy."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(TOP_K, dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return top.values, top.indices, entropy


def nnsight_job(loaded):
    from nnsight import LanguageModel

    wrapped = LanguageModel(loaded.model, tokenizer=loaded.tokenizer)

    def run(ids: torch.Tensor):
        with torch.inference_mode(), wrapped.trace(ids):
            logits = wrapped.lm_head.output.save()
        return reduce_logits(logits)
    return run


def transformer_lens_job(loaded):
    """TransformerLens 4's bridge over the same checkpoint directory (its own copy of the weights; it
    forces eager attention, its documented default); older versions: a HookedTransformer."""
    import transformer_lens

    if hasattr(transformer_lens, "TransformerBridge"):
        bridge = transformer_lens.TransformerBridge.boot_transformers(
            str(loaded.source.path), device="cpu", dtype=torch.float32, tokenizer=loaded.tokenizer)
        bridge.eval()
    else:  # TransformerLens 2 and 3
        bridge = transformer_lens.HookedTransformer.from_pretrained_no_processing(
            "meta-llama/Llama-2-7b-hf", hf_model=loaded.model, tokenizer=loaded.tokenizer)

    def run(ids: torch.Tensor):
        with torch.inference_mode():
            return reduce_logits(bridge(ids, return_type="logits"))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 batch, 2 repeats")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, default=None, help="batches (default 3, quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, quick 2)")
    args = parser.parse_args()
    n_batches, repeats = args.batches or (1 if args.quick else 3), args.repeats or (2 if args.quick else 3)

    loaded = load_model(None, device="cpu", dtype="float32")
    line = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    stream = line * (args.tokens * args.batch * n_batches // len(line) + 2)
    batches = [[stream[(b * args.batch + i) * 7 % len(line):][: args.tokens] for i in range(args.batch)]
               for b in range(n_batches)]
    tensors = [torch.tensor(batch) for batch in batches]
    settings = TraceSettings(top_k=TOP_K, targets=[" heads", " tails"], batch_size=args.batch)
    tracer = TraceRun(settings, []).start(loaded).tracer
    encoded = [[EncodedPrompt(PromptRecord(index=i, id=str(i), text=TEXT, line=i + 1), ids, {}, {})
                for i, ids in enumerate(batch)] for batch in batches]

    def bare(i: int):
        with torch.inference_mode():
            loaded.model(input_ids=tensors[i], use_cache=False)

    runs = {"bare forward": bare, "llmprobe": lambda i: tracer._trace_batch(encoded[i])}
    missing = {}
    for name, build in (("nnsight", nnsight_job), ("TransformerLens", transformer_lens_job)):
        try:
            job = build(loaded)
        except ImportError as exc:
            missing[name] = f"not installed ({exc.name}); pip install -e '.[peers]'"
            continue
        runs[name] = lambda i, job=job: job(tensors[i])

    agreement = {}
    mine = tracer._trace_batch(encoded[0])
    top_lp = torch.tensor(mine.column("topk_logprobs").to_pylist()).view(args.batch, args.tokens, TOP_K)
    for name in runs:
        if name in ("bare forward", "llmprobe"):
            continue
        values, _, _ = runs[name](0)
        agreement[name] = float((values - top_lp).abs().max())

    names = list(runs)
    best = {name: [float("inf")] * n_batches for name in names}
    for r in range(repeats + 1):  # the first round warms up
        for i in range(n_batches):
            for name in names if (r + i) % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                runs[name](i)
                if r:
                    best[name][i] = min(best[name][i], time.perf_counter() - start)
    total = {name: sum(times) for name, times in best.items()}
    positions = args.batch * args.tokens * n_batches
    print(f"machine: {machine()}")
    print(f"model {loaded.source.label} on cpu (float32); {n_batches} batches of {args.batch} x {args.tokens} tokens;"
          f" top-{TOP_K} + entropy at every position; fastest of {repeats} per batch, summed")
    ratios = {}
    for name in names:
        ratios[name] = total["bare forward"] / total[name]
        check = f"; top-{TOP_K} log-probs within {agreement[name]:.1e} of llmprobe's" if name in agreement else ""
        print(f"  {name:<16} {positions / total[name]:8.1f} positions/s   ratio to bare {ratios[name]:.3f}{check}")
    for name, why in missing.items():
        print(f"  {name:<16} {why}")
    emit({"benchmark": "peers", "ratios": {k: round(v, 4) for k, v in ratios.items()},
          "agreement": {k: float(f"{v:.2e}") for k, v in agreement.items()}, "missing": list(missing),
          "batch": args.batch, "tokens": args.tokens})


if __name__ == "__main__":
    main()
