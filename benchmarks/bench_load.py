"""Benchmark 5: cold and warm load of the default model.

Run: python benchmarks/bench_load.py [--quick] [--repeats R]

Cold: a fresh process loads the default model with an empty, temporary LLMPROBE_CACHE, so the
GGUF file is dequantized and saved first (once per machine). Warm: fresh processes load it again
from that cache; reported as the whole process (interpreter start and imports count), the imports of
torch and transformers (with the Llama modeling code), and the ``load_model`` call after them
(config, tokenizer, weights). Goal (issue 5): warm load <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _common  # noqa: F401
from _common import emit, machine, median

GOAL = 2.0
CHILD = """
import json, time
started = time.perf_counter()
import torch
import transformers
from transformers.models.llama import modeling_llama  # what load_model imports lazily for this model
from llmprobe.model.loading import load_model
imported = time.perf_counter()
loaded = load_model(None, device="cpu", dtype="float32")
done = time.perf_counter()
print(json.dumps({"imports": imported - started, "load_model": done - imported}))
"""


def load_once(cache: str) -> dict[str, float]:
    """Seconds of one fresh process: whole wall time, imports, the load_model call."""
    env = {**os.environ, "LLMPROBE_CACHE": cache}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"loading failed:\n{done.stderr}")
    return {"process": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 warm loads instead of 5")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)

    with tempfile.TemporaryDirectory() as cache:
        cold = load_once(cache)
        warm = [load_once(cache) for _ in range(repeats)]
    warm_process = median([w["process"] for w in warm])
    warm_call = median([w["load_model"] for w in warm])
    warm_imports = median([w["imports"] for w in warm])
    print(f"machine: {machine()}")
    print(f"cold (GGUF conversion, empty cache): process {cold['process']:.2f} s, load_model {cold['load_model']:.2f} s")
    print(f"warm (median of {repeats}): process {warm_process:.2f} s = imports {warm_imports:.2f} s"
          f" + load_model {warm_call:.2f} s + interpreter start and exit")
    print(f"warm load_model {warm_call:.2f} s; goal <= {GOAL} s: {'met' if warm_call <= GOAL else 'NOT met'}"
          f" (whole process {warm_process:.2f} s: {'met' if warm_process <= GOAL else 'NOT met'})")
    emit({"benchmark": "load", "cold_s": round(cold["process"], 2), "warm_process_s": round(warm_process, 2),
          "warm_load_model_s": round(warm_call, 2), "warm_imports_s": round(warm_imports, 2), "goal": GOAL})


if __name__ == "__main__":
    main()
