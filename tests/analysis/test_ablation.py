"""``llmprobe ablate`` (issue 22 part 2): the sweep table, its equality with trace --ablate + fit-posterior,
resuming a killed sweep, Ray, bad input; and what ablating all attention does (known answer).

Fits use few bootstrap resamples and two folds (speed); the tiny model puts little mass on the
categories, so ``--min-mass 0``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from llmprobe.analysis import ablation_run
from llmprobe.analysis.ablation import SWEEP_SCHEMA, open_sweep
from llmprobe.analysis.fits import fit_posterior, posterior_marks
from llmprobe.experiments import generate, load_experiment, write_jsonl
from llmprobe.tracing.checkpoint import work_dir_for
from llmprobe.tracing.interventions import parse_ablation
from llmprobe.tracing.prompts import read_prompts
from llmprobe.tracing.reader import Trace, open_trace
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from tests.analysis.fixtures import ROOT
from tests.cli_helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
FIT = ["--bootstrap", "10", "--folds", "2", "--min-mass", "0", "--fit-workers", "0"]
ROW_NUMBERS = ("mean_kl_bits", "kl_model_filter_bits", "gamma", "gamma_ci_low", "gamma_ci_high", "alpha0",
               "alpha0_forgetting", "mass")


@pytest.fixture(scope="module")
def coin_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "coin.jsonl"
    with open(path, "w") as stream:
        write_jsonl(generate(load_experiment(ROOT / "configs/experiments/coin.toml"), n_max=5, sequences=1), stream)
    return path


def ablate(args, tiny_model_dir, capsys, monkeypatch):
    return run_cli(["ablate", "-m", str(tiny_model_dir), *FIT, *map(str, args)], capsys, monkeypatch)


@pytest.fixture(scope="module")
def head_sweep(coin_prompts, tiny_model_dir, tmp_path_factory):
    """``ablate --over heads --layers 1`` on the tiny model, once for the module: (table path, stdout, stderr)."""
    monkeypatch, capture = pytest.MonkeyPatch(), _Capture()
    out = tmp_path_factory.mktemp("sweep") / "sweep.parquet"
    try:  # fitted in a worker process (the others fit in-process, --fit-workers 0: the same rows, tested below)
        code, stdout, err = ablate([coin_prompts, "--over", "heads", "--layers", "1", "-o", out, "--fit-workers", "1"],
                                   tiny_model_dir, capture, monkeypatch)
    finally:
        monkeypatch.undo()
    assert code == 0, err
    return out, stdout, err


class _Capture:
    """capsys for a module-scoped fixture."""

    def __init__(self) -> None:
        import io
        import sys

        self._sys, self._io = sys, io
        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()

    def readouterr(self):
        out, err = self._sys.stdout.getvalue(), self._sys.stderr.getvalue()
        self._sys.stdout, self._sys.stderr = self._saved
        return out, err


def test_the_sweep_table(head_sweep):
    path, stdout, err = head_sweep
    sweep = open_sweep(path)
    frame = sweep.frame
    assert list(frame["component"]) == ["baseline", "1.0", "1.1", "1.2", "1.3"]
    assert list(frame["kind"]) == ["baseline"] + ["head"] * 4 and list(frame["head"][1:]) == [0, 1, 2, 3]
    assert pq.read_schema(path).remove_metadata() == SWEEP_SCHEMA
    base = frame.iloc[0]
    assert base["delta_kl_bits"] == 0 and not base["verdict_flipped"] and base["top1_agreement"] == 1
    np.testing.assert_allclose(frame["delta_kl_bits"], frame["mean_kl_bits"] - base["mean_kl_bits"], atol=1e-15)
    assert (frame["verdict_flipped"] == (frame["verdict"] != base["verdict"])).all()
    assert frame["top1_agreement"][1:].min() < 1  # ablating a head changes some prediction
    meta = sweep.meta
    assert meta["sweep"]["over"] == "heads" and meta["fit"]["bootstrap"] == 10 and meta["fit"]["min_mass"] == 0
    assert meta["components"] == list(frame["component"]) and meta["weights_sha256"].startswith("sha256:")
    assert sweep.headline() in " ".join(stdout.split()) and "components by change of KL" in stdout
    assert "ablating" in err and "eta" in err  # progress with time left, on stderr


def test_tsv_and_json_carry_every_row(head_sweep, coin_prompts, capsys, monkeypatch):
    path, _, _ = head_sweep
    code, stdout, err = run_cli(["ablate", str(coin_prompts), "--over", "heads", "--layers", "1", "-o", str(path),
                                 "--resume", "--format", "tsv"], capsys, monkeypatch)  # complete: read back, not rerun
    assert code == 0 and "is complete" in err, err
    lines = stdout.splitlines()
    assert len(lines) == 6 and lines[0].startswith("index\tcomponent\tkind") and "direction" not in lines[0]
    code, stdout, err = run_cli(["ablate", str(coin_prompts), "--over", "heads", "--layers", "1", "-o", str(path),
                                 "--resume", "--json"], capsys, monkeypatch)
    document = json.loads(stdout)
    assert [r["component"] for r in document["rows"]] == ["baseline", "1.0", "1.1", "1.2", "1.3"]


@pytest.mark.parametrize("spec,ablation", [("1.2", "zero"), ("0.mlp", "mean"), ("2", "zero")])
def test_a_row_equals_trace_ablate_then_fit_posterior(coin_prompts, tiny_model_dir, tiny_loaded, tmp_path, capsys,
                                                      monkeypatch, spec, ablation):
    over = {"1.2": "heads", "0.mlp": "mlp", "2": "layers"}[spec]
    layer = spec.split(".")[0]
    out = tmp_path / "s.parquet"
    code, _, err = ablate([coin_prompts, "--over", over, "--layers", layer, "--ablation", ablation, "-o", out],
                          tiny_model_dir, capsys, monkeypatch)
    assert code == 0, err
    frame = open_sweep(out).frame.set_index("component")
    records = read_prompts(str(coin_prompts))
    options = dict(bootstrap=10, folds=2, min_mass=0.0)
    for name, interventions in (("baseline", []), (spec, [parse_ablation(spec, ablation)])):
        run = TraceRun(TraceSettings(top_k=1, interventions=interventions), records).start(tiny_loaded)
        trace = open_trace_of(run, tmp_path / f"{name}.parquet")
        fit = fit_posterior(posterior_marks(trace), **options)
        row = frame.loc[name]
        got = [row[k] for k in ROW_NUMBERS]
        want = [fit.distances.mean_kl_bits, fit.scores.forgetting.held.kl_bits, fit.test.free.gamma,
                fit.test.gamma_ci[0], fit.test.gamma_ci[1], fit.test.exact.alpha0, fit.test.free.alpha0,
                fit.distances.mean_mass]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=name)
        assert row["verdict"] == fit.verdict and row["n_marks_used"] == fit.counts.used
        marks = trace.table.filter(trace.table.column("mark_index").is_valid())
        entropy_bits = np.asarray(marks.column("entropy").to_numpy(), dtype=np.float64) / np.log(2)
        assert abs(row["mean_entropy_bits"] - entropy_bits.mean()) < 1e-5


def open_trace_of(run, path):
    """The run's trace through the writer and reader, as ``llmprobe trace -o`` then fit-posterior would see it."""
    from llmprobe.tracing.writer import open_trace_sink

    with open_trace_sink(str(path), "parquet", run.schema, run.metadata(), run.vocab) as sink:
        for batch in run.batches():
            sink.write(batch)
    return open_trace(path)


