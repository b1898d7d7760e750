"""Benchmark 4: bytes per traced position in a Parquet trace at k=20.

Run: python benchmarks/bench_size.py [--quick] [--sequences S]

Traces the coin experiment's marks-layout prompts (50 flips each, with marks, the JSON ``meta`` of
every record and the targets " heads" and " tails") through ``llmprobe.tracing.runner.run_trace`` — the path
``llmprobe trace -o FILE`` takes, committed parts merged into one file — and divides the file size
the column data by its rows; the footer (schema, run metadata and the vocabulary as JSON, which
pyarrow stores twice: as key-value metadata and inside its serialized ARROW:schema) is a fixed cost
per file, printed apart with the row count from which the whole file is under the goal. Prints the
compressed bytes of every column per row, so the levers are visible.
Goal (issue 5): <= 200 bytes per position.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import _common  # noqa: F401  (sets LLMPROBE_CACHE)
import pyarrow.parquet as pq
from _common import COIN, emit, machine

from llmprobe.cli.output import Output
from llmprobe.tracing.engine import TraceSettings
from llmprobe.analysis.experiments import generate, load_experiment, write_jsonl
from llmprobe.tracing.reader import open_trace
from llmprobe.tracing.runner import ModelOptions, run_trace

GOAL = 200.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sequences (4)")
    parser.add_argument("--sequences", type=int, default=None, help="coin sequences traced (default 16, quick 4)")
    parser.add_argument("--top-k", type=int, default=20)
    args = parser.parse_args()
    sequences = args.sequences or (4 if args.quick else 16)

    with tempfile.TemporaryDirectory() as tmp:
        prompts, output = Path(tmp) / "coin.jsonl", Path(tmp) / "coin.parquet"
        exp = load_experiment(COIN)
        with open(prompts, "w") as f:
            records = list(generate(exp, sequences=-(-sequences // len(exp.thetas)), layout="marks"))[:sequences]
            write_jsonl(records, f)
        run_trace(str(prompts), str(output), "parquet", True, "auto", TraceSettings(top_k=args.top_k),
                  ModelOptions(device="cpu", dtype="float32"), "bench_size", Output(True))
        size = output.stat().st_size
        meta = pq.ParquetFile(output).metadata
        rows = meta.num_rows
        vocab_size = len(open_trace(output, columns=["position"]).vocab or [])
        per_column: dict[str, int] = defaultdict(int)
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                per_column[column.path_in_schema.split(".")[0]] += column.total_compressed_size
    data = sum(per_column.values())
    fixed = size - data  # footer: schema, run metadata and the vocabulary, once per file
    per_position = data / rows
    print(f"machine: {machine()}")
    print(f"{len(records)} prompts, {rows} rows, {meta.num_row_groups} row groups, {size} bytes,"
          f" k={args.top_k}, 2 targets")
    print("compressed bytes per row by column:")
    for name, nbytes in sorted(per_column.items(), key=lambda item: -item[1]):
        print(f"  {name:<22} {nbytes / rows:7.2f}")
    print(f"fixed per file (footer: schema, metadata, vocabulary of {vocab_size} tokens): {fixed} bytes")
    print(f"whole file: {size / rows:.1f} bytes per position at {rows} rows; below {GOAL:.0f} from"
          f" {fixed / max(GOAL - per_position, 1e-9):,.0f} rows")
    print(f"bytes per position {per_position:.1f}; goal <= {GOAL:.0f}: {'met' if per_position <= GOAL else 'NOT met'}")
    emit({"benchmark": "size", "bytes_per_position": round(per_position, 1), "goal": GOAL, "rows": rows,
          "fixed_bytes_per_file": fixed, "whole_file_bytes_per_position": round(size / rows, 1), "top_k": args.top_k})


if __name__ == "__main__":
    main()
