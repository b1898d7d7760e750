"""The HTML report: self-contained (no URL of any kind), escaped, and its tables are the inputs' numbers.

Ends with the whole chain on the real default model: experiment prompts -> trace -> fit-posterior /
fit-prior -> plot, plot-icl, plot-prior and report.
"""

from __future__ import annotations

import base64
import io
import json
import math
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from llmprobe.plots.icl import open_fit
from llmprobe.tracing.reader import read_trace
from llmprobe.plots.report import fit_group_summary, prompt_summary
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.plots.fixtures import (
    PNG_SIGNATURE,
    THETAS,
    experiment_records,
    mixture_prior_json,
    synthetic_fit,
    text_records,
    write_fit,
    write_trace,
)

HOSTILE = "Tags <b>bold</b> & <script>alert(1)</script> stay text"


class Page(HTMLParser):
    """Every tag with its attributes, and the text, of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def assert_self_contained(path: Path) -> list[bytes]:
    """No scripts, links, frames or URLs; every image an inline data: URI. Returns the decoded images."""
    html = path.read_text(encoding="utf-8")
    page = parse(path)
    assert html.startswith("<!DOCTYPE html>")
    tags = {tag for tag, _ in page.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed", "base", "audio", "video", "source"}
    lowered = html.lower()
    assert "http:" not in lowered and "https:" not in lowered and "url(" not in lowered and "@import" not in lowered
    images = []
    for tag, attrs in page.tags:
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith("data:image/"), (tag, name, value[:40])
        if tag == "img":
            images.append(base64.b64decode(attrs["src"].split(",", 1)[1]))
    return images


@pytest.fixture(scope="module")
def report_inputs(tiny_loaded, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    trace = write_trace(tiny_loaded, root / "trace.parquet", text_records(["The capital of France is", HOSTILE]))
    summaries = [{"trace": "synthetic", "forgetting": {"gamma": 0.9}, "mean_kl_bits": 0.05}]
    fit = write_fit(synthetic_fit(THETAS, sequences=2, n_max=4), root / "fit.parquet", summaries)
    prior = mixture_prior_json(root / "prior.json", [1.0], [[2.0, 3.0]], ["heads", "tails"])
    return {"trace": trace, "fit": fit, "prior": prior, "root": root}


def test_report_is_self_contained_and_complete(report_inputs, tmp_path, capsysbinary, monkeypatch):
    from matplotlib.image import imread

    out = tmp_path / "report.html"
    code, stdout, err = run_cli(["report", str(report_inputs["trace"]), str(report_inputs["fit"]),
                                 str(report_inputs["prior"]), "-o", str(out), "--top-k", "4"], capsysbinary, monkeypatch)
    assert code == 0 and stdout == b"" and "wrote" in err
    images = assert_self_contained(out)
    assert len(images) == 2 + 1 + 1  # two prompts, the in-context figure, the prior
    for image in images:
        assert image[:8] == PNG_SIGNATURE and imread(io.BytesIO(image)).shape[0] > 100
    text = " ".join(parse(out).text)
    meta = read_trace(report_inputs["trace"]).attrs["llmprobe"]
    assert meta["model"] in text and meta["weights_sha256"] in text
    assert "Fitted prior" in text and "Fit of synthetic" in text and "θ = 0.2/0.8" in text
    html = out.read_text(encoding="utf-8")
    assert "<b>bold" not in html and "<script>alert" not in html  # trace text is escaped ...
    assert "Tags <b>bold</b> & <script>alert(1)</script> stay text" in text  # ... and reads back verbatim


def test_prompt_table_is_the_trace_numbers(report_inputs):
    frame = read_trace(report_inputs["trace"])
    table = prompt_summary(frame).set_index("prompt")
    rows = pq.read_table(report_inputs["trace"]).to_pylist()
    for prompt_id in ("p0", "p1"):
        mine = [r for r in rows if r["prompt_id"] == prompt_id]
        scored = [r for r in mine if r["next_logprob"] is not None]
        row = table.loc[prompt_id]
        assert row["positions"] == len(mine) and row["generated"] == 0
        assert row["mean entropy (bits)"] == pytest.approx(np.mean([r["entropy"] for r in mine]) / math.log(2))
        assert row["mean surprisal (bits/token)"] == pytest.approx(
            -np.mean([r["next_logprob"] for r in scored]) / math.log(2), rel=1e-6)
        assert row["top-1 accuracy"] == pytest.approx(np.mean([r["next_rank"] == 1 for r in scored]))
    assert table.loc["p1", "text"] == HOSTILE


def test_generated_tokens_are_kept_apart(tiny_loaded, tmp_path):
    """Generated tokens are counted, drawn in italics, and left out of the prompt's surprisal."""
    from llmprobe.plots.tokens import load_token_grid, plot_tokens

    trace = write_trace(tiny_loaded, tmp_path / "gen.parquet", text_records(["Once upon a time"]), max_new_tokens=3)
    rows = sorted(pq.read_table(trace).to_pylist(), key=lambda r: r["position"])
    prompt = [r for r in rows if r["phase"] == "prompt"]
    row = prompt_summary(read_trace(trace)).iloc[0]
    assert row["generated"] == 3 and row["positions"] == len(prompt)
    expected = -np.mean([r["next_logprob"] for r in prompt[:-1]]) / math.log(2)  # the last one's next is generated
    assert row["mean surprisal (bits/token)"] == pytest.approx(expected, rel=1e-6)
    assert row["text"] == "".join(r["token"] for r in prompt) + "‖" + "".join(
        r["token"] for r in rows if r["phase"] == "generated")
    fig = plot_tokens(load_token_grid(str(trace), "p0"))
    heat = next(ax for ax in fig.axes if ax.get_ylabel() == "candidate rank")
    styles = [label.get_fontstyle() for label in heat.get_xticklabels()]
    assert styles == ["normal"] * len(prompt) + ["italic"] * 3


