"""The scorecard on the command line (issue 25): ``fit-posterior --martingale``, the scorecard in ``--json``, the
fit table's metadata and the Python API (the same numbers), ``fit-scaling``, and one line for every bad input."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

import llmprobe
from llmprobe.analysis.fit_tables import FIT_META_KEY
from llmprobe.analysis.scaling import SCALING_META_KEY
from tests.analysis.fixtures import (COIN, bayesian, planted_martingale, recency, records, write_martingale,
                                     write_trace)
from tests.cli_helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    """A recency model's trace with shuffled orders, and its martingale results."""
    root = tmp_path_factory.mktemp("scorecard-cli")
    prompts = records("coin", 2, 12, permutations=2)
    trace = write_trace(root / "recency.parquet", prompts, recency(0.8, COIN))
    martingale = write_martingale(root / "recency.jsonl", planted_martingale(recency(0.8, COIN), prompts, [1, 4]))
    return trace, martingale


def test_json_metadata_and_api_carry_the_same_scorecard(shuffled, tmp_path, capsys, monkeypatch):
    trace, martingale = shuffled
    fit = tmp_path / "fit.parquet"
    code, out, err = run_cli(["fit-posterior", str(trace), "--martingale", str(martingale), "--bootstrap", "5",
                              "--json", "-o", str(fit), "-q"], capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads(out)[0]
    keys = list(summary)
    assert keys.index("verdict") < keys.index("scorecard") and keys[-1] == "scorecard"  # after the verdict
    card = summary["scorecard"]
    assert all(card[key]["computed"] for key in card), card
    assert [row["n"] for row in card["martingale"]["details"]["by_n"]] == [1, 4]
    assert json.loads(pq.read_schema(fit).metadata[FIT_META_KEY])[0]["scorecard"] == card
    api = llmprobe.fit_posterior(trace, bootstrap=5, martingale=martingale)
    assert api.summary == summary
    assert api.scorecard.martingale[0].p_value == card["martingale"]["details"]["by_n"][0]["p_value"]


def test_the_terminal_shows_the_scorecard_after_the_verdict(shuffled, capsys, monkeypatch):
    trace, martingale = shuffled
    code, out, err = run_cli(["fit-posterior", str(trace), str(trace), "--martingale", str(martingale),
                              "--martingale", str(martingale), "--bootstrap", "5"], capsys, monkeypatch)
    assert code == 0, err
    first = out.index("scorecard — the field's other tests")
    assert out.index("every predictor scored the same way") < first
    assert out.count("scorecard — the field's other tests") == 2
    for needle in ("exchangeability", "excess code length", "Bayesian scaling law", "martingale test",
                   "planted reference", "recency 0.8: 0.150 bits"):
        assert needle in out[first:], needle
    side = out[out.index("side by side"):]
    assert side.index("verdict") < side.index("order spread, bits") < side.index("martingale max TV")


MARTINGALE_LINE = ('{"n": 1, "horizon": 1, "states": 3, "paths": 4, "statistic": 0.1, "p_value": 0.5,'
                   ' "mean_tv_deviation": 0.1}')


@pytest.mark.parametrize(("content", "needle"), [
    ("{oops\n", "line 1: not JSON"),
    ("[]\n", "not a martingale result"),
    (MARTINGALE_LINE.replace('"paths": 4', '"paths": 1') + "\n", "paths >= 2"),
    (MARTINGALE_LINE + "\n" + MARTINGALE_LINE.replace('"p_value": 0.5', '"p_value": 2') + "\n",
     "line 2: p_value must be in (0, 1]"),
    (None, "no such martingale file"),
])
def test_a_bad_martingale_file_is_one_line_and_writes_nothing(shuffled, tmp_path, capsys, monkeypatch, content, needle):
    trace, _ = shuffled
    bad = tmp_path / "bad.jsonl"
    if content is not None:
        bad.write_text(content)
    fit = tmp_path / "fit.parquet"
    code, out, err = run_cli(["fit-posterior", str(trace), "--martingale", str(bad), "--bootstrap", "2", "-o",
                              str(fit)], capsys, monkeypatch)
    assert_one_line_error(code, err, "--martingale", str(bad), needle)
    assert out == "" and not fit.exists()


def test_one_martingale_file_per_trace(shuffled, capsys, monkeypatch):
    trace, martingale = shuffled
    code, _, err = run_cli(["fit-posterior", str(trace), str(trace), "--martingale", str(martingale)], capsys,
                           monkeypatch)
    assert_one_line_error(code, err, "--martingale", "one martingale file per trace (2 traces, 1 files)")


def test_fit_scaling_prints_writes_and_matches_the_api(tmp_path, capsys, monkeypatch):
    trace = write_trace(tmp_path / "t.parquet", records("coin", 2, 20), bayesian([1.0], [[2.0, 3.0]]))
    code, out, err = run_cli(["fit-scaling", str(trace)], capsys, monkeypatch)
    assert code == 0, err
    for needle in ("Bayesian law (Arora et al.)", "power law", "bounded power law", "logistic", "RMSE held out",
                   "fitted on n ≤ 10"):
        assert needle in out, needle
    code, out, err = run_cli(["fit-scaling", str(trace), "--json", "--tasks", "3"], capsys, monkeypatch)
    assert code == 0, err
    document = json.loads(out)
    assert document["tasks"] == 3 and len(document["laws"]["bayesian"]["parameters"]["prior"]) == 3
    assert document == llmprobe.fit_scaling(trace, tasks=3).to_dict()
    for name in ("p.csv", "p.parquet"):
        output = tmp_path / name
        code, _, err = run_cli(["fit-scaling", str(trace), "-o", str(output), "-q"], capsys, monkeypatch)
        assert code == 0, err
        frame = pd.read_csv(output) if name.endswith(".csv") else pd.read_parquet(output)
        assert list(frame["n"]) == list(range(21)) and frame["fitted"].sum() == 11
        assert {"p_next", "bayesian", "power", "bounded_power", "logistic"} <= set(frame.columns)
    assert json.loads(pq.read_schema(tmp_path / "p.parquet").metadata[SCALING_META_KEY])["tasks"] == 2
    code, out, err = run_cli(["fit-scaling", str(trace), "--format", "tsv"], capsys, monkeypatch)
    assert code == 0 and out.splitlines()[0].split("\t")[:3] == ["trace", "n", "sequences"]


@pytest.mark.parametrize(("args", "needles"), [
    (["--tasks", "0"], ["--tasks", "1 or more"]),
    (["--fit-fraction", "1"], ["--fit-fraction", "between 0 and 1"]),
    (["--fit-fraction", "0"], ["--fit-fraction"]),
    (["--min-mass", "1"], ["--min-mass", "[0, 1)"]),
])
def test_fit_scaling_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, args, needles):
    trace = write_trace(tmp_path / "t.parquet", records("coin", 1, 12), bayesian([1.0], [[2.0, 3.0]]))
    output = tmp_path / "p.csv"
    code, out, err = run_cli(["fit-scaling", str(trace), *args, "-o", str(output)], capsys, monkeypatch)
    assert_one_line_error(code, err, *needles)
    assert out == "" and not output.exists()


def test_fit_scaling_refuses_a_curve_too_short_and_keeps_outputs(tmp_path, capsys, monkeypatch):
    trace = write_trace(tmp_path / "t.parquet", records("coin", 1, 4), bayesian([1.0], [[2.0, 3.0]]))
    code, _, err = run_cli(["fit-scaling", str(trace)], capsys, monkeypatch)
    assert_one_line_error(code, err, "synthetic", "too few points")
    taken = tmp_path / "taken.csv"
    taken.write_text("keep me")
    long = write_trace(tmp_path / "long.parquet", records("coin", 1, 20), bayesian([1.0], [[2.0, 3.0]]))
    code, _, err = run_cli(["fit-scaling", str(long), "-o", str(taken)], capsys, monkeypatch)
    assert_one_line_error(code, err, "already exists")
    assert taken.read_text() == "keep me"
