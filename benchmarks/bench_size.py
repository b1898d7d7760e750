"""Benchmark 4: bytes per traced position in a Parquet trace at k=20, whole files included.

Run: python benchmarks/bench_size.py [--quick] [--rows 2000,20000]

Traces the coin experiment's marks-layout prompts (50 flips each, with marks, the JSON ``meta`` of
every record and the targets " heads" and " tails") through ``llmprobe.tracing.runner.run_trace`` — the path
``llmprobe trace -o FILE`` takes, committed parts merged into one file — with enough sequences for the
largest row count asked for; each smaller count is the first rows of that trace written again
through the same sink (:func:`llmprobe.tracing.writer.open_trace_sink`, one row group per batch).
Prints the compressed bytes of every column per row, so the levers are visible, and the fixed footer
(schema, run metadata, and the vocabulary: stored once per file, zstd-compressed).
Goals (issue 15): whole file <= 200 bytes per row at 2,000 rows, <= 100 at 20,000 rows.
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
from llmprobe.experiments import generate, load_experiment, write_jsonl
from llmprobe.tracing.settings import TraceSettings
from llmprobe.tracing.reader import open_trace
from llmprobe.tracing.runner import ModelOptions, run_trace
from llmprobe.tracing.writer import open_trace_sink

GOALS = {2000: 200.0, 20000: 100.0}  # rows -> whole-file bytes per row
ROWS_PER_SEQUENCE = 150  # about, for 50 flips with marks; more sequences are traced if short


def column_bytes(path: Path) -> tuple[int, dict[str, int], int]:
    meta = pq.ParquetFile(path).metadata
    per_column: dict[str, int] = defaultdict(int)
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            per_column[column.path_in_schema.split(".")[0]] += column.total_compressed_size
    return meta.num_rows, per_column, meta.num_row_groups


def first_rows(source: Path, target: Path, rows: int) -> None:
    """The first ``rows`` rows of ``source``, rewritten through the trace sink with the same row groups."""
    trace = open_trace(source)
    parquet = pq.ParquetFile(source)
    with open_trace_sink(str(target), "parquet", trace.table.schema.remove_metadata(), trace.meta, trace.vocab) as sink:
        left = rows
        for g in range(parquet.metadata.num_row_groups):
            if left <= 0:
                break
            group = parquet.read_row_group(g).slice(0, left)
            sink.write(group.cast(trace.table.schema.remove_metadata()))
            left -= group.num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 2,000-row file only")
    parser.add_argument("--rows", default=None, help="comma-separated row counts (default 2000,20000; quick 2000)")
    parser.add_argument("--top-k", type=int, default=20)
    args = parser.parse_args()
    wanted = sorted(int(r) for r in (args.rows or ("2000" if args.quick else "2000,20000")).split(","))

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts, output = Path(tmp) / "coin.jsonl", Path(tmp) / "coin.parquet"
        exp = load_experiment(COIN)
        sequences = -(-wanted[-1] // ROWS_PER_SEQUENCE)
        while True:
            with open(prompts, "w") as f:
                records = list(generate(exp, sequences=-(-sequences // len(exp.thetas)), layout="marks"))[:sequences]
                write_jsonl(records, f)
            run_trace(str(prompts), str(output), "parquet", True, "auto", TraceSettings(top_k=args.top_k),
                      ModelOptions(device="cpu", dtype="float32"), "bench_size", Output(True))
            if pq.ParquetFile(output).metadata.num_rows >= wanted[-1]:
                break
            sequences += -(-(wanted[-1] - pq.ParquetFile(output).metadata.num_rows) // ROWS_PER_SEQUENCE) + 1
        vocab_size = len(open_trace(output, columns=["position"]).vocab or [])
        print(f"machine: {machine()}")
        for target in wanted:
            path = Path(tmp) / f"first-{target}.parquet"
            first_rows(output, path, target)
            size = path.stat().st_size
            rows, per_column, groups = column_bytes(path)
            data = sum(per_column.values())
            fixed = size - data  # footer: schema, run metadata and the vocabulary, once per file
            whole = size / rows
            goal = GOALS.get(target)
            print(f"{rows} rows ({groups} row groups), {size} bytes, k={args.top_k}, 2 targets; compressed bytes"
                  " per row by column:")
            for name, nbytes in sorted(per_column.items(), key=lambda item: -item[1]):
                print(f"  {name:<22} {nbytes / rows:7.2f}")
            print(f"  column data {data / rows:.1f} per row; fixed per file (footer: schema, metadata, vocabulary of"
                  f" {vocab_size} tokens) {fixed} bytes")
            verdict = "" if goal is None else f"; goal <= {goal:.0f}: {'met' if whole <= goal else 'NOT met'}"
            print(f"whole file: {whole:.1f} bytes per row at {rows} rows{verdict}")
            results.append({"rows": rows, "whole_file_bytes_per_row": round(whole, 1),
                            "column_bytes_per_row": round(data / rows, 1), "fixed_bytes_per_file": fixed,
                            "goal": goal})
    emit({"benchmark": "size", "files": results, "top_k": args.top_k})


if __name__ == "__main__":
    main()
