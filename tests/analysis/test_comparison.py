"""``llmprobe compare``: known answers on a tiny checkpoint series, and the comparison's promises.

The tiny series (tests/control/fixtures.py) learns within its 200 steps: step 0 puts 0.6 % of its mass on the
categories (no verdict), the last step is consistent with exact Bayes, and KL(Bayes‖model) under the true prior
falls about eightyfold. The default control's claim (600 steps, 4 sizes) is measured by
benchmarks/bench_emergence.py. Here also: a comparison of one model gives trace + fit-posterior's numbers; the same
checkpoint twice gives the same row; models with different tokenizers are each traced with their own, prompts
tokenized once per distinct tokenizer; a corrupt checkpoint is one line and ``--resume`` finishes the run; bad
input writes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from llmprobe.analysis.comparison import COLUMNS, LOW_MASS, META_KEY, read_comparison
from llmprobe.compare import work_dir_for
from tests.cli_helpers import assert_one_line_error, run_cli, run_cli_outside_a_test
from tests.control.fixtures import SERIES_STEPS

FIT = ["--bootstrap", "20"]
METRICS = ["verdict", "kl_bits", "kl_best_filter_bits", "gamma", "gamma_low", "gamma_high", "alpha0",
           "entropy_mae_bits", "mass", "tv", "marks", "marks_used", "exact_bayes_rejected", "parameters", "layers",
           "hidden"]


@pytest.fixture(scope="session")
def compared(tiny_series, coin_prompts, tmp_path_factory) -> tuple[Path, Path, str]:
    """``compare SERIES -o TABLE --keep-traces DIR`` run once: (table, traces directory, stderr)."""
    root = tmp_path_factory.mktemp("compared")
    table, traces = root / "series.parquet", root / "traces"
    code, _, err = run_cli_outside_a_test(["compare", str(tiny_series), "--prompts", str(coin_prompts), "-o",
                                           str(table), "--keep-traces", str(traces), *FIT])
    assert code == 0, err
    return table, traces, err


def _compare_json(args: list[str], capsys, monkeypatch) -> list[dict]:
    code, out, err = run_cli(["compare", *args, *FIT, "--format", "json", "-q"], capsys, monkeypatch)
    assert code == 0, err
    return json.loads(out)


def _fit_posterior_json(trace: Path, args: list[str], capsys, monkeypatch) -> dict:
    code, out, err = run_cli(["fit-posterior", str(trace), *args, *FIT, "--json", "-q"], capsys, monkeypatch)
    assert code == 0, err
    return json.loads(out)[0]


def test_a_series_becomes_bayesian(compared, tiny_series):
    table, _, err = compared
    frame = read_comparison(str(table)).frame
    assert list(frame.columns) == list(COLUMNS)
    assert frame["step"].tolist() == SERIES_STEPS and set(frame["series"]) == {"L2-H32"}
    assert frame["name"].tolist() == [f"L2-H32@{s}" for s in SERIES_STEPS]
    first, last = frame.iloc[0], frame.iloc[-1]
    assert first["verdict"] != "consistent" and last["verdict"] == "consistent", frame[["step", "verdict"]]
    assert first["kl_bits"] >= 10 * last["kl_bits"], frame[["step", "kl_bits"]]
    assert first["verdict"] == LOW_MASS and first["mass"] < 0.05 and last["mass"] > 0.9
    assert (frame["prior"] == str(tiny_series / "steps" / "step-000000" / "prior.json")).all()  # the true prior
    assert "tokenized the prompts 1 time for 5 models" in err
    assert not work_dir_for(str(table)).exists()
    meta = json.loads(pq.read_schema(table).metadata[META_KEY])
    assert [s["verdict"] for s in meta["summaries"]] == frame["verdict"].tolist()
    assert meta["options"]["bootstrap"] == 20


def test_a_model_gives_trace_and_fit_posteriors_numbers_and_twice_the_same_row(tiny_series, coin_prompts, tmp_path,
                                                                               capsys, monkeypatch):
    checkpoint = tiny_series / "steps" / "step-000150"
    row, again = _compare_json([str(checkpoint), str(checkpoint), "--prompts", str(coin_prompts)], capsys, monkeypatch)
    timings = ("index", "load_seconds", "trace_seconds", "fit_seconds")
    assert (row["index"], again["index"]) == (0, 1)
    assert {k: v for k, v in row.items() if k not in timings} == {k: v for k, v in again.items() if k not in timings}
    trace = tmp_path / "t.parquet"
    code, _, err = run_cli(["trace", str(coin_prompts), "--model", str(checkpoint), "-o", str(trace), "-q"], capsys,
                           monkeypatch)
    assert code == 0, err
    summary = _fit_posterior_json(trace, ["--prior", str(checkpoint / "prior.json")], capsys, monkeypatch)
    assert row["verdict"] == summary["verdict"]
    assert row["kl_bits"] == summary["mean_kl_bits"] and row["tv"] == summary["mean_tv"]
    assert row["kl_best_filter_bits"] == summary["scores"]["forgetting"]["kl_bits_out_of_sample"]
    assert row["gamma"] == summary["forgetting"]["gamma"] and [row["gamma_low"], row["gamma_high"]] == \
        summary["gamma_ci"]
    assert row["alpha0"] == summary["exact_bayes"]["alpha0"]
    assert row["entropy_mae_bits"] == summary["entropy_mae_bits"] and row["mass"] == summary["mean_mass"]
    assert (row["step"], row["layers"], row["hidden"]) == (150, 2, 32)


def test_kept_traces_are_the_traces_trace_writes(compared, tiny_series, coin_prompts, tmp_path, capsys,
                                                 monkeypatch):
    _, traces, _ = compared
    assert sorted(p.name for p in traces.iterdir()) == [f"{i:03d}-L2-H32@{s}.parquet"
                                                        for i, s in enumerate(SERIES_STEPS)]
    trace = tmp_path / "t.parquet"
    code, _, err = run_cli(["trace", str(coin_prompts), "--model", str(tiny_series / "steps" / "step-000200"), "-o",
                            str(trace), "-q"], capsys, monkeypatch)
    assert code == 0, err
    columns = ["prompt_id", "position", "topk_ids", "topk_logprobs", "target_seq_logprobs", "mark_index"]
    kept = pq.read_table(traces / "004-L2-H32@200.parquet", columns=columns)
    assert kept.equals(pq.read_table(trace, columns=columns))


def test_models_with_different_tokenizers(tiny_series, tiny_model_dir, coin_prompts, compared, tmp_path, capsys,
                                          monkeypatch):
    """A control and the tiny random Llama: each traced with its own tokenizer, marks placed by character offset as
    `trace` places them, so the random model's row is its trace + fit-posterior (--min-mass 0: it puts little mass
    on the targets) and the control's is the row it gets alone (all its marks carry mass, so --min-mass 0 and the
    prior spelled dirichlet:3,1 change nothing)."""
    control = tiny_series / "steps" / "step-000200"
    args = ["--min-mass", "0", "--prior", "dirichlet:3,1"]
    code, out, err = run_cli(["compare", str(control), str(tiny_model_dir), "--prompts", str(coin_prompts), *args,
                              *FIT, "--format", "json"], capsys, monkeypatch)
    assert code == 0, err
    assert "tokenized the prompts 2 times for 2 models" in err
    mine, random = json.loads(out)
    alone = read_comparison(str(compared[0])).frame.iloc[-1]
    assert (mine["verdict"], mine["kl_bits"], mine["gamma"], mine["mass"]) == \
        (alone["verdict"], alone["kl_bits"], alone["gamma"], alone["mass"])
    trace = tmp_path / "random.parquet"
    code, _, err = run_cli(["trace", str(coin_prompts), "--model", str(tiny_model_dir), "-o", str(trace), "-q"],
                           capsys, monkeypatch)
    assert code == 0, err
    summary = _fit_posterior_json(trace, args, capsys, monkeypatch)
    assert (random["kl_bits"], random["gamma"], random["mass"]) == (summary["mean_kl_bits"],
                                                                     summary["forgetting"]["gamma"],
                                                                     summary["mean_mass"])
    assert random["marks"] == summary["n_marks"] == mine["marks"] == 12 * 13
    assert mine["mass"] > 0.9 > 0.1 > random["mass"]


def test_a_corrupt_checkpoint_is_one_line_and_resume_finishes(tiny_series, coin_prompts, compared, tmp_path,
                                                               capsys, monkeypatch):
    series = tmp_path / "series"
    shutil.copytree(tiny_series, series)
    weights = series / "steps" / "step-000100" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])
    output = tmp_path / "c.parquet"
    command = ["compare", str(series), "--prompts", str(coin_prompts), "-o", str(output), *FIT, "-q"]
    code, _, err = run_cli(command, capsys, monkeypatch)
    assert_one_line_error(code, err, str(series / "steps" / "step-000100"), "cannot load model",
                          "2 of 5 rows are kept", "--resume")
    assert not output.exists()
    assert sorted(p.name for p in work_dir_for(str(output)).iterdir()) == ["plan.json", "row-00000.json",
                                                                          "row-00001.json"]
    code, _, err = run_cli(command, capsys, monkeypatch)  # without --resume: refused, nothing touched
    assert_one_line_error(code, err, "an interrupted comparison left its rows", "--resume")
    weights.write_bytes(good)
    code, _, err = run_cli([*command[:-1], "--resume"], capsys, monkeypatch)
    assert code == 0, err
    assert "resuming: 2 of 5 models were done" in err
    resumed, whole = read_comparison(str(output)).frame, read_comparison(str(compared[0])).frame
    pd.testing.assert_frame_equal(resumed[METRICS], whole[METRICS])
    assert not work_dir_for(str(output)).exists()


def test_resume_refuses_rows_of_another_comparison(tiny_series, coin_prompts, tmp_path, capsys, monkeypatch):
    output = tmp_path / "c.parquet"
    work = work_dir_for(str(output))
    work.mkdir()
    (work / "plan.json").write_text("{}")
    code, _, err = run_cli(["compare", str(tiny_series / "steps" / "step-000000"), "--prompts", str(coin_prompts),
                            "-o", str(output), "--resume"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--resume", "from a different comparison", "--force")


def _refused(args: list[str], capsys, monkeypatch, *needles: str) -> None:
    code, _, err = run_cli(["compare", *args], capsys, monkeypatch)
    assert_one_line_error(code, err, *needles)


def test_bad_input_is_one_line_and_writes_nothing(tiny_series, coin_prompts, tmp_path, capsys, monkeypatch):
    output = str(tmp_path / "c.parquet")
    _refused(["--prompts", str(coin_prompts), "-o", output], capsys, monkeypatch, "MODEL")
    series = tmp_path / "series"
    shutil.copytree(tiny_series, series)
    shutil.rmtree(series / "steps" / "step-000050")
    _refused([str(series), "--prompts", str(coin_prompts), "-o", output], capsys, monkeypatch,
             str(series / "manifest.json"), "steps/step-000050, which is not there")
    plain = tmp_path / "plain.txt"
    plain.write_text("I just flipped a coin, and it came up heads, then\n")
    _refused([str(tiny_series), "--prompts", str(plain), "-o", output], capsys, monkeypatch, str(plain),
             "has no categories", "llmprobe experiment")
    no_counts = tmp_path / "no-counts.jsonl"
    record = json.loads(coin_prompts.read_text().splitlines()[0])
    record["marks"] = [{"offset": m["offset"]} for m in record["marks"]]
    no_counts.write_text(json.dumps(record) + "\n")
    _refused([str(tiny_series), "--prompts", str(no_counts)], capsys, monkeypatch, "no marks with counts")
    _refused([str(tmp_path / "nope"), "--prompts", str(coin_prompts)], capsys, monkeypatch, "no such model, series")
    _refused([str(tmp_path), "--prompts", str(coin_prompts)], capsys, monkeypatch, "neither a model directory")
    _refused([str(tiny_series), "--prompts", str(coin_prompts), "--min-mass", "2"], capsys, monkeypatch,
             "--min-mass")
    _refused([str(tiny_series), "--prompts", str(coin_prompts), "--resume"], capsys, monkeypatch, "--resume", "-o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-counts.jsonl", "plain.txt", "series"]


def test_controls_under_different_priors_need_a_prior(tiny_series, coin_prompts, tmp_path, capsys, monkeypatch):
    other = tmp_path / "other"
    shutil.copytree(tiny_series / "steps" / "step-000050", other)
    prior = json.loads((other / "prior.json").read_text())
    prior["mixture"]["alphas"] = [[1.0, 1.0]]
    (other / "prior.json").write_text(json.dumps(prior))
    _refused([str(tiny_series / "steps" / "step-000050"), str(other), "--prompts", str(coin_prompts)], capsys,
             monkeypatch, "--prior", "trained under different priors")


def test_plot_compare_draws_the_series(compared, tmp_path, capsys, monkeypatch):
    from llmprobe.analysis.comparison import turning_points

    table, _, _ = compared
    turn, = turning_points(read_comparison(str(table)).frame)
    assert turn.group == "L2-H32" and turn.step in SERIES_STEPS[1:] and turn.last_verdict == "consistent"
    code, _, err = run_cli(["plot-compare", str(table), "-o", str(tmp_path / "e.png")], capsys, monkeypatch)
    assert code == 0, err
    assert (tmp_path / "e.png").stat().st_size > 10_000
