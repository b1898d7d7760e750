"""One conclusion, the same everywhere (issue 25): every surface that states a conclusion about a fit leads
with the verdict, and shows the γ = 1 test only beside it, and the scorecard of the field's other tests only
after it — on planted models whose verdict is known.

A poor fit is "not rejected" by the γ = 1 test too (the default model's case: poor-fit with γ = 1.000
[1.000, 1.000]); a surface that showed the test alone, or first, would say the opposite of the verdict.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from llmprobe.analysis.fits import fit_posterior, posterior_marks
from llmprobe.plots.icl import open_fit, plot_icl, summarize
from llmprobe.tracing.reader import open_trace
from tests.analysis.fixtures import bayesian, records, write_trace
from tests.cli_helpers import assert_one_line_error, run_cli

GAMMA_TEST = re.compile(r"exact Bayes(ian updating)? (is )?(not )?rejected|REJECTED")


def constant(record, index):
    return np.tile([0.3, 0.7], (len(record["marks"]), 1))


PLANTED = {  # the verdict each planted model must get, and how to make it
    "poor-fit": lambda path: write_trace(path, records("coin", 1, 20), bayesian([1.0], [[1.0, 1.0]], swap=True)),
    "rejected": lambda path: write_trace(path, records("coin", 2, 30), bayesian([1.0], [[1.5, 1.5]], gamma=0.85)),
    "no-updating": lambda path: write_trace(path, records("coin", 1, 12), constant),
}


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def page_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    return " ".join(parser.parts)


SCORECARD = "the field's other tests"


def assert_scorecard_after_verdict(text: str, verdict: str, sentence: str) -> None:
    """The scorecard is there, after the verdict (its label or its sentence)."""
    found = [i for i in (text.find(f"verdict {verdict}"), text.find(sentence[:40])) if i >= 0]
    assert found and SCORECARD in text, text[:400]
    assert min(found) < text.index(SCORECARD), f"the scorecard comes before the verdict: {text[:600]}"


def assert_verdict_first(text: str, verdict: str, sentence: str) -> None:
    """The verdict (its label or its sentence) appears, and before anything the γ = 1 test says."""
    found = [i for i in (text.find(f"verdict {verdict}"), text.find(sentence[:40])) if i >= 0]
    assert found, f"no verdict {verdict!r} in: {text[:400]}"
    test = GAMMA_TEST.search(text)
    assert test is None or min(found) < test.start(), f"the γ = 1 test comes before the verdict: {text[:600]}"


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """Per planted verdict: the trace, the fit table written by the CLI, and the CLI's stdout."""
    root = tmp_path_factory.mktemp("conclusion")
    made = {}
    for verdict, make in PLANTED.items():
        trace = make(root / f"{verdict}.parquet")
        summary = fit_posterior(posterior_marks(open_trace(trace)), "fit", 20, 0).summary
        assert summary["verdict"] == verdict, summary["verdict_sentence"]  # the planted answer, else nothing to test
        made[verdict] = (trace, summary)
    return made


