"""The logit lens and prompt embeddings (llmprobe/unembed.py, lens.py, plots_layers.py).

References are computed without llmprobe's hooks: ``output_hidden_states=True`` gives each decoder
layer's output (hidden_states[i + 1] for layer i < L - 1), sent through the model's own final norm
and head, then ``log_softmax`` in float64, one unpadded prompt at a time.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from llmprobe.errors import UsageError
from llmprobe.tracing.reduction import LogitReducer
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from llmprobe.tracing.lens import lens_stats, parse_layers, probe_internals
from llmprobe.tracing.prompts import PromptRecord
from llmprobe.model.structure import Unembed
from tests.cli_helpers import assert_one_line_error, run_cli

PROMPTS = [
    "The capital of France is",
    "I just flipped a coin, and it came up heads, then tails, then",
    "Once upon a time",
    "blick means zorp. dax means",
]
TARGETS = [" heads", " tails"]
TOL = 1e-4






def last_layer_logits_and_unembed(loaded, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits, and Unembed applied to what a hook on the last decoder layer saw."""
    model = loaded.model
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
    seen = []
    handle = model.model.layers[-1].register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids).logits
            return logits, Unembed(model)(seen[0])
    finally:
        handle.remove()


def records(texts=PROMPTS, marks=None) -> list[PromptRecord]:
    return [PromptRecord(index=i, id=f"p{i}", text=t, line=i + 1, marks=(marks or {}).get(i, []))
            for i, t in enumerate(texts)]


def trace_table(loaded, settings: TraceSettings, recs=None) -> pa.Table:
    return TraceRun(settings, recs or records()).start(loaded).table()


def sorted_rows(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: (r["prompt_index"], r.get("layer", 0), r["position"]))


def per_layer_reference(loaded, ids: list[int]) -> list[np.ndarray]:
    """log P(. | x_0..x_i) read from each decoder layer's output, float64, [L][T, V]."""
    model = loaded.model
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        layers = [model.lm_head(model.model.norm(h))[0] for h in out.hidden_states[1:-1]]
        layers.append(out.logits[0])  # the last layer's output is normed inside the model
    return [torch.log_softmax(x.double(), dim=-1).numpy() for x in layers]


def test_unembed_of_the_last_layer_output_equals_the_model_logits(tiny_loaded):
    logits, again = last_layer_logits_and_unembed(tiny_loaded, PROMPTS[1])
    assert torch.equal(again, logits)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_every_lens_row_matches_an_independent_per_layer_computation(tiny_loaded, batch_size):
    table = trace_table(tiny_loaded, TraceSettings(top_k=5, targets=TARGETS, layers="all", batch_size=batch_size))
    rows = sorted_rows(table)
    num_layers = tiny_loaded.model.config.num_hidden_layers
    target_ids = [tiny_loaded.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in TARGETS]
    lengths = [len(tiny_loaded.tokenizer(t)["input_ids"]) for t in PROMPTS]
    assert len(rows) == num_layers * sum(lengths)
    for index, text in enumerate(PROMPTS):
        ids = tiny_loaded.tokenizer(text)["input_ids"]
        reference = per_layer_reference(tiny_loaded, ids)
        for row in (r for r in rows if r["prompt_index"] == index):
            lp = reference[row["layer"]][row["position"]]
            order = np.argsort(-lp, kind="stable")[:5]
            np.testing.assert_allclose(row["topk_logprobs"], lp[order], atol=TOL)
            np.testing.assert_allclose(lp[row["topk_ids"]], lp[order], atol=TOL)
            assert row["entropy"] == pytest.approx(-(np.exp(lp) * lp).sum(), abs=TOL)
            np.testing.assert_allclose(row["target_logprobs"], lp[target_ids], atol=TOL)
            if row["position"] + 1 < len(ids):
                nxt = ids[row["position"] + 1]
                assert row["next_token_id"] == nxt
                assert row["next_logprob"] == pytest.approx(lp[nxt], abs=TOL)
                assert row["next_rank"] == 1 + int((lp > lp[nxt] + 1e-9).sum())
            else:
                assert row["next_token_id"] is None
            if row["layer"] != num_layers - 1:
                assert row["target_seq_logprobs"] is None  # whole-string scores belong to the model's output


