"""Benchmark 2: an in-context sweep traced once with marks, against one prompt per n.

Run: python benchmarks/bench_icl.py [--quick] [--n-max N]

One coin sequence of N = 64 flips (configs/experiments/coin.toml, theta = 0.7) in both layouts of
``llmprobe experiment``: "marks" (one prompt, a mark before every outcome, traced once) and
"per-n" (the peers' protocol: prompts n = 0..N, each ending where the next outcome would go),
both traced by a :class:`~llmprobe.tracing.run.TraceRun` (the engine built and the prompts encoded
before the timing) at k=20 with the targets " heads" and " tails" and written to Parquet. Checks that
the two give the same target log-probabilities at every n (goal: within 1e-4) and prints the
speed-up (goal: >= N/3).
"""

from __future__ import annotations

import argparse
import io

import _common  # noqa: F401  (sets LLMPROBE_CACHE)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import coin_records, emit, interleaved, machine, median

from llmprobe.model.loading import load_model
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings

TOLERANCE = 1e-4


def traced(run: TraceRun) -> pa.Table:
    """Trace the run's prompts and write the Parquet bytes (timed), returning the rows (for the check)."""
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, run.schema, compression="zstd") as writer:
        for batch in run.batches():
            writer.write_batch(batch)
    return pq.read_table(io.BytesIO(sink.getvalue()))


def target_logprobs_by_n(table: pa.Table) -> dict[int, np.ndarray]:
    """n -> the targets' first-token log-probabilities at the mark of the n-th outcome."""
    import json

    marked = table.filter(table.column("mark").is_valid())
    return {json.loads(m)["n"]: np.array(t, dtype=np.float64)
            for m, t in zip(marked.column("mark").to_pylist(), marked.column("target_logprobs").to_pylist())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="time each layout fewer times")
    parser.add_argument("--n-max", type=int, default=64, help="flips in the sequence (N)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="timed per-n runs (default 3, quick 1); the short"
                        " marks run is timed 5 times as often")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)

    loaded = load_model(None, device="cpu", dtype="float32")
    marks = coin_records("marks", args.n_max, theta=0.7)
    per_n = coin_records("per-n", args.n_max, theta=0.7)
    settings = TraceSettings(top_k=20, batch_size=args.batch_size)  # the targets the coin prompts carry
    layouts = {"marks": TraceRun(settings, marks).start(loaded), "per-n": TraceRun(settings, per_n).start(loaded)}
    tables: dict[str, pa.Table] = {}

    def run(name):
        return lambda: tables.__setitem__(name, traced(layouts[name]))

    # The long per-n run needs no warm-up of its own (the marks warm-up loads the same kernels), and
    # averages other jobs' load over a minute; the marks run takes a second or two, so it is timed
    # five times per per-n run and its median taken.
    runs = {"per-n": run("per-n"), **{f"marks{i}": run("marks") for i in range(5)}}
    times = interleaved(runs, repeats, warm_up=("marks0",))
    times["marks"] = [t for name, values in times.items() if name.startswith("marks") for t in values]
    once, sweep = target_logprobs_by_n(tables["marks"]), target_logprobs_by_n(tables["per-n"])
    if sorted(once) != list(range(args.n_max + 1)) or sorted(sweep) != sorted(once):
        raise SystemExit(f"marks cover n={sorted(once)}, per-n prompts n={sorted(sweep)}: expected 0..{args.n_max}")
    worst = max(float(np.abs(once[n] - sweep[n]).max()) for n in once)
    speedup = median(times["per-n"]) / median(times["marks"])
    goal = args.n_max / 3
    positions = {name: tables[name].num_rows for name in tables}
    print(f"machine: {machine()}")
    print(f"N = {args.n_max} flips; targets {layouts['marks'].settings.targets}; k=20; batch size {args.batch_size}")
    print(f"marks: 1 prompt, {positions['marks']} positions      {median(times['marks']):8.2f} s")
    print(f"per-n: {len(per_n)} prompts, {positions['per-n']} positions  {median(times['per-n']):8.2f} s")
    print(f"speed-up {speedup:.1f}x (goal >= N/3 = {goal:.1f}: {'met' if speedup >= goal else 'NOT met'});"
          f" max |difference| of target log-probs over n = 0..{args.n_max}: {worst:.2e}"
          f" (goal <= {TOLERANCE:g}: {'met' if worst <= TOLERANCE else 'NOT met'})")
    emit({"benchmark": "icl", "speedup": round(speedup, 2), "goal": round(goal, 2), "max_abs_diff": worst,
          "n_max": args.n_max, "marks_s": round(median(times["marks"]), 3), "per_n_s": round(median(times["per-n"]), 3)})


if __name__ == "__main__":
    main()