@pytest.mark.parametrize("verdict", list(PLANTED))
def test_every_surface_leads_with_the_verdict(fits, verdict, tmp_path, capsys, monkeypatch):
    trace, summary = fits[verdict]
    sentence = summary["verdict_sentence"]
    fit = tmp_path / "fit.parquet"
    code, out, err = run_cli(["fit-posterior", str(trace), "--bootstrap", "20", "-o", str(fit)], capsys, monkeypatch)
    assert code == 0, err
    # the terminal: the first line is the verdict; the γ = 1 test only in the updating-prior table's caption
    assert out.splitlines()[0] == f"synthetic: {sentence}"
    assert_verdict_first(out, verdict, sentence)
    assert_scorecard_after_verdict(out, verdict, sentence)
    assert out.index("every predictor scored the same way") < out.index(SCORECARD)  # after the verdict's tables
    # the JSON: the scorecard is the summary's last key, after the verdict
    code, out, err = run_cli(["fit-posterior", str(trace), "--bootstrap", "5", "--json", "-q"], capsys, monkeypatch)
    assert code == 0, err
    keys = list(json.loads(out)[0])
    assert keys.index("verdict") < keys.index("scorecard") == len(keys) - 1
    # several traces side by side: the comparison table's first row is the verdict
    code, out, err = run_cli(["fit-posterior", str(trace), str(trace), "--bootstrap", "5"], capsys, monkeypatch)
    assert code == 0, err
    side = out[out.index("side by side"):]
    assert re.search(rf"verdict\s*│\s*{verdict}\s*│", side) and side.index("verdict") < side.index("γ ")

    # the report: the Answer section's first statement is the verdict, and the page's first conclusion
    page = tmp_path / "r.html"
    code, _, err = run_cli(["report", str(trace), str(fit), "-o", str(page), "--max-prompts", "0", "-q"], capsys,
                           monkeypatch)
    assert code == 0, err
    html = page.read_text(encoding="utf-8")
    answer = html[html.index("<h2>Answer</h2>"):html.index("<h2>", html.index("<h2>Answer</h2>") + 5)]
    assert re.search(rf'<p class="verdict" data-verdict="{verdict}">', answer)
    assert_verdict_first(page_text(answer), verdict, sentence)
    assert_verdict_first(page_text(html), verdict, sentence)
    headers = re.findall(r"<th>(.*?)</th>", answer)
    assert headers[:3] == ["trace", "verdict", "γ = 1 test"]
    # the scorecard: the section right after the Answer, a row per test with its direction and reference
    after = html[html.index("<h2>", html.index("<h2>Answer</h2>") + 5):]
    assert after.startswith("<h2>Scorecard: the field's other tests</h2>")
    assert_scorecard_after_verdict(page_text(html), verdict, sentence)
    section = after[:after.index("<h2>", 5)]
    assert re.findall(r"<th>(.*?)</th>", section) == ["trace", "test", "number", "direction", "planted reference"]
    assert section.count("<tr>") == 1 + 4 and "not computed: " in section  # no shuffled orders, no martingale

    # the figure: its title states the verdict before the γ = 1 test
    table = open_fit(str(fit))
    title = plot_icl(summarize(table), table.summaries).get_suptitle()
    assert_verdict_first(title.replace("\n", " "), verdict, sentence)

    # the notebook API: the repr leads with the verdict
    result = fit_posterior(posterior_marks(open_trace(trace)), "fit", 20, 0)
    assert result.verdict == verdict
    assert repr(result).startswith(f"<fit-posterior of synthetic: verdict {verdict}: ")
    assert_verdict_first(repr(result), verdict, sentence)
    assert_scorecard_after_verdict(repr(result), verdict, sentence)


def test_a_poor_fit_that_gamma_does_not_reject_is_never_called_not_rejected_alone(fits):
    """The default model's case: no filter explains it, and γ = 1 is not rejected. The page must not say
    'not rejected' as its answer: the verdict leads, and the test is marked as not the conclusion."""
    from llmprobe.analysis.results import gamma_test_line

    summary = {**fits["poor-fit"][1], "exact_bayes_rejected": False, "forgetting": {"gamma": 1.0},
               "gamma_ci": [1.0, 1.0]}
    line = gamma_test_line(summary)
    assert "not rejected" in line and "the verdict above, not this test, is the conclusion" in line
    consistent = {**summary, "verdict": "consistent"}
    assert "not the conclusion" not in gamma_test_line(consistent)
    # γ = 1 rejected, but by a negligible deviation: the line says so instead of contradicting 'consistent'
    negligible = gamma_test_line({**consistent, "exact_bayes_rejected": True, "gamma_ci": [0.998, 0.999]})
    assert "is rejected" in negligible and "too small to matter" in negligible and "verdict above stands" in negligible


def test_old_fit_tables_without_a_verdict_say_so():
    from llmprobe.analysis.results import verdict_line

    assert verdict_line({"exact_bayes_rejected": False}).startswith("no verdict")