def test_fit_table_is_the_fit_numbers(report_inputs):
    frame = synthetic_fit(THETAS, sequences=2, n_max=4)
    table = fit_group_summary(open_fit(str(report_inputs["fit"])))
    assert table["group"].tolist() == ["θ = 0.2/0.8", "θ = 0.7/0.3"]
    for (_, row), theta in zip(table.iterrows(), (0.2, 0.7)):
        marks = frame[frame["theta"].eq(theta)].drop_duplicates(["sequence", "n"])  # heads rows: one per mark
        assert row["marks"] == len(marks) == 2 * 5 and row["sequences"] == 2
        assert row["mean TV"] == pytest.approx(marks["tv"].mean())
        assert row["mean KL(Bayes‖model) bits"] == pytest.approx(marks["kl_bits"].mean())
        assert row["largest n"] == 4
        assert row["KL(Bayes‖model) bits at largest n"] == pytest.approx(marks[marks["n"] == 4]["kl_bits"].mean())
        assert row["mean mass on categories"] == pytest.approx(marks["mass"].mean())


def test_report_options(report_inputs, tmp_path, capsysbinary, monkeypatch):
    trace, fit, prior = (str(report_inputs[k]) for k in ("trace", "fit", "prior"))
    svg_page = tmp_path / "svg.html"
    # inputs are told apart by content, not order; one prompt; SVG figures
    code, _, err = run_cli(["report", trace, prior, fit, "-o", str(svg_page), "--prompt", "p1", "--image-format",
                            "svg", "--max-positions", "3"], capsysbinary, monkeypatch)
    assert code == 0, err
    page = parse(svg_page)
    sources = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert len(sources) == 3 and all(s.startswith("data:image/svg+xml;base64,") for s in sources)
    for source in sources:
        assert ET.fromstring(base64.b64decode(source.split(",", 1)[1])).tag.endswith("svg")
    assert "Figures for 1 of 2 prompts" in " ".join(page.text)
    assert_self_contained(svg_page)