def test_output_layer_rows_equal_the_plain_trace_exactly(tiny_loaded):
    plain = sorted_rows(trace_table(tiny_loaded, TraceSettings(top_k=6, targets=TARGETS, batch_size=3)))
    lens = trace_table(tiny_loaded, TraceSettings(top_k=6, targets=TARGETS, batch_size=3, layers="0"))
    assert sorted(set(lens.column("layer").to_pylist())) == [0, 2]  # the output layer is always written
    output_rows = [r for r in sorted_rows(lens) if r["layer"] == 2]
    for row in output_rows:
        del row["layer"]
    assert output_rows == plain


def test_lens_statistics_do_not_depend_on_the_chunk_size(tiny_loaded):
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, tiny_loaded.model.config.hidden_size)
    next_ids = torch.randint(0, tiny_loaded.vocab_size, (2, 9))
    unembed = Unembed(tiny_loaded.model)
    with torch.inference_mode():
        whole = lens_stats(unembed, LogitReducer(4, [5, 7], chunk_positions=512), hidden, next_ids)
        pieces = lens_stats(unembed, LogitReducer(4, [5, 7], chunk_positions=3), hidden, next_ids)
    for name in ("entropy", "topk_logprobs", "next_logprob", "target_logprobs"):
        torch.testing.assert_close(getattr(pieces, name), getattr(whole, name), atol=1e-5, rtol=1e-5)
    assert torch.equal(pieces.topk_ids, whole.topk_ids) and torch.equal(pieces.next_rank, whole.next_rank)


def test_hooks_are_removed_on_every_exit_path(tiny_loaded):
    model = tiny_loaded.model
    layers, head = model.model.layers, model.get_output_embeddings()
    count = lambda: (sum(len(m._forward_hooks) for m in layers), len(head._forward_pre_hooks))  # noqa: E731
    before = count()
    with pytest.raises(RuntimeError, match="boom"):
        with probe_internals(model, LogitReducer(3), [0, 1, 2], embed_at=([0], [0])):
            assert count() == (before[0] + 3, before[1] + 1)
            raise RuntimeError("boom")
    assert count() == before
    trace_table(tiny_loaded, TraceSettings(top_k=2, layers="all", save_embeddings=True))
    assert count() == before


def test_embeddings_are_the_final_normed_state_at_marks_else_the_last_position(tiny_loaded):
    text = PROMPTS[1]
    marks = {1: [{"offset": text.index(" heads")}, {"offset": len(text)}]}
    table = trace_table(tiny_loaded, TraceSettings(top_k=3, save_embeddings=True, batch_size=4),
                        records(marks=marks))
    meta_dim = table.schema.field("embedding").type.list_size
    assert meta_dim == tiny_loaded.model.config.hidden_size
    rows = sorted_rows(table)
    for index, prompt in enumerate(PROMPTS):
        ids = tiny_loaded.tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            normed = tiny_loaded.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
        mine = [r for r in rows if r["prompt_index"] == index]
        kept = [r["position"] for r in mine if r["embedding"] is not None]
        expected = [r["position"] for r in mine if r["mark_index"] is not None] or [len(ids) - 1]
        assert kept == expected
        for position in kept:
            stored = np.asarray(mine[position]["embedding"], dtype=np.float32)
            np.testing.assert_allclose(stored, normed[position], rtol=1e-3, atol=1e-4)  # float16 rounding


