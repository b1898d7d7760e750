"""``fit-prior`` and ``fit-posterior``: traces in, Bayesian comparisons out.

The statistics live in :mod:`llmprobe.bayes` (pure numpy/scipy); this module only turns traces
into its inputs (via :mod:`llmprobe.analysis.marks`) and its results into tables and JSON. The per-mark table
is long: one row per (mark, category), so it filters and plots without reshaping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.bayes import (
    BayesFit,
    ExactBayesTest,
    bootstrap_exact_bayes,
    entropy_bits,
    fit_dirichlet_mixture,
    fit_dirichlet_multinomial_mixture,
    kl_bits,
    mixture_posterior_predictive,
    posterior_predictive,
    select_components,
    total_variation,
)
from llmprobe.errors import UsageError
from llmprobe.files import atomic_file, check_new_output
from llmprobe.analysis.marks import CategoryMarks
from llmprobe.analysis.priors import prior_for

PRIOR_FORMAT = "llmprobe.prior/1"
# A fitted prior strength beyond this means the predictions do not move with the examples at all:
# the prior swamps any counts, so the forgetting factor has nothing to act on and is not identifiable.
UNRESPONSIVE_ALPHA0 = 1e6
FIT_META_KEY = b"llmprobe.fit"


# ------------------------------------------------------------------------------------------ fit-prior
def fit_prior(cm: CategoryMarks, components: str, max_components: int, from_counts: bool, n_filter: list[int] | None,
              seed: int) -> dict[str, Any]:
    """Fit a Dirichlet (mixture) to the model's category distributions, or to the example counts.

    ``n_filter``: only the marks after these numbers of examples (all marks when None)."""
    keep = np.ones(len(cm), dtype=bool) if n_filter is None else np.isin(cm.marks["n"].to_numpy(), n_filter)
    if not keep.any():
        raise UsageError(f"no marks with n in {n_filter}", where="--n")
    if from_counts:
        if cm.counts is None:
            raise UsageError("the trace's marks carry no counts (experiment prompts do)", where="--from-counts")
        last = cm.marks.assign(_row=np.arange(len(cm)))[keep].groupby("sequence")["_row"].max().to_numpy()
        data = cm.counts[last]
    else:
        data = cm.probs[keep]
    if data.shape[0] < 2:
        raise UsageError(f"only {data.shape[0]} distribution(s) to fit; a prior needs several")
    if components == "auto":
        selection = select_components(data, max_components, seed, counts=from_counts)
        best, table = selection.best, selection.table
    else:
        try:
            k = int(components)
        except ValueError:
            raise UsageError(f"expected a number or 'auto', got {components!r}", where="--components") from None
        if k < 1:
            raise UsageError("must be 1 or more", where="--components")
        fit = fit_dirichlet_multinomial_mixture if from_counts else fit_dirichlet_mixture
        best = fit(data, k, seed)
        table = [{"n_components": k, "loglik": best.loglik, "bic": best.bic}]
    return {
        "format": PRIOR_FORMAT,
        "trace": cm.label,
        "categories": cm.categories,
        "data": "counts" if from_counts else "probabilities",
        "n_rows": int(data.shape[0]),
        "n_filter": n_filter,
        "mixture": best.to_dict(),
        "selection": table,
    }


# ------------------------------------------------------------------------------------------ fit-posterior
@dataclass
class PosteriorResult:
    label: str
    categories: list[str]
    table: pd.DataFrame  # long: one row per (mark, category)
    by_n: pd.DataFrame  # per (layout, n) means
    summary: dict[str, Any]


def _sequence_inputs(cm: CategoryMarks) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Outcome sequences and, per mark, its sequence number and position, for the filter fit."""
    if not cm.outcomes:
        raise UsageError("marks carry no outcome sequences (generate prompts with `llmprobe experiment`)")
    keys = list(cm.outcomes)
    index = {k: i for i, k in enumerate(keys)}
    try:
        sequence = np.array([index[s] for s in cm.marks["sequence"]])
    except KeyError as exc:
        raise UsageError(f"sequence {exc.args[0]!r} has marks but no outcomes") from None
    return [np.asarray(cm.outcomes[k], dtype=np.int64) for k in keys], sequence, cm.marks["n"].to_numpy(dtype=np.int64)


