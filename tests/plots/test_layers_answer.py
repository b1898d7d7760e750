"""``plot-layers`` fills the answer position (issue 16, item 4): after the prompt's last token nothing
follows, so that column shows the lens probability of the model's answer (its output-layer top-1)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmprobe.plots.layers import next_token_grid
from llmprobe.tracing.reader import open_trace, read_trace
from tests.cli_helpers import run_cli


def lens_trace(tiny_model_dir, tmp_path, capsysbinary, monkeypatch, top_k: int, targets: str | None = None):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\n")
    path = tmp_path / f"lens-{top_k}-{bool(targets)}.parquet"
    code, _, err = run_cli(["trace", str(prompts), "--model", str(tiny_model_dir), "--layers", "all", "--top-k",
                            str(top_k), *(["--targets", targets] if targets else []), "-o", str(path), "-q"],
                           capsysbinary, monkeypatch)
    assert code == 0, err
    return path


def grid_of(path, target_ids=()):
    frame = read_trace(path)
    frame = frame[frame["phase"] == "prompt"].sort_values(["layer", "position"])
    return frame, next_token_grid(frame, list(target_ids), open_trace(path).vocab)


def test_the_answer_column_is_the_answer_probability_per_layer(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    vocab_size = 320  # the tiny model's: every token is in the top-k, so every cell is known exactly
    path = lens_trace(tiny_model_dir, tmp_path, capsysbinary, monkeypatch, top_k=vocab_size)
    frame, (layers, positions, probs, answers) = grid_of(path)
    last = int(positions[-1])
    assert list(answers) == [last]  # only the last position has no next token
    assert np.isfinite(probs).all()  # no blank column
    output = frame[(frame["layer"] == layers[-1]) & (frame["position"] == last)].iloc[0]
    answer = int(output["topk_ids"][0])
    assert answers[last] == open_trace(path).vocab[answer]
    for i, layer in enumerate(layers):
        row = frame[(frame["layer"] == layer) & (frame["position"] == last)].iloc[0]
        expected = math.exp(row["topk_logprobs"][list(row["topk_ids"]).index(answer)])
        assert probs[i, -1] == pytest.approx(expected, rel=1e-6)
    assert probs[-1, -1] == pytest.approx(math.exp(output["topk_logprobs"][0]))
    # the other columns are still the actual next token's probability
    first = frame[(frame["layer"] == layers[0]) & (frame["position"] == positions[0])].iloc[0]
    assert probs[0, 0] == pytest.approx(math.exp(first["next_logprob"]))


def test_below_the_top_k_is_marked_and_targets_are_exact(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    path = lens_trace(tiny_model_dir, tmp_path, capsysbinary, monkeypatch, top_k=1)
    frame, (layers, positions, probs, answers) = grid_of(path)
    last = frame[frame["position"] == positions[-1]].sort_values("layer")
    answer = int(last["topk_ids"].iloc[-1][0])
    is_top = np.array([int(ids[0]) == answer for ids in last["topk_ids"]])
    assert np.isfinite(probs[is_top, -1]).all() and np.isnan(probs[~is_top, -1]).all()
    # the answer given as a target: its first-token probability is exact at every layer
    text = answers[int(positions[-1])]
    with_target = lens_trace(tiny_model_dir, tmp_path, capsysbinary, monkeypatch, top_k=1, targets=text)
    ids = [t["token_ids"][0] for t in open_trace(with_target).meta["targets"]]
    if ids != [answer]:
        pytest.skip(f"the answer {text!r} does not round-trip through the tokenizer as one token")
    frame, (_, _, probs, _) = grid_of(with_target, ids)
    expected = np.exp([lp[0] for lp in frame[frame["position"] == positions[-1]].sort_values("layer")
                       ["target_logprobs"]])
    np.testing.assert_allclose(probs[:, -1], expected, rtol=1e-6)


def test_plot_layers_labels_the_answer(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    path = lens_trace(tiny_model_dir, tmp_path, capsysbinary, monkeypatch, top_k=3)
    code, _, err = run_cli(["plot-layers", str(path), "-o", str(tmp_path / "layers.png")], capsysbinary, monkeypatch)
    assert code == 0, err
    assert "after the last token the answer" in err and (tmp_path / "layers.png").stat().st_size > 0


@pytest.mark.real_model
def test_real_model_answer_column_is_paris(real_loaded, tmp_path):
    """SmolLM2: after "The capital of France is" the answer " Paris" forms only in the last layers."""
    from llmprobe.tracing.run import TraceRun
    from llmprobe.tracing.settings import TraceSettings
    from llmprobe.tracing.writer import open_trace_sink
    from tests.plots.fixtures import text_records

    path = tmp_path / "lens.parquet"
    records = text_records(["The capital of France is"])
    run = TraceRun(TraceSettings(top_k=5, targets=[" Paris"], layers="20,26,28"), records).start(real_loaded)
    with open_trace_sink(str(path), "parquet", run.schema, run.metadata(), run.vocab) as sink:
        for batch in run.batches():
            sink.write(batch)
    target_ids = [t["token_ids"][0] for t in open_trace(path).meta["targets"]]
    frame, (layers, positions, probs, answers) = grid_of(path, target_ids)
    assert answers == {int(positions[-1]): " Paris"} and np.isfinite(probs[:, -1]).all()  # exact, via the target
    assert list(layers) == [20, 26, 28, 29]  # the output layer is always included
    assert probs[-1, -1] == pytest.approx(0.773, abs=0.01) and probs[:2, -1].max() < 0.01  # docs/analyses.md
    assert probs[2, -1] == pytest.approx(0.070, abs=0.01)
