"""``wind-tunnel --save-every`` and size grids: the series layout, its manifest, determinism, and bad input.

What must hold for any series: every listed checkpoint is an ordinary checkpoint that ``trace --model`` loads,
taken at the step the manifest says (0, N, 2N, ... and the last); saving does not change training (the final
weights are byte-identical to a run without --save-every); a grid trains each size exactly as that size alone;
and two runs writing one ``-o`` never silently replace each other (two real processes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmprobe.control.series import read_series
from llmprobe.errors import UsageError
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.control.fixtures import COIN, SERIES_STEPS, write_coin

QUICK = ["--batch-size", "8", "--eval-sequences", "8", "--warmup-steps", "2", "-q"]


@pytest.fixture(scope="module")
def coin_toml(tmp_path_factory) -> Path:
    return write_coin(tmp_path_factory.mktemp("experiment"))


def _wind_tunnel(args: list[str], capsys, monkeypatch) -> str:
    code, out, err = run_cli(["wind-tunnel", *args], capsys, monkeypatch)
    assert code == 0, err
    return out


def test_series_layout_and_manifest(tiny_series):
    manifest = json.loads((tiny_series / "manifest.json").read_text())
    assert manifest["format"] == "llmprobe.series/1" and manifest["save_every"] == 50
    listed = manifest["checkpoints"]
    assert [c["step"] for c in listed] == SERIES_STEPS
    assert [c["path"] for c in listed] == [f"steps/step-{s:06d}" for s in SERIES_STEPS]
    assert {c["size"] for c in listed} == {"L2-H32"} and len({c["parameters"] for c in listed}) == 1
    for entry in listed:
        training = json.loads((tiny_series / entry["path"] / "training.json").read_text())
        assert training["step"] == entry["step"] and training["parameters"] == entry["parameters"]
        assert training["held_out"]["kl_bits_trained"] == entry["held_out_kl_bits"]
        assert (tiny_series / entry["path"] / "prior.json").is_file()
    # the directory itself is the final checkpoint, the same weights as the last step
    assert (tiny_series / "model.safetensors").read_bytes() == \
        (tiny_series / "steps" / "step-000200" / "model.safetensors").read_bytes()
    assert (tiny_series / "steps" / "step-000000" / "model.safetensors").read_bytes() != \
        (tiny_series / "steps" / "step-000050" / "model.safetensors").read_bytes()
    assert not [p for p in tiny_series.rglob("*") if p.name.endswith((".partial", ".old"))]
    expanded = read_series(tiny_series / "manifest.json")
    assert [c.name for c, _ in expanded] == [f"L2-H32@{s}" for s in SERIES_STEPS]


def test_every_checkpoint_loads_and_traces(tiny_series, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("I just flipped a coin, and it came up heads, then\n")
    for step in (0, 100):
        trace = tmp_path / f"{step}.parquet"
        code, _, err = run_cli(["trace", str(prompts), "--model", str(tiny_series / "steps" / f"step-{step:06d}"),
                                "-o", str(trace), "--device", "cpu", "-q"], capsys, monkeypatch)
        assert code == 0, err


def test_saving_a_series_does_not_change_training(coin_toml, tmp_path, capsys, monkeypatch):
    size = ["--layers", "1", "--hidden", "16", "--steps", "7", *QUICK]
    _wind_tunnel([str(coin_toml), "-o", str(tmp_path / "plain"), *size], capsys, monkeypatch)
    _wind_tunnel([str(coin_toml), "-o", str(tmp_path / "series"), "--save-every", "3", *size], capsys, monkeypatch)
    series = tmp_path / "series"
    assert sorted(p.name for p in (series / "steps").iterdir()) == ["step-000000", "step-000003", "step-000006",
                                                                    "step-000007"]
    assert (series / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert not (tmp_path / "plain" / "manifest.json").exists()  # a single control is not a series


def test_a_size_grid_trains_each_size_as_alone(coin_toml, tmp_path, capsys, monkeypatch):
    run = ["--steps", "4", *QUICK]
    out = _wind_tunnel([str(coin_toml), "-o", str(tmp_path / "grid"), "--layers", "1,2", "--hidden", "16", "--json",
                        *run], capsys, monkeypatch)
    listed = json.loads(out)["checkpoints"]
    assert [(c["size"], c["step"], c["path"]) for c in listed] == [("L1-H16", 4, "L1-H16"), ("L2-H16", 4, "L2-H16")]
    assert listed[0]["parameters"] < listed[1]["parameters"]
    assert json.loads((tmp_path / "grid" / "manifest.json").read_text())["checkpoints"] == listed
    _wind_tunnel([str(coin_toml), "-o", str(tmp_path / "alone"), "--layers", "2", "--hidden", "16", *run], capsys,
                 monkeypatch)
    assert (tmp_path / "grid" / "L2-H16" / "model.safetensors").read_bytes() == \
        (tmp_path / "alone" / "model.safetensors").read_bytes()


def test_the_sweep_table_gives_the_grid_and_flags_win(tmp_path, capsys, monkeypatch):
    config = write_coin(tmp_path)
    config.write_text(config.read_text() + "\n[sweep]\nlayers = [1]\nhidden = [8, 16]\nsave_every = 2\n")
    out = _wind_tunnel([str(config), "-o", str(tmp_path / "grid"), "--steps", "2", "--json", *QUICK], capsys,
                       monkeypatch)
    assert [(c["size"], c["step"]) for c in json.loads(out)["checkpoints"]] == \
        [("L1-H8", 0), ("L1-H8", 2), ("L1-H16", 0), ("L1-H16", 2)]
    out = _wind_tunnel([str(config), "-o", str(tmp_path / "one"), "--steps", "2", "--hidden", "8", "--save-every",
                        "1", "--json", *QUICK], capsys, monkeypatch)
    assert [(c["size"], c["step"]) for c in json.loads(out)["checkpoints"]] == [("L1-H8", 0), ("L1-H8", 1),
                                                                                 ("L1-H8", 2)]


@pytest.mark.parametrize(("args", "needles"), [
    (["--save-every", "0"], ["--save-every", "must be 1 or more, got 0"]),
    (["--save-every", "-5"], ["--save-every", "must be 1 or more"]),
    (["--hidden", "16,30"], ["--hidden 30 must be a multiple of --heads 4"]),
    (["--layers", "1,0"], ["--layers", "must be 1 or more, got 0"]),
    (["--layers", "1,two"], ["--layers", "comma-separated whole numbers"]),
])
def test_bad_series_options_fail_in_one_line_and_write_nothing(args, needles, coin_toml, tmp_path, capsys,
                                                               monkeypatch):
    code, _, err = run_cli(["wind-tunnel", str(coin_toml), "-o", str(tmp_path / "out"), *args], capsys, monkeypatch)
    assert_one_line_error(code, err, *needles)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("table", "needle"), [
    ("[sweep]\nlayrs = [1]\n", "sweep.layrs: unknown key"),
    ("[sweep]\nhidden = [16, 0]\n", "sweep.hidden: must be an array of whole numbers"),
    ("[sweep]\nsave_every = 0\n", "sweep.save_every: must be a whole number, 1 or more"),
])
def test_bad_sweep_table(table, needle, tmp_path, capsys, monkeypatch):
    config = tmp_path / "coin.toml"
    config.write_text(COIN + "\n[prior]\nalpha = [3.0, 1.0]\n" + table)
    code, _, err = run_cli(["wind-tunnel", str(config), "-o", str(tmp_path / "out")], capsys, monkeypatch)
    assert_one_line_error(code, err, str(config), needle)
    assert not (tmp_path / "out").exists()


def test_a_manifest_naming_a_missing_checkpoint_is_one_line(tiny_series, tmp_path):
    copy = tmp_path / "series"
    shutil.copytree(tiny_series, copy)
    shutil.rmtree(copy / "steps" / "step-000100")
    with pytest.raises(UsageError, match="names checkpoint steps/step-000100, which is not there") as info:
        read_series(copy / "manifest.json")
    assert str(copy / "manifest.json") in str(info.value)


def test_two_runs_to_one_output_never_replace_each_other(coin_toml, tmp_path):
    """Both start before either finishes; the second to finish keeps the first's checkpoint and says so."""
    output = tmp_path / "control"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {seed: subprocess.Popen([sys.executable, "-m", "llmprobe", "wind-tunnel", str(coin_toml), "-o", str(output),
                                    "--layers", "1", "--hidden", "16", "--steps", "250", "--seed", str(seed), *QUICK],
                                   stderr=subprocess.PIPE, text=True, env=env)
            for seed in (1, 2)}
    results = {seed: (run.wait(timeout=300), run.stderr.read()) for seed, run in runs.items()}
    winners = [seed for seed, (code, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    (loser_code, loser_err), = [r for seed, r in results.items() if seed not in winners]
    assert_one_line_error(loser_code, loser_err, str(output), "was created by another run while this one worked",
                          "nothing was replaced")
    training = json.loads((output / "training.json").read_text())
    assert training["settings"]["seed"] == winners[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control"]  # no staging directory left behind
