"""How fast trivial mistakes fail: a missing input file or a bad option, each in a fresh process.

Run: python benchmarks/bench_fail_fast.py [--repeats R]

Goal: under 1 s each. Baseline in the same run: a fresh process that only imports torch and
transformers, which every such error paid before the commands checked their input first. Prints
each command's median wall time, the baseline, and the ratio, then a ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MISTAKES = [
    ["trace", "nope.txt"], ["trace", "configs/prompts/demo.txt", "--format", "xml"],
    ["trace", "configs/prompts/demo.txt", "--top-k", "0"], ["inspect", "nope.parquet"],
    ["fit-posterior", "nope.parquet"], ["fit-prior", "nope.parquet"], ["plot", "nope.parquet"],
    ["plot-icl", "nope.parquet"], ["report", "nope.parquet"], ["continuity", "nope.parquet"],
    ["martingale", "nope.toml"], ["experiment", "nope.toml"], ["plot-prior", "nope.json"],
]


def wall(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    baseline = statistics.median(wall([sys.executable, "-c", "import torch, transformers"])
                                 for _ in range(args.repeats))
    times = {}
    for mistake in MISTAKES:
        times[" ".join(mistake)] = statistics.median(wall([sys.executable, "-m", "llmprobe", *mistake])
                                                     for _ in range(args.repeats))
        print(f"{times[' '.join(mistake)]:6.2f} s  llmprobe {' '.join(mistake)}", flush=True)
    worst = max(times.values())
    print(f"baseline (import torch, transformers): {baseline:.2f} s; slowest error {worst:.2f} s"
          f" ({worst / baseline:.2f} of the baseline); goal: every error < 1 s")
    print("RESULT " + json.dumps({"slowest_error_s": round(worst, 3), "baseline_s": round(baseline, 3),
                                  "ratio": round(worst / baseline, 3), "errors": times}))


if __name__ == "__main__":
    main()
