"""Benchmark 3: peak memory when the number of prompts grows 10x.

Run: python benchmarks/bench_memory.py [--quick] [--prompts N]

Runs ``llmprobe trace PROMPTS -o OUT.parquet`` (the resumable file path: committed parts, then the
merge into one Parquet file) in a fresh subprocess for N and for 10 N prompts, and reads each
child's peak resident set size (``ru_maxrss`` from ``wait4``). The prompts are the coin
experiment's marks-layout sequences (different flips per sequence, 3 flips each by default).
Goal (issue 5): peak(10 N) / peak(N) < 1.2.
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
    from llmprobe.analysis.experiments import generate, load_experiment, write_jsonl

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts (N = 8)")
    parser.add_argument("--prompts", type=int, default=None, help="N (default 20, quick 8); the large run has 10 N")
    parser.add_argument("--flips", type=int, default=3, help="coin flips per prompt")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
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
