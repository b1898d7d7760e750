"""``plot-compare`` and the report's comparison section, on a comparison table with known content.

The table (tests/plots/fixtures.py): L2-H16 turns consistent at step 10 and stays, L1-H8 never does, SmolLM2 has
no step. The figure must say so (title, dotted turn line), draw a line per size over steps and a level for the
model without one, put the sizes on a log parameter axis, and the report must carry the same facts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llmprobe.analysis.comparison import read_comparison, turning_points
from llmprobe.plots.emergence import MEASURES, plot_emergence
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.plots.fixtures import (
    PNG_SIGNATURE,
    THETAS,
    coin_trace,
    comparison_table,
    synthetic_fit,
    write_fit,
)


@pytest.fixture
def table(tmp_path):
    return comparison_table(tmp_path / "compare.parquet")


def test_turning_points_are_where_the_verdict_turns_consistent_for_good(table):
    turns = {t.group: t for t in turning_points(read_comparison(str(table)).frame)}
    assert (turns["L2-H16"].step, turns["L2-H16"].parameters) == (10, 5000)
    assert (turns["L1-H8"].step, turns["L1-H8"].last_verdict, turns["L1-H8"].last_step) == (None, "poor-fit", 20)
    assert turns["SmolLM2-135M-Instruct"].step is None
    frame = pd.DataFrame({"name": list("abcd"), "series": ["s"] * 4, "step": [0, 1, 2, 3], "parameters": [1] * 4,
                          "verdict": ["consistent", "poor-fit", "consistent", "consistent"]})
    assert turning_points(frame)[0].step == 2  # the last run of consistent checkpoints, not the first consistent one


def test_the_figure_draws_steps_sizes_and_the_turn(table):
    fig = plot_emergence(read_comparison(str(table)))
    axes = np.array(fig.axes[:2 * len(MEASURES)]).reshape(len(MEASURES), 2)
    assert "L2-H16: consistent from step 10" in fig._suptitle.get_text()
    assert "L1-H8: not consistent by step 20 (poor-fit)" in fig._suptitle.get_text()
    by_step, by_size = axes[0]
    lines = [line for line in by_step.get_lines()]
    series = [line for line in lines if len(line.get_xdata()) == 3]
    assert [list(line.get_xdata()) for line in series] == [[0, 10, 20], [0, 10, 20]]
    assert [list(line.get_ydata()) for line in series] == [[0.3, 0.1, 0.08], [0.3, 0.01, 0.001]]
    levels = [line for line in lines if line.get_linestyle() == "--"]
    assert [line.get_ydata()[0] for line in levels] == [0.7]  # SmolLM2, no step: a level
    turns = [line for line in lines if line.get_linestyle() == ":"]
    assert [line.get_xdata()[0] for line in turns] == [10]
    assert by_step.get_yscale() == "log" and by_size.get_xscale() == "log"
    joined, = by_size.get_lines()  # the sizes' last checkpoints, in order of size
    assert list(joined.get_xdata()) == [1000, 5000] and list(joined.get_ydata()) == [0.08, 0.001]


def test_plot_compare_writes_the_figure_and_refuses_other_tables(table, tiny_loaded, tmp_path, capsys, monkeypatch):
    out = tmp_path / "emergence.png"
    code, _, err = run_cli(["plot-compare", str(table), "-o", str(out)], capsys, monkeypatch)
    assert code == 0, err
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    code, _, err = run_cli(["plot-compare", str(table), "-o", str(out)], capsys, monkeypatch)
    assert_one_line_error(code, err, str(out), "already exists")
    trace = coin_trace(tiny_loaded, tmp_path)
    code, _, err = run_cli(["plot-compare", str(trace), "-o", str(tmp_path / "x.png")], capsys, monkeypatch)
    assert_one_line_error(code, err, str(trace), "not a comparison table")
    assert not (tmp_path / "x.png").exists()


def test_the_report_carries_the_comparison(table, tiny_loaded, tmp_path, capsys, monkeypatch):
    trace = coin_trace(tiny_loaded, tmp_path)
    fit = write_fit(synthetic_fit(THETAS), tmp_path / "fit.parquet")
    page = tmp_path / "r.html"
    code, _, err = run_cli(["report", str(trace), str(table), str(fit), "-o", str(page)], capsys, monkeypatch)
    assert code == 0, err
    html = page.read_text()
    assert "Over training and size: when the model becomes Bayesian" in html
    assert "<b>L2-H16</b> (5,000 parameters): consistent from step 10" in html
    assert "<b>L1-H8</b> (1,000 parameters): poor-fit at its last checkpoint (step 20)" in html
    assert html.count('alt="emergence figure"') == 1 and "In-context learning against" in html  # and the fit
    code, _, err = run_cli(["report", str(trace), str(table), str(table), "-o", str(tmp_path / "r2.html")], capsys,
                           monkeypatch)
    assert_one_line_error(code, err, "two comparison tables")