@pytest.mark.parametrize("extra_args, needles", [
    (["{fit}", "{fit}"], ["two fit tables"]),
    (["{prior}", "{prior}"], ["two prior files"]),
    (["--prompt", "zzz"], ["--prompt", "zzz"]),
    (["--image-format", "gif"], ["--image-format"]),
    (["{root}/nothing.parquet"], ["nothing.parquet", "no such file"]),
    (["{trace}"], ["trace.parquet", "not a fit-posterior table"]),
])
def test_report_bad_input_is_one_line(report_inputs, tmp_path, capsysbinary, monkeypatch, extra_args, needles):
    out = tmp_path / "r.html"
    args = [a.format(**{k: str(v) for k, v in report_inputs.items()}) for a in extra_args]
    code, _, err = run_cli(["report", str(report_inputs["trace"]), *args, "-o", str(out)], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_report_output_checks(report_inputs, tmp_path, capsysbinary, monkeypatch):
    code, _, err = run_cli(["report", str(report_inputs["trace"]), "-o", str(tmp_path / "r.txt")], capsysbinary,
                           monkeypatch)
    assert_one_line_error(code, err, "r.txt", ".html")
    existing = tmp_path / "r.html"
    existing.write_text("keep")
    code, _, err = run_cli(["report", str(report_inputs["trace"]), "-o", str(existing)], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "--force")
    assert existing.read_text() == "keep"
    code, _, err = run_cli(["report", str(tmp_path / "none.parquet"), "-o", str(tmp_path / "n.html")], capsysbinary,
                           monkeypatch)
    assert_one_line_error(code, err, "none.parquet")


@pytest.mark.real_model
def test_real_model_figures_and_report(real_loaded, tmp_path, capsysbinary, monkeypatch):
    """The default model on a tiny coin experiment: the commands run on it and draw the fit's numbers.

    (plot-icl's command line is covered on synthetic tables; here the report draws the same figure.)
    """
    from llmprobe.plots.icl import plot_icl, summarize
    from llmprobe.plots.tokens import load_token_grid

    records = experiment_records(tmp_path, n_max=3, sequences=1)[::3]  # θ_heads = 0, 0.3, 0.6, 0.9
    france = text_records(["The capital of France is"])[0]
    trace = write_trace(real_loaded, tmp_path / "real.parquet", [france, *records], top_k=10,
                        targets=[" heads", " tails"])
    grid = load_token_grid(str(trace), france.id)
    assert grid.model == "SmolLM2-135M-Instruct" and grid.candidates[-1][0] == " Paris"
    assert grid.probs[-1, 0] > 0.5

    fit_path, prior_path = tmp_path / "fit.parquet", tmp_path / "prior.json"
    code, _, err = run_cli(["fit-posterior", str(trace), "-o", str(fit_path), "--bootstrap", "10"], capsysbinary,
                           monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["fit-prior", str(trace), "-o", str(prior_path)], capsysbinary, monkeypatch)
    assert code == 0, err

    fit = open_fit(str(fit_path))
    summary = summarize(fit)
    assert len(summary.groups) == 4 and set(summary.groups["sequences"]) == {1}
    lines = {line.get_gid(): line for ax in plot_icl(summary, fit.summaries).axes for line in ax.get_lines()}
    table = pq.read_table(fit_path).to_pandas()
    for group in summary.groups.itertuples():
        mine = table[table["theta"].eq(group.theta[0]) & table["category"].eq("heads")].sort_values("n")
        mine = mine[mine["used"]]  # marks the fit left out (--min-mass) are left out of the curves too (issue 25)
        np.testing.assert_allclose(lines[f"model_prob|heads|{group.group}"].get_ydata(), mine["model_prob"])
    # the report's per-group means average (equal marks per group) to fit-posterior's own overall mean
    groups = fit_group_summary(fit)
    assert groups["mean KL(Bayes‖model) bits"].mean() == pytest.approx(fit.summaries[0]["mean_kl_bits"], rel=1e-9)

    for command in (["plot", str(trace), "--prompt", records[0].id], ["plot-prior", str(prior_path)]):
        code, _, err = run_cli([*command, "-o", str(tmp_path / "figure.png"), "--force"], capsysbinary, monkeypatch)
        assert code == 0, err
        assert (tmp_path / "figure.png").read_bytes()[:8] == PNG_SIGNATURE
    page = tmp_path / "report.html"
    code, _, err = run_cli(["report", str(trace), str(fit_path), str(prior_path), "-o", str(page), "--max-prompts",
                            "1", "--max-positions", "8"], capsysbinary, monkeypatch)
    assert code == 0, err
    assert len(assert_self_contained(page)) == 3
    assert json.loads(prior_path.read_text())["trace"] in " ".join(parse(page).text)