def test_layer_option_is_checked_before_and_after_the_model_loads(tiny_loaded):
    assert parse_layers(" 2,0,2 ", 3) == [0, 2]
    assert parse_layers("ALL", 3) == [0, 1, 2]
    with pytest.raises(UsageError, match="out of range.*0..2"):
        TraceRun(TraceSettings(layers="3"), []).start(tiny_loaded)
    # the library names its parameter (layers); the CLI shows its flag (--layers)
    with pytest.raises(UsageError, match="^layers: .*'x'"):
        TraceSettings(layers="0,x").validate()
    with pytest.raises(UsageError, match="^layers: .*out of range"):
        TraceSettings(layers="-1").validate()
    with pytest.raises(UsageError, match="^layers: .*prompt positions only"):
        TraceSettings(layers="0", max_new_tokens=2).validate()


def test_cli_lens_trace_and_plot(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\nOnce upon a time\n")
    trace = tmp_path / "lens.parquet"
    code, _, err = run_cli(["trace", str(prompts), "-o", str(trace), "--model", str(tiny_model_dir), "--layers",
                            "0,1", "--targets", " heads, tails", "-q"], capsysbinary, monkeypatch)
    assert code == 0, err
    image = tmp_path / "layers.png"
    code, stdout, err = run_cli(["plot-layers", str(trace), "--prompt", "1", "-o", str(image)], capsysbinary,
                                monkeypatch)
    assert code == 0, err
    assert stdout == b"" and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "3 layers x" in err
    code, _, err = run_cli(["plot-layers", str(trace), "--prompt", "1", "--show", "targets", "-o",
                            str(tmp_path / "t.svg")], capsysbinary, monkeypatch)
    assert code == 0, err
    assert (tmp_path / "t.svg").read_text().lstrip().startswith("<?xml")
    code, _, err = run_cli(["plot-layers", str(trace), "-o", str(tmp_path / "x.png")], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "--prompt", "2 prompts")
    code, _, err = run_cli(["plot-layers", str(trace), "--prompt", "9", "-o", str(tmp_path / "x.png")],
                           capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "no prompt '9'")
    assert not (tmp_path / "x.png").exists()
    plain = tmp_path / "plain.parquet"
    run_cli(["trace", str(prompts), "-o", str(plain), "--model", str(tiny_model_dir), "-q"], capsysbinary, monkeypatch)
    code, _, err = run_cli(["plot-layers", str(plain), "--prompt", "1", "-o", str(tmp_path / "x.png")],
                           capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "no layer column")
    code, _, err = run_cli(["trace", str(prompts), "-o", str(tmp_path / "y.parquet"), "--model", str(tiny_model_dir),
                            "--layers", "5"], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "--layers", "out of range")
    assert not (tmp_path / "y.parquet").exists()


@pytest.mark.real_model
def test_real_model_lens_output_layer_is_the_trace_and_the_answer_forms_late(real_loaded):
    logits, again = last_layer_logits_and_unembed(real_loaded, "The capital of France is")
    assert torch.equal(again, logits)
    settings = dict(top_k=10, targets=[" Paris"])
    recs = records(["The capital of France is"])
    plain = sorted_rows(trace_table(real_loaded, TraceSettings(**settings), recs))
    lens = sorted_rows(trace_table(real_loaded, TraceSettings(**settings, layers="0,15"), recs))
    last = real_loaded.model.config.num_hidden_layers - 1
    output_rows = [dict(r) for r in lens if r["layer"] == last]
    for row in output_rows:
        del row["layer"]
    assert output_rows == plain
    paris = {r["layer"]: float(np.exp(r["target_logprobs"][0])) for r in lens if r["position"] == len(plain) - 1}
    assert sorted(paris) == [0, 15, last]
    # SmolLM2-135M: P(" Paris") is ~0 through layer 15 and about 0.77 at the output.
    assert paris[last] > 0.5 and paris[0] < 0.01 and paris[15] < paris[last]
    print(json.dumps({"p_paris_by_layer": paris}))
