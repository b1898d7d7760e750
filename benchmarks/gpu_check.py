"""The GPU-only checks: run on any machine with CUDA whenever one is available.

Run: python benchmarks/gpu_check.py [--json-out FILE]
Without CUDA it says so on stderr and exits 0 (``--cpu-rehearsal`` runs the same code with the CPU
standing in for the GPU, to check the script itself). On the default model (SmolLM2-135M-Instruct):

1. CUDA float32 trace == CPU float32 trace (tight tolerance), and CUDA bfloat16 trace == CPU float32
   trace within bfloat16 tolerance (median log-prob error under 0.1 nat, top-1 mostly agreeing).
2. ``device_map`` over the GPUs there are (with one GPU: the GPU plus CPU offload under a max_memory
   cap) traces like the model on one GPU.
3. bfloat16 throughput of teacher-forced tracing (prompt tokens per second) at several batch sizes.
4. With Ray installed: ``--engine ray`` with one GPU actor equals the local CUDA trace.

A summary goes to stdout as JSON; the exit status is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
TOP_K = 10
PROMPTS = [
    "The capital of France is",
    "I just flipped a coin, and it came up heads, then tails, then heads, then heads, then",
    "I just rolled a six-sided die, and it showed 3, then 5, then 1, then 6, then 2, then",
    "blick means zorp. dax means mib. wug means fep. blick means",
    "Once upon a time there was a small model that predicted the next token, and",
]
# bfloat16 keeps 8 significant bits: per-position log-probs move by a few hundredths of a nat, and
# near-ties among the top candidates may swap.
BF16_MEDIAN_ABS = 0.1
BF16_P99_ABS = 0.5
BF16_TOP1_AGREEMENT = 0.9
SAME_DEVICE_ABS = 2e-3  # float32 on two devices, or one dtype under two placements


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def records(texts: list[str]):
    from llmprobe.tracing.prompts import PromptRecord

    return [PromptRecord(index=i, id=str(i + 1), text=t, line=i + 1) for i, t in enumerate(texts)]


def trace(loaded, prompts, batch_size: int = 8) -> pa.Table:
    from llmprobe.tracing.run import TraceRun
    from llmprobe.tracing.settings import TraceSettings

    table = TraceRun(TraceSettings(top_k=TOP_K, targets=[" heads", " tails"], batch_size=batch_size), prompts).start(
        loaded).table()
    return table.sort_by([("prompt_index", "ascending"), ("position", "ascending")])


def compare(got: pa.Table, want: pa.Table) -> dict[str, float]:
    """Differences of next-token log-probs, entropies and target log-probs; top-1 agreement."""
    assert got.column("token_id").equals(want.column("token_id")), "the two traces hold different tokens"
    a, b = got.column("next_logprob").to_numpy(zero_copy_only=False), want.column("next_logprob").to_numpy(
        zero_copy_only=False)
    keep = ~np.isnan(b)
    diff = np.abs(a[keep] - b[keep])
    targets = np.abs(np.stack(got.column("target_logprobs").to_numpy(zero_copy_only=False))
                     - np.stack(want.column("target_logprobs").to_numpy(zero_copy_only=False)))
    top1 = np.stack(got.column("topk_ids").to_numpy(zero_copy_only=False))[:, 0] == np.stack(
        want.column("topk_ids").to_numpy(zero_copy_only=False))[:, 0]
    entropy = np.abs(got.column("entropy").to_numpy() - want.column("entropy").to_numpy())
    return {"rows": got.num_rows, "next_logprob_max_abs": float(diff.max()),
            "next_logprob_median_abs": float(np.median(diff)), "next_logprob_p99_abs": float(np.quantile(diff, 0.99)),
            "target_logprob_max_abs": float(targets.max()), "entropy_max_abs": float(entropy.max()),
            "top1_agreement": float(top1.mean())}


def check(results: dict, name: str, ok: bool, **numbers) -> None:
    results["checks"][name] = {"ok": bool(ok), **numbers}
    log(f"{'PASS' if ok else 'FAIL'} {name}: {json.dumps(numbers)}")


def throughput(loaded, batch_sizes: list[int], device_sync, n_prompts: int) -> list[dict]:
    """Prompt tokens per second through the whole engine (forward, hook reductions, Arrow rows)."""
    words = "the coin came up heads then tails then heads and the die showed three then five".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=96)) for _ in range(n_prompts)]
    prompts = records(texts)
    rows = []
    for batch_size in batch_sizes:
        trace(loaded, prompts[:batch_size], batch_size)  # warm-up: kernels, allocator
        device_sync()
        started = time.perf_counter()
        table = trace(loaded, prompts, batch_size)
        device_sync()
        seconds = time.perf_counter() - started
        rows.append({"batch_size": batch_size, "tokens": table.num_rows, "seconds": round(seconds, 3),
                     "tokens_per_s": round(table.num_rows / seconds, 1)})
        log(f"  batch {batch_size}: {table.num_rows / seconds:,.0f} tokens/s")
    return rows


def ray_check(results: dict, want: pa.Table, device: str, dtype: str, gpus: float) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        results["checks"]["ray_gpu_actor"] = {"ok": True, "skipped": "ray is not installed"}
        log("skip ray_gpu_actor: ray is not installed (pip install 'llmprobe[ray]')")
        return
    from llmprobe.cli import main
    from llmprobe.tracing.reader import open_trace

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        out = Path(tmp) / "trace"
        args = ["trace", str(prompts), "-o", str(out), "--engine", "ray", "--device", device, "--dtype", dtype,
                "--top-k", str(TOP_K), "--targets", " heads, tails", "--ray-gpus-per-actor", str(gpus), "-q"]
        try:
            main(args)
        except SystemExit as exc:
            if exc.code:
                check(results, "ray_gpu_actor", False, exit_code=exc.code)
                return
        got = open_trace(out).table.sort_by([("prompt_index", "ascending"), ("position", "ascending")])
    numbers = compare(got, want)
    check(results, "ray_gpu_actor", numbers["next_logprob_median_abs"] <= BF16_MEDIAN_ABS
          and numbers["top1_agreement"] >= BF16_TOP1_AGREEMENT, **numbers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json-out", help="Also write the summary JSON here.")
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="No GPU: run every check with the CPU standing in for it (checks the script only).")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.cpu_rehearsal:
        log("no CUDA device here: the GPU checks did not run (run this script on a machine with a GPU)")
        print(json.dumps({"cuda": False, "checks": {}}))
        return 0
    from llmprobe.model.loading import load_model

    gpu = "cpu" if args.cpu_rehearsal else "cuda"
    n_gpus = torch.cuda.device_count() if gpu == "cuda" else 0
    sync = torch.cuda.synchronize if gpu == "cuda" else (lambda: None)
    results: dict = {"cuda": gpu == "cuda", "torch": torch.__version__, "checks": {},
                     "devices": [torch.cuda.get_device_name(i) for i in range(n_gpus)]}
    log(f"devices: {results['devices'] or ['cpu (rehearsal)']}")
    prompts = records(PROMPTS)

    cpu32 = load_model(None, device="cpu", dtype="float32")
    reference = trace(cpu32, prompts)
    del cpu32

    gpu32 = load_model(None, device=gpu, dtype="float32")
    numbers = compare(trace(gpu32, prompts), reference)
    check(results, "float32_gpu_equals_cpu", numbers["next_logprob_max_abs"] <= SAME_DEVICE_ABS, **numbers)
    del gpu32

    bf16 = load_model(None, device=gpu, dtype="bfloat16")
    single = trace(bf16, prompts)
    numbers = compare(single, reference)
    check(results, "bfloat16_gpu_within_tolerance_of_cpu_float32",
          numbers["next_logprob_median_abs"] <= BF16_MEDIAN_ABS and numbers["next_logprob_p99_abs"] <= BF16_P99_ABS
          and numbers["top1_agreement"] >= BF16_TOP1_AGREEMENT, **numbers)

    log("bfloat16 throughput:")
    results["throughput_bfloat16"] = (throughput(bf16, [1, 8, 32], sync, 256) if gpu == "cuda"
                                      else throughput(bf16, [8], sync, 8))
    weights_bytes = sum(p.numel() * p.element_size() for p in bf16.model.parameters())
    del bf16
    if gpu == "cuda":
        torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory() as offload:
        if n_gpus >= 2:  # spread over every GPU
            placement = dict(device_map="balanced", max_memory={i: int(weights_bytes / n_gpus * 1.5)
                                                                for i in range(n_gpus)})
        else:  # one GPU (or the rehearsal): cap it so the rest spills to the CPU (disk in the rehearsal)
            cap = {0: int(weights_bytes * 0.5), "cpu": "64GiB"} if gpu == "cuda" else {"cpu": int(weights_bytes * 0.5)}
            placement = dict(device_map="auto", max_memory=cap, offload_folder=offload)
        mapped = load_model(None, dtype="bfloat16", **placement)
        where = sorted({str(v) for v in mapped.device_map.values()})
        numbers = compare(trace(mapped, prompts), single)
        check(results, "device_map_equals_single_device", len(where) >= 2
              and numbers["next_logprob_max_abs"] <= SAME_DEVICE_ABS, placement=where, **numbers)
        del mapped

    ray_check(results, single, gpu, "bfloat16", 1.0 if gpu == "cuda" else 0.0)
    summary = json.dumps(results, indent=1)
    print(summary)
    if args.json_out:
        Path(args.json_out).write_text(summary)
    failed = [name for name, c in results["checks"].items() if not c["ok"]]
    log(f"{len(results['checks']) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
