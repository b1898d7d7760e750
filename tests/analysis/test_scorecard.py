"""The scorecard (issue 25) on planted models whose answers are known, traced with shuffled orders:

* exact Bayes: no order dependence, no excess code length, the martingale test not rejected;
* a recency model (repeats the last outcome w.p. 0.8): order-dependent, pays bits per example, drifts;
* planted forgetting (γ = 0.5): its excess code length over exact Bayes under its own prior grows linearly;
* a model that knows θ: codes the outcomes better than any prior (negative excess);

and the shuffled orders leave every fit, score and the verdict as they are without them. The planted
references the scorecard prints (``REFERENCES``) are checked against these same models.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmprobe.analysis.fits import fit_posterior, posterior_marks
from llmprobe.analysis.scorecard import MARTINGALE_ALPHA, REFERENCES, read_martingale
from llmprobe.errors import ParameterError, UsageError
from llmprobe.tracing.reader import open_trace
from tests.analysis.fixtures import (SCORECARD_PLANTED, bayesian, planted_martingale, records, write_martingale,
                                     write_trace)

MARTINGALE_NS = [1, 2, 4, 8, 16]  # as benchmarks/scorecard_table.py runs them
BY_NAME = {planted.name: planted for planted in SCORECARD_PLANTED}
TESTED = ("exact Bayes", "recency 0.8", "forgetting γ = 0.5", "knows θ")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Per planted model: its fit (with the martingale results of the same model), trace and martingale file."""
    root = tmp_path_factory.mktemp("scorecard")
    made = {}
    for index, name in enumerate(TESTED):
        model = BY_NAME[name]
        prompts = model.prompts()
        trace = write_trace(root / f"{index}.parquet", prompts, model.make())
        martingale = write_martingale(root / f"{index}.martingale.jsonl",
                                      planted_martingale(model.make(), prompts, MARTINGALE_NS))
        fit = fit_posterior(posterior_marks(open_trace(trace)), model.prior, 10, 0, martingale=martingale)
        made[name] = (fit, trace, martingale)
    return made


def reference_number(key: str, name: str, after: str = ":") -> float:
    """The number REFERENCES gives a planted model: the first after ``after`` once ``name`` is named."""
    text = REFERENCES[key]
    rest = text[text.index(name) + len(name):]
    return float(rest[rest.index(after) + len(after):].split()[0].rstrip(",;"))


def test_exact_bayes_scores_zero_on_every_test(planted):
    card = planted["exact Bayes"][0].scorecard
    order = card.exchangeability
    assert order.n_sequences == 22 and order.n_orders == 22 * (BY_NAME["exact Bayes"].shuffled + 1)
    assert order.spread_kl_bits < 1e-9 and order.spread_tv < 1e-6 and abs(order.averaging_gain_bits) < 1e-9
    assert abs(card.code_length.mean_bits_per_sequence) < 1e-4 and abs(card.code_length.slope_bits_per_example) < 1e-5
    assert sum(r.p_value < MARTINGALE_ALPHA for r in card.martingale) <= 1  # ~ uniform p-values: 1 in 20 below 0.05
    assert max(r.mean_tv_deviation for r in card.martingale) == pytest.approx(
        reference_number("martingale", "exact Bayes", "TV"), rel=0.1)


def test_a_recency_model_depends_on_the_order_and_averaging_helps(planted):
    card = planted["recency 0.8"][0].scorecard
    order = card.exchangeability
    assert order.spread_kl_bits == pytest.approx(reference_number("exchangeability", "recency 0.8"), rel=0.1)
    assert order.spread_tv > 0.05 and order.max_pairwise_tv > order.spread_tv
    # Chlon et al.: Bayesian "in expectation": the orders' average is closer to Bayes than the orders are
    assert order.kl_bayes_of_average_bits < order.kl_bayes_per_order_bits - 0.05
    assert card.code_length.slope_bits_per_example > 0.1
    assert all(r.p_value < MARTINGALE_ALPHA for r in card.martingale)  # it drifts at every n >= 1
    assert max(r.mean_tv_deviation for r in card.martingale) == pytest.approx(
        reference_number("martingale", "recency 0.8", "TV"), rel=0.1)


