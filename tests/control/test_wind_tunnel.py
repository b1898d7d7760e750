"""``llmprobe wind-tunnel``: a tiny control trained for a few seconds loads, traces and moves toward Bayes.

The full-size goals (KL <= 0.01 bits and friends) are measured by benchmarks/bench_wind_tunnel.py,
not here: this trains a 2-layer, 32-wide control on 12-flip coins for 40 steps and checks what
must hold for any run — the checkpoint is an ordinary transformers Llama, the tokenizer puts every
target in one token and every mark on a token boundary, the loss falls, and the traced KL to the
exact posterior is lower than the same model's before training. Bad input fails in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmprobe.control.prior import parse_prior_spec
from llmprobe.errors import UsageError
from tests.cli_helpers import assert_one_line_error, run_cli, run_cli_outside_a_test
from tests.control.fixtures import COIN, TINY, write_coin


@pytest.fixture(scope="module")
def coin_toml(tmp_path_factory) -> Path:
    return write_coin(tmp_path_factory.mktemp("experiment"))


@pytest.fixture(scope="module")
def control(coin_toml, tmp_path_factory) -> Path:
    """A control trained once for the module (40 steps, a few seconds), through the CLI."""
    out = tmp_path_factory.mktemp("control") / "coin-control"
    code, stdout, err = run_cli_outside_a_test(["wind-tunnel", str(coin_toml), "-o", str(out), "--steps", "40",
                                                "--json", "-q", *TINY])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["sequences_seen"] == 40 * 16
    return out


def test_checkpoint_is_an_ordinary_transformers_llama(control):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(control)
    tokenizer = AutoTokenizer.from_pretrained(control)
    assert isinstance(model, LlamaForCausalLM) and model.config.num_hidden_layers == 2
    for target in (" heads", " tails"):
        assert len(tokenizer(target, add_special_tokens=False)["input_ids"]) == 1
    enc = tokenizer("I just flipped a coin, and it came up heads, then", return_offsets_mapping=True)
    assert enc["input_ids"][0] == tokenizer.bos_token_id
    assert [end for _, end in enc["offset_mapping"]][-1] == len("I just flipped a coin, and it came up heads, then")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits
    assert logits.shape[-1] == len(tokenizer)
    files = {p.name for p in control.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "prior.json", "training.json"} <= files
    card = (control / "README.md").read_text()
    assert "Dirichlet(3, 1)" in card and "seed 0" in card and "| step | loss |" in card
    assert not any(p.name.endswith(".partial") for p in control.parent.iterdir())


def test_training_moves_the_model_toward_the_posterior(control):
    training = json.loads((control / "training.json").read_text())
    curve = training["curve"]
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    held = training["held_out"]
    assert held["kl_bits_trained"] < 0.6 * held["kl_bits_untrained"]


def test_traced_kl_to_the_exact_posterior_beats_the_untrained_model(control, coin_toml, tmp_path, capsys,
                                                                    monkeypatch):
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    untrained = tmp_path / "untrained"
    shutil.copytree(control, untrained)
    torch.manual_seed(0)  # the seed the control started from
    LlamaForCausalLM(AutoConfig.from_pretrained(control)).save_pretrained(untrained)
    prompts = tmp_path / "coin.jsonl"
    assert run_cli(["experiment", str(coin_toml), "-o", str(prompts), "-q"], capsys, monkeypatch)[0] == 0
    kl = {}
    for name, model in (("trained", control), ("untrained", untrained)):
        trace = tmp_path / f"{name}.parquet"
        code, _, err = run_cli(["trace", str(prompts), "--model", str(model), "--targets", " heads, tails",
                                "-o", str(trace), "--device", "cpu", "-q"], capsys, monkeypatch)
        assert code == 0, err
        # --min-mass 0: the untrained model puts little mass on the two targets; every mark is compared
        code, out, err = run_cli(["fit-posterior", str(trace), "--prior", str(control / "prior.json"), "--json",
                                  "--bootstrap", "2", "--min-mass", "0", "-q"], capsys, monkeypatch)
        assert code == 0, err
        summary = json.loads(out)[0]
        assert summary["n_marks"] == 12 * 13
        kl[name] = summary["mean_kl_bits"]
    assert kl["trained"] < 0.6 * kl["untrained"], kl


def test_same_seed_same_checkpoint(coin_toml, tmp_path, capsys, monkeypatch):
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        code, _, err = run_cli(["wind-tunnel", str(coin_toml), "-o", str(out), "--steps", "3", "-q", *TINY,
                                "--eval-sequences", "4"], capsys, monkeypatch)
        assert code == 0, err
        outputs.append(out)
    assert (outputs[0] / "model.safetensors").read_bytes() == (outputs[1] / "model.safetensors").read_bytes()
    assert (outputs[0] / "tokenizer.json").read_bytes() == (outputs[1] / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------------------------------ priors
def test_prior_specs_parse_to_the_same_mixture():
    cats = ["heads", "tails"]
    single = parse_prior_spec("dirichlet:2,3", cats)
    assert single.weights.tolist() == [1.0] and single.alphas.tolist() == [[2.0, 3.0]]
    mixture = parse_prior_spec("mixture:0.5*1,1+0.25*20,2+0.25*2,20", cats)
    assert mixture.weights.tolist() == [0.5, 0.25, 0.25]
    assert mixture.alphas.tolist() == [[1, 1], [20, 2], [2, 20]]
    assert np.allclose(mixture.mean, [0.5, 0.5])
    assert parse_prior_spec("uniform", cats).alphas.tolist() == [[1.0, 1.0]]
    for prior in (single, mixture):  # the canonical spelling gives the same prior back
        again = parse_prior_spec(prior.canonical, cats)
        assert np.array_equal(again.weights, prior.weights) and np.array_equal(again.alphas, prior.alphas)


def test_sampled_thetas_follow_the_prior():
    prior = parse_prior_spec("mixture:0.7*30,10+0.3*10,30", ["a", "b"])
    thetas = prior.sample_thetas(np.random.default_rng(0), 20000)
    assert abs(thetas[:, 0].mean() - (0.7 * 0.75 + 0.3 * 0.25)) < 0.01
    assert abs((thetas[:, 0] > 0.5).mean() - 0.7) < 0.02


@pytest.mark.parametrize(("spec", "needle"), [
    ("dirichlet:1,1,1", "3 concentrations per component but the experiment has 2 categories"),
    ("dirichlet:0,1", "finite and > 0, got 0"),
    ("dirichlet:-2,1", "finite and > 0, got -2"),
    ("dirichlet:a,1", "comma-separated numbers"),
    ("mixture:0.5*1,1+0.6*2,2", "sum to 1"),
    ("mixture:0.5*1,1+0.5*2", "different numbers of concentrations"),
    ("mixture:1,1", "expected WEIGHT*A1,A2"),
    ("beta:2,2", "expected 'dirichlet:"),
])
def test_bad_prior_specs(spec, needle):
    with pytest.raises(UsageError, match="--prior") as info:
        parse_prior_spec(spec, ["heads", "tails"])
    assert needle in str(info.value)


# ------------------------------------------------------------------------------------------ bad input
def _fails(args, capsys, monkeypatch, *needles, output: Path | None = None) -> None:
    code, _, err = run_cli(["wind-tunnel", *args], capsys, monkeypatch)
    assert_one_line_error(code, err, *needles)
    if output is not None:
        assert not output.exists()


def test_unknown_experiment_file(tmp_path, capsys, monkeypatch):
    _fails([str(tmp_path / "nope.toml"), "-o", str(tmp_path / "out")], capsys, monkeypatch, "nope.toml",
           "cannot read experiment file", output=tmp_path / "out")


def test_prior_that_does_not_match_the_categories(coin_toml, tmp_path, capsys, monkeypatch):
    _fails([str(coin_toml), "-o", str(tmp_path / "out"), "--prior", "dirichlet:1,2,3"], capsys, monkeypatch,
           "--prior", "3 concentrations", "2 categories", output=tmp_path / "out")


@pytest.mark.parametrize("spec", ["dirichlet:0,2", "mixture:0.5*1,-1+0.5*2,2"])
def test_zero_or_negative_concentration(spec, coin_toml, tmp_path, capsys, monkeypatch):
    _fails([str(coin_toml), "-o", str(tmp_path / "out"), "--prior", spec], capsys, monkeypatch, "--prior",
           "must be finite and > 0", output=tmp_path / "out")


@pytest.mark.parametrize(("table", "needle"), [
    ("[prior]\nalpha = [1.0, 0.0]\n", "must be finite and > 0"),
    ("[prior]\nalpha = [1.0, 2.0, 3.0]\n", "2 categories"),
    ("[prior]\nalpah = [1.0, 2.0]\n", "prior.alpah: unknown key"),
    ("[[prior.components]]\nweight = 0.5\nalpha = [1.0, 2.0]\n", "sum to 1"),
])
def test_bad_prior_table(table, needle, tmp_path, capsys, monkeypatch):
    config = tmp_path / "coin.toml"
    config.write_text(COIN + table)
    _fails([str(config), "-o", str(tmp_path / "out")], capsys, monkeypatch, str(config), needle,
           output=tmp_path / "out")


def test_no_prior_anywhere(tmp_path, capsys, monkeypatch):
    config = tmp_path / "coin.toml"
    config.write_text(COIN)
    _fails([str(config), "-o", str(tmp_path / "out")], capsys, monkeypatch, "no prior: give --prior")


def test_existing_output_needs_force(coin_toml, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    _fails([str(coin_toml), "-o", str(out)], capsys, monkeypatch, "already exists; pass --force")
    assert (out / "keep").read_text() == "mine"


def test_missing_output_and_bad_sizes(coin_toml, tmp_path, capsys, monkeypatch):
    _fails([str(coin_toml)], capsys, monkeypatch, "--output")
    _fails([str(coin_toml), "-o", str(tmp_path / "out"), "--hidden", "30", "--heads", "4"], capsys, monkeypatch,
           "--hidden", output=tmp_path / "out")
    _fails([str(coin_toml), "-o", str(tmp_path / "out"), "--objective", "mse"], capsys, monkeypatch,
           "--objective", output=tmp_path / "out")
