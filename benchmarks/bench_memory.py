"""Benchmark 3: peak memory when the number of prompts grows 10x, and against a bare forward pass.

Run: python benchmarks/bench_memory.py [--quick] [--prompts N]
     python benchmarks/bench_memory.py --long [--batch 4] [--tokens 1000]

Default: runs ``llmprobe trace PROMPTS -o OUT.parquet`` (the resumable file path: committed parts,
then the merge into one Parquet file) in a fresh subprocess for N and for 10 N prompts, and reads each
child's peak resident set size (``ru_maxrss`` from ``wait4``). The prompts are the coin
experiment's marks-layout sequences (different flips per sequence, 3 flips each by default).
Goal (issue 5): peak(10 N) / peak(N) < 1.2.

``--long`` (issue 15): one batch of long prompts in a fresh process each, traced (k=20, entropy,
ranks, two targets) or run through the bare ``model(...)`` forward with its head, on the default model
(batch 4 x 1,000 tokens; goal: trace peak <= 0.6 x the bare forward's), then on a tiny random Llama with
a 128,256-token vocabulary (Llama 3's) at batch 1 x 1k, 2k, 4k tokens, where the bare forward's
logits are 0.5, 1.05, 2.1 GB: the trace's peak must not grow with length x vocabulary. Each child
also reports its RSS after loading, so the increment a pass adds is printed beside the peak.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (sets LLMPROBE_CACHE)
from _common import COIN, emit, machine

GOAL = 1.2


def write_prompts(path: Path, sequences: int, n_max: int) -> None:
    from llmprobe.experiments import generate, load_experiment, write_jsonl

    exp = load_experiment(COIN)
    per_theta = -(-sequences // len(exp.thetas))
    records = list(generate(exp, n_max=n_max, sequences=per_theta, layout="marks"))[:sequences]
    with open(path, "w") as f:
        write_jsonl(records, f)


def peak_rss_mib(prompts: Path, output: Path, batch_size: int) -> tuple[float, float]:
    """Peak RSS (MiB) and seconds of one ``llmprobe trace`` run in a fresh process."""
    command = [sys.executable, "-m", "llmprobe", "trace", str(prompts), "-o", str(output), "--force", "-q",
               "--device", "cpu", "--batch-size", str(batch_size)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    stderr = child.stderr.read().decode()
    child.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return usage.ru_maxrss * scale / 2**20, seconds


LONG_GOAL = 0.6
BIG_VOCAB = 128_256


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def child(mode: str, model: str | None, batch: int, tokens: int) -> None:
    """One pass in this fresh process; prints its RSS after loading, the parent reads the peak."""
    import torch

    from llmprobe.model.loading import load_model
    from llmprobe.tracing.encoding import EncodedPrompt, padded_inputs
    from llmprobe.tracing.prompts import PromptRecord
    from llmprobe.tracing.run import TraceRun
    from llmprobe.tracing.settings import TraceSettings

    torch.set_num_threads(2)
    loaded = load_model(model, device="cpu", dtype="float32")
    text = "I just flipped a coin, and it came up heads, then tails, then heads, then tails, then heads."
    line = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = (line * (tokens // len(line) + 1))[:tokens]
    prompts = [EncodedPrompt(PromptRecord(index=i, id=str(i), text=text, line=i + 1), ids[i:] + ids[:i], {}, {})
               for i in range(batch)]
    run = TraceRun(TraceSettings(top_k=20, targets=[" heads", " tails"], batch_size=batch), []).start(loaded)
    input_ids, attention, position_ids, _ = padded_inputs([p.ids for p in prompts], loaded.tokenizer.pad_token_id)
    print(f"{rss_mib():.1f}", flush=True)
    with torch.inference_mode():
        if mode == "bare":
            loaded.model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False)
        else:
            run.tracer._trace_batch(prompts)  # the one batch of prompts, exactly as the engine traces it


def child_peak(mode: str, model: str | None, batch: int, tokens: int) -> tuple[float, float]:
    """(peak RSS, RSS after loading) in MiB of one :func:`child` run."""
    command = [sys.executable, __file__, "--child", mode, "--batch", str(batch), "--tokens", str(tokens)]
    if model:
        command += ["--model", model]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    loaded, errors = process.stdout.read().decode(), process.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{errors}")
    return usage.ru_maxrss / 1024, float(loaded.split()[-1])


def big_vocab_model(directory: Path) -> str:
    """A random 2-layer Llama with a 128,256-token vocabulary and the default model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmprobe.model.loading import load_model

    tokenizer = load_model(None, device="cpu", dtype="float32").tokenizer
    config = LlamaConfig(vocab_size=BIG_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def long_prompts(batch: int, tokens: int) -> None:
    print(f"machine: {machine()}")
    bare, loaded = child_peak("bare", None, batch, tokens)
    trace, _ = child_peak("trace", None, batch, tokens)
    ratio = trace / bare
    print(f"default model, batch {batch} x {tokens} tokens: peak RSS bare forward {bare:8.1f} MiB,"
          f" trace {trace:8.1f} MiB (after loading {loaded:.1f} MiB: +{bare - loaded:.1f} vs +{trace - loaded:.1f})")
    print(f"ratio trace/bare {ratio:.3f}; goal <= {LONG_GOAL}: {'met' if ratio <= LONG_GOAL else 'NOT met'}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = big_vocab_model(Path(tmp) / "llama-128k")
        for length in (1024, 2048, 4096):
            (bare_peak, bare_loaded), (trace_peak, trace_loaded) = (child_peak(m, model, 1, length)
                                                                    for m in ("bare", "trace"))
            rows[length] = (bare_peak - bare_loaded, trace_peak - trace_loaded)
            print(f"tiny Llama, vocabulary {BIG_VOCAB:,}, 1 x {length:5d} tokens: peak RSS over the loaded model"
                  f" bare +{rows[length][0]:8.1f} MiB, trace +{rows[length][1]:7.1f} MiB"
                  f" (logits alone {length * BIG_VOCAB * 4 / 2**20:7.1f} MiB)")
    growth = (rows[4096][1] - rows[1024][1]) / (3072 * BIG_VOCAB * 4 / 2**20)
    print(f"trace growth 1k -> 4k tokens: {rows[4096][1] - rows[1024][1]:.1f} MiB = {growth:.3f} of a length x"
          f" vocabulary term")
    emit({"benchmark": "memory_long", "ratio": round(ratio, 4), "goal": LONG_GOAL, "bare_mib": round(bare, 1),
          "trace_mib": round(trace, 1), "batch": batch, "tokens": tokens,
          "big_vocab_trace_increment_mib": {str(k): round(v[1], 1) for k, v in rows.items()},
          "big_vocab_bare_increment_mib": {str(k): round(v[0], 1) for k, v in rows.items()},
          "length_x_vocab_fraction": round(growth, 4)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts (N = 8)")
    parser.add_argument("--prompts", type=int, default=None, help="N (default 20, quick 8); the large run has 10 N")
    parser.add_argument("--flips", type=int, default=3, help="coin flips per prompt")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--long", action="store_true", help="long prompts: trace vs bare forward (issue 15)")
    parser.add_argument("--batch", type=int, default=4, help="--long: prompts in the batch")
    parser.add_argument("--tokens", type=int, default=1000, help="--long: tokens per prompt")
    parser.add_argument("--child", choices=("bare", "trace"), help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.model, args.batch, args.tokens)
    if args.long:
        return long_prompts(args.batch, args.tokens)
    small = args.prompts or (8 if args.quick else 20)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (small, 10 * small):
            prompts = Path(tmp) / f"prompts-{n}.jsonl"
            write_prompts(prompts, n, args.flips)
            results[n] = peak_rss_mib(prompts, Path(tmp) / f"trace-{n}.parquet", args.batch_size)
    ratio = results[10 * small][0] / results[small][0]
    print(f"machine: {machine()}")
    for n, (mib, seconds) in results.items():
        print(f"{n:5d} prompts: peak RSS {mib:8.1f} MiB   ({seconds:.1f} s)")
    print(f"ratio peak(10N)/peak(N) {ratio:.3f}; goal < {GOAL}: {'met' if ratio < GOAL else 'NOT met'}")
    emit({"benchmark": "memory", "ratio": round(ratio, 4), "goal": GOAL, "small_prompts": small,
          "small_mib": round(results[small][0], 1), "large_mib": round(results[10 * small][0], 1)})


if __name__ == "__main__":
    main()