def fit_posterior(cm: CategoryMarks, prior_spec: str, n_bootstrap: int, seed: int) -> PosteriorResult:
    if cm.counts is None:
        raise UsageError("marks carry no running counts (generate prompts with `llmprobe experiment`)")
    outcomes, sequence, position = _sequence_inputs(cm)
    test: ExactBayesTest = bootstrap_exact_bayes(cm.probs, outcomes, sequence, position,
                                                 n_bootstrap=n_bootstrap, seed=seed)
    if prior_spec == "fit":
        bayes = posterior_predictive(test.exact.prior_alpha, cm.counts)
        prior_desc: dict[str, Any] = {"kind": "fit", "alpha": test.exact.prior_alpha.tolist()}
    else:
        prior = prior_for(prior_spec, cm.categories)
        bayes = mixture_posterior_predictive(prior.weights, prior.alphas, cm.counts)
        prior_desc = {"kind": "uniform" if prior_spec == "uniform" else "file", "source": prior_spec,
                      "weights": prior.weights.tolist(), "alphas": prior.alphas.tolist()}
    filtered = test.free.predictive(outcomes, sequence, position)
    table = _long_table(cm, bayes, filtered)
    by_n = summarize_by_n(table)
    per_mark = table.drop_duplicates(["prompt_id", "position"])
    summary = {
        "trace": cm.label,
        "categories": cm.categories,
        "n_marks": len(cm),
        "n_sequences": int(len(outcomes)),
        "prior": prior_desc,
        "exact_bayes": _fit_summary(test.exact),
        "forgetting": _fit_summary(test.free),
        "gamma_ci": list(test.gamma_ci),
        "gamma_ci_level": test.level,
        "exact_bayes_rejected": test.rejected,
        "gamma_identifiable": bool(test.exact.prior_strength < UNRESPONSIVE_ALPHA0),
        "n_bootstrap": n_bootstrap,
        "mean_kl_bits": float(per_mark["kl_bits"].mean()),
        "mean_tv": float(per_mark["tv"].mean()),
        "mean_entropy_gap_bits": float((per_mark["entropy_model_bits"] - per_mark["entropy_bayes_bits"]).mean()),
        "mean_mass": float(per_mark["mass"].mean()),
    }
    return PosteriorResult(cm.label, cm.categories, table, by_n, summary)


def _fit_summary(fit: BayesFit) -> dict[str, Any]:
    return {"prior_mean": fit.prior_mean.tolist(), "alpha0": fit.prior_strength, "gamma": fit.gamma,
            "mean_kl_bits_model_to_filter": fit.mean_kl_bits, "converged": fit.converged}


def _long_table(cm: CategoryMarks, bayes: np.ndarray, filtered: np.ndarray) -> pd.DataFrame:
    m, k = cm.probs.shape
    per_mark = pd.DataFrame({
        "trace": cm.label,
        "prompt_id": cm.marks["prompt_id"].to_numpy(),
        "position": cm.marks["position"].to_numpy(),
        "layout": cm.marks["layout"].to_numpy(),
        "sequence": cm.marks["sequence"].astype(str).to_numpy(),
        "n": cm.marks["n"].to_numpy(dtype=np.int64),
        "mass": cm.mass,
        "tv": total_variation(bayes, cm.probs),
        "kl_bits": kl_bits(bayes, cm.probs),
        "kl_model_bayes_bits": kl_bits(cm.probs, bayes),
        "entropy_model_bits": entropy_bits(cm.probs),
        "entropy_bayes_bits": entropy_bits(bayes),
    })
    long = per_mark.loc[per_mark.index.repeat(k)].reset_index(drop=True)
    long.insert(6, "category", np.tile(cm.categories, m))
    long.insert(7, "count", cm.counts.reshape(-1))
    long.insert(8, "theta", cm.theta.reshape(-1) if cm.theta is not None else np.nan)
    long.insert(9, "model_prob", cm.probs.reshape(-1))
    long.insert(10, "bayes_prob", bayes.reshape(-1))
    long.insert(11, "filter_prob", filtered.reshape(-1))
    return long


def summarize_by_n(table: pd.DataFrame) -> pd.DataFrame:
    """Means over marks for each (trace, layout, n, category)."""
    keys = ["trace", "layout", "n", "category"]
    grouped = table.groupby(keys, dropna=False, sort=True)
    out = grouped[["model_prob", "bayes_prob", "filter_prob", "tv", "kl_bits", "mass"]].mean()
    out["marks"] = grouped.size()
    return out.reset_index()


def write_fit_table(results: list[PosteriorResult], output: str, force: bool) -> None:
    """The long per-mark table as Parquet (with the fits in its metadata) or CSV, written atomically."""
    check_new_output(output, force)
    frame = pd.concat([r.table for r in results], ignore_index=True)
    with atomic_file(output, "wb", replace=force) as stream:
        if Path(output).suffix.lower() == ".csv":
            stream.write(frame.to_csv(index=False).encode("utf-8"))
        else:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            table = table.replace_schema_metadata({FIT_META_KEY: json.dumps([r.summary for r in results]).encode()})
            pq.write_table(table, stream, compression="zstd")
