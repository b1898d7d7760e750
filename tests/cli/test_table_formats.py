"""``--format table|tsv|json`` on every command that prints a table (issue 16, item 2): piped output that a
program can read, numbers never cut. tsv: a header line, then tab-separated rows at full precision."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmprobe.analysis.fit_tables import summarize_by_n
from llmprobe.cli.output import tsv_text
from tests.analysis.fixtures import bayesian, records, write_trace
from tests.cli_helpers import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]


def parse_tsv(data: bytes) -> list[dict[str, str]]:
    """The documented format, read without pandas: one header line, one line per row, one tab per cell."""
    lines = data.decode().splitlines()
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    assert rows and all(len(row) == len(header) for row in rows), "every row has a cell per column"
    return [dict(zip(header, row)) for row in rows]


def unescape(cell: str) -> str:
    out, chars = [], iter(cell)
    for ch in chars:
        if ch != "\\":
            out.append(ch)
            continue
        code = next(chars)
        out.append(chr(int("".join(next(chars) for _ in range(4)), 16)) if code == "u"
                   else {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}[code])
    return "".join(out)


@pytest.fixture
def coin(tmp_path) -> Path:
    return write_trace(tmp_path / "coin.parquet", records("coin", sequences=4, n_max=5), bayesian([1.0], [[2.0, 3.0]]))


def test_fit_posterior_tsv_is_the_per_n_table_at_full_precision(coin, tmp_path, capsysbinary, monkeypatch):
    fit = tmp_path / "fit.parquet"
    code, stdout, err = run_cli(["fit-posterior", str(coin), "--bootstrap", "5", "--format", "tsv", "-o", str(fit)],
                                capsysbinary, monkeypatch)
    assert code == 0, err
    assert "by number of examples" in err  # the human tables moved to stderr, as with --json
    rows = parse_tsv(stdout)
    expected = summarize_by_n(pd.read_parquet(fit))
    assert [r["category"] for r in rows] == expected["category"].tolist()
    for column in ("model_prob", "bayes_prob", "tv", "kl_bits", "mass"):
        # repr round-trips: the printed number is the float itself, not a rounding of it
        assert [float(r[column]) for r in rows] == expected[column].tolist()
    assert any(len(r["model_prob"].split(".")[-1]) > 6 for r in rows) and "…" not in stdout.decode()
    parsed = pd.read_csv(io.BytesIO(stdout), sep="\t")  # and pandas reads it as it is
    assert parsed.shape == expected.shape and parsed["n"].dtype.kind == "i"


def test_format_json_is_json(coin, capsysbinary, monkeypatch):
    args = ["fit-posterior", str(coin), "--bootstrap", "5", "-q"]
    code, by_format, err = run_cli([*args, "--format", "json"], capsysbinary, monkeypatch)
    assert code == 0, err
    code, by_flag, _ = run_cli([*args, "--json"], capsysbinary, monkeypatch)
    assert by_format == by_flag and json.loads(by_format)[0]["verdict"]


def test_fit_prior_tsv_is_the_components(coin, tmp_path, capsysbinary, monkeypatch):
    prior = tmp_path / "prior.json"
    code, stdout, err = run_cli(["fit-prior", str(coin), "--components", "2", "--format", "tsv", "-o", str(prior)],
                                capsysbinary, monkeypatch)
    assert code == 0, err
    rows = parse_tsv(stdout)
    mixture = json.loads(prior.read_text())["mixture"]
    assert [float(r["weight"]) for r in rows] == mixture["weights"]
    assert [[float(r["alpha_heads"]), float(r["alpha_tails"])] for r in rows] == mixture["alphas"]
    # without -o the prior JSON is not mixed into the tsv
    code, stdout, _ = run_cli(["fit-prior", str(coin), "--format", "tsv", "-q"], capsysbinary, monkeypatch)
    assert code == 0 and stdout.startswith(b"component\tweight\talpha0\t") and b"{" not in stdout


def test_inspect_tsv_has_a_row_per_position(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    from llmprobe.tracing.reader import read_trace

    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\nOnce upon a time\n")
    trace = tmp_path / "t.parquet"
    code, _, err = run_cli(["trace", str(prompts), "--model", str(tiny_model_dir), "--top-k", "4", "-o", str(trace),
                            "-q"], capsysbinary, monkeypatch)
    assert code == 0, err
    code, stdout, err = run_cli(["inspect", str(trace), "--format", "tsv", "--top-k", "3"], capsysbinary, monkeypatch)
    assert code == 0 and err == "", err
    rows, frame = parse_tsv(stdout), read_trace(trace)
    assert len(rows) == len(frame)
    for row, actual in zip(rows, frame.itertuples()):
        assert unescape(row["token"]) == actual.token and int(row["top1_id"]) == int(actual.topk_ids[0])
        assert float(row["top1_prob"]) == math.exp(float(actual.topk_logprobs[0]))
        if pd.isna(actual.next_logprob):  # the last position: nothing follows, the cells are empty
            assert row["next_prob"] == row["next_rank"] == ""
        else:
            assert float(row["next_prob"]) == math.exp(float(actual.next_logprob))
            assert row["next_rank"] == str(int(actual.next_rank))  # an integer, not 2.0


def test_models_tsv_lists_the_cached_conversions(capsysbinary, monkeypatch):
    code, stdout, err = run_cli(["models", "--format", "tsv"], capsysbinary, monkeypatch)
    assert code == 0, err
    code, listing, _ = run_cli(["models", "--json"], capsysbinary, monkeypatch)
    cached = json.loads(listing)["cached"]
    assert stdout.decode().splitlines()[0] == "source\tsource_sha256\tquantization\tbytes\tconverted_utc\tpath"
    rows = parse_tsv(stdout) if cached else []
    assert [int(r["bytes"]) for r in rows] == [c["bytes"] for c in cached]


def test_continuity_tsv_holds_the_json_numbers(tiny_loaded, tmp_path, capsysbinary, monkeypatch):
    from llmprobe.tracing.prompts import read_prompts
    from llmprobe.tracing.run import TraceRun
    from llmprobe.tracing.settings import TraceSettings
    from llmprobe.tracing.writer import open_trace_sink

    path = tmp_path / "emb.parquet"
    prompts = read_prompts(str(ROOT / "configs" / "prompts" / "continuity.jsonl"))[:8]
    run = TraceRun(TraceSettings(top_k=8, save_embeddings=True), prompts).start(tiny_loaded)
    with open_trace_sink(str(path), "parquet", run.schema, run.metadata(), run.vocab) as sink:
        for batch in run.batches():
            sink.write(batch)
    code, stdout, err = run_cli(["continuity", str(path), "--format", "tsv"], capsysbinary, monkeypatch)
    assert code == 0, err
    values = {r["measure"]: r["value"] for r in parse_tsv(stdout)}
    code, summary, _ = run_cli(["continuity", str(path), "--json"], capsysbinary, monkeypatch)
    for name, value in json.loads(summary).items():
        if isinstance(value, float):
            assert float(values[name]) == value, name


def test_martingale_tsv_has_a_row_per_n(tiny_model_dir, capsysbinary, monkeypatch):
    args = ["martingale", str(ROOT / "configs/experiments/coin.toml"), "--model", str(tiny_model_dir), "--device",
            "cpu", "--n", "0,2", "--sequences", "1", "--paths", "2", "--bootstrap", "10", "-q"]
    code, stdout, err = run_cli([*args, "--format", "tsv"], capsysbinary, monkeypatch)
    assert code == 0, err
    rows = parse_tsv(stdout)
    code, lines, _ = run_cli([*args, "--json"], capsysbinary, monkeypatch)
    expected = [json.loads(line) for line in lines.decode().splitlines()]
    assert [int(r["n"]) for r in rows] == [0, 2] == [e["n"] for e in expected]
    assert [float(r["p_value"]) for r in rows] == [e["p_value"] for e in expected]
    assert [r["rejected"] for r in rows] == [str(e["rejected"]).lower() for e in expected]


def test_tsv_escapes_text_and_keeps_every_digit():
    frame = pd.DataFrame({"token": ["a\tb", "line\nbreak\\", "\x0c\u2028é"], "p": [1 / 3, np.float32(0.1), np.nan],
                          "rank": pd.array([1, None, 3], dtype="Int64"), "ids": [[1, 2], [], [3]],
                          "ok": [True, False, np.bool_(True)]})
    text = tsv_text(frame)
    lines = text.splitlines()
    assert len(lines) == 4 and all(line.count("\t") == 4 for line in lines)
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    assert [unescape(r["token"]) for r in rows] == ["a\tb", "line\nbreak\\", "\x0c\u2028é"]
    assert len(text.splitlines()) == 4  # Python's splitlines, which also splits at \x0c and \u2028
    assert float(rows[0]["p"]) == 1 / 3 and float(rows[1]["p"]) == float(np.float32(0.1)) and rows[2]["p"] == ""
    assert [r["rank"] for r in rows] == ["1", "", "3"] and json.loads(rows[0]["ids"]) == [1, 2]
    assert [r["ok"] for r in rows] == ["true", "false", "true"]


@pytest.mark.parametrize("command", [["models"], ["inspect", "TRACE"], ["fit-posterior", "TRACE"]])
def test_json_and_tsv_together_are_one_line(command, coin, capsysbinary, monkeypatch):
    args = [str(coin) if a == "TRACE" else a for a in command]
    code, stdout, err = run_cli([*args, "--json", "--format", "tsv"], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "--format", "--json")
    assert stdout == b""
    code, _, err = run_cli([*args, "--format", "csv"], capsysbinary, monkeypatch)
    assert code == 2 and "csv" in err
