"""fit-posterior's per-mark table, its per-n summary, and the file it is written to.

The per-mark table is long: one row per (mark, category), so it filters and plots without
reshaping. Written as Parquet (the fits' JSON summaries in its metadata under :data:`FIT_META_KEY`,
which plot-icl and report read) or as CSV, atomically (:func:`write_table_file`, which fit-scaling's
per-n predictions go through too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.analysis.marks import CategoryMarks
from llmprobe.bayes import entropy_bits, kl_bits, total_variation
from llmprobe.files import atomic_file, check_new_output

FIT_META_KEY = b"llmprobe.fit"


class FittedTrace(Protocol):
    """What the fit file holds of a fit (a :class:`~llmprobe.analysis.results.PosteriorResult`)."""

    table: pd.DataFrame

    @property
    def summary(self) -> dict[str, Any]: ...


def long_table(cm: CategoryMarks, bayes: np.ndarray, filtered: np.ndarray, held_out: np.ndarray,
               used: np.ndarray) -> pd.DataFrame:
    """One row per (mark, category): the model's probability, the --prior posterior predictive's
    (``bayes``), the fitted filter's in sample and out of sample, and per-mark distances."""
    m, k = cm.probs.shape
    entropy_model, entropy_bayes = entropy_bits(cm.probs), entropy_bits(bayes)
    per_mark = pd.DataFrame({
        "trace": cm.label,
        "prompt_id": cm.marks["prompt_id"].to_numpy(),
        "position": cm.marks["position"].to_numpy(),
        "layout": cm.marks["layout"].to_numpy(),
        "sequence": cm.marks["sequence"].astype(str).to_numpy(),
        "n": cm.marks["n"].to_numpy(dtype=np.int64),
        "mass": cm.mass,
        "used": used,
        "exact": cm.marks["exact"].to_numpy(dtype=bool) if "exact" in cm.marks else True,
        "tv": total_variation(bayes, cm.probs),
        "kl_bits": kl_bits(bayes, cm.probs),
        "kl_model_bayes_bits": kl_bits(cm.probs, bayes),
        "entropy_model_bits": entropy_model,
        "entropy_bayes_bits": entropy_bayes,
        "entropy_error_bits": np.abs(entropy_model - entropy_bayes),
        "tv_theta": total_variation(cm.theta, cm.probs) if cm.theta is not None else np.nan,
        "kl_theta_bits": kl_bits(cm.theta, cm.probs) if cm.theta is not None else np.nan,
    })
    long = per_mark.loc[per_mark.index.repeat(k)].reset_index(drop=True)
    long.insert(6, "category", np.tile(cm.categories, m))
    long.insert(7, "count", cm.counts.reshape(-1))
    long.insert(8, "theta", cm.theta.reshape(-1) if cm.theta is not None else np.nan)
    long.insert(9, "model_prob", cm.probs.reshape(-1))
    long.insert(10, "bayes_prob", bayes.reshape(-1))
    long.insert(11, "filter_prob", filtered.reshape(-1))
    long.insert(12, "held_out_prob", held_out.reshape(-1))
    return long


def summarize_by_n(table: pd.DataFrame) -> pd.DataFrame:
    """Per (trace, layout, n, category): mass and mark counts over all marks, the other means (and the
    std of TV to theta) over the used marks (NaN where every mark at that n was left out)."""
    keys = ["trace", "layout", "n", "category"]
    grouped = table.groupby(keys, dropna=False, sort=True)
    out = grouped[["mass"]].mean()
    out["marks"] = grouped.size()
    out["used"] = grouped["used"].sum()
    used = table[table["used"]].groupby(keys, dropna=False, sort=True)
    columns = ["model_prob", "bayes_prob", "filter_prob", "held_out_prob", "tv", "kl_bits", "entropy_error_bits",
               "tv_theta", "kl_theta_bits"]
    out = out.join(used[columns].mean())
    out["tv_theta_std"] = used["tv_theta"].std(ddof=0)
    return out.reset_index()


def write_fit_table(results: Sequence[FittedTrace], output: str, force: bool) -> None:
    """The long per-mark table as Parquet (with the fits in its metadata) or CSV, written atomically."""
    write_table_file(pd.concat([r.table for r in results], ignore_index=True), output, force,
                     {FIT_META_KEY: json.dumps([r.summary for r in results]).encode()})


def write_table_file(frame: pd.DataFrame, output: str, force: bool, metadata: dict[bytes, bytes] | None = None) -> None:
    """A table as CSV (by the ``.csv`` suffix) or Parquet (with ``metadata`` in its schema), written atomically."""
    check_new_output(output, force)
    with atomic_file(output, "wb", replace=force) as stream:
        if Path(output).suffix.lower() == ".csv":
            stream.write(frame.to_csv(index=False).encode("utf-8"))
        else:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if metadata:
                table = table.replace_schema_metadata(metadata)
            pq.write_table(table, stream, compression="zstd", write_page_checksum=True)
