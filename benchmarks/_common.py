"""What the benchmarks share: the default cache, the machine line, workloads, interleaved timing.

Every benchmark measures its baseline in the same process and run as the thing it measures, and
alternates the two (A B B A ...), so a machine that other jobs share slows both alike; ratios are
medians over repeats.
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from collections.abc import Callable

os.environ.setdefault("LLMPROBE_CACHE", "/tmp/lpcache")
ROOT = Path(__file__).resolve().parent.parent
COIN = ROOT / "configs" / "experiments" / "coin.toml"


def machine() -> str:
    """One line naming the machine, threads and load, printed with every result."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {gpu}; load average"
            f" {load:.1f}; torch {torch.__version__}; python {platform.python_version()}")


def coin_records(layout: str, n_max: int, sequences: int = 1, theta: float | None = None) -> list:
    """Prompt records from configs/experiments/coin.toml, parsed the way ``llmprobe trace`` parses them."""
    from llmprobe.experiments import generate, load_experiment, write_jsonl
    from llmprobe.tracing.prompts import read_prompts

    exp = load_experiment(COIN)
    if theta is not None:
        import dataclasses

        exp = dataclasses.replace(exp, thetas=((theta, 1.0 - theta),))
    buffer = io.StringIO()
    write_jsonl(generate(exp, n_max=n_max, sequences=sequences, layout=layout), buffer)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmprobe-bench-{os.getpid()}-{layout}.jsonl"
    path.write_text(buffer.getvalue())
    try:
        return read_prompts(str(path))
    finally:
        path.unlink()


def fixed_length_records(tokenizer, tokens: int, count: int, seed: int = 0) -> list:
    """``count`` coin-flip prompts of exactly ``tokens`` tokens each (no padding in a batch of them)."""
    import random

    from llmprobe.tracing.prompts import read_prompts

    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        text = "I just flipped a coin, and it came up heads"
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens + 4:
            text += rng.choice([", then heads", ", then tails"])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        text = tokenizer.decode(ids)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) != tokens:
            raise RuntimeError(f"could not make a prompt of exactly {tokens} tokens")
        lines.append(text)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmprobe-bench-{os.getpid()}-fixed.txt"
    path.write_text("\n".join(lines) + "\n")
    try:
        return read_prompts(str(path))
    finally:
        path.unlink()


def interleaved(runs: dict[str, Callable[[], object]], repeats: int,
                warm_up: tuple[str, ...] | None = None) -> dict[str, list[float]]:
    """Seconds of each run per repeat, alternating the order every repeat, after one untimed run of
    each name in ``warm_up`` (default: all)."""
    for name in runs if warm_up is None else warm_up:
        runs[name]()
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def emit(result: dict) -> None:
    """The machine-readable result line, last on stdout (the README table is built from these)."""
    print("RESULT " + json.dumps(result, sort_keys=True))
    sys.stdout.flush()