def test_planted_forgetting_pays_a_toll_per_example_that_never_shrinks(planted):
    """Against exact Bayes under its own prior, a γ = 0.5 filter's excess grows linearly: as fast over the last
    half of the sequence as over the whole."""
    fit = planted["forgetting γ = 0.5"][0]
    code = fit.scorecard.code_length
    assert "--prior dirichlet:1.5,1.5" in fit.scorecard.bayes
    slope = code.slope_bits_per_example
    assert slope == pytest.approx(reference_number("excess_code_length", "(against its own prior)"), rel=0.1)
    late = code.by_n[code.by_n[:, 0] > code.by_n[:, 0].max() / 2]
    assert np.polyfit(late[:, 0], late[:, 1], 1)[0] > 0.8 * slope
    assert np.all(np.diff(code.by_n[2:, 1]) > -0.1)  # no plateau: it keeps growing
    assert code.mean_bits_per_sequence > 2.0


def test_a_model_that_knows_theta_codes_better_than_any_prior(planted):
    card = planted["knows θ"][0].scorecard
    assert card.code_length.slope_bits_per_example < 0 and card.code_length.mean_bits_per_sequence < 0
    assert card.exchangeability.spread_kl_bits < 1e-12  # it ignores the examples, so every order agrees


def test_the_scaling_entry_is_fitted_on_the_first_half(planted):
    scaling = planted["exact Bayes"][0].scorecard.scaling
    assert scaling.n.max() == 20 and scaling.n[scaling.fitted].max() == 10
    # the Dirichlet learner's curve approaches its limit like 1/n; two latent tasks converge exponentially
    assert scaling.error_ratio == pytest.approx(reference_number("scaling_law", "exact Bayes, coin sweep"), rel=0.1)
    entry = planted["exact Bayes"][0].summary["scorecard"]["scaling_law"]
    assert entry["computed"] and entry["value"] == pytest.approx(scaling.error_ratio)
    assert set(entry["details"]["laws"]) == {"bayesian", "power", "bounded_power", "logistic"}


def test_shuffled_orders_change_no_fit_and_no_verdict(planted, tmp_path):
    """Every fit reads the original orders: the trace without its shuffled orders gives the same summary."""
    fit, trace, martingale = planted["recency 0.8"]
    plain = write_trace(tmp_path / "plain.parquet", records("coin", 2, 20), BY_NAME["recency 0.8"].make())
    alone = fit_posterior(posterior_marks(open_trace(plain)), "fit", 10, 0, martingale=martingale)
    without = {k: v for k, v in fit.summary.items() if k != "scorecard"}
    assert without == {k: v for k, v in alone.summary.items() if k != "scorecard"}
    assert fit.counts.marks == 22 * 21 and len(fit.table) == 2 * 22 * 21
    assert alone.scorecard.exchangeability is None and "--permutations" in alone.scorecard.reasons["exchangeability"]
    for key in ("excess_code_length", "scaling_law", "martingale"):
        assert fit.summary["scorecard"][key] == alone.summary["scorecard"][key]


def test_what_cannot_be_computed_says_why(tmp_path):
    trace = write_trace(tmp_path / "short.parquet", records("coin", 1, 3), bayesian([1.0], [[2.0, 3.0]]))
    card = fit_posterior(posterior_marks(open_trace(trace)), "fit", 5, 0).summary["scorecard"]
    assert list(card) == ["exchangeability", "excess_code_length", "scaling_law", "martingale"]
    for key, needle in (("exchangeability", "--permutations"), ("scaling_law", "too short"),
                        ("martingale", "--martingale")):
        assert not card[key]["computed"] and card[key]["value"] is None and needle in card[key]["reason"]
        assert card[key]["display"].startswith("not computed: ")
    assert card["excess_code_length"]["computed"]


