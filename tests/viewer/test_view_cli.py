"""``llmprobe view`` without a browser: the data model holds the trace's numbers, the page is escaped and
sealed, and every bad input is one line with nothing written."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import llmprobe.files
from llmprobe.tracing.reader import open_trace, read_trace
from llmprobe.viewer.assets import SCRIPT, STYLE
from llmprobe.viewer.columns import untyped
from llmprobe.viewer.data import page_data
from llmprobe.viewer.page import DATA_ELEMENT, json_block, render_page, Sanitizer
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.plots.fixtures import text_records, write_trace
from tests.viewer.fixtures import coin_trace_and_fit, decoded_rows


@pytest.fixture(scope="module")
def coin(tiny_loaded, tmp_path_factory):
    return coin_trace_and_fit(tiny_loaded, tmp_path_factory.mktemp("coin"), sequences=1, n_max=3)


def page_json(html: str) -> dict:
    block = re.search(rf'<script type="application/json" id="{DATA_ELEMENT}">(.*?)</script>', html, re.S).group(1)
    return json.loads(block)


def test_the_data_model_holds_the_trace_exactly(coin):
    trace_path, _ = coin
    frame = read_trace(trace_path)
    data = page_data(open_trace(trace_path))
    rows = decoded_rows(data)
    tokens = data["tokens"]
    assert len(tokens) == len(set(tokens))  # each string once
    k = data["top_k"]
    order = frame.sort_values(["prompt_index", "position"])
    np.testing.assert_array_equal(rows["topk_logprob"].reshape(-1, k), np.stack(order["topk_logprobs"]))
    assert [[tokens[i] for i in row] for row in rows["topk"].reshape(-1, k)] == \
        [list(t) for t in order["topk_tokens"]]
    assert [tokens[i] for i in rows["token"]] == order["token"].tolist()
    assert [None if i == data["none"] else tokens[i] for i in rows["next"]] == \
        [None if not isinstance(t, str) else t for t in order["next_token"]]
    np.testing.assert_array_equal(rows["entropy"], order["entropy"].to_numpy(np.float32))
    np.testing.assert_array_equal(rows["next_rank"], order["next_rank"].fillna(0).to_numpy(np.int32))
    np.testing.assert_array_equal(rows["target_logprob"].reshape(-1, 2), np.stack(order["target_logprobs"]))
    seq = rows["target_seq_logprob"].reshape(-1, 2)
    for got, want in zip(seq, order["target_seq_logprobs"]):
        np.testing.assert_array_equal(got, np.full(2, np.nan, np.float32) if want is None else want)
    # prompts in input order, one slice each, marks where the trace has them
    assert [p["id"] for p in data["prompts"]] == list(dict.fromkeys(order["prompt_id"]))
    marks = order[order["mark_index"].notna()]
    assert sum(len(p["marks"]) for p in data["prompts"]) == len(marks)
    assert data["prompts"][0]["marks"][0] == [int(marks["position"].iloc[0]), marks["mark"].iloc[0]]


def test_the_fit_entry_is_the_fit_tables_numbers(coin):
    from llmprobe.analysis.results import gamma_test_line, verdict_line
    from llmprobe.plots.icl import open_fit

    trace_path, fit_path = coin
    fit = open_fit(str(fit_path))
    page = page_data(open_trace(trace_path), fit)
    data = page["fit"]
    assert data["verdict"] == verdict_line(fit.summaries[0]) and data["gamma_test"] == gamma_test_line(fit.summaries[0])
    table = fit.frame
    columns = {name: untyped(spec) for name, spec in data["marks"].items() if isinstance(spec, dict)}
    k = len(data["categories"])
    assert data["marks"]["count"] == len(table.drop_duplicates(["prompt_id", "position"]))
    for i in range(data["marks"]["count"]):
        prompt_id = page["prompts"][columns["prompt"][i]]["id"]
        rows = table[(table["prompt_id"] == prompt_id) & (table["position"] == columns["position"][i])]
        rows = rows.set_index("category").loc[data["categories"]]
        for name, key in (("model_prob",) * 2, ("bayes_prob",) * 2, ("theta",) * 2, ("count", "counts")):
            assert columns[key][i * k:(i + 1) * k].tolist() == rows[name].tolist(), name
        for name in ("kl_bits", "tv", "mass", "n"):
            assert columns[name][i] == rows[name].iloc[0], name
        assert data["sequences"][columns["sequence"][i]] == str(rows["sequence"].iloc[0])


def test_json_block_cannot_end_its_script_element():
    nasty = "</script><!-- <script>alert(1)</script> & \u2028 \u2029 \ud800 'quote\" </SCRIPT >"
    clean = Sanitizer()
    block = json_block({"text": nasty, "keys": {nasty: [nasty]}}, clean)
    assert "<" not in block and ">" not in block and "&" not in block
    assert "\u2028" not in block and "\u2029" not in block
    assert json.loads(block) == {"text": nasty.replace("\ud800", "\ufffd"),
                                 "keys": {nasty.replace("\ud800", "\ufffd"): [nasty.replace("\ud800", "\ufffd")]}}
    assert clean.replaced == 3
    html = render_page({"format": 1, "text": nasty, "fit": None}, title=nasty, subtitle=nasty)
    html.encode("utf-8")  # no lone surrogate left
    assert html.count("<script") == 2 and html.count("</script>") == 2
    assert "lone surrogates" in html and page_json(html)["text"] == nasty.replace("\ud800", "\ufffd")


def test_the_content_security_policy_allows_exactly_the_inline_script_and_style(coin):
    trace_path, fit_path = coin
    data = page_data(open_trace(trace_path))
    for live in (False, True):
        html = render_page(data, title="t", live=live)
        policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html).group(1)
        policy = policy.replace("&#x27;", "'")
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives["default-src"] == "'none'" and directives["img-src"] == "data:"
        assert ("connect-src" in directives) == live and directives.get("connect-src", "'self'") == "'self'"
        inline_script = re.findall(r"<script>(.*?)</script>", html, re.S)
        inline_style = re.findall(r"<style>(.*?)</style>", html, re.S)
        assert inline_script == [SCRIPT] and inline_style == [STYLE]
        for text, directive in ((SCRIPT, "script-src"), (STYLE, "style-src")):
            digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
            assert directives[directive] == f"'sha256-{digest}'"
        assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)  # nothing to fetch


def test_view_writes_one_page_and_refuses_to_replace_it(coin, tmp_path, capsysbinary, monkeypatch):
    trace_path, fit_path = coin
    out = tmp_path / "page.html"
    code, _, err = run_cli(["view", str(trace_path), str(fit_path), "-o", str(out)], capsysbinary, monkeypatch)
    assert code == 0, err
    assert f"wrote {out}" in err
    assert page_json(out.read_text())["fit"]["verdict"].startswith("verdict ")
    before = out.read_bytes()
    code, _, err = run_cli(["view", str(trace_path), "-o", str(out)], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, str(out), "--force")
    assert out.read_bytes() == before
    code, _, err = run_cli(["view", str(trace_path), "-o", str(out), "--force", "-q"], capsysbinary, monkeypatch)
    assert code == 0 and err == "" and page_json(out.read_text())["fit"] is None


def tampered_fit(fit_path, out, change) -> str:
    table = pq.read_table(fit_path)
    frame = change(table.to_pandas())
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(table.schema.metadata),
                   out)
    return str(out)


@pytest.mark.parametrize("case,needles", [
    ("missing trace", ["no such trace file"]),
    ("corrupt trace", ["not a Parquet file"]),
    ("not a fit", ["not a fit-posterior table"]),
    ("fit of another model", ["is a fit of 'other-model'", "not of this trace"]),
    ("fit of other prompts", ["is not a fit of this trace", "prompt 'coin-other'"]),
    ("fit of other numbers", ["is not a fit of this trace", "model probability"]),
    ("fit of a trace without marks", ["is not a fit of this trace"]),
    ("unwritable output", ["is not writable"]),
    ("missing directory", ["does not exist"]),
    ("not html", ["name it *.html"]),
])
def test_bad_input_is_one_line_and_nothing_is_written(case, needles, coin, tiny_loaded, tmp_path, capsysbinary,
                                                      monkeypatch):
    trace_path, fit_path = coin
    out = tmp_path / "out" / "page.html"
    out.parent.mkdir()
    trace, fit = str(trace_path), str(fit_path)
    if case == "missing trace":
        trace = str(tmp_path / "nope.parquet")
    elif case == "corrupt trace":
        (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really" * 10)
        trace = str(tmp_path / "bad.parquet")
    elif case == "not a fit":
        fit = trace
    elif case == "fit of another model":
        fit = tampered_fit(fit_path, tmp_path / "f.parquet", lambda f: f.assign(trace="other-model"))
    elif case == "fit of other prompts":
        fit = tampered_fit(fit_path, tmp_path / "f.parquet", lambda f: f.assign(
            prompt_id=f["prompt_id"].where(f["prompt_id"] != f["prompt_id"].iloc[-1], "coin-other")))
    elif case == "fit of other numbers":
        fit = tampered_fit(fit_path, tmp_path / "f.parquet", lambda f: f.assign(
            model_prob=f["model_prob"] * np.where(np.arange(len(f)) == 2, 1 - 1e-5, 1.0)))
    elif case == "fit of a trace without marks":
        trace = str(write_trace(tiny_loaded, tmp_path / "text.parquet", text_records(), top_k=3))
    elif case == "unwritable output":
        monkeypatch.setattr(llmprobe.files.os, "access", lambda path, mode: mode != llmprobe.files.os.W_OK)
    elif case == "missing directory":
        out = tmp_path / "no-such-dir" / "page.html"
    elif case == "not html":
        out = out.with_suffix(".png")
    code, _, err = run_cli(["view", trace, fit, "-o", str(out)], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_a_write_that_fails_leaves_nothing(coin, tmp_path, capsysbinary, monkeypatch):
    import errno
    import os

    trace_path, fit_path = coin

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(llmprobe.files.os, "fsync", full)
    code, _, err = run_cli(["view", str(trace_path), str(fit_path), "-o", str(tmp_path / "p.html")], capsysbinary,
                           monkeypatch)
    assert_one_line_error(code, err, "No space left on device", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_a_trace_from_stdin_needs_an_output(coin, capsysbinary, monkeypatch):
    trace_path, _ = coin
    code, _, err = run_cli(["view", "-"], capsysbinary, monkeypatch, stdin=trace_path.read_bytes())
    assert_one_line_error(code, err, "-o", "stdin")


def test_typed_arrays_round_trip_exactly():
    from llmprobe.viewer.columns import typed

    rng = np.random.default_rng(0)
    for kind, values in (("f32", rng.normal(size=1000).astype(np.float32)), ("f64", rng.normal(size=7)),
                         ("u16", rng.integers(0, 65535, 99)), ("u32", rng.integers(0, 2**32 - 1, 5)),
                         ("i32", rng.integers(-2**31, 2**31 - 1, 5)), ("u8", rng.integers(0, 255, 3)),
                         ("f32", np.array([np.nan, -np.inf, 0.0], np.float32)), ("u16", np.array([], np.int64))):
        back = untyped(typed(values, kind))
        np.testing.assert_array_equal(back, np.asarray(values).astype(back.dtype))


def test_sizes_stay_compact(coin):
    """Token strings once, float32 deflated: a row costs a few bytes per candidate (bench_view.py measures 20,000)."""
    trace_path, _ = coin
    data = page_data(open_trace(trace_path))
    rows = data["rows"]["count"]
    per_row = len(json.dumps(data)) / rows
    assert per_row < 8 * data["top_k"] + 100, per_row
    assert len(untyped(data["rows"]["topk_logprob"])) == rows * data["top_k"]
