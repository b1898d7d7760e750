"""The logit lens in the terminal (issue 16, item 4): a layer x position grid of top-1 tokens, layers in JSON."""

from __future__ import annotations

import json
import math

from llmprobe.tracing.reader import read_trace, visible
from tests.cli_helpers import run_cli


def lens_trace(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    """A logit-lens trace (every layer, top 3) of one prompt on the tiny model, through the CLI."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\n")
    lens = tmp_path / "lens.parquet"
    code, _, err = run_cli(["trace", str(prompts), "--model", str(tiny_model_dir), "--layers", "all", "--top-k", "3",
                            "-o", str(lens), "-q"], capsysbinary, monkeypatch)
    assert code == 0, err
    return lens


def test_inspect_shows_the_lens_grid(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    lens = lens_trace(tiny_model_dir, tmp_path, capsysbinary, monkeypatch)
    code, stdout, err = run_cli(["inspect", str(lens)], capsysbinary, monkeypatch)
    assert code == 0, err
    text = stdout.decode()
    frame = read_trace(lens)
    layers = sorted(set(int(v) for v in frame["layer"]))
    body = [line for line in text.splitlines() if line.startswith("│")]
    assert len(body) == len(layers)  # one row per layer, not one table per layer
    assert body[0].split("│")[1].strip() == f"{layers[-1]} (output)" and body[-1].split("│")[1].strip() == "0"
    first = frame[(frame["layer"] == layers[0]) & (frame["position"] == 0)].iloc[0]
    assert f"{visible(first.topk_tokens[0])} {math.exp(first.topk_logprobs[0]):.2f}" in body[-1]
    code, stdout, _ = run_cli(["inspect", str(lens), "--json"], capsysbinary, monkeypatch)
    rows = [json.loads(line) for line in stdout.decode().splitlines()]
    assert sorted({r["layer"] for r in rows}) == layers and len(rows) == len(frame)


def test_token_figure_of_a_lens_layer_names_the_layer(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    from llmprobe.plots.tokens import figure_title, load_token_grid

    lens = lens_trace(tiny_model_dir, tmp_path, capsysbinary, monkeypatch)
    last = read_trace(lens).attrs["llmprobe"]["num_layers"] - 1
    assert figure_title(load_token_grid(str(lens), None, None, 3, 0), 3).endswith(f"logit lens at layer 0 of 0–{last}")
    assert figure_title(load_token_grid(str(lens), None, None, 3, None), 3).endswith(f"output layer {last}")