def test_a_shuffled_order_must_reorder_its_original(tmp_path):
    prompts = records("coin", 1, 6, permutations=1)
    twisted = next(r for r in prompts if r.get("permutation") and sum(r["outcomes"]) not in (0, 6))
    twisted["outcomes"] = [1 - x for x in twisted["outcomes"]]
    for mark in twisted["marks"]:
        mark["counts"] = mark["counts"][::-1]
    trace = write_trace(tmp_path / "t.parquet", prompts, bayesian([1.0], [[2.0, 3.0]]))
    with pytest.raises(UsageError, match=f"{twisted['id']}.*not a reordering"):
        posterior_marks(open_trace(trace))


@pytest.mark.parametrize(("text", "needle"), [
    ("", "no martingale results"),
    ("not json\n", "line 1: not JSON"),
    ('[{"n": 1}]\n', "line 1: not a martingale result"),
    ('{"n": 1, "horizon": 1, "states": 2, "paths": 4, "statistic": 0.1, "mean_tv_deviation": 0.1}\n',
     "line 1: 'p_value' must be a finite number"),
    ('{"n": 1.5, "horizon": 1, "states": 2, "paths": 4, "statistic": 0.1, "p_value": 0.5, "mean_tv_deviation": 0.1}',
     "'n' must be a whole number"),
    ('{"n": 1, "horizon": 1, "states": 2, "paths": 4, "statistic": 0.1, "p_value": 0, "mean_tv_deviation": 0.1}',
     "p_value must be in (0, 1]"),
    ('{"n": 1, "horizon": 1, "states": 2, "paths": 4, "statistic": 0.1, "p_value": 0.5, "mean_tv_deviation": 0.1}\n'
     '{"n": 1, "horizon": 1, "states": 2, "paths": 4, "statistic": 0.1, "p_value": 0.5, "mean_tv_deviation": 0.1}\n',
     "n = 1 appears twice"),
])
def test_martingale_files_are_checked(tmp_path, text, needle):
    path = tmp_path / "m.jsonl"
    path.write_text(text)
    with pytest.raises(ParameterError) as info:
        read_martingale(path)
    assert info.value.parameter == "martingale" and str(path) in str(info.value) and needle in str(info.value)


def test_martingale_results_round_trip(planted):
    _, _, martingale = planted["exact Bayes"]
    results = read_martingale(martingale)
    assert [r.n for r in results] == MARTINGALE_NS
    card = planted["exact Bayes"][0].summary["scorecard"]["martingale"]
    by_n = card["details"]["by_n"]
    written = [json.loads(line) for line in martingale.read_text().splitlines()]
    assert [row["p_value"] for row in by_n] == [row["p_value"] for row in written]
    assert [row["statistic"] for row in by_n] == [row["statistic"] for row in written]


def test_martingale_rows_with_too_little_mass_are_shown_not_counted(planted, tmp_path):
    """As every fit leaves out marks with less than --min-mass on the categories, the headline leaves out the n
    whose states put too little there (the default model's n = 1 for the coin: 0.005)."""
    _, trace, martingale = planted["recency 0.8"]
    rows = [json.loads(line) for line in martingale.read_text().splitlines()]
    rows[0]["mean_category_mass"] = 0.004
    rows[0]["mean_tv_deviation"] = 0.9
    low = tmp_path / "low.jsonl"
    low.write_text("".join(json.dumps(row) + "\n" for row in rows))
    entry = fit_posterior(posterior_marks(open_trace(trace)), "fit", 5, 0, martingale=low).summary["scorecard"][
        "martingale"]
    assert entry["value"] < 0.9 and "n = 1 left out" in entry["display"] and f"of {len(rows) - 1} n" in entry["display"]
    assert [row["counted"] for row in entry["details"]["by_n"]] == [False] + [True] * (len(rows) - 1)
    for row in rows:
        row["mean_category_mass"] = 0.001
    low.write_text("".join(json.dumps(row) + "\n" for row in rows))
    entry = fit_posterior(posterior_marks(open_trace(trace)), "fit", 5, 0, martingale=low).summary["scorecard"][
        "martingale"]
    assert not entry["computed"] and "--min-mass" in entry["reason"]
