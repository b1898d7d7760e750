"""Figures: the numbers drawn are the input's numbers, files are well-formed, bad input is one line.

Every check of plotted values reads the input independently (pyarrow on the trace file, numpy on
the fit table, scipy.stats for densities) and compares it with what the figure's artists hold.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from llmprobe.errors import UsageError
from llmprobe.plots.common import token_label
from llmprobe.plots.icl import open_fit, plot_icl, summarize
from llmprobe.analysis.priors import read_prior
from llmprobe.plots.prior import (
    beta_marginal_density,
    plot_prior,
    simplex_density,
    ternary_points,
)
from llmprobe.plots.tokens import HIGHLIGHT, load_token_grid, plot_tokens
from llmprobe.tracing.schema import META_KEY, decode_vocab, trace_schema
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.plots.fixtures import PNG_SIGNATURE, THETAS, experiment_records, mixture_prior_json, synthetic_fit, text_records, write_fit, write_trace


# ----------------------------------------------------------------------------------------------- helpers


def is_png(path: Path) -> tuple[int, int]:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return image.shape[1], image.shape[0]


def raw_rows(path: Path, prompt_id: str) -> tuple[list[dict], list[str]]:
    """The trace's rows for one prompt and its vocabulary, read with pyarrow (and the vocabulary's decoder)."""
    parquet = pq.ParquetFile(path)
    vocab = decode_vocab(parquet.metadata.metadata)
    rows = [r for r in parquet.read().to_pylist() if r["prompt_id"] == prompt_id]
    return sorted(rows, key=lambda r: r["position"]), vocab


def lines_by_gid(fig) -> dict[str, object]:
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}


@pytest.fixture(scope="module")
def tiny_trace(tiny_loaded, tmp_path_factory) -> Path:
    return write_trace(tiny_loaded, tmp_path_factory.mktemp("plots") / "tiny.parquet", text_records())


# ----------------------------------------------------------------------------------------------- tokens
def test_token_grid_is_the_trace(tiny_trace):
    grid = load_token_grid(str(tiny_trace), "p1", top=5)
    rows, vocab = raw_rows(tiny_trace, "p1")
    assert grid.positions.tolist() == [r["position"] for r in rows]
    np.testing.assert_allclose(grid.probs, np.exp([r["topk_logprobs"][:5] for r in rows]), rtol=1e-6)
    assert grid.candidates == [[vocab[i] for i in r["topk_ids"][:5]] for r in rows]
    np.testing.assert_allclose(grid.entropy_bits, [r["entropy"] / math.log(2) for r in rows], rtol=1e-6)
    assert grid.tokens == [r["token"] for r in rows]
    assert grid.next_tokens == [r["next_token"] for r in rows]
    assert grid.next_tokens[-1] is None and np.isnan(grid.next_probs[-1])
    np.testing.assert_allclose(grid.next_probs[:-1], [math.exp(r["next_logprob"]) for r in rows[:-1]], rtol=1e-6)
    assert grid.model == json.loads(pq.ParquetFile(tiny_trace).schema_arrow.metadata[META_KEY])["model"]


def test_token_figure_draws_the_trace_numbers(tiny_trace):
    grid = load_token_grid(str(tiny_trace), "p1", top=4)
    fig = plot_tokens(grid, wrap=5)
    rows, vocab = raw_rows(tiny_trace, "p1")
    expected = np.exp([r["topk_logprobs"][:4] for r in rows])
    chunks = math.ceil(len(rows) / 5)
    heat = [ax for ax in fig.axes if ax.get_ylabel() == "candidate rank"]
    assert len(heat) == chunks
    drawn = np.concatenate([np.asarray(ax.images[0].get_array()).T for ax in heat])
    np.testing.assert_allclose(drawn, expected, rtol=1e-6)
    # one red box per position whose actual next token is among the candidates
    boxes = sum(1 for ax in heat for p in ax.patches if p.get_edgecolor()[:3] == pytest.approx((0.839, 0.153, 0.157),
                                                                                                abs=1e-2))
    assert boxes == sum(r["next_token_id"] in r["topk_ids"][:4] for r in rows)
    # cell labels carry the candidate strings, whitespace made visible
    texts = {t.get_text().split("\n")[0] for ax in heat for t in ax.texts}
    assert {token_label(vocab[r["topk_ids"][0]]) for r in rows} <= texts
    # the entropy line underneath is the trace's entropy in bits
    entropy = np.concatenate([ax.get_lines()[0].get_ydata() for ax in fig.axes if ax.get_ylabel() == "bits"])
    np.testing.assert_allclose(entropy, [r["entropy"] / math.log(2) for r in rows], rtol=1e-6)
    title = " ".join(t.get_text() for t in fig.texts)
    assert grid.model in title and "prompt p1" in title
    assert HIGHLIGHT == "#d62728"


def test_positions_range_and_wrapping(tiny_trace):
    grid = load_token_grid(str(tiny_trace), "p1", positions="2:7")
    assert grid.positions.tolist() == [2, 3, 4, 5, 6]
    assert load_token_grid(str(tiny_trace), "p1", positions="9:").positions[0] == 9
    assert load_token_grid(str(tiny_trace), "p1", positions=":3").positions.tolist() == [0, 1, 2]
    fig = plot_tokens(grid, wrap=2)
    assert sum(ax.get_ylabel() == "candidate rank" for ax in fig.axes) == 3


def test_marked_positions_are_flagged(tiny_loaded, tmp_path):
    records = experiment_records(tmp_path)[:1]
    path = write_trace(tiny_loaded, tmp_path / "coin.parquet", records, targets=[" heads", " tails"])
    grid = load_token_grid(str(path), records[0].id)
    marked = [r["position"] for r in raw_rows(path, records[0].id)[0] if r["mark_index"] is not None]
    assert grid.positions[grid.marked].tolist() == marked and len(marked) == 5


def test_layer_option_picks_one_layer(tiny_trace, tmp_path):
    """A per-layer trace: the last layer by default, --layer for another."""
    parquet = pq.ParquetFile(tiny_trace)
    table = parquet.read()
    k = table.schema.field("topk_ids").type.list_size
    halved = pa.array([[lp - math.log(2) for lp in row] for row in table.column("topk_logprobs").to_pylist()],
                      pa.list_(pa.float32(), k))
    schema = trace_schema(k, layers=True).with_metadata(parquet.schema_arrow.metadata)
    parts = []
    for layer, logprobs in ((3, table.column("topk_logprobs")), (1, halved)):
        t = table.add_column(3, "layer", pa.array([layer] * len(table), pa.int16()))
        parts.append(t.set_column(t.schema.get_field_index("topk_logprobs"), "topk_logprobs", logprobs))
    layered = tmp_path / "layers.parquet"
    pq.write_table(pa.concat_tables(parts).cast(schema), layered)
    last = load_token_grid(str(layered), "p0")
    np.testing.assert_allclose(last.probs, load_token_grid(str(tiny_trace), "p0").probs)
    first = load_token_grid(str(layered), "p0", layer=1)
    np.testing.assert_allclose(first.probs, last.probs / 2, rtol=1e-5)
    with pytest.raises(UsageError, match="no layer 7"):
        load_token_grid(str(layered), "p0", layer=7)
    with pytest.raises(UsageError, match="no layer column"):
        load_token_grid(str(tiny_trace), "p0", layer=1)


def test_token_label_makes_whitespace_visible_and_keeps_dollars_literal():
    assert token_label(" the") == "␣the"
    assert token_label("\n\t") == "⏎⇥"
    assert token_label("$x$") == r"\$x\$"
    assert token_label("a\x00") == "a\\x00"
    assert token_label(None) == "∅"
    assert token_label("abcdefghijklmnop") == "abcdefghijk…"


def test_plot_cli_writes_png_and_svg(tiny_trace, tmp_path, capsysbinary, monkeypatch):
    png = tmp_path / "tokens.png"
    code, out, err = run_cli(["plot", str(tiny_trace), "--prompt", "p0", "-o", str(png), "--top-k", "5"], capsysbinary,
                             monkeypatch)
    assert code == 0 and out == b"" and "wrote" in err
    is_png(png)
    svg = tmp_path / "tokens.svg"
    code, _, _ = run_cli(["plot", str(tiny_trace), "--prompt", "p0", "-o", str(svg), "--positions", "0:3", "--top-k",
                          "3"], capsysbinary, monkeypatch)
    assert code == 0 and ET.parse(svg).getroot().tag.endswith("svg")


@pytest.mark.parametrize("args, needles", [
    (["--prompt", "nope"], ["--prompt", "no prompt with id 'nope'"]),
    ([], ["2 prompts", "--prompt"]),
    (["--prompt", "p0", "--positions", "5"], ["--positions"]),
    (["--prompt", "p0", "--positions", "100:"], ["--positions", "no positions"]),
    (["--prompt", "p0", "--wrap", "0"], ["--wrap"]),
    (["--prompt", "p0", "--top-k", "0"], ["--top-k"]),
])
def test_plot_bad_options_are_one_line(tiny_trace, tmp_path, capsysbinary, monkeypatch, args, needles):
    out = tmp_path / "x.png"
    code, _, err = run_cli(["plot", str(tiny_trace), "-o", str(out), *args], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, *needles)
    assert list(tmp_path.iterdir()) == []


def test_plot_bad_inputs_are_one_line(tiny_trace, tmp_path, capsysbinary, monkeypatch):
    code, _, err = run_cli(["plot", str(tmp_path / "missing.parquet"), "-o", str(tmp_path / "x.png")], capsysbinary,
                           monkeypatch)
    assert_one_line_error(code, err, "missing.parquet", "no such")
    fit = write_fit(synthetic_fit([[0.5, 0.5]], sequences=1, n_max=1), tmp_path / "fit.parquet")
    code, _, err = run_cli(["plot", str(fit), "-o", str(tmp_path / "x.png")], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "fit.parquet", "not an llmprobe trace")
    code, _, err = run_cli(["plot", str(tiny_trace), "--prompt", "p0", "-o", str(tmp_path / "x.jpg")], capsysbinary,
                           monkeypatch)
    assert_one_line_error(code, err, "x.jpg", ".png")
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"keep")
    code, _, err = run_cli(["plot", str(tiny_trace), "--prompt", "p0", "-o", str(existing)], capsysbinary,
                           monkeypatch)
    assert_one_line_error(code, err, "--force")
    assert existing.read_bytes() == b"keep"


# ----------------------------------------------------------------------------------------------- in-context learning


def test_icl_summary_is_the_mean_and_band_over_sequences():
    frame = synthetic_fit(THETAS, sequences=4, n_max=5)
    summary = summarize(open_fit_frame(frame))
    assert [g.theta for g in summary.groups.itertuples()] == [(0.2, 0.8), (0.7, 0.3)]
    assert summary.groups["sequences"].tolist() == [4, 4]
    for group in summary.groups.itertuples():
        seqs = [s for s in frame["sequence"].unique()
                if tuple(frame[frame["sequence"] == s]["theta"][:2]) == group.theta]
        mine = frame[frame["sequence"].isin(seqs)]
        for n in range(6):
            values = mine[(mine["n"] == n) & (mine["category"] == "heads")]["model_prob"].to_numpy()
            row = summary.per_category.query("group == @group.group and category == 'heads' and n == @n"
                                             " and metric == 'model_prob'").iloc[0]
            assert row["mean"] == pytest.approx(values.mean())
            assert (row["lo"], row["hi"]) == pytest.approx(tuple(np.quantile(values, [0.1, 0.9])))
            # per-mark columns count once per mark, not once per category row
            tv = mine[mine["n"] == n].drop_duplicates(["sequence"])["tv"].to_numpy()
            row = summary.per_mark.query("group == @group.group and n == @n and metric == 'tv'").iloc[0]
            assert row["mean"] == pytest.approx(tv.mean()) and row["rows"] == len(tv) == 4


def open_fit_frame(frame: pd.DataFrame):
    from llmprobe.plots.icl import FitTable

    return FitTable(frame, [], "<test>")


def test_icl_figure_draws_the_summary(tmp_path):
    frame = synthetic_fit(THETAS, sequences=3, n_max=5)
    summaries = [{"trace": "synthetic", "exact_bayes": {"alpha0": 2.0, "prior_mean": [0.5, 0.5]},
                  "forgetting": {"gamma": 0.93}, "mean_kl_bits": 0.01}]
    fit = open_fit(str(write_fit(frame, tmp_path / "fit.parquet", summaries)))
    summary = summarize(fit)
    fig = plot_icl(summary, fit.summaries)
    lines = lines_by_gid(fig)
    for group in summary.groups.itertuples():
        mine = frame[frame["theta"].eq(group.theta[0]) & frame["category"].eq("heads")]
        means = mine.groupby("n")["model_prob"].mean()
        np.testing.assert_allclose(lines[f"model_prob|heads|{group.group}"].get_ydata(), means.to_numpy())
        np.testing.assert_allclose(lines[f"bayes_prob|heads|{group.group}"].get_ydata(),
                                   mine.groupby("n")["bayes_prob"].mean().to_numpy())
        assert lines[f"theta|heads|{group.group}"].get_ydata()[0] == pytest.approx(group.theta[0])
        assert f"model_prob|tails|{group.group}" not in lines  # two categories: P(tails) = 1 − P(heads)
        marks = frame[frame["theta"].eq(group.theta[0])].drop_duplicates(["sequence", "n"])
        np.testing.assert_allclose(lines[f"kl_bits|{group.group}"].get_ydata(),
                                   marks.groupby("n")["kl_bits"].mean().to_numpy())
        np.testing.assert_allclose(lines[f"entropy_model_bits|{group.group}"].get_ydata(),
                                   marks.groupby("n")["entropy_model_bits"].mean().to_numpy())
    title = fig.get_suptitle()
    assert "synthetic" in title and "fitted γ = 0.93" in title and "exact-Bayes α₀ = 2" in title
    labels = {ax.get_xlabel() for ax in fig.axes if ax.get_visible() and ax.axison}
    assert labels == {"examples seen (n)"}


def test_icl_reads_csv_and_the_real_layout(tmp_path):
    """CSV input, string sequence ids and the extra columns fit-posterior writes (layout, position, ...)."""
    frame = synthetic_fit(THETAS, sequences=2, n_max=3)
    parquet = summarize(open_fit(str(write_fit(frame, tmp_path / "fit.parquet"))))
    real = frame.assign(sequence=frame["sequence"].astype(str), layout="marks", position=0, filter_prob=0.5)
    csv = summarize(open_fit(str(write_fit(real, tmp_path / "fit.csv"))))
    pd.testing.assert_frame_equal(parquet.per_category, csv.per_category)
    both = pd.concat([real, real.assign(layout="per-n", prompt_id=real["prompt_id"] + "-n")])
    groups = summarize(open_fit_frame(both)).groups
    assert len(groups) == 4 and groups["label"].str.startswith(("marks, θ", "per-n, θ")).all()


def test_plot_icl_cli(tmp_path, capsysbinary, monkeypatch):
    fit = write_fit(synthetic_fit(THETAS, sequences=2, n_max=4), tmp_path / "fit.parquet")
    code, out, err = run_cli(["plot-icl", str(fit)], capsysbinary, monkeypatch)
    assert code == 0 and out == b"" and "wrote" in err
    is_png(tmp_path / "fit.icl.png")  # the default name


def test_plot_icl_bad_inputs(tiny_trace, tmp_path, capsysbinary, monkeypatch):
    out = str(tmp_path / "icl.png")
    code, _, err = run_cli(["plot-icl", str(tmp_path / "none.parquet"), "-o", out], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "none.parquet", "no such file")
    code, _, err = run_cli(["plot-icl", str(tiny_trace), "-o", out], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "tiny.parquet", "not a fit-posterior table", "bayes_prob")
    short = write_fit(synthetic_fit(THETAS, sequences=1, n_max=1).drop(columns="kl_bits"), tmp_path / "short.csv")
    code, _, err = run_cli(["plot-icl", str(short), "-o", out], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "short.csv", "kl_bits")
    binary = tmp_path / "junk.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 50)
    code, _, err = run_cli(["plot-icl", str(binary), "-o", out], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "junk.bin")
    assert not Path(out).exists()


# ----------------------------------------------------------------------------------------------- priors
def test_beta_marginals_are_scipy_betas():
    prior = load_prior_from([0.3, 0.7], [[2.0, 5.0, 1.5], [0.7, 1.2, 3.0]])
    x = np.linspace(0.01, 0.99, 50)
    for k in range(3):
        a = prior.alphas[:, k]
        b = prior.alphas.sum(axis=1) - a
        expected = 0.3 * stats.beta.pdf(x, a[0], b[0]) + 0.7 * stats.beta.pdf(x, a[1], b[1])
        np.testing.assert_allclose(beta_marginal_density(prior, k, x), expected, rtol=1e-10)


def test_simplex_density_is_the_dirichlet_mixture_and_integrates_to_one():
    prior = load_prior_from([0.6, 0.4], [[8.0, 3.0, 2.0], [1.5, 2.0, 9.0]])
    points = ternary_points(200)
    density = simplex_density(prior, points)
    expected = [0.6 * stats.dirichlet.pdf(p, prior.alphas[0]) + 0.4 * stats.dirichlet.pdf(p, prior.alphas[1])
                for p in points[:200]]
    np.testing.assert_allclose(density[:200], expected, rtol=1e-9)
    # the grid is uniform over the simplex, whose area in (p1, p2) coordinates is 1/2
    assert density.mean() * 0.5 == pytest.approx(1.0, abs=0.02)


def load_prior_from(weights, alphas, tmp=None):
    from llmprobe.plots.prior import Prior

    alphas = np.asarray(alphas, float)
    return Prior(np.asarray(weights, float), alphas, [f"c{i}" for i in range(alphas.shape[1])], None, {})


@pytest.mark.parametrize("alphas, weights", [
    ([[2.5, 4.0]], [1.0]),
    ([[0.5, 3.0], [6.0, 2.0]], [0.5, 0.5]),
])
def test_two_category_prior_is_a_beta_density(tmp_path, alphas, weights):
    prior = read_prior(str(mixture_prior_json(tmp_path / "p.json", weights, alphas, ["heads", "tails"])))
    assert prior.categories == ["heads", "tails"] and prior.label == "synthetic"
    fig = plot_prior(prior)
    line = lines_by_gid(fig)["density|0"]
    x = line.get_xdata()
    expected = sum(w * stats.beta.pdf(x, a[0], a[1]) for w, a in zip(weights, alphas))
    np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-9)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("P(heads)") and ax.get_ylabel() == "density"
    assert ax.get_ylim()[1] < np.inf and ax.get_legend() is not None


def test_three_and_more_categories(tmp_path):
    ternary = plot_prior(read_prior(str(mixture_prior_json(tmp_path / "p3.json", [1.0], [[2.0, 3.0, 4.0]],
                                                           ["a", "b", "c"]))))
    assert {t.get_text() for t in ternary.axes[0].texts} >= {"a", "b", "c"}
    assert any(ax.get_ylabel().startswith("prior density") for ax in ternary.axes)  # the colorbar
    alphas = [[1.0, 2.0, 3.0, 4.0, 5.0]]
    many = plot_prior(read_prior(str(mixture_prior_json(tmp_path / "p5.json", [1.0], alphas, list("vwxyz")))))
    lines = lines_by_gid(many)
    for k in range(5):
        x = lines[f"density|{k}"].get_xdata()
        expected = stats.beta.pdf(x, alphas[0][k], 15 - alphas[0][k])
        np.testing.assert_allclose(lines[f"density|{k}"].get_ydata(), expected)
    assert sum(ax.get_visible() for ax in many.axes) == 5


def test_plain_dirichlet_json_is_accepted(tmp_path):
    from llmprobe.bayes import DirichletFit

    path = tmp_path / "d.json"
    path.write_text(json.dumps(DirichletFit(np.array([1.0, 2.0]), -1.0, 5.0, 1, True).to_dict()))
    prior = read_prior(str(path))
    assert prior.alphas.tolist() == [[1.0, 2.0]] and prior.categories == ["category 1", "category 2"]


@pytest.mark.parametrize("content, needle", [
    ("not json", "not JSON"),
    ('{"format": "x"}', "not a fitted prior"),
    ('{"alphas": [[1, -2]], "weights": [1]}', "positive"),
    ('{"alphas": [[1, 2]], "weights": [0.5]}', "summing to 1"),
    ('{"alpha": [1, 2], "categories": ["a"]}', "categories"),
])
def test_plot_prior_bad_inputs(tmp_path, capsysbinary, monkeypatch, content, needle):
    path = tmp_path / "prior.json"
    path.write_text(content)
    code, _, err = run_cli(["plot-prior", str(path), "-o", str(tmp_path / "p.png")], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "prior.json", needle)
    assert not (tmp_path / "p.png").exists()


def test_plot_prior_cli(tmp_path, capsysbinary, monkeypatch):
    path = mixture_prior_json(tmp_path / "prior.json", [0.6, 0.4], [[8.0, 3.0, 2.0], [1.5, 2.0, 9.0]], "xyz")
    code, out, _ = run_cli(["plot-prior", str(path)], capsysbinary, monkeypatch)
    assert code == 0 and out == b""
    is_png(tmp_path / "prior.prior.png")
    code, _, err = run_cli(["plot-prior", str(tmp_path / "missing.json")], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "missing.json", "no such file")
