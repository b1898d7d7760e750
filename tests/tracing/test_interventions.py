"""Interventions in the trace engine (issue 22 part 1), each against an independent construction.

Ablations are compared with weight surgery on a deep copy (tests/tracing/surgery.py), a direction
projection with a swapped-in block that projects, a residual patch with the donor's own trace; all
on the split path and the hook path, batched with padding, with generation, multi-token targets and
the logit lens. After every run, failures included, the model's parameters are bit-identical and it
holds no hook.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from llmprobe.errors import UsageError
from llmprobe.model.structure import DecoderBlocks
from llmprobe.tracing import engine
from llmprobe.tracing.editing import Editor, orthonormal_rows
from llmprobe.tracing.interventions import Intervention, describe, parse_ablation, parse_patch
from llmprobe.tracing.prompts import PromptRecord
from llmprobe.tracing.reader import open_trace
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import AUTO, TraceSettings
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.model.comparison import assert_same_rows
from tests.tracing import surgery
from tests.tracing.reference import TARGETS, records

pytestmark = pytest.mark.usefixtures("one_thread")

BATCHED = dict(top_k=4, targets=TARGETS, batch_size=2)  # 5 prompts of different lengths: padded batches
TOL = 1e-5


def trace(loaded, interventions=(), **settings):
    return TraceRun(TraceSettings(**{**BATCHED, **settings}, interventions=list(interventions)),
                    records()).start(loaded).table()


@pytest.fixture(params=[True, False], ids=["split path", "hook path"])
def path(request, monkeypatch):
    if not request.param:
        monkeypatch.setattr(engine, "split_causal_lm", lambda model: (None, "test: the hook path"))
    return request.param


def assert_untouched(loaded, before_parameters, before_hooks):
    after = surgery.parameters_of(loaded.model)
    assert after.keys() == before_parameters.keys()
    assert all(torch.equal(after[k], before_parameters[k]) for k in after)
    assert surgery.attached_hooks(loaded.model) == before_hooks


CASES = [  # (intervention, surgery)
    ("1.2", surgery.zero_head(1, 2)),
    ("0.0", surgery.zero_head(0, 0)),
    ("2.attn", surgery.zero_attention(2)),
    ("0.mlp", surgery.zero_mlp(0)),
    ("1", surgery.skip_block(1)),
]


@pytest.mark.parametrize("spec,operation", CASES, ids=[c[0] for c in CASES])
def test_ablation_equals_weight_surgery(tiny_loaded, path, spec, operation):
    parameters, hooks = surgery.parameters_of(tiny_loaded.model), surgery.attached_hooks(tiny_loaded.model)
    settings = dict(max_new_tokens=3)
    got = trace(tiny_loaded, [parse_ablation(spec)], **settings)
    want = trace(surgery.operated(tiny_loaded, operation), **settings)
    assert_same_rows(got, want, atol=TOL)
    plain = trace(tiny_loaded, **settings)
    assert not np.allclose(got.column("entropy").to_numpy(), plain.column("entropy").to_numpy(), atol=1e-3)
    assert_untouched(tiny_loaded, parameters, hooks)


def test_lens_rows_show_the_intervention(tiny_loaded, path):
    """--layers: every layer's rows, the ablated layer's included, are those of the operated model."""
    got = trace(tiny_loaded, [parse_ablation("1.1"), parse_ablation("2.mlp")], layers="all")
    operated = surgery.operated(tiny_loaded, surgery.zero_head(1, 1), surgery.zero_mlp(2))
    assert_same_rows(got, trace(operated, layers="all"), atol=TOL)


def test_direction_projection_equals_a_projecting_block(tiny_loaded, path, tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2, 48))
    file = tmp_path / "d.npy"
    np.save(file, vectors)
    intervention = Intervention("direction", 1, path=str(file))
    parameters, hooks = surgery.parameters_of(tiny_loaded.model), surgery.attached_hooks(tiny_loaded.model)
    got = trace(tiny_loaded, [intervention], max_new_tokens=2, layers=None)
    q = orthonormal_rows(vectors, "test")
    want = trace(surgery.operated(tiny_loaded, surgery.project_after(1, q)), max_new_tokens=2)
    assert_same_rows(got, want, atol=TOL)
    lens = trace(tiny_loaded, [intervention], layers="all")  # the stream after block 1 holds nothing along Q
    assert_same_rows(lens, trace(surgery.operated(tiny_loaded, surgery.project_after(1, q)), layers="all"), atol=TOL)
    assert_untouched(tiny_loaded, parameters, hooks)


def test_orthonormal_rows_and_refusals():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3, 8))
    q = orthonormal_rows(vectors, "here")
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(q[0], vectors[0] / np.linalg.norm(vectors[0]), atol=1e-12)  # row 0 keeps its direction
    # the span is kept: every input row is a combination of the output rows
    np.testing.assert_allclose(vectors @ q.T @ q, vectors, atol=1e-12)
    for bad, needle in [(np.zeros((1, 8)), "is zero"), (np.stack([vectors[0], 2 * vectors[0]]), "rank-deficient"),
                        (np.full((1, 8), np.nan), "NaN"), (rng.normal(size=(9, 8)), "cannot be independent")]:
        with pytest.raises(UsageError, match=needle):
            orthonormal_rows(bad, "here")


def test_patching_a_prompt_with_itself_is_the_plain_trace_bit_for_bit(tiny_loaded, path, tmp_path):
    donors = tmp_path / "donors.jsonl"
    donors.write_text("".join(json.dumps({"id": r.id, "prompt": r.text}) + "\n" for r in records()))
    single = dict(max_new_tokens=2, targets=[" heads", " then"])  # a patch scores single-token targets only
    plain = trace(tiny_loaded, **single)
    for spec in ("0:all", "2:all", "1:marks", "1:0,-1"):
        assert trace(tiny_loaded, [parse_patch(str(donors), spec)], **single).equals(plain), spec
    assert trace(tiny_loaded, []).equals(trace(tiny_loaded))


def test_patching_the_last_block_moves_the_donors_prediction_over(tiny_loaded, path, tmp_path):
    """Recipient and donor of the same length; after the last block the recipient's stream at p is the
    donor's, so its next-token distribution at p is the donor's (and elsewhere its own)."""
    tokenizer = tiny_loaded.tokenizer
    recipient, donor = "I just flipped a coin, and it came up heads", "I just flipped a coin, and it came up then"
    assert len(tokenizer(recipient)["input_ids"]) == len(tokenizer(donor)["input_ids"])
    donors = tmp_path / "donors.jsonl"
    donors.write_text(json.dumps({"id": "x", "prompt": donor}) + "\n")
    n = len(tokenizer(recipient)["input_ids"])
    settings = TraceSettings(top_k=5, targets=[" heads", " then"], interventions=[parse_patch(str(donors), "2:-1")])
    patched = TraceRun(settings, [PromptRecord(0, "x", recipient, 1)]).start(tiny_loaded).table().to_pylist()
    plain = {text: TraceRun(TraceSettings(top_k=5, targets=[" heads", " then"]), [PromptRecord(0, "x", text, 1)])
             .start(tiny_loaded).table().to_pylist() for text in (recipient, donor)}
    last, earlier = patched[n - 1], patched[n - 2]
    np.testing.assert_allclose(last["topk_logprobs"], plain[donor][n - 1]["topk_logprobs"], atol=TOL)
    assert last["topk_ids"] == plain[donor][n - 1]["topk_ids"]
    np.testing.assert_allclose(last["target_logprobs"], plain[donor][n - 1]["target_logprobs"], atol=TOL)
    assert abs(last["entropy"] - plain[donor][n - 1]["entropy"]) < TOL
    assert abs(last["entropy"] - plain[recipient][n - 1]["entropy"]) > 1e-3
    np.testing.assert_allclose(earlier["topk_logprobs"], plain[recipient][n - 2]["topk_logprobs"], atol=TOL)


def test_mean_ablation_uses_the_runs_mean_without_padding(tiny_loaded, path):
    """The mean in the metadata is the activation's mean over every prompt position, computed here one
    unpadded prompt at a time; the trace equals putting that mean in place by hand."""
    means = [parse_ablation("1.3", "mean"), parse_ablation("0.mlp", "mean")]
    run = TraceRun(TraceSettings(**BATCHED, interventions=means), records()).start(tiny_loaded)
    entries = run.metadata()["interventions"]
    model = tiny_loaded.model
    head_inputs, mlp_outputs = [], []
    hooks = [model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: head_inputs.append(a[0][0])),
             model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: mlp_outputs.append(o[0]))]
    try:
        with torch.no_grad():
            for record in records():
                model(input_ids=torch.tensor([tiny_loaded.tokenizer(record.text)["input_ids"]]))
    finally:
        for hook in hooks:
            hook.remove()
    d = surgery.head_dim(model)
    head_mean = torch.cat(head_inputs).double().mean(0)[3 * d : 4 * d].numpy()
    mlp_mean = torch.cat(mlp_outputs).double().mean(0).numpy()
    np.testing.assert_allclose(entries[0]["mean"], head_mean, atol=1e-6)
    np.testing.assert_allclose(entries[1]["mean"], mlp_mean, atol=1e-6)
    assert np.abs(head_mean).max() > 1e-3 and np.abs(mlp_mean).max() > 1e-3  # not zero: a real mean was put in

    def by_hand(m: torch.nn.Module) -> None:
        o_proj = m.model.layers[1].self_attn.o_proj  # input columns -> a constant: fold the mean into a bias
        bias = o_proj.weight[:, 3 * d : 4 * d].double() @ torch.tensor(entries[0]["mean"], dtype=torch.float64)
        o_proj.weight[:, 3 * d : 4 * d] = 0
        o_proj.bias = torch.nn.Parameter(bias.float())
        down = m.model.layers[0].mlp.down_proj
        down.weight.zero_()
        down.bias = torch.nn.Parameter(torch.tensor(entries[1]["mean"], dtype=torch.float32))
    assert_same_rows(run.table(), trace(surgery.operated(tiny_loaded, by_hand)), atol=TOL)


def test_a_mean_ablations_first_pass_halves_on_out_of_memory(tiny_loaded, monkeypatch):
    """With --batch-size auto the first pass runs inside the batching's out-of-memory retry, as the trace does:
    a model that 'runs out of memory' above 2 prompts still gets its means, those of batches of 2."""
    means = [parse_ablation("1.3", "mean"), parse_ablation("0.mlp", "mean")]
    expected = TraceRun(TraceSettings(**BATCHED, interventions=means), records()).start(tiny_loaded)
    model = tiny_loaded.model
    forward = type(model).forward
    sizes: list[int] = []

    def limited(self, input_ids=None, **kwargs):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(model), "forward", limited)
    run = TraceRun(TraceSettings(**{**BATCHED, "batch_size": AUTO}, interventions=means), records()).start(tiny_loaded)
    assert sizes[0] > 2 and max(sizes[1:]) <= 2  # the first pass failed once, then fit in halves
    for got, want in zip(run.metadata()["interventions"], expected.metadata()["interventions"], strict=True):
        np.testing.assert_allclose(got["mean"], want["mean"], atol=1e-6)


def test_mean_ablating_a_constant_activation_changes_nothing(tiny_loaded, path):
    """An MLP whose down projection is zero outputs its bias everywhere; mean-ablating it puts that same
    bias back, bit for bit."""
    def constant_mlp(m: torch.nn.Module) -> None:
        down = m.model.layers[1].mlp.down_proj
        down.weight.zero_()
        down.bias = torch.nn.Parameter(torch.linspace(-1, 1, down.out_features))
    operated = surgery.operated(tiny_loaded, constant_mlp)
    ablated = trace(operated, [parse_ablation("1.mlp", "mean")], max_new_tokens=2)
    assert ablated.equals(trace(operated, max_new_tokens=2))
    assert not trace(operated, [parse_ablation("1.mlp")]).equals(trace(operated))  # zero ablation does change it


def test_a_failing_run_leaves_the_model_untouched(tiny_loaded, path):
    model = tiny_loaded.model
    parameters, hooks = surgery.parameters_of(model), surgery.attached_hooks(model)
    run = TraceRun(TraceSettings(**BATCHED, max_new_tokens=2, interventions=[parse_ablation("1.2", "mean"),
                                                                            parse_ablation("2")]), records())
    run.start(tiny_loaded)
    calls = []

    def fail(module, args):
        calls.append(1)
        if len(calls) == 3:
            assert surgery.attached_hooks(model) > hooks + 1  # the edits are on
            raise KeyboardInterrupt
    saboteur = model.model.layers[-1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(KeyboardInterrupt):
            list(run.batches())
    finally:
        saboteur.remove()
    assert_untouched(tiny_loaded, parameters, hooks)


def test_interventions_are_recorded_and_named(tiny_model_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\nOnce upon a time\n")
    out = tmp_path / "t.parquet"
    code, _, err = run_cli(["trace", str(prompts), "-m", str(tiny_model_dir), "-o", str(out), "--ablate", "1.2",
                            "--ablate", "0.mlp", "--ablation", "mean", "-q"], capsys, monkeypatch)
    assert code == 0, err
    meta = open_trace(out).meta
    assert [Intervention.from_dict(i).label for i in meta["settings"]["interventions"]] == ["1.2", "0.mlp"]
    assert [len(e["mean"]) for e in meta["interventions"]] == [12, 48]
    code, shown, err = run_cli(["inspect", str(out)], capsys, monkeypatch)
    assert code == 0 and "interventions: mean-ablated head 1.2; mean-ablated MLP 0.mlp" in shown, err
    assert describe(meta["settings"]["interventions"]) in " ".join(shown.split())
    report = tmp_path / "r.html"
    code, _, err = run_cli(["report", str(out), "-o", str(report), "--max-prompts", "1"], capsys, monkeypatch)
    assert code == 0 and "mean-ablated head 1.2" in report.read_text(), err


def test_a_resume_with_other_interventions_is_refused(tiny_model_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i} is here\n" for i in range(6)))
    out = tmp_path / "t.parquet"
    args = ["trace", str(prompts), "-m", str(tiny_model_dir), "-o", str(out), "--batch-size", "2", "-q"]
    import llmprobe.tracing.run as run_module
    check, seen = run_module.check_finite, []

    def interrupt(batch, by_index):
        if len(seen) == 1:
            raise KeyboardInterrupt
        seen.append(1)
        check(batch, by_index)
    with monkeypatch.context() as m:
        m.setattr(run_module, "check_finite", interrupt)
        assert run_cli([*args, "--ablate", "1.2"], capsys, monkeypatch)[0] == 130
    code, _, err = run_cli([*args, "--ablate", "1.3", "--resume"], capsys, monkeypatch)
    assert_one_line_error(code, err, "cannot resume", "settings.interventions")
    code, _, err = run_cli([*args, "--ablate", "1.2", "--resume"], capsys, monkeypatch)
    assert code == 0, err
    fresh = tmp_path / "fresh.parquet"
    assert run_cli([*args[:5], str(fresh), *args[6:], "--ablate", "1.2"], capsys, monkeypatch)[0] == 0
    assert pq.read_table(out).equals(pq.read_table(fresh))


@pytest.mark.parametrize("extra,needles", [
    (["--ablate", "3.1"], ("--ablate", "layer 3 is out of range", "0..2")),
    (["--ablate", "1.4"], ("--ablate", "head 4 is out of range", "0..3")),
    (["--ablate", "1.x"], ("--ablate", "L.H")),
    (["--ablate", "-1"], ("--ablate",)),
    (["--ablate", "1.1", "--ablate", "1.1"], ("--ablate", "twice")),
    (["--ablation", "mean"], ("--ablation", "only applies with --ablate")),
    (["--patch-at", "1"], ("--patch-from",)),
    (["--ablate-direction", "missing.npy@1"], ("--ablate-direction", "no such file")),
    (["--ablate-direction", "nolayer.npy"], ("--ablate-direction", "FILE@L")),
])
def test_bad_interventions_are_one_line_and_write_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch, extra,
                                                           needles):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\n")
    out = tmp_path / "t.parquet"
    code, _, err = run_cli(["trace", str(prompts), "-m", str(tiny_model_dir), "-o", str(out), *extra],
                           capsys, monkeypatch)
    assert_one_line_error(code, err, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


def test_bad_direction_files_and_donors_are_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "The capital of France is"}) + "\n")
    cases = []
    for name, array, needle in [("wide.npy", np.ones((1, 50)), "shape [k, 48]"),
                                ("zero.npy", np.zeros((2, 48)), "is zero"),
                                ("twice.npy", np.ones((2, 48)), "rank-deficient")]:
        np.save(tmp_path / name, array)
        cases.append((["--ablate-direction", f"{tmp_path / name}@1"], ("--ablate-direction", needle)))
    (tmp_path / "other.jsonl").write_text(json.dumps({"id": "b", "prompt": "The capital of France is"}) + "\n")
    (tmp_path / "longer.jsonl").write_text(json.dumps({"id": "a", "prompt": "The capital of Italy is Rome"}) + "\n")
    cases += [(["--patch-from", str(tmp_path / "other.jsonl"), "--patch-at", "1"], ("no donor prompt with id 'a'",)),
              (["--patch-from", str(tmp_path / "longer.jsonl"), "--patch-at", "1"], ("same length",)),
              (["--patch-from", str(prompts), "--patch-at", "1:40"], ("--patch-at", "position 40 is outside")),
              (["--patch-from", str(prompts), "--patch-at", "1:x"], ("--patch-at", "positions")),
              (["--patch-from", str(prompts), "--patch-at", "1", "--targets", " Paris is"], ("--patch-from",
                                                                                              "single-token"))]
    before = sorted(p.name for p in tmp_path.iterdir())
    for extra, needles in cases:
        code, _, err = run_cli(["trace", str(prompts), "-m", str(tiny_model_dir), "-o", str(tmp_path / "t.parquet"),
                                *extra], capsys, monkeypatch)
        assert_one_line_error(code, err, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_blocks_that_cannot_be_located_are_named(tiny_loaded):
    model = surgery.operated(tiny_loaded, lambda m: delattr(m.model.layers[1].self_attn, "o_proj")).model
    with pytest.raises(UsageError, match=r"decoder layer 1 \(LlamaDecoderLayer\) has no linear \.self_attn\.o_proj"):
        Editor(model, [parse_ablation("1.0")])
    Editor(model, [parse_ablation("0.0"), parse_ablation("1.mlp")])  # layer 0's attention and layer 1's MLP are there
    without_mlp = surgery.operated(tiny_loaded, lambda m: delattr(m.model.layers[2], "mlp")).model
    with pytest.raises(UsageError, match=r"decoder layer 2 .* has no \.mlp"):
        Editor(without_mlp, [parse_ablation("2.mlp")])
    no_layers = surgery.operated(tiny_loaded, lambda m: delattr(m.model, "layers")).model
    with pytest.raises(UsageError, match=r"has no \.layers"):
        DecoderBlocks.of(no_layers)


def test_the_ray_engine_refuses_a_mean_ablation_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\n")
    code, _, err = run_cli(["trace", str(prompts), "-m", str(tiny_model_dir), "-o", str(tmp_path / "t"),
                            "--engine", "ray", "--ablate", "1.1", "--ablation", "mean"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--ablation", "--engine local")
    assert not (tmp_path / "t").exists()


@pytest.mark.real_model
def test_head_ablation_equals_surgery_on_the_default_model(real_loaded):
    recs = records()[:3]
    settings = TraceSettings(top_k=5, targets=[" heads", " tails"], batch_size=2,
                             interventions=[parse_ablation("3.1")])
    got = TraceRun(settings, recs).start(real_loaded).table()
    plain_settings = TraceSettings(top_k=5, targets=[" heads", " tails"], batch_size=2)
    want = TraceRun(plain_settings, recs).start(surgery.operated(real_loaded, surgery.zero_head(3, 1))).table()
    assert_same_rows(got, want, atol=TOL)
    plain = TraceRun(plain_settings, recs).start(real_loaded).table()
    assert np.abs(got.column("entropy").to_numpy() - plain.column("entropy").to_numpy()).max() > 1e-4
