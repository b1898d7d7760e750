"""The scorecard: the field's other tests of Bayesian in-context learning, beside llmprobe's verdict.

The verdict (:mod:`llmprobe.bayes.verdict`) is the conclusion and leads every surface; the scorecard comes
after it, so that a reader can compare the verdict with the tests other papers use. Each entry is one
number with its direction and the planted-model reference (docs/statistics.md, section 6g, from
``benchmarks/scorecard_table.py``), or says why it could not be computed:

* **exchangeability** (Falck et al. 2024; Chlon et al. 2025): the spread of the final prediction across
  shuffled orders of the same examples (:mod:`llmprobe.bayes.exchangeability`), from the trace's shuffled
  orders (``experiment --permutations K``);
* **excess code length** (prequential; :mod:`llmprobe.bayes.codelength`): the model's cumulative log-loss on
  the actual outcomes minus the exact-Bayes predictor's under the fit's Bayes column (the fitted updating
  prior at γ = 1, or ``--prior``), and its growth per example;
* **Bayesian scaling law** (Arora et al. 2024; :mod:`llmprobe.analysis.scaling`): the law against the power,
  bounded power and logistic laws on the ICL curve, fitted on its first half and scored on the rest;
* **martingale** (Falck et al. 2024): the statistic and p-value per n of ``llmprobe martingale --json``,
  when its output is given (:func:`read_martingale`); an n whose states put less than ``min_mass`` on the
  categories is shown but not counted, as every fit leaves such marks out.

Every entry is computed on the original orders' used marks except exchangeability, which is the one test
the shuffled orders are for. :class:`Scorecard` is the typed result; ``to_dict`` is the ``scorecard`` key of
fit-posterior's JSON summary (and so of the fit table's metadata, which the report reads).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np

from llmprobe.analysis.fit_options import DEFAULT_FIT_FRACTION, DEFAULT_TASKS
from llmprobe.analysis.marks import CategoryMarks, next_outcomes
from llmprobe.analysis.martingale import MartingaleResult
from llmprobe.analysis.scaling import compare_laws, icl_curve
from llmprobe.bayes.codelength import ExcessCodeLength, excess_code_length
from llmprobe.bayes.exchangeability import OrderDependence, order_dependence
from llmprobe.bayes.scaling import LAW_NAMES, ScalingComparison
from llmprobe.errors import ParameterError

MARTINGALE_ALPHA = 0.05
"""The level at which the scorecard counts the martingale test's rejections (the file's own ``rejected``
was decided at whatever ``--alpha`` the run had, which the file does not record)."""

TESTS = {
    "exchangeability": "exchangeability: order dependence of the final prediction (Falck et al. 2024; Chlon et al."
                       " 2025)",
    "excess_code_length": "excess code length over exact Bayes (prequential)",
    "scaling_law": "Bayesian scaling law of ICL vs power, bounded power and logistic laws (Arora et al. 2024)",
    "martingale": "martingale test (Falck et al. 2024)",
}

DIRECTIONS = {
    "exchangeability": "0 for exact Bayes (every order predicts the same); larger = more order-dependent",
    "excess_code_length": "0 for exact Bayes under this prior; > 0 = more bits than Bayes, growing linearly when the"
                          " model forgets; < 0 = codes the outcomes better than this prior (e.g. knows θ)",
    "scaling_law": "held-out RMSE of the law / best baseline: < 1 = the Bayesian law extrapolates the ICL curve"
                   " better; K = evidence per example (1: Bayes under the law's task prior)",
    "martingale": "0 TV and uniform p-values for a martingale (exact Bayes); larger TV, small p = the predictive"
                  " drifts along the model's own samples",
}

# docs/statistics.md section 6g (benchmarks/scorecard_table.py); checked by tests/analysis/test_scorecard.py
REFERENCES = {
    "exchangeability": "exact Bayes: 0; recency 0.8: 0.150 bits",
    "excess_code_length": "exact Bayes: 0; forgetting γ = 0.5 (against its own prior): +0.124 bits per example",
    "scaling_law": "curves made by the law: < 0.001 (K within 10 %); exact Bayes, coin sweep: 4.8",
    "martingale": "exact Bayes: p uniform (1 of 5 n below 0.05), max TV 0.011; recency 0.8: 5 of 5 n, max TV 0.129",
}


@dataclass(frozen=True)
class Entry:
    """One test on the scorecard: its headline ``value`` (None: not computed, and ``reason`` says why), how it
    is shown, its direction and planted-model reference, and every number behind it (``details``)."""

    key: str
    value: float | None
    display: str
    reason: str | None
    details: dict[str, Any] | None

    @property
    def test(self) -> str:
        return TESTS[self.key]

    @property
    def direction(self) -> str:
        return DIRECTIONS[self.key]

    @property
    def reference(self) -> str:
        return REFERENCES[self.key]

    def to_dict(self) -> dict[str, Any]:
        return {"test": self.test, "computed": self.reason is None, "value": self.value, "display": self.display,
                "direction": self.direction, "reference": self.reference, "reason": self.reason,
                "details": self.details}


@dataclass(frozen=True)
class Scorecard:
    """The field's other tests on one trace (module docstring); a test that could not run is None with its
    reason in ``reasons``. ``bayes``: which exact-Bayes predictor the excess code length is measured against."""

    exchangeability: OrderDependence | None
    code_length: ExcessCodeLength | None
    scaling: ScalingComparison | None
    martingale: tuple[MartingaleResult, ...] | None
    reasons: dict[str, str]
    bayes: str
    min_mass: float  # martingale rows whose states put less on the categories are shown, not counted

    def entries(self) -> list[Entry]:
        return [self._exchangeability(), self._code_length(), self._scaling(), self._martingale()]

    def to_dict(self) -> dict[str, Any]:
        return {entry.key: entry.to_dict() for entry in self.entries()}

    def _missing(self, key: str) -> Entry:
        return Entry(key, None, f"not computed: {self.reasons[key]}", self.reasons[key], None)

    def _exchangeability(self) -> Entry:
        o = self.exchangeability
        if o is None:
            return self._missing("exchangeability")
        return Entry("exchangeability", o.spread_kl_bits,
                     f"{o.spread_kl_bits:.4f} bits (TV {o.spread_tv:.3f}) over {o.n_sequences} sequences,"
                     f" {o.n_orders / o.n_sequences:.1f} orders each; KL(Bayes‖model) {o.kl_bayes_per_order_bits:.4f}"
                     f" bits per order, {o.kl_bayes_of_average_bits:.4f} averaged over orders", None, o.to_dict())

    def _code_length(self) -> Entry:
        c = self.code_length
        if c is None:
            return self._missing("excess_code_length")
        growth = "n/a" if c.slope_bits_per_example is None else f"{c.slope_bits_per_example:+.4f}"
        return Entry("excess_code_length", c.slope_bits_per_example,
                     f"{growth} bits per example (growth in n); {c.mean_bits_per_sequence:+.3f} bits per sequence"
                     f" ({c.bits_per_prediction:+.4f} per prediction) over {c.n_sequences} sequences, against"
                     f" {self.bayes}", None, {"bayes": self.bayes, **c.to_dict()})

    def _scaling(self) -> Entry:
        s = self.scaling
        if s is None:
            return self._missing("scaling_law")
        best = s.best_baseline
        ratio = s.error_ratio
        shown = "n/a" if ratio is None else f"{ratio:.2f}"
        return Entry("scaling_law", None if ratio is None or not math.isfinite(ratio) else ratio,
                     f"{shown}: held-out RMSE {s.law.rmse_held_out:.4f} (law, K = {s.efficiency:.3g}) vs"
                     f" {best.rmse_held_out:.4f} ({LAW_NAMES[best.law]}), fitted on n ≤"
                     f" {int(s.n[s.fitted].max())} of {int(s.n.max())}", None, s.to_dict())

    def _martingale(self) -> Entry:
        results = self.martingale
        if results is None:
            return self._missing("martingale")
        counted = [r for r in results if r.mean_category_mass is None or r.mean_category_mass >= self.min_mass]
        left_out = [r for r in results if r not in counted]
        details = {"alpha": MARTINGALE_ALPHA, "min_mass": self.min_mass,
                   "by_n": [{"n": r.n, "horizon": r.horizon, "states": r.states, "paths": r.paths,
                             "statistic": r.statistic, "p_value": r.p_value, "mean_tv_deviation": r.mean_tv_deviation,
                             "mean_category_mass": r.mean_category_mass, "counted": r in counted} for r in results]}
        if not counted:
            reason = f"at every n the model puts less than {self.min_mass:g} on the categories (--min-mass)"
            return Entry("martingale", None, f"not computed: {reason}", reason, details)
        rejected = sum(r.p_value < MARTINGALE_ALPHA for r in counted)
        largest = max(r.mean_tv_deviation for r in counted)
        skipped = "" if not left_out else (
            f"; n = {', '.join(str(r.n) for r in left_out)} left out (mass on the categories below"
            f" {self.min_mass:g})")
        return Entry("martingale", largest,
                     f"mean TV |E p_n+m − p_n| up to {largest:.3f}; rejected at {MARTINGALE_ALPHA:g} at {rejected} of"
                     f" {len(counted)} n (min p {min(r.p_value for r in counted):.3g}){skipped}", None,
                     {**details, "rejected": rejected})


def build_scorecard(everything: CategoryMarks, originals: CategoryMarks, bayes: np.ndarray, used: np.ndarray,
                    outcomes: list[np.ndarray], sequence: np.ndarray, position: np.ndarray, *, min_mass: float,
                    bayes_name: str, martingale: Sequence[MartingaleResult] | None = None) -> Scorecard:
    """The scorecard of a fit: ``originals`` and its arrays (``bayes``: the fit's per-mark Bayes column, ``used``:
    the marks every fit used, ``outcomes``/``sequence``/``position`` as :func:`sequence_inputs` gives them) and
    ``everything``, the same trace with its shuffled orders."""
    reasons: dict[str, str] = {}
    exchangeability = _order_dependence(everything, originals, bayes, min_mass, reasons)
    following = next_outcomes(outcomes, sequence, position)
    rows = used & (following >= 0)
    code_length = excess_code_length(originals.probs[rows, following[rows]], bayes[rows, following[rows]],
                                     sequence[rows], position[rows])
    if code_length is None:
        reasons["excess_code_length"] = "no used mark has a next outcome"
    scaling = None
    try:
        scaling = compare_laws(icl_curve(originals, used, following), DEFAULT_TASKS, DEFAULT_FIT_FRACTION)
    except ValueError as exc:
        reasons["scaling_law"] = f"the ICL curve is too short: {exc}"
    if martingale is None:
        reasons["martingale"] = ("no martingale results given: run `llmprobe martingale CONFIG --json > FILE` on the"
                                 " same model and pass --martingale FILE")
    return Scorecard(exchangeability, code_length, scaling, None if martingale is None else tuple(martingale),
                     reasons, bayes_name, min_mass)


def _order_dependence(everything: CategoryMarks, originals: CategoryMarks, bayes: np.ndarray, min_mass: float,
                      reasons: dict[str, str]) -> OrderDependence | None:
    """Each order's final prediction (its last mark, if used), grouped by the original it reorders, against the
    Bayes column at the original's last mark."""
    if not everything.has_permutations:
        reasons["exchangeability"] = ("the trace has no shuffled orders: generate the prompts with `llmprobe"
                                      " experiment --permutations K` and trace them")
        return None
    marks = everything.marks
    final = marks.assign(_row=np.arange(len(marks))).sort_values("n").groupby("prompt_id")["_row"].last().to_numpy()
    final = final[everything.mass[final] >= min_mass]
    original_final = originals.marks.assign(_row=np.arange(len(originals))).sort_values("n").groupby(
        "prompt_id")["_row"].last()
    group = marks["order_of"].to_numpy()[final]
    known = np.isin(group, original_final.index.to_numpy())
    final, group = final[known], group[known]
    result = order_dependence(everything.probs[final], group, bayes[original_final.loc[group].to_numpy()])
    if result is None:
        reasons["exchangeability"] = (f"no sequence has two orders whose final mark has mass >= {min_mass:g} on the"
                                      " categories")
    return result


