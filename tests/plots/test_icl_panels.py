"""The in-context figure as small multiples: one panel per θ, no redundant second category, a log axis
where probabilities under 1 % matter, and one KL direction named in the figure, the tables and the report."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from llmprobe.analysis.results import KL_BAYES_MODEL
from llmprobe.plots.icl import FitTable, MAX_PANELS, open_fit, plot_icl, summarize
from tests.analysis.fixtures import bayesian, records, write_trace
from tests.cli_helpers import run_cli
from tests.plots.fixtures import synthetic_fit, write_fit

ELEVEN = [[t, 1 - t] for t in np.linspace(0.05, 0.95, 11)]


def panels(fig) -> list:
    return [ax for ax in fig.axes if (ax.get_gid() or "").startswith("panel|")]


def figure(frame: pd.DataFrame, summaries=(), **options):
    return plot_icl(summarize(FitTable(frame, list(summaries), "<test>")), list(summaries), **options)


def test_one_panel_per_theta_with_shared_axes():
    many = figure(synthetic_fit(ELEVEN, sequences=1, n_max=3))
    two = figure(synthetic_fit([[0.2, 0.8], [0.7, 0.3]], sequences=1, n_max=3))
    assert len(panels(many)) == 11 and len(panels(two)) == 2
    grid = panels(many)
    assert all(ax.get_shared_y_axes().joined(grid[0], ax) and ax.get_shared_x_axes().joined(grid[0], ax)
               for ax in grid)
    # each panel holds exactly its own θ group: one model curve, one Bayes curve, one θ line
    for ax in grid:
        gids = sorted(line.get_gid().split("|")[0] for line in ax.get_lines())
        assert gids == ["bayes_prob", "model_prob", "theta"]


def test_many_groups_share_panels_in_runs_of_neighbours():
    thetas = [[t, 1 - t] for t in np.linspace(0.05, 0.95, 20)]
    fig = figure(synthetic_fit(thetas, sequences=1, n_max=2))
    grid = panels(fig)
    assert len(grid) == MAX_PANELS
    drawn = [int(line.get_gid().split("|")[2]) for ax in grid for line in ax.get_lines()
             if line.get_gid().startswith("model_prob")]
    assert drawn == list(range(20))  # every group once, in θ order


def test_two_categories_draw_no_second_category_panel():
    fig = figure(synthetic_fit([[0.2, 0.8], [0.7, 0.3]], sequences=2, n_max=3))
    gids = {line.get_gid() for ax in fig.axes for line in ax.get_lines()}
    assert not any("|tails|" in gid for gid in gids) and any("|heads|" in gid for gid in gids)
    assert all("tails" not in ax.get_ylabel() and "tails" not in ax.get_title() for ax in fig.axes)
    three = figure(synthetic_fit([[0.2, 0.3, 0.5]], sequences=2, n_max=3, categories=("a", "b", "c")))
    gids = {line.get_gid() for ax in three.axes for line in ax.get_lines()}
    assert {f"model_prob|{c}|0" for c in "abc"} <= gids and len(panels(three)) == 1


def test_log_scale_when_probabilities_fall_below_one_percent():
    low = figure(synthetic_fit([[0.002, 0.998], [0.5, 0.5]], sequences=2, n_max=30))
    assert {ax.get_yscale() for ax in panels(low)} == {"log"}
    assert panels(low)[0].get_ylim()[0] <= min(line.get_ydata().min() for ax in panels(low)
                                               for line in ax.get_lines() if line.get_gid().startswith("model"))
    mid = figure(synthetic_fit([[0.3, 0.7], [0.6, 0.4]], sequences=2, n_max=3))
    assert {ax.get_yscale() for ax in panels(mid)} == {"linear"}
    assert {ax.get_yscale() for ax in panels(figure(synthetic_fit([[0.3, 0.7]], sequences=2, n_max=3),
                                                    yscale="log"))} == {"log"}
    assert {ax.get_yscale() for ax in panels(figure(synthetic_fit([[0.002, 0.998]], sequences=2, n_max=30),
                                                    yscale="linear"))} == {"linear"}


def test_kl_panel_goes_log_when_kl_spans_below_one_percent():
    frame = synthetic_fit([[0.3, 0.7]], sequences=2, n_max=3)
    kl_axis = lambda fig: next(ax for ax in fig.axes if ax.get_title() == KL_BAYES_MODEL)  # noqa: E731
    assert kl_axis(figure(frame.assign(kl_bits=frame["kl_bits"] * 0 + 0.2))).get_yscale() == "linear"
    assert kl_axis(figure(frame.assign(kl_bits=frame["n"].map(lambda n: 10.0 ** -n)))).get_yscale() == "log"


def test_one_kl_direction_in_title_panel_table_and_report(tmp_path, capsysbinary, monkeypatch):
    from llmprobe.plots.report import fit_group_summary

    assert KL_BAYES_MODEL == "KL(Bayes‖model)"
    frame = synthetic_fit([[0.2, 0.8], [0.7, 0.3]], sequences=2, n_max=3)
    summaries = [{"trace": "synthetic", "forgetting": {"gamma": 0.9}, "mean_kl_bits": 0.05}]
    fig = figure(frame, summaries)
    texts = [fig.get_suptitle()] + [t for ax in fig.axes for t in (ax.get_title(), ax.get_ylabel())]
    kl_texts = [t for t in texts if "KL" in t]
    assert kl_texts and all(KL_BAYES_MODEL in t for t in kl_texts), kl_texts
    assert f"mean {KL_BAYES_MODEL} bits = 0.05" in fig.get_suptitle()
    path = write_fit(frame, tmp_path / "fit.parquet", summaries)
    report_columns = [c for c in fit_group_summary(open_fit(str(path))).columns if "KL" in c]
    assert report_columns and all(KL_BAYES_MODEL in c for c in report_columns)
    # fit-posterior's tables name the same direction for the same column, and every other KL its own
    trace = write_trace(tmp_path / "coin.parquet", records("coin", sequences=3, n_max=5), bayesian([1.0], [[2.0, 3.0]]))
    other = write_trace(tmp_path / "forgets.parquet", records("coin", sequences=3, n_max=5),
                        bayesian([1.0], [[2.0, 3.0]], gamma=0.7), model="forgetting")
    code, stdout, err = run_cli(["fit-posterior", str(trace), str(other), "--bootstrap", "5"], capsysbinary,
                                monkeypatch)
    assert code == 0, err
    text = stdout.decode()
    assert "side by side" in text  # the comparison table of two traces is checked too
    assert KL_BAYES_MODEL in text and not re.findall(r"KL(?!\()", text), re.findall(r".{0,40}KL(?!\().{0,20}", text)


def test_plot_icl_yscale_option(tmp_path, capsysbinary, monkeypatch):
    fit = write_fit(synthetic_fit([[0.2, 0.8]], sequences=2, n_max=3), tmp_path / "fit.parquet")
    for scale in ("auto", "linear", "log"):
        code, out, err = run_cli(["plot-icl", str(fit), "--yscale", scale, "-o", str(tmp_path / f"{scale}.png")],
                                 capsysbinary, monkeypatch)
        assert code == 0 and out == b"" and (tmp_path / f"{scale}.png").stat().st_size > 0, err
    code, _, err = run_cli(["plot-icl", str(fit), "--yscale", "cubic", "-o", str(tmp_path / "x.png")],
                           capsysbinary, monkeypatch)
    assert code != 0 and "cubic" in err and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("yscale", ["sqrt", ""])
def test_bad_yscale_in_the_api_is_one_usage_error(yscale):
    from llmprobe.errors import UsageError

    with pytest.raises(UsageError, match="--yscale"):
        figure(synthetic_fit([[0.2, 0.8]], sequences=1, n_max=1), yscale=yscale)
