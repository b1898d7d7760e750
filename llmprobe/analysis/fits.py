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

from llmprobe.analysis.marks import CategoryMarks, category_marks
from llmprobe.analysis.priors import PRIOR_OVER_ROWS, reference_prior
from llmprobe.bayes import (
    entropy_bits,
    fit_dirichlet_mixture,
    fit_dirichlet_multinomial_mixture,
    kl_bits,
    mixture_posterior_predictive,
    select_components,
    total_variation,
)
from llmprobe.bayes.updating import (
    UpdatingFit,
    UpdatingPrior,
    held_out_predictions,
    select_updating_prior,
    sequence_folds,
)
from llmprobe.bayes.verdict import (
    FIT_KL_BITS,
    FORGETTING_BITS,
    GAMMA_UNIDENTIFIED_WIDTH,
    NO_UPDATE_BITS,
    Evidence,
    decide,
    frequency_follower,
    never_updating,
    recency,
    score,
    shared_constant,
    true_theta,
)
from llmprobe.errors import UsageError
from llmprobe.files import atomic_file, check_new_output
from llmprobe.progress import SILENT, Reporter
from llmprobe.tracing.reader import Trace

PRIOR_FORMAT = "llmprobe.prior/1"
FIT_META_KEY = b"llmprobe.fit"
KL_BAYES_MODEL = "KL(Bayes‖model)"
"""The name of the per-mark ``kl_bits`` column (and of ``mean_kl_bits``) wherever it is shown: KL from the
Bayesian posterior predictive to the model, sum_k bayes_k log2(bayes_k / model_k). The verdict's scores
are the other direction, KL(model‖predictor), and are always labelled so."""


# ------------------------------------------------------------------------------------------ fit-prior
def fit_prior(cm: CategoryMarks, components: str, max_components: int, from_counts: bool, n_filter: list[int] | None,
              seed: int) -> dict[str, Any]:
    """Fit the *prior over rows*: a Dirichlet (mixture) over the model's category distributions across
    marks and prompts, or over the examples' counts. Not the *updating prior* (fit-posterior).

    ``n_filter``: only the marks after these numbers of examples (all marks when None)."""
    keep = np.ones(len(cm), dtype=bool) if n_filter is None else np.isin(cm.marks["n"].to_numpy(), n_filter)
    if not keep.any():
        raise UsageError(f"no marks with n in {n_filter}", where="--n")
    if from_counts:
        if cm.counts is None:
            raise UsageError("the trace's marks carry no counts (experiment prompts do)", where="--from-counts")
        last = cm.marks.assign(_row=np.arange(len(cm)))[keep].groupby("sequence")["_row"].max().to_numpy()
        data = cm.counts[last]
        data = data[data.sum(axis=1) > 0]
        if data.shape[0] < 2:
            raise UsageError(f"only {data.shape[0]} sequence(s) with examples before the chosen marks; counts after"
                             " n = 0 examples are empty, so --from-counts needs marks with n >= 1", where="--n")
    else:
        data = cm.probs[keep]
    if data.shape[0] < 2:
        raise UsageError(f"only {data.shape[0]} distribution(s) to fit; a prior needs several")
    if components != "auto":
        try:
            k = int(components)
        except ValueError:
            raise UsageError(f"expected a number or 'auto', got {components!r}", where="--components") from None
        if k < 1:
            raise UsageError("must be 1 or more", where="--components")
    try:
        if components == "auto":
            selection = select_components(data, max_components, seed, counts=from_counts)
            best, table = selection.best, selection.table
        else:
            fit = fit_dirichlet_multinomial_mixture if from_counts else fit_dirichlet_mixture
            best = fit(data, k, seed)
            table = [{"n_components": k, "loglik": best.loglik, "bic": best.bic}]
    except ValueError as exc:  # data the fit cannot take (e.g. a category never counted)
        raise UsageError(f"cannot fit a prior over rows to these marks: {exc}", where=cm.label) from None
    return {
        "format": PRIOR_FORMAT,
        "kind": PRIOR_OVER_ROWS,
        "trace": cm.label,
        "categories": cm.categories,
        "data": "counts" if from_counts else "probabilities",
        "n_rows": int(data.shape[0]),
        "n_filter": n_filter,
        "mixture": best.to_dict(),
        "selection": table,
    }


# ------------------------------------------------------------------------------------------ fit-posterior
DEFAULT_MIN_MASS = 0.05
"""Marks where the model puts less than this probability on the category set are left out of every
fit and score (it is not predicting a category there; renormalizing would invent a prediction)."""

DEFAULT_FOLDS = 5
"""Out-of-sample scores: sequences dealt into this many folds, each scored by fits on the others."""

DEFAULT_MAX_COMPONENTS = 3