MARTINGALE_FIELDS = {"n": int, "horizon": int, "states": int, "paths": int, "statistic": float, "p_value": float,
                     "mean_tv_deviation": float}


def read_martingale(path: str | Path) -> tuple[MartingaleResult, ...]:
    """The results of ``llmprobe martingale --json`` (one JSON object per line and per n), checked; anything
    else is a :class:`ParameterError` naming ``martingale``, the file and the line."""
    where = str(path)

    def refuse(message: str) -> ParameterError:
        return ParameterError("martingale", f"{where}: {message}")

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise refuse(f"cannot read the martingale results: {getattr(exc, 'strerror', None) or exc}") from None
    results: list[MartingaleResult] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise refuse(f"line {number}: not JSON; expected the output of `llmprobe martingale --json` (one JSON"
                         " object per line)") from None
        if not isinstance(record, dict):
            raise refuse(f"line {number}: not a martingale result (a JSON object per n, as `llmprobe martingale"
                         " --json` writes)")
        results.append(_martingale_result(record, lambda message: refuse(f"line {number}: {message}")))
    if not results:
        raise refuse("no martingale results in the file")
    ns = [r.n for r in results]
    if len(set(ns)) != len(ns):
        raise refuse(f"n = {next(n for n in ns if ns.count(n) > 1)} appears twice; give one martingale run per file")
    return tuple(results)


def _martingale_result(record: dict[str, Any], refuse) -> MartingaleResult:
    values: dict[str, Any] = {}
    for name, kind in MARTINGALE_FIELDS.items():
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                kind is int and value != int(value)):
            raise refuse(f"{name!r} must be a {'whole number' if kind is int else 'finite number'}, got {value!r}")
        values[name] = kind(value)
    if values["n"] < 0 or values["horizon"] < 1 or values["states"] < 1 or values["paths"] < 2:
        raise refuse("n must be >= 0, horizon and states >= 1, paths >= 2")
    if not 0 < values["p_value"] <= 1 or values["statistic"] < 0 or not 0 <= values["mean_tv_deviation"] <= 1:
        raise refuse("p_value must be in (0, 1], statistic >= 0 and mean_tv_deviation in [0, 1]")
    mass = record.get("mean_category_mass")
    if mass is not None and (isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0 <= mass <= 1):
        raise refuse(f"'mean_category_mass' must be null or in [0, 1], got {mass!r}")
    return MartingaleResult(**values, mean_category_mass=None if mass is None else float(mass))
