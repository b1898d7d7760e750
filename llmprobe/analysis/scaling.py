"""``fit-scaling``: the model's in-context learning curve against the Bayesian scaling law and its rivals.

**The curve.** y(n) is the mean over sequences of the model's expected probability of the right outcome
after n examples: at the mark after n examples, sum_k θ_k p_model(k | x_1..x_n) with θ the true
distribution the next outcome is drawn from (renormalized over the categories, as every fit reads it).
This is the probability of "the right answer" in the only sense a draw from θ has one, the outcome the
experiment draws next, averaged over that draw: its expectation equals that of the model's probability of
the outcome that actually came next (Arora et al. fit the NLL of the next example; exp(-NLL) here), without
the noise of the one draw that came (a Rao-Blackwellization), and it is defined for every θ (a majority
category is not: θ = (0.5, 0.5) has none) and at the last mark too. Its limit under exact Bayes is
sum_k θ_k², the probability of guessing a draw when θ is known. A trace without θ falls back to the
probability of the outcome that came next.

Marks whose mass on the categories is below ``min_mass`` are left out (as in every fit), and so are the
shuffled orders of a trace (``experiment --permutations``): the curve is over the original orders.

**The fit** (:mod:`llmprobe.bayes.scaling`): the Bayesian law with ``tasks`` latent tasks and the power,
bounded power and logistic laws, each fitted by least squares on y over the first ``fit_fraction`` of the
distinct n (ascending) and scored by RMSE on the rest.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from llmprobe.analysis.fit_options import DEFAULT_FIT_FRACTION, DEFAULT_MIN_MASS, DEFAULT_TASKS, ScalingOptions
from llmprobe.analysis.fit_tables import write_table_file
from llmprobe.analysis.marks import CategoryMarks, next_outcomes, sequence_inputs
from llmprobe.bayes.scaling import LAWS, ScalingComparison, fit_scaling_laws
from llmprobe.errors import UsageError

SCALING_META_KEY = b"llmprobe.scaling"

CURVES = ("mean over sequences of the model's expected probability of the next outcome, sum_k θ_k p_model(k)",
          "mean over sequences of the model's probability of the outcome that came next (the trace has no θ)")

SCALING_INPUT = "a trace of experiment prompts (marks with running counts and outcome sequences) with target scores"


def icl_curve(cm: CategoryMarks, used: np.ndarray, next_outcome: np.ndarray) -> pd.DataFrame:
    """y(n): per n, the mean (and std) over the used marks' sequences of the model's expected probability of
    the next outcome under θ (without θ: of the outcome that came next, where one did)."""
    if cm.theta is not None:
        rows = used
        chosen = (cm.theta[rows] * cm.probs[rows]).sum(axis=1)
    else:
        rows = used & (next_outcome >= 0)
        chosen = cm.probs[rows, next_outcome[rows]]
    frame = pd.DataFrame({"n": cm.marks["n"].to_numpy(dtype=np.int64)[rows], "p": chosen})
    grouped = frame.groupby("n", sort=True)["p"]
    return pd.DataFrame({"p_next": grouped.mean(), "p_next_std": grouped.std(ddof=0),
                         "sequences": grouped.size()}).reset_index()


def split_point(n_values: np.ndarray, fit_fraction: float) -> np.ndarray:
    """Which of the (ascending, distinct) n are fitted: the first ceil(fraction x count), at least one held out."""
    fitted = min(math.ceil(n_values.size * fit_fraction), n_values.size - 1)
    return np.arange(n_values.size) < fitted


def compare_laws(curve: pd.DataFrame, tasks: int, fit_fraction: float) -> ScalingComparison:
    """The laws fitted to ``curve`` (:func:`icl_curve`); ValueError naming what is missing when it is too short."""
    n = curve["n"].to_numpy(dtype=float)
    return fit_scaling_laws(n, curve["p_next"].to_numpy(), split_point(n, fit_fraction), tasks)


@dataclass(frozen=True)
class ScalingResult:
    """fit-scaling on one trace: the curve, the laws fitted to it and their held-out errors."""

    label: str
    options: ScalingOptions
    curve: pd.DataFrame
    comparison: ScalingComparison
    measure: str  # what y(n) is (:data:`CURVES`)

    def predictions(self) -> pd.DataFrame:
        """Per n: the curve, whether it was fitted or held out, and every law's prediction (``-o``)."""
        frame = self.curve.assign(trace=self.label, fitted=self.comparison.fitted)
        for name in LAWS:
            frame[name] = self.comparison.fits[name].predictions
        return frame[["trace", "n", "sequences", "fitted", "p_next", "p_next_std", *LAWS]]

    def to_dict(self) -> dict[str, Any]:
        return {"trace": self.label, "curve": self.measure, "fit_fraction": self.options.fit_fraction,
                "min_mass": self.options.min_mass, **self.comparison.to_dict()}


def fit_scaling(cm: CategoryMarks, tasks: int = DEFAULT_TASKS, fit_fraction: float = DEFAULT_FIT_FRACTION,
                min_mass: float = DEFAULT_MIN_MASS) -> ScalingResult:
    """The ICL curve of a trace's original orders and every law fitted to its first ``fit_fraction``."""
    options = ScalingOptions(tasks, fit_fraction, min_mass)
    originals = cm.originals()
    outcomes, sequence, position = sequence_inputs(originals, f"fit-scaling needs {SCALING_INPUT}")
    curve = icl_curve(originals, originals.mass >= min_mass, next_outcomes(outcomes, sequence, position))
    try:
        comparison = compare_laws(curve, tasks, fit_fraction)
    except ValueError as exc:
        raise UsageError(f"the ICL curve has {len(curve)} numbers of examples with a next outcome and used marks;"
                         f" {exc}", where=cm.label) from None
    return ScalingResult(cm.label, options, curve, comparison, CURVES[originals.theta is None])


def write_predictions(result: ScalingResult, output: str, force: bool) -> None:
    """The per-n predictions as CSV (``.csv``) or Parquet (the result's JSON in its metadata), atomically."""
    write_table_file(result.predictions(), output, force, {SCALING_META_KEY: json.dumps(result.to_dict()).encode()})
