"""The report leads with the answer (issue 16, item 11): verdict and key numbers, the in-context figure,
prompts of different θ, then the details collapsed and rounded."""

from __future__ import annotations

import re

import numpy as np

from tests.analysis.test_fits import coin_records, synthetic_trace
from tests.cli_helpers import run_cli


def test_report_opens_with_the_verdict(tmp_path, capsysbinary, monkeypatch):
    trace = synthetic_trace(tmp_path / "coin.parquet", coin_records(sequences=2, n_max=6), np.array([2.0, 3.0]), 0.8)
    fit = tmp_path / "fit.parquet"
    code, _, err = run_cli(["fit-posterior", str(trace), "--bootstrap", "20", "-o", str(fit), "-q"], capsysbinary,
                           monkeypatch)
    assert code == 0, err
    out = tmp_path / "r.html"
    code, _, err = run_cli(["report", str(trace), str(fit), "-o", str(out), "--max-prompts", "3", "-q"],
                           capsysbinary, monkeypatch)
    assert code == 0, err
    html = out.read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", html)
    assert headings[0] == "Answer" and headings[-1] == "Details"
    answer = html[html.index("<h2>Answer</h2>"):html.index("<h2>", html.index("<h2>Answer</h2>") + 5)]
    assert "exact Bayesian updating is rejected" in answer and "γ = 0.8" in answer  # planted γ = 0.8
    assert html.index("in-context learning curves") < html.index("top-10 candidates")
    shown = re.findall(r'alt="top-10 candidates, prompt ([^"]+)"', html)
    thetas = {record["id"]: tuple(record["theta"]) for record in coin_records(sequences=2, n_max=6)}
    assert len(shown) == 3 and len({thetas[p] for p in shown}) == 3  # three different biases, not three alike
    assert min(thetas[p] for p in shown) == min(thetas.values()) and max(thetas[p] for p in shown) == max(thetas.values())
    details = html[html.index("<h2>Details</h2>"):]
    assert details.count("<details>") >= 3 and "Run metadata" in details
    assert not re.search(r"\d\.\d{8,}", html), "numbers are rounded"