@dataclass
class PosteriorResult:
    label: str
    categories: list[str]
    table: pd.DataFrame  # long: one row per (mark, category)
    by_n: pd.DataFrame  # per (layout, n) means
    summary: dict[str, Any]

    @property
    def verdict(self) -> str:
        return self.summary["verdict"]

    def __repr__(self) -> str:
        """The conclusion first (as every surface shows it), then where the numbers are."""
        return (f"<fit-posterior of {self.label}: {verdict_line(self.summary)}\n {gamma_test_line(self.summary)}\n"
                f" .summary (the --json dict), .table ({len(self.table)} rows, one per mark and category),"
                f" .by_n (per n)>")


# ------------------------------------------------------------------------------------------ the conclusion
def verdict_line(summary: dict[str, Any]) -> str:
    """What every surface that states a conclusion leads with: the verdict and its one-sentence reason.
    The γ = 1 test (:func:`gamma_test_line`) is shown only after it, never alone: γ = 1 not being
    rejected says nothing when no filter explains the predictions (``poor-fit``) or they do not
    respond to the examples (``no-updating``)."""
    verdict, sentence = summary.get("verdict"), summary.get("verdict_sentence")
    if not isinstance(verdict, str):
        return "no verdict: this fit was written by an llmprobe older than the verdict; rerun fit-posterior"
    return f"verdict {verdict}: {sentence}" if isinstance(sentence, str) else f"verdict {verdict}"


def gamma_test_line(summary: dict[str, Any]) -> str:
    """The bootstrap test of γ = 1, worded to be read beside the verdict (:func:`verdict_line`)."""
    rejected = summary.get("exact_bayes_rejected")
    if rejected not in (True, False):
        return "γ = 1 test: none in this fit"
    forgetting = summary.get("forgetting") if isinstance(summary.get("forgetting"), dict) else {}
    gamma = forgetting.get("gamma")
    interval = summary.get("gamma_ci") or []
    level = summary.get("gamma_ci_level")
    numbers = ""
    if isinstance(gamma, (int, float)) and len(interval) == 2:
        numbers = (f" (γ = {gamma:.3f}, {int(round(level * 100)) if isinstance(level, (int, float)) else 95}%"
                   f" CI [{interval[0]:.3f}, {interval[1]:.3f}])")
    outcome = "exact Bayesian updating is rejected" if rejected else "exact Bayesian updating is not rejected"
    note = "" if summary.get("verdict") in ("consistent", "rejected") else "; the verdict above, not this test, is the conclusion"
    return f"γ = 1 test: {outcome}{numbers}{note}"


POSTERIOR_INPUT = ("a trace of experiment prompts (written by `llmprobe experiment`: marks with running counts and"
                   " outcome sequences) traced with their categories' targets (experiment prompts carry them)")
"""Everything fit-posterior needs, named whole in the first message about any part of it."""


def posterior_marks(trace: Trace, label: str | None = None) -> CategoryMarks:
    """The category marks of a trace for :func:`fit_posterior`; one error naming every requirement."""
    return category_marks(trace, label, needs=POSTERIOR_INPUT)


