"""The notebook API (issue 16, item 3) gives the CLI's numbers: same trace, same fits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import llmprobe
from llmprobe.errors import ParameterError, UsageError
from llmprobe.tracing.reader import read_trace
from tests.analysis.fixtures import bayesian, records, write_trace
from tests.cli_helpers import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]
COIN = ROOT / "configs/experiments/coin.toml"
NUMBERS = ["prompt_index", "position", "token_id", "next_token_id", "next_logprob", "next_rank", "entropy"]


def assert_same_trace(api: pd.DataFrame, cli: pd.DataFrame) -> None:
    assert list(api.columns) == list(cli.columns)
    assert list(api["prompt_id"]) == list(cli["prompt_id"]) and list(api["token"]) == list(cli["token"])
    for name in NUMBERS:
        np.testing.assert_array_equal(api[name].to_numpy(dtype=float), cli[name].to_numpy(dtype=float), err_msg=name)
    for name in ("topk_ids", "topk_logprobs", "target_logprobs"):
        np.testing.assert_array_equal(np.stack(api[name]), np.stack(cli[name]), err_msg=name)
    assert [list(t) for t in api["topk_tokens"]] == [list(t) for t in cli["topk_tokens"]]


def cli_pipeline(model_args: list[str], tmp_path, capsysbinary, monkeypatch) -> tuple[pd.DataFrame, dict]:
    prompts, trace = tmp_path / "coin.jsonl", tmp_path / "coin.parquet"
    code, _, err = run_cli(["experiment", str(COIN), "--n-max", "4", "--sequences", "1", "-o", str(prompts), "-q"],
                           capsysbinary, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["trace", str(prompts), "-o", str(trace), "--top-k", "5", "-q", *model_args],
                           capsysbinary, monkeypatch)
    assert code == 0, err
    code, stdout, err = run_cli(["fit-posterior", str(trace), "--json", "--bootstrap", "20", "--min-mass", "0", "-q"],
                                capsysbinary, monkeypatch)  # the tiny model puts little mass on the categories
    assert code == 0, err
    return read_trace(trace), json.loads(stdout)[0]


def api_pipeline(model) -> tuple[pd.DataFrame, llmprobe.api.PosteriorResult]:
    frame = llmprobe.trace(llmprobe.experiment(COIN, n_max=4, sequences=1), model=model, top_k=5)
    return frame, llmprobe.fit_posterior(frame, bootstrap=20, min_mass=0.0)


def test_api_equals_cli_on_the_tiny_model(tiny_model_dir, tiny_loaded, tmp_path, capsysbinary, monkeypatch):
    cli_frame, cli_summary = cli_pipeline(["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"],
                                          tmp_path, capsysbinary, monkeypatch)
    frame, fit = api_pipeline(tiny_loaded)
    assert_same_trace(frame, cli_frame)
    assert fit.summary == cli_summary
    assert set(fit.table.columns) >= {"n", "category", "model_prob", "bayes_prob", "kl_bits"}
    # a path and a read_trace frame give the same fit as the in-memory trace
    assert llmprobe.fit_posterior(cli_frame, bootstrap=20, min_mass=0.0).summary == cli_summary
    prior = llmprobe.fit_prior(frame)
    assert prior["categories"] == ["heads", "tails"]


def test_api_takes_strings_and_reports_errors(tiny_loaded):
    frame = llmprobe.trace(["Once upon a time", "The capital of France is"], model=tiny_loaded, top_k=3,
                           targets=[" Paris"])
    assert list(frame["prompt_id"].unique()) == ["1", "2"] and frame["topk_ids"].iloc[0].shape == (3,)
    assert frame.attrs["llmprobe"]["targets"][0]["text"] == " Paris"
    with pytest.raises(ParameterError, match="^top_k: "):  # the parameter's name, as the notebook wrote it
        llmprobe.trace("hi", model=tiny_loaded, top_k=0)
    with pytest.raises(UsageError, match="no trace metadata"):
        llmprobe.fit_posterior(pd.DataFrame({"x": [1]}))


@pytest.mark.parametrize(("options", "parameter", "flag"), [
    ({"min_mass": 1.5}, "min_mass", "--min-mass"), ({"components": "two"}, "components", "--prior-components"),
    ({"folds": 1}, "folds", "--folds"), ({"prior": "dirichlet:1,x"}, "prior", "--prior"),
    ({"min_mass": 0.9}, "min_mass", "--min-mass"),  # found once the marks are read: none has that much mass
])
def test_errors_name_the_parameter_in_python_and_the_flag_on_the_command_line(tmp_path, capsys, monkeypatch, options,
                                                                             parameter, flag):
    path = write_trace(tmp_path / "t.parquet", records("coin", 2, 4), bayesian([1.0], [[1.0, 1.0]]), mass=0.8)
    with pytest.raises(ParameterError) as info:
        llmprobe.fit_posterior(path, bootstrap=2, **options)
    assert info.value.parameter == parameter and str(info.value).startswith(f"{parameter}: ")
    (name, value), = options.items()
    code, _, err = run_cli(["fit-posterior", str(path), "--bootstrap", "2", flag, str(value)], capsys, monkeypatch)
    assert_one_line_error(code, err, f"{flag}: {info.value.message}")


@pytest.mark.parametrize(("arguments", "parameter", "flag"), [
    ({"sample": True, "seed": -1}, "seed", "--seed"),  # issue 26 item 7: was a bare ValueError from numpy
    ({"top_k": "5"}, "top_k", None), ({"top_k": 2.5}, "top_k", None), ({"max_new_tokens": -2}, "max_new_tokens",
                                                                          "--max-new-tokens"),
    ({"temperature": "hot", "sample": True}, "temperature", None), ({"sample": "yes"}, "sample", None),
    ({"batch_size": 0}, "batch_size", "--batch-size"), ({"targets": [" Paris", 3]}, "targets", None),
    ({"targets": [" Paris", " Paris"]}, "targets", "--targets"), ({"layers": 7}, "layers", None),
    ({"layers": "0,x"}, "layers", "--layers"), ({"top_k": 10**6}, "top_k", "--top-k"),
    ({"temprature": 0.5}, "temprature", None), ({"model": 3}, "model", None),
])
def test_every_bad_trace_argument_names_its_parameter(arguments, parameter, flag, tiny_loaded, tiny_model_dir,
                                                     tmp_path, capsys, monkeypatch):
    """Issue 26 item 7: every bad argument of llmprobe.trace is a UsageError (ParameterError) naming the parameter
    as the notebook wrote it; the command line names the flag for the same check."""
    with pytest.raises(ParameterError) as info:
        llmprobe.trace("Once upon a time", **{"model": tiny_loaded, "max_new_tokens": 1, **arguments})
    assert info.value.parameter == parameter and str(info.value).startswith(f"{parameter}: "), str(info.value)
    if flag is not None:
        prompts = tmp_path / "p.txt"
        prompts.write_text("Once upon a time\n")
        args = ["trace", str(prompts), "-o", str(tmp_path / "t.parquet"), "--model", str(tiny_model_dir), "-q"]
        for name, v in arguments.items():
            option = "--" + name.replace("_", "-")
            args += ([option] if v is True else [option, ",".join(v) if isinstance(v, list) else str(v)])
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert_one_line_error(code, err, flag)


@pytest.mark.parametrize(("prompts", "needle"), [
    (5, "prompts: expected a prompt string, a record dict or a list of them"),
    (b"hi", "prompts: expected"),
    ([{"prompt": "hi", "x": "\ud800"}], "prompts[0]: contains \\ud800, a lone UTF-16 surrogate"),
    (["fine", "\udfff"], "prompts[1]: contains \\udfff"),
    ([3], "prompts[0]: expected a prompt string or a record dict"),
])
def test_bad_prompts_are_refused_before_the_model_runs(prompts, needle, tiny_loaded):
    """Issue 26 item 7: lone surrogates crashed the engine with UnicodeEncodeError (read_prompts refuses them)."""
    with pytest.raises(UsageError) as info:
        llmprobe.trace(prompts, model=tiny_loaded)
    assert str(info.value).startswith(needle), str(info.value)


def test_a_single_record_is_one_prompt(tiny_loaded):
    """Issue 26 item 7: a dict used to be iterated, so its keys ("id", "prompt") were traced as two prompts."""
    frame = llmprobe.trace({"id": "a", "prompt": "Once upon a time"}, model=tiny_loaded, top_k=2)
    assert list(frame["prompt_id"].unique()) == ["a"]
    assert frame["token"].str.cat() == llmprobe.trace("Once upon a time", model=tiny_loaded, top_k=2)["token"].str.cat()
    single = llmprobe.trace("The capital of France is", model=tiny_loaded, top_k=2, targets=" Paris")
    assert [t["text"] for t in single.attrs["llmprobe"]["targets"]] == [" Paris"]  # one target, not five letters


def test_import_llmprobe_stays_light():
    code = ("import sys, llmprobe; assert 'trace' in llmprobe.__all__;"
            " print(','.join(m for m in ('torch', 'pandas', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == ""


@pytest.mark.real_model
def test_api_equals_cli_on_the_default_model(real_loaded, tmp_path, capsysbinary, monkeypatch):
    cli_frame, cli_summary = cli_pipeline(["--device", "cpu", "--dtype", "float32"], tmp_path, capsysbinary,
                                          monkeypatch)
    frame, fit = api_pipeline(real_loaded)
    assert frame.attrs["llmprobe"]["model"] == "SmolLM2-135M-Instruct"
    assert_same_trace(frame, cli_frame)
    assert fit.summary == cli_summary
