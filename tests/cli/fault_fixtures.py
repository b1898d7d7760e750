"""Builders for the fault and hostile-input tests: experiment traces, fit tables, prompt files, subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.plots.fixtures import experiment_records, synthetic_fit, text_records, write_fit, write_trace

REPO = Path(__file__).resolve().parents[2]
COIN = REPO / "configs/experiments/coin.toml"
COIN_TARGETS = (" heads", " tails")

__all__ = ["COIN", "COIN_TARGETS", "REPO", "coin_trace", "text_trace", "fit_table", "flip_a_byte_in_pages",
           "llmprobe_process"]


def coin_trace(loaded, tmp_path: Path, name: str = "coin.parquet", targets=COIN_TARGETS, sequences: int = 1,
               n_max: int = 3) -> Path:
    """A trace of coin-experiment prompts with targets, as fit-prior and fit-posterior read."""
    return write_trace(loaded, tmp_path / name, experiment_records(tmp_path, n_max=n_max, sequences=sequences),
                       top_k=4, targets=list(targets))


def text_trace(loaded, path: Path) -> Path:
    return write_trace(loaded, path, text_records(), top_k=4)


def fit_table(path: Path) -> Path:
    return write_fit(synthetic_fit([[0.2, 0.8]], sequences=2, n_max=3), path)


def flip_a_byte_in_pages(source: Path, column: str, target: Path | None = None) -> Path:
    """Bit rot that leaves the footer intact: one byte flipped in the middle of ``column``'s pages (in place, or
    into a copy at ``target``). Without page checksums such a flip mostly decodes, as a wrong number."""
    import pyarrow.parquet as pq

    chunk = pq.ParquetFile(source).metadata.row_group(0)
    found = next(chunk.column(i) for i in range(chunk.num_columns) if chunk.column(i).path_in_schema.startswith(column))
    start = found.dictionary_page_offset or found.data_page_offset
    data = bytearray(source.read_bytes())
    data[start + found.total_compressed_size // 2] ^= 0x10
    target = target or source
    target.write_bytes(bytes(data))
    return target


def llmprobe_process(args: list[str], tmp_path: Path, **kwargs) -> subprocess.Popen:
    """A real ``llmprobe`` process (this worktree's package), stdout and stderr piped."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMPROBE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           **kwargs.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "llmprobe", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=tmp_path, **kwargs)