def _sequence_inputs(cm: CategoryMarks) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Outcome sequences and, per mark, its sequence number and position, for the filter fit."""
    if not cm.outcomes:
        raise UsageError(f"the marks carry no outcome sequences; fit-posterior needs {POSTERIOR_INPUT}",
                         where=cm.label)
    keys = list(cm.outcomes)
    index = {k: i for i, k in enumerate(keys)}
    try:
        sequence = np.array([index[s] for s in cm.marks["sequence"]])
    except KeyError as exc:
        raise UsageError(f"sequence {exc.args[0]!r} has marks but no outcomes") from None
    return [np.asarray(cm.outcomes[k], dtype=np.int64) for k in keys], sequence, cm.marks["n"].to_numpy(dtype=np.int64)


def parse_components(spec: str) -> int | None:
    """``--prior-components``: a number >= 1, or ``auto`` (None: choose by held-out KL)."""
    if spec == "auto":
        return None
    try:
        k = int(spec)
    except ValueError:
        raise UsageError(f"expected a number or 'auto', got {spec!r}", where="--prior-components") from None
    if k < 1:
        raise UsageError("must be 1 or more, or 'auto'", where="--prior-components")
    return k


def fit_posterior(cm: CategoryMarks, prior_spec: str, n_bootstrap: int, seed: int, *, components: str = "1",
                  max_components: int = DEFAULT_MAX_COMPONENTS, min_mass: float = DEFAULT_MIN_MASS,
                  folds: int = DEFAULT_FOLDS, reporter: Reporter = SILENT) -> PosteriorResult:
    """The updating prior, the exact-Bayes test under it, out-of-sample scores, baselines and the verdict.
    ``reporter`` shows progress through the slow steps (choosing components, the bootstrap, held-out fits)."""
    if cm.counts is None:
        raise UsageError(f"the marks carry no running counts; fit-posterior needs {POSTERIOR_INPUT}", where=cm.label)
    if not 0.0 <= min_mass < 1.0:
        raise UsageError(f"must be in [0, 1), got {min_mass}", where="--min-mass")
    if folds < 2:
        raise UsageError(f"must be 2 or more, got {folds}", where="--folds")
    n_components = parse_components(components)
    if max_components < 1:
        raise UsageError("must be 1 or more", where="--max-components")
    reference = None if prior_spec == "fit" else reference_prior(prior_spec, cm.categories)
    outcomes, sequence, position = _sequence_inputs(cm)
    used = cm.mass >= min_mass
    used_sequences = np.unique(sequence[used])
    if used.sum() < 2:
        raise UsageError(f"only {int(used.sum())} of {len(cm)} marks have mass >= {min_mass} on the categories;"
                         " nothing to fit", where="--min-mass")
    weights = used.astype(float)
    n_folds = min(folds, used_sequences.size)
    fold = None
    if n_folds >= 2:  # deal the sequences that have used marks; the others carry no weight anywhere
        dealt = np.isin(sequence, used_sequences)
        fold = np.zeros(len(cm), dtype=np.int64)
        fold[dealt] = sequence_folds(sequence[dealt], n_folds, seed)
    selection: list[dict[str, float]] = []
    if n_components is None:
        if fold is None:
            raise UsageError("needs 2 or more sequences to choose components out of sample", where="--prior-components")
        with reporter.progress(f"{cm.label}: choosing 1-{max_components} components", max_components * n_folds) \
                as advance:
            model, selection = select_updating_prior(cm.probs, outcomes, sequence, position, max_components, fold,
                                                     weights=weights, seed=seed, advance=advance)
    else:
        model = UpdatingFit(cm.probs, outcomes, sequence, position, n_components, weights=weights, seed=seed)
    with reporter.progress(f"{cm.label}: bootstrap of γ", n_bootstrap) as advance:
        test = model.test(n_bootstrap=n_bootstrap, seed=seed, selection=selection, advance=advance)
    exact_in, free_in = model.predict(test.exact), model.predict(test.free)
    if fold is None:
        exact_out, free_out = exact_in, free_in
    else:
        with reporter.progress(f"{cm.label}: out-of-sample fits", n_folds) as advance:
            exact_out, free_out = held_out_predictions(model, fold, test.profile, advance)

    if reference is None:  # --prior fit
        bayes = exact_in
        prior_desc: dict[str, Any] = {"kind": "fit", "weights": test.exact.weights.tolist(),
                                      "alphas": test.exact.alphas.tolist()}
        if test.exact.n_components == 1:
            prior_desc["alpha"] = test.exact.alphas[0].tolist()
    else:
        bayes = mixture_posterior_predictive(reference.mixture.weights, reference.mixture.alphas, cm.counts)
        prior_desc = reference.describe()
    last = np.array([outcomes[s][p - 1] if p > 0 else -1 for s, p in zip(sequence, position)], dtype=np.int64)
    baselines = {
        "never_updating": never_updating(cm.probs, sequence, position),
        "frequency": frequency_follower(cm.counts),
        "recency": recency(last, len(cm.categories)),
    }
    if cm.theta is not None:
        baselines["true_theta"] = true_theta(cm.theta)
    scores = _scores(cm.probs, weights, exact_in, exact_out, free_in, free_out, bayes, prior_desc["kind"],
                     baselines, fold is not None, n_folds)
    held = "out_of_sample" if fold is not None else "in_sample"
    # the alpha_0 -> infinity member of the filter family, fitted (on the other folds) like the filters
    scores["shared_constant"] = {**score(cm.probs, shared_constant(cm.probs, weights, fold), weights).to_dict(),
                                 "fitted": True, "out_of_sample": fold is not None}
    verdict = decide(Evidence(
        best_kl_bits=scores["forgetting"][f"kl_bits_{held}"], exact_kl_bits=scores["exact_bayes"][f"kl_bits_{held}"],
        never_kl_bits=scores["never_updating"]["kl_bits"], constant_kl_bits=scores["shared_constant"]["kl_bits"],
        out_of_sample=fold is not None,
        gamma=test.free.gamma, gamma_ci=test.gamma_ci, rejected=test.rejected,
        alpha0_at_bound=test.exact.at_bound or test.free.at_bound,
        converged=all(f.converged or f.at_bound for f in (test.exact, test.free)),
        never_updates=test.exact.n_components == 1 and test.exact.at_bound,
        components_chosen=n_components is None or n_components > 1))

    table = _long_table(cm, bayes, free_in, exact_out, used)
    by_n = summarize_by_n(table)
    per_mark = table.drop_duplicates(["prompt_id", "position"])
    fitted = per_mark[per_mark["used"]]
    n_inexact = int((~cm.marks["exact"].to_numpy(dtype=bool)).sum()) if "exact" in cm.marks else 0
    summary = {
        "trace": cm.label,
        "categories": cm.categories,
        "verdict": verdict.verdict,
        "verdict_sentence": verdict.sentence,
        "verdict_warnings": verdict.warnings,
        "thresholds": {"fit_kl_bits": FIT_KL_BITS, "no_update_bits": NO_UPDATE_BITS,
                       "forgetting_bits": FORGETTING_BITS,
                       "gamma_unidentified_width": GAMMA_UNIDENTIFIED_WIDTH, "min_mass": min_mass},
        "n_marks": len(cm),
        "n_marks_used": int(used.sum()),
        "n_marks_low_mass": int((~used).sum()),
        "n_marks_inexact": n_inexact,
        "n_sequences": len(outcomes),
        "prior": prior_desc,
        "updating_prior": test.to_dict(),
        "exact_bayes": _fit_summary(test.exact),
        "forgetting": _fit_summary(test.free),
        "gamma_ci": list(test.gamma_ci),
        "gamma_ci_level": test.level,
        "exact_bayes_rejected": test.rejected,
        "gamma_identifiable": bool(not (test.exact.n_components == 1 and test.exact.at_bound)),
        "n_bootstrap": n_bootstrap,
        "scores": scores,
        # descriptive means against the --prior reference, over every mark (as the report averages them);
        # the scores, the verdict and the peers' statistics below are over the used marks
        "mean_kl_bits": float(per_mark["kl_bits"].mean()),
        "mean_tv": float(per_mark["tv"].mean()),
        "mean_entropy_gap_bits": float((per_mark["entropy_model_bits"] - per_mark["entropy_bayes_bits"]).mean()),
        "entropy_mae_bits": float(fitted["entropy_error_bits"].mean()),
        "mean_mass": float(per_mark["mass"].mean()),
    }
    if cm.theta is not None:
        summary["tv_theta"] = {"mean": float(fitted["tv_theta"].mean()), "std": float(fitted["tv_theta"].std(ddof=0))}
        summary["kl_theta_bits"] = {"mean": float(fitted["kl_theta_bits"].mean()),
                                    "std": float(fitted["kl_theta_bits"].std(ddof=0))}
    return PosteriorResult(cm.label, cm.categories, table, by_n, summary)


def _scores(probs: np.ndarray, weights: np.ndarray, exact_in: np.ndarray, exact_out: np.ndarray,
            free_in: np.ndarray, free_out: np.ndarray, bayes: np.ndarray, prior_kind: str,
            baselines: dict[str, np.ndarray], out_of_sample: bool, n_folds: int) -> dict[str, Any]:
    """Every predictor scored the same way: mean KL(model || predictor) in bits and mean TV, used marks."""
    scores: dict[str, Any] = {
        "measure": "mean over used marks of KL(model‖predictor) in bits and of TV",
        "out_of_sample": out_of_sample,
        "n_folds": n_folds if out_of_sample else 0,
    }
    for name, inside, outside in (("exact_bayes", exact_in, exact_out), ("forgetting", free_in, free_out)):
        a = score(probs, inside, weights)
        b = score(probs, outside, weights) if out_of_sample else None  # null: nothing could be held out
        scores[name] = {"kl_bits_in_sample": a.kl_bits, "tv_in_sample": a.tv,
                        "kl_bits_out_of_sample": None if b is None else b.kl_bits,
                        "tv_out_of_sample": None if b is None else b.tv}
    for name, predictions in baselines.items():
        scores[name] = {**score(probs, predictions, weights).to_dict(), "fitted": False}
    if prior_kind != "fit":
        scores["reference_prior"] = {**score(probs, bayes, weights).to_dict(), "fitted": False, "kind": prior_kind}
    return scores


def _fit_summary(fit: UpdatingPrior) -> dict[str, Any]:
    means = fit.alphas / fit.strengths[:, None]
    return {"prior_mean": (fit.weights @ means).tolist(), "alpha0": float(fit.weights @ fit.strengths),
            "weights": fit.weights.tolist(), "alphas": fit.alphas.tolist(), "gamma": fit.gamma,
            "mean_kl_bits_model_to_filter": fit.mean_kl_bits, "converged": fit.converged, "at_bound": fit.at_bound}


def _long_table(cm: CategoryMarks, bayes: np.ndarray, filtered: np.ndarray, held_out: np.ndarray,
                used: np.ndarray) -> pd.DataFrame:
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