def test_a_killed_sweep_resumes_to_the_rows_of_an_uninterrupted_one(head_sweep, coin_prompts, tiny_model_dir,
                                                                    tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.parquet"
    args = [coin_prompts, "--over", "heads", "--layers", "1", "-o", out]
    score, calls = ablation_run.fit_job, []

    def interrupting(engine, index, *rest):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return score(engine, index, *rest)
    with monkeypatch.context() as m:
        m.setattr(ablation_run, "fit_job", interrupting)
        code, _, err = ablate(args, tiny_model_dir, capsys, monkeypatch)
    assert code == 130 and "2 of 5 components done" in err and "--resume" in err, err
    assert work_dir_for(str(out)).is_dir() and not out.exists()
    code, _, err = ablate(args, tiny_model_dir, capsys, monkeypatch)
    assert_one_line_error(code, err, "interrupted run", "--resume")
    code, _, err = ablate([*args, "--ablation", "mean", "--resume"], tiny_model_dir, capsys, monkeypatch)
    assert_one_line_error(code, err, "cannot resume", "sweep.ablation")
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(ablation_run, "fit_job", lambda engine, index, *rest: calls.append(index) or score(
            engine, index, *rest))
        code, _, err = ablate([*args, "--resume"], tiny_model_dir, capsys, monkeypatch)
    assert code == 0 and "resuming: 2 of 5 components were done" in err, err
    assert calls == [2, 3, 4] and not work_dir_for(str(out)).exists()
    assert pq.read_table(out).equals(pq.read_table(head_sweep[0]))  # fitted here, and there in a worker: the same rows


@pytest.mark.parametrize("extra,needles", [
    (["--over", "heads", "--layers", "5"], ("--layers", "out of range")),
    (["--over", "heads", "--layers", "x"], ("--layers",)),
    (["--over", "directions"], ("--directions", "needs --directions pca:K@L")),
    (["--over", "heads", "--directions", "pca:2@1"], ("--directions", "only applies")),
    (["--over", "heads", "--random-controls", "2"], ("--random-controls", "only applies")),
    (["--over", "directions", "--directions", "pca:2@9"], ("--directions", "out of range")),
    (["--over", "directions", "--directions", "pcb:2@1"], ("--directions", "pca:K@L")),
    (["--over", "directions", "--directions", "pca:0@1"], ("--directions", "pca:K@L")),
    (["--over", "directions", "--directions", "pca:2@1", "--layers", "1"], ("--layers",)),
    (["--over", "heads", "--min-mass", "2"], ("--min-mass",)),
    (["--over", "heads", "--prior", "missing.json"], ("no such prior file",)),
    (["--over", "heads", "--resume"], ("--resume", "-o")),
    (["--over", "necks"], ("--over",)),
])
def test_bad_input_is_one_line_and_writes_nothing(coin_prompts, tiny_model_dir, tmp_path, capsys, monkeypatch, extra,
                                                  needles):
    monkeypatch.chdir(tmp_path)
    code, _, err = ablate([coin_prompts, *extra], tiny_model_dir, capsys, monkeypatch)
    assert_one_line_error(code, err, *needles)
    assert list(tmp_path.iterdir()) == []


def test_prompts_and_outputs_are_checked_before_the_model_loads(coin_prompts, tmp_path, capsys, monkeypatch):
    text = tmp_path / "p.txt"
    text.write_text("The capital of France is\n")
    code, _, err = ablate([text, "--over", "heads"], "no-such-model", capsys, monkeypatch)
    assert_one_line_error(code, err, "experiment prompts")
    code, _, err = ablate([coin_prompts, "--over", "heads", "-o", coin_prompts], "no-such-model", capsys, monkeypatch)
    assert_one_line_error(code, err, "is also an input")
    code, _, err = ablate([coin_prompts, "--over", "heads", "-o", "-"], "no-such-model", capsys, monkeypatch)
    assert_one_line_error(code, err, "-o", "Parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


def test_ablating_every_head_leaves_each_position_only_its_own_token(coin_prompts, tiny_loaded):
    """With every attention head of every layer ablated no position reads another, and attention is the only
    place position enters: the prediction at a mark depends only on its token, whatever the counts before
    it, so the marks that end in " then" (all but n = 0) predict the same — no updating."""
    records = read_prompts(str(coin_prompts))
    heads = [parse_ablation(f"{layer}.{head}") for layer in range(3) for head in range(4)]
    run = TraceRun(TraceSettings(top_k=3, interventions=heads), records).start(tiny_loaded)
    table = run.table()
    marks = table.filter(table.column("mark_index").is_valid()).to_pylist()
    by_token: dict[int, list] = {}
    for row in marks:
        by_token.setdefault(row["token_id"], []).append(row["target_seq_logprobs"])
    assert len(by_token) == 2 and max(len(v) for v in by_token.values()) > 20
    for values in by_token.values():
        values = np.asarray(values)
        assert np.abs(values - values[0]).max() <= 1e-6
    plain = TraceRun(TraceSettings(top_k=3), records).start(tiny_loaded).table()
    plain_marks = np.asarray([r["target_seq_logprobs"] for r in plain.filter(plain.column("mark_index").is_valid())
                              .to_pylist() if r["token_id"] == marks[-1]["token_id"]])
    assert np.abs(plain_marks - plain_marks[0]).max() > 1e-2  # the un-ablated model does read the counts
    fit = fit_posterior(posterior_marks(Trace(table, run.metadata(), run.vocab, "all heads")), bootstrap=10, folds=2,
                        min_mass=0.0)
    assert fit.verdict not in ("consistent", "rejected")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray for the module (the Ray test only: the others run without Ray installed)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'llmprobe[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")),
             log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_the_ray_engine_gives_the_local_rows(local_ray, head_sweep, coin_prompts, tiny_model_dir, tmp_path, capsys,
                                              monkeypatch):
    out = tmp_path / "ray.parquet"
    code, _, err = ablate([coin_prompts, "--over", "heads", "--layers", "1", "-o", out, "--engine", "ray", "-q"],
                          tiny_model_dir, capsys, monkeypatch)
    assert code == 0, err
    assert pq.read_table(out).equals(pq.read_table(head_sweep[0]))
    assert open_sweep(out).meta["engine"] == "ray"


def test_components_in_order_and_an_empty_sweep_refused():
    from llmprobe.analysis.ablation import SweepOptions, sweep_components
    from llmprobe.errors import UsageError

    names = lambda options, layers=3, heads=2: [c.name for c in sweep_components(options, layers, heads)]  # noqa: E731
    assert names(SweepOptions("heads", "2,0")) == ["baseline", "0.0", "0.1", "2.0", "2.1"]
    assert names(SweepOptions("layers")) == ["baseline", "0", "1", "2"]
    assert names(SweepOptions("attn", "1")) == ["baseline", "1.attn"]
    assert names(SweepOptions("mlp", "1")) == ["baseline", "1.mlp"]
    assert names(SweepOptions("directions", directions=("pca:2@2", "pca:1@0"), random_controls=1)) == [
        "baseline", "0.pc1", "0.random1", "2.pc1", "2.pc2", "2.random1"]
    with pytest.raises(UsageError, match="no components"):
        sweep_components(SweepOptions("heads"), 0, 2)
