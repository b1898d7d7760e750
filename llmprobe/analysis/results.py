"""What ``fit-posterior`` returns: a typed result, its JSON summary, and the conclusion's wording.

:class:`PosteriorResult` holds the verdict (:class:`~llmprobe.bayes.verdict.Verdict`), the updating prior's
fits and gamma test (:class:`~llmprobe.bayes.updating.UpdatingPriorTest`), every predictor's scores
(:class:`Scores`), how many marks were used, the descriptive distances to the ``--prior`` reference
(:class:`Distances`), the peers' statistics when asked for, the per-mark and per-n tables, and the scorecard
of the field's other tests (:class:`~llmprobe.analysis.scorecard.Scorecard`, always after the verdict: the
summary's last key). ``summary`` is the JSON document the CLI writes with ``--json`` (and into the Parquet
table's metadata), built from those fields; its keys and values are a file format that other runs, plot-icl
and report read back, so they change only with care.

Every surface that states a conclusion leads with :func:`verdict_line` and shows the gamma = 1 test
(:func:`gamma_test_line`) only beside it; both read a summary dict, so they work on files too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pandas as pd

from llmprobe.analysis.fit_options import PosteriorOptions
from llmprobe.analysis.priors import ReferencePrior
from llmprobe.analysis.protocols import PeerStatistics
from llmprobe.analysis.scorecard import Scorecard
from llmprobe.bayes.updating import UpdatingPrior, UpdatingPriorTest
from llmprobe.bayes.verdict import (
    FIT_KL_BITS,
    FORGETTING_BITS,
    GAMMA_UNIDENTIFIED_WIDTH,
    NO_UPDATE_BITS,
    Score,
    Verdict,
)

KL_BAYES_MODEL = "KL(Bayes‖model)"
"""The name of the per-mark ``kl_bits`` column (and of ``mean_kl_bits``) wherever it is shown: KL from the
Bayesian posterior predictive to the model, sum_k bayes_k log2(bayes_k / model_k). The verdict's scores
are the other direction, KL(model‖predictor), and are always labelled so."""

SCORE_MEASURE = "mean over used marks of KL(model‖predictor) in bits and of TV"


@dataclass(frozen=True)
class FilterScores:
    """A fitted filter scored on the used marks in sample and, when sequences could be held out, out of sample."""

    in_sample: Score
    out_of_sample: Score | None

    @property
    def held(self) -> Score:
        """The score the verdict reads: out of sample when there is one."""
        return self.in_sample if self.out_of_sample is None else self.out_of_sample

    def to_dict(self) -> dict[str, float | None]:
        out = self.out_of_sample
        return {"kl_bits_in_sample": self.in_sample.kl_bits, "tv_in_sample": self.in_sample.tv,
                "kl_bits_out_of_sample": None if out is None else out.kl_bits,
                "tv_out_of_sample": None if out is None else out.tv}


@dataclass(frozen=True)
class Scores:
    """Every predictor scored the same way (:data:`SCORE_MEASURE`): the two fitted filters, the baselines
    (nothing fitted: ``never_updating``, ``frequency``, ``recency``, ``true_theta`` where θ is known) and
    the ``--prior`` reference when one was given. ``n_folds``: 0 when nothing could be held out."""

    out_of_sample: bool
    n_folds: int
    exact_bayes: FilterScores
    forgetting: FilterScores
    baselines: dict[str, Score]
    reference: Score | None
    reference_kind: str | None
    shared_constant: Score  # one constant prediction for every mark, fitted (out of sample when folds exist)

    def to_dict(self) -> dict[str, Any]:
        scores: dict[str, Any] = {"measure": SCORE_MEASURE, "out_of_sample": self.out_of_sample,
                                  "n_folds": self.n_folds,
                                  "exact_bayes": self.exact_bayes.to_dict(), "forgetting": self.forgetting.to_dict()}
        for name, baseline in self.baselines.items():
            scores[name] = {**baseline.to_dict(), "fitted": False}
        if self.reference is not None:
            scores["reference_prior"] = {**self.reference.to_dict(), "fitted": False, "kind": self.reference_kind}
        scores["shared_constant"] = {**self.shared_constant.to_dict(), "fitted": True,
                                     "out_of_sample": self.out_of_sample}
        return scores


@dataclass(frozen=True)
class MarkCounts:
    """How many marks there were, how many every fit and score used (mass on the categories at least
    ``min_mass``), how many fell inside a token, and how many outcome sequences they came from."""

    marks: int
    used: int
    inexact: int
    sequences: int

    @property
    def low_mass(self) -> int:
        return self.marks - self.used


@dataclass(frozen=True)
class Distances:
    """Descriptive means against the ``--prior`` reference, over every mark (as the report averages
    them), and the entropy error and distances to the true θ over the used marks."""

    mean_kl_bits: float
    mean_tv: float
    mean_entropy_gap_bits: float
    entropy_mae_bits: float
    mean_mass: float
    tv_theta: dict[str, float] | None  # mean and std, where θ is known
    kl_theta_bits: dict[str, float] | None

    @classmethod
    def of(cls, table: pd.DataFrame, has_theta: bool) -> Distances:
        per_mark = table.drop_duplicates(["prompt_id", "position"])
        fitted = per_mark[per_mark["used"]]
        spread = lambda column: {"mean": float(fitted[column].mean()),  # noqa: E731
                                 "std": float(fitted[column].std(ddof=0))}
        return cls(
            mean_kl_bits=float(per_mark["kl_bits"].mean()), mean_tv=float(per_mark["tv"].mean()),
            mean_entropy_gap_bits=float((per_mark["entropy_model_bits"] - per_mark["entropy_bayes_bits"]).mean()),
            entropy_mae_bits=float(fitted["entropy_error_bits"].mean()), mean_mass=float(per_mark["mass"].mean()),
            tv_theta=spread("tv_theta") if has_theta else None,
            kl_theta_bits=spread("kl_theta_bits") if has_theta else None)

    def to_dict(self) -> dict[str, Any]:
        out = {"mean_kl_bits": self.mean_kl_bits, "mean_tv": self.mean_tv,
               "mean_entropy_gap_bits": self.mean_entropy_gap_bits, "entropy_mae_bits": self.entropy_mae_bits,
               "mean_mass": self.mean_mass}
        if self.tv_theta is not None:
            out["tv_theta"] = self.tv_theta
            out["kl_theta_bits"] = self.kl_theta_bits
        return out


@dataclass(frozen=True)
class PosteriorResult:
    """fit-posterior on one trace. ``conclusion``: the verdict, its one-sentence reason and warnings;
    ``test``: the updating prior (``test.exact``: gamma = 1, ``test.free``: the forgetting filter) and
    the bootstrap interval of gamma; ``reference``: the ``--prior`` other than ``fit`` (None: the fitted
    updating prior is the per-mark Bayes column); ``table``: one row per mark and category (``-o``);
    ``by_n``: the per-n table the CLI shows and ``--format tsv`` writes; ``scorecard``: the field's other
    tests, read after the verdict."""

    label: str
    categories: list[str]
    options: PosteriorOptions
    conclusion: Verdict
    test: UpdatingPriorTest
    scores: Scores
    reference: ReferencePrior | None
    counts: MarkCounts
    distances: Distances
    peers: PeerStatistics | None
    table: pd.DataFrame
    by_n: pd.DataFrame
    scorecard: Scorecard | None  # None: left out on request (fit_posterior(scorecard=False), a sweep)

    @property
    def verdict(self) -> str:
        return self.conclusion.verdict

    @property
    def prior_description(self) -> dict[str, Any]:
        """The per-mark Bayes column's prior, as the summary's ``prior`` states it."""
        if self.reference is not None:
            return self.reference.describe()
        exact = self.test.exact
        description: dict[str, Any] = {"kind": "fit", "weights": exact.weights.tolist(),
                                       "alphas": exact.alphas.tolist()}
        if exact.n_components == 1:
            description["alpha"] = exact.alphas[0].tolist()
        return description

    @cached_property
    def summary(self) -> dict[str, Any]:
        """The JSON document of ``--json`` (one per trace)."""
        test = self.test
        return {
            "trace": self.label,
            "categories": self.categories,
            "verdict": self.conclusion.verdict,
            "verdict_sentence": self.conclusion.sentence,
            "verdict_warnings": self.conclusion.warnings,
            "thresholds": {"fit_kl_bits": FIT_KL_BITS, "no_update_bits": NO_UPDATE_BITS,
                           "forgetting_bits": FORGETTING_BITS,
                           "gamma_unidentified_width": GAMMA_UNIDENTIFIED_WIDTH, "min_mass": self.options.min_mass},
            "n_marks": self.counts.marks,
            "n_marks_used": self.counts.used,
            "n_marks_low_mass": self.counts.low_mass,
            "n_marks_inexact": self.counts.inexact,
            "n_sequences": self.counts.sequences,
            "prior": self.prior_description,
            "updating_prior": test.to_dict(),
            "exact_bayes": fit_summary(test.exact),
            "forgetting": fit_summary(test.free),
            "gamma_ci": list(test.gamma_ci),
            "gamma_ci_level": test.level,
            "exact_bayes_rejected": test.rejected,
            "gamma_identifiable": bool(not (test.exact.n_components == 1 and test.exact.at_bound)),
            "n_bootstrap": self.options.bootstrap,
            "scores": self.scores.to_dict(),
            **self.distances.to_dict(),
            **(self.peers.to_dict() if self.peers is not None else {}),
            # after the verdict, always: it is not the conclusion
            **({"scorecard": self.scorecard.to_dict()} if self.scorecard is not None else {}),
        }

    def __repr__(self) -> str:
        """The conclusion first (as every surface shows it), then where the numbers are."""
        return (f"<fit-posterior of {self.label}: {verdict_line(self.summary)}\n {gamma_test_line(self.summary)}\n"
                f" .summary (the --json dict), .table ({len(self.table)} rows, one per mark and category),"
                f" .by_n (per n), .scorecard (the field's other tests)>")


def fit_summary(fit: UpdatingPrior) -> dict[str, Any]:
    """A fitted filter as the summary's ``exact_bayes`` / ``forgetting`` state it (mixture means and
    strengths averaged over the components)."""
    return {"prior_mean": fit.prior_mean.tolist(), "alpha0": fit.alpha0,
            "weights": fit.weights.tolist(), "alphas": fit.alphas.tolist(), "gamma": fit.gamma,
            "mean_kl_bits_model_to_filter": fit.mean_kl_bits, "converged": fit.converged, "at_bound": fit.at_bound}


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
    verdict = summary.get("verdict")
    if verdict == "consistent" and rejected:  # detectable, but forgetting buys too little to matter
        note = "; a deviation too small to matter (forgetting barely improves the fit), so the verdict above stands"
    elif verdict in ("consistent", "rejected"):
        note = ""
    else:
        note = "; the verdict above, not this test, is the conclusion"
    return f"γ = 1 test: {outcome}{numbers}{note}"
