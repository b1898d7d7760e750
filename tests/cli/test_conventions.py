"""Command-line conventions (issue 16): results on stdout, untruncated tables in pipes, one help
style with choices, ``--version``/``-h``, ``-`` inputs, English plurals, and fast failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmprobe.cli.app import COMMANDS
from tests.analysis.test_fits import coin_records, synthetic_trace
from tests.cli_helpers import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def coin_trace(tmp_path):
    return synthetic_trace(tmp_path / "coin.parquet", coin_records(sequences=3, n_max=6), np.array([2.0, 3.0]), 0.9)


@pytest.fixture
def tiny_trace(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    out = tmp_path / "t.parquet"
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\n")
    code, _, err = run_cli(["trace", str(prompts), "-o", str(out), "--model", str(tiny_model_dir), "--top-k", "3"],
                           capsysbinary, monkeypatch)
    assert code == 0, err
    assert "for 1 prompt to" in err  # "1 prompt", not "1 prompts"
    return out


# ------------------------------------------------------------------------------------------ item 1: stdout
def test_inspect_table_is_the_result_on_stdout(tiny_trace, capsysbinary, monkeypatch):
    code, stdout, err = run_cli(["inspect", str(tiny_trace)], capsysbinary, monkeypatch)
    assert code == 0, err
    assert b"prompt 1" in stdout and b"top-5 candidates" in stdout and err == ""


def test_fit_tables_on_stdout_unless_stdout_carries_data(coin_trace, tmp_path, capsysbinary, monkeypatch):
    code, stdout, err = run_cli(["fit-posterior", str(coin_trace), "--bootstrap", "10"], capsysbinary, monkeypatch)
    assert code == 0, err
    assert b"posterior predictive by number of examples" in stdout and "by number of examples" not in err
    code, stdout, err = run_cli(["fit-posterior", str(coin_trace), "--bootstrap", "10", "--json"], capsysbinary,
                                monkeypatch)
    assert code == 0, err
    assert json.loads(stdout)[0]["n_bootstrap"] == 10 and "by number of examples" in err  # tables moved to stderr
    # fit-prior piped without -o writes the prior JSON to stdout: then its tables go to stderr ...
    code, stdout, err = run_cli(["fit-prior", str(coin_trace)], capsysbinary, monkeypatch)
    assert code == 0, err
    assert json.loads(stdout)["categories"] == ["heads", "tails"] and "BIC" in err
    # ... and with -o the tables are the result
    code, stdout, err = run_cli(["fit-prior", str(coin_trace), "-o", str(tmp_path / "p.json")], capsysbinary,
                                monkeypatch)
    assert code == 0 and b"BIC" in stdout and "BIC" not in err


def test_models_table_on_stdout(capsysbinary, monkeypatch):
    code, stdout, err = run_cli(["models"], capsysbinary, monkeypatch)
    assert code == 0, err
    assert b"default model: SmolLM2-135M-Instruct" in stdout and b"cached conversions" in stdout


# ------------------------------------------------------------------------------------------ item 2: width
def test_piped_tables_never_cut_numbers(coin_trace, capsysbinary, monkeypatch):
    """Off a terminal rich would fit tables to 80 columns and print ``0.06…``."""
    monkeypatch.delenv("COLUMNS", raising=False)
    code, stdout, err = run_cli(["fit-posterior", str(coin_trace), "--bootstrap", "10"], capsysbinary, monkeypatch)
    assert code == 0, err
    text = stdout.decode()
    assert "…" not in text
    assert "heads model" in text and "heads Bayes" in text and "KL(Bayes‖model)" in text
    code, summary, _ = run_cli(["fit-posterior", str(coin_trace), "--bootstrap", "10", "--json"], capsysbinary,
                               monkeypatch)
    gamma = json.loads(summary)[0]["forgetting"]["gamma"]
    assert f"{gamma:.3f}" in text


# ------------------------------------------------------------------------------------------ item 7: conventions
def test_version_and_short_help(capsys, monkeypatch):
    from llmprobe import __version__

    code, stdout, _ = run_cli(["--version"], capsys, monkeypatch)
    assert code == 0 and stdout.strip() == f"llmprobe {__version__}"
    code, stdout, _ = run_cli(["version"], capsys, monkeypatch)
    assert code == 0 and stdout.strip() == f"llmprobe {__version__}"
    code, stdout, _ = run_cli(["trace", "-h"], capsys, monkeypatch)
    assert code == 0 and "--top-k" in stdout


def _help(command: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")
    code, stdout, err = run_cli([command, "--help"], capsys, monkeypatch)
    assert code == 0, err
    return stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_has_one_metavar_style_and_no_twins(command, capsys, monkeypatch):
    text = _help(command, capsys, monkeypatch)
    assert "<str>" not in text and "<bool>" not in text and "<int" not in text and "<float>" not in text
    assert "--no-" not in text  # --force, --quiet, ... without --no-force twins
    if command != "version":
        assert "-q" in text, f"{command} prints, so it takes -q"


@pytest.mark.parametrize("command,choices", [
    ("trace", ["parquet|jsonl|csv", "auto|float32|bfloat16|float16", "auto|cpu|cuda[:N]|mps", "auto|text|jsonl|parquet",
               "left|right", "local|ray"]),
    ("martingale", ["auto|float32|bfloat16|float16"]),
    ("experiment", ["marks|per-n|both"]),
    ("plot-layers", ["next|targets"]),
    ("continuity", ["topk|targets"]),
    ("report", ["png|svg"]),
])
def test_help_shows_choices(command, choices, capsys, monkeypatch):
    text = _help(command, capsys, monkeypatch)
    for choice in choices:
        assert choice in text, choice


def test_trace_help_groups_options_and_shows_ray_defaults(capsys, monkeypatch):
    text = _help("trace", capsys, monkeypatch)
    for panel in ("Input", "Model", "Capture", "Generation", "Output", "Scale-out"):
        assert f"─ {panel} ─" in text, panel
    scale = text[text.index("─ Scale-out ─"):]
    assert "--ray-actors" in scale and "[default: (1)]" in scale and "--batch-size" in scale


def test_choices_are_checked_by_the_parser(coin_trace, capsysbinary, monkeypatch):
    code, _, err = run_cli(["continuity", str(coin_trace), "--over", "words"], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "--over", "'words' is not one of 'topk', 'targets'")
    assert "Value error" not in err


def test_plot_prior_reads_stdin(tmp_path, coin_trace, capsysbinary, monkeypatch):
    code, prior, err = run_cli(["fit-prior", str(coin_trace)], capsysbinary, monkeypatch)
    assert code == 0, err
    image = tmp_path / "prior.png"
    code, _, err = run_cli(["plot-prior", "-", "-o", str(image)], capsysbinary, monkeypatch, stdin=prior)
    assert code == 0, err
    assert image.read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_cli(["plot-prior", "-"], capsysbinary, monkeypatch, stdin=prior)
    assert_one_line_error(code, err, "-o", "stdin")


def test_dash_inputs_work_or_are_refused(coin_trace, tmp_path, capsysbinary, monkeypatch):
    config = (ROOT / "configs/experiments/coin.toml").read_bytes()
    code, stdout, err = run_cli(["experiment", "-", "--n-max", "2", "--sequences", "1"], capsysbinary, monkeypatch,
                                stdin=config)
    assert code == 0, err
    assert len(stdout.decode().splitlines()) == 11 and "wrote 11 prompts" in err
    code, _, err = run_cli(["fit-posterior", "-", "--prior", "-"], capsysbinary, monkeypatch,
                           stdin=coin_trace.read_bytes())
    assert_one_line_error(code, err, "--prior", "standard input")
    code, _, err = run_cli(["report", str(coin_trace), "-"], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "standard input")


# ------------------------------------------------------------------------------------------ item 8: fast failure
HEAVY = ("torch", "transformers", "pandas", "pyarrow", "numpy", "scipy", "matplotlib")
PROBE = """
import sys
from llmprobe.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("args", [
    ["trace", "nope.txt"], ["trace", "configs/prompts/demo.txt", "--format", "xml"], ["inspect", "nope.parquet"],
    ["fit-posterior", "nope.parquet"], ["fit-prior", "nope.parquet"], ["plot", "nope.parquet"],
    ["fit-scaling", "nope.parquet"], ["fit-scaling", "t.parquet", "--tasks", "0"],
    ["fit-posterior", "configs/prompts/demo.txt", "--martingale", "nope.jsonl"],
    ["plot-icl", "nope.parquet"], ["plot-prior", "nope.json"], ["plot-layers", "nope.parquet", "-o", "x.png"],
    ["report", "nope.parquet"], ["continuity", "nope.parquet"], ["martingale", "nope.toml"],
    ["experiment", "nope.toml"], ["trace", "configs/prompts/demo.txt", "--top-k", "0"],
    ["ablate", "nope.jsonl", "--over", "heads"],
])
def test_trivial_errors_fail_before_heavy_imports(args):
    """A typo fails in well under a second because nothing heavy is imported (benchmarks/bench_fail_fast.py times it)."""
    run = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.stderr.startswith("llmprobe: error:") and len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stdout.strip() == "", f"imported {run.stdout.strip()} before failing"