def test_plot_icl_leaves_out_the_marks_the_fit_left_out_and_says_so(tmp_path):
    from tests.plots.fixtures import synthetic_fit
    from llmprobe.plots.icl import FitTable

    frame = synthetic_fit([[0.3, 0.7]], sequences=2, n_max=4)
    frame["used"] = frame["n"] != 1
    frame.loc[frame["n"] == 1, "mass"] = 0.005
    summary = summarize(FitTable(frame, [{"thresholds": {"min_mass": 0.05}}], "<test>"))
    assert summary.left_out == 2 and summary.marks == 10 and summary.left_out_n == [1]
    fig = plot_icl(summary, [{"thresholds": {"min_mass": 0.05}}])
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}
    assert list(lines["model_prob|heads|0"].get_xdata()) == [0, 2, 3, 4]
    assert list(lines["kl_bits|0"].get_xdata()) == [0, 2, 3, 4]
    assert list(lines["mass|0"].get_xdata()) == [0, 1, 2, 3, 4]  # the mass shows why they were left out
    note = [" ".join(t.get_text().split()) for ax in fig.axes for t in ax.texts if t.get_gid() == "left-out"]
    assert len(note) == 1 and "2 of 10 marks" in note[0] and "less than 0.05" in note[0] and "n = 1" in note[0]
    # nothing left out: no note, every n drawn
    full = plot_icl(summarize(FitTable(frame.assign(used=True), [], "<test>")), [])
    assert not [t for ax in full.axes for t in ax.texts if t.get_gid() == "left-out"]


def test_the_known_prior_of_a_control_is_an_updating_prior(tmp_path, capsys, monkeypatch):
    """wind-tunnel's prior.json says what it is; fit-prior's says what it is; only the wrong kind warns."""
    import json

    from llmprobe.control.prior import parse_prior_spec

    trace = write_trace(tmp_path / "t.parquet", records("coin", 3, 8), bayesian([1.0], [[2.0, 1.0]]))
    known = tmp_path / "prior.json"
    known.write_text(json.dumps(parse_prior_spec("dirichlet:2,1", ["heads", "tails"]).to_dict()))
    code, out, err = run_cli(["fit-posterior", str(trace), str(trace), "--prior", str(known), "--bootstrap", "5"],
                             capsys, monkeypatch)
    assert code == 0, err
    assert "prior over rows" not in out + err
    assert json.loads(known.read_text())["kind"] == "updating prior"
    rows = tmp_path / "rows.json"
    code, _, err = run_cli(["fit-prior", str(trace), "-o", str(rows)], capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run_cli(["fit-posterior", str(trace), "--prior", str(rows), "--bootstrap", "5"], capsys,
                             monkeypatch)
    assert code == 0 and " ".join((out + err).split()).count("is a prior over rows") == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(known.read_text()), "kind": "posterior"}))
    code, _, err = run_cli(["fit-posterior", str(trace), "--prior", str(bad)], capsys, monkeypatch)
    assert_one_line_error(code, err, "bad.json", "'kind'")


def test_every_requirement_is_named_in_the_first_message(tmp_path, capsys, monkeypatch):
    """A trace without targets, and one with targets but no experiment marks, get the same whole list."""
    import json

    plain = write_trace(tmp_path / "plain.parquet", records("coin", 1, 3), constant)
    import pyarrow.parquet as pq

    table = pq.read_table(plain)
    no_targets = tmp_path / "no-targets.parquet"
    pq.write_table(table.drop(["target_logprobs", "target_seq_logprobs"]), no_targets)
    no_counts = tmp_path / "no-counts.parquet"
    marks = [json.dumps({k: v for k, v in json.loads(m).items() if k != "counts"}) for m in table.column("mark").to_pylist()]
    metas = [json.dumps({k: v for k, v in json.loads(m).items() if k != "outcomes"}) for m in table.column("meta").to_pylist()]
    import pyarrow as pa

    stripped = table.set_column(table.schema.get_field_index("mark"), "mark", pa.array(marks))
    stripped = stripped.set_column(table.schema.get_field_index("meta"), "meta", pa.array(metas))
    pq.write_table(stripped.replace_schema_metadata(table.schema.metadata), no_counts)
    for path in (no_targets, no_counts):
        code, _, err = run_cli(["fit-posterior", str(path)], capsys, monkeypatch)
        assert_one_line_error(code, err, "experiment prompts", "running counts", "outcome sequences", "targets")


def test_choosing_components_shows_progress(fits, capsys, monkeypatch):
    trace, _ = fits["rejected"]
    code, _, err = run_cli(["fit-posterior", str(trace), "--prior-components", "auto", "--max-components", "2",
                            "--bootstrap", "3"], capsys, monkeypatch)
    assert code == 0, err
    assert "choosing 1-2 components" in err and "bootstrap of γ" in err and "out-of-sample fits" in err
    code, _, err = run_cli(["fit-posterior", str(trace), "--bootstrap", "3", "-q"], capsys, monkeypatch)
    assert code == 0 and "bootstrap" not in err
