"""Run every benchmark, each in a fresh process, and print the README's Performance table.

Run: python benchmarks/run_all.py [--quick] [--repeats R]

Each benchmark prints its own figures and a ``RESULT {json}`` line; this collects those lines and
reports the median of ``repeats`` runs per benchmark (the machine line records the load average).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [  # (script, quick flag accepted, key of the headline figure, how the goal reads)
    ("bench_trace.py", True, "ratio", ">= 0.95"),
    ("bench_icl.py", True, "speedup", ">= N/3"),
    ("bench_memory.py", True, "ratio", "< 1.2"),
    ("bench_size.py", True, "bytes_per_position", "<= 200"),
    ("bench_load.py", True, "warm_load_model_s", "<= 2 s"),
    ("bench_generate.py", True, "ratio", ">= 0.9"),
    ("bench_fits.py", False, None, "< 1 s, < 10 s"),
    ("bench_ablate.py", True, "ratio", "<= 0.6"),
]


def run(script: str, quick: bool) -> tuple[str, dict | None]:
    command = [sys.executable, str(HERE / script), *(["--quick"] if quick else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    results = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return done.stdout, results[-1] if results else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="script names to run (default: all)")
    args = parser.parse_args()
    rows = []
    for script, takes_quick, key, goal in BENCHMARKS:
        if args.only and script not in args.only:
            continue
        outputs = [run(script, args.quick and takes_quick) for _ in range(args.repeats)]
        for stdout, _ in outputs:
            sys.stderr.write(f"--- {script}\n{stdout}")
        if key is None:
            rows.append((script, "see output", goal))
            continue
        values = [result[key] for _, result in outputs]
        rows.append((script, f"{statistics.median(values):g} ({key}; runs: {', '.join(f'{v:g}' for v in values)})", goal))
    print("| benchmark | median | goal |\n|---|---|---|")
    for script, value, goal in rows:
        print(f"| {script} | {value} | {goal} |")


if __name__ == "__main__":
    main()
