"""``trace --engine ray`` on a local Ray: the part-file directory equals the local engine, row for row (and
``compare --engine ray``: the same rows as the local engine).

One local Ray (2 CPUs, its temp files under the test's tmp dir) serves the module. The actor pool is
one actor of one CPU, so Ray Data's write tasks always have a CPU left (an actor pool that takes
every CPU of a 2-CPU machine can starve them).
"""

from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq
import pytest

from llmprobe.tracing.settings import TraceSettings
from llmprobe.tracing.reader import open_trace
from llmprobe.tracing.schema import META_KEY, VOCAB_KEY
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.model.comparison import PROMPTS, assert_same_rows, records, trace_table

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'llmprobe[ray]')")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")),
             log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    extra = [{"prompt": "Once upon a time there was"}, {"prompt": "I just rolled a die and it showed 3, then"}]
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS + extra))
    return path


def ray_trace(args: list[str], capsysbinary, monkeypatch) -> tuple[int, str]:
    code, out, err = run_cli(["trace", *args, "--engine", "ray", "--ray-prompts-per-task", "3", "-q"],
                             capsysbinary, monkeypatch)
    assert out == b""  # data goes to the directory, nothing to stdout
    return code, err


def test_ray_trace_of_tiny_model_equals_local_engine(local_ray, tiny_model_dir, tiny_loaded, prompt_file, tmp_path,
                                                     capsysbinary, monkeypatch):
    out = tmp_path / "trace"
    code, err = ray_trace([str(prompt_file), "-m", str(tiny_model_dir), "-o", str(out), "--dtype", "float32",
                           "--top-k", "6", "--targets", " heads, tails", "--max-new-tokens", "2"],
                          capsysbinary, monkeypatch)
    assert code == 0, err
    parts = sorted(out.glob("*.parquet"))
    assert len(parts) == 2  # 5 prompts, 3 per task
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    settings = TraceSettings(top_k=6, targets=[" heads", " tails"], max_new_tokens=2)
    want = trace_table(tiny_loaded, settings, records(json.loads(line) for line in prompt_file.read_text().splitlines()))
    got = open_trace(out)
    assert_same_rows(got.table, want, atol=1e-5)
    assert got.meta["engine"] == "ray" and got.meta["n_prompts"] == 5
    assert got.meta["settings"]["targets"] == [" heads", " tails"]
    assert got.meta["weights_sha256"].startswith("sha256:")
    for part in parts:  # every part is a complete trace file on its own
        kv = pq.read_schema(part).metadata
        assert META_KEY in kv and len(json.loads(kv[VOCAB_KEY])) == tiny_loaded.vocab_size
    code, inspected, err = run_cli(["inspect", str(out), "--json"], capsysbinary, monkeypatch)
    assert code == 0 and inspected.count(b"\n") >= want.num_rows, err


@pytest.mark.real_model
def test_ray_trace_of_real_model_equals_local_engine(local_ray, real_loaded, tmp_path, capsysbinary, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "real"
    code, err = ray_trace([str(prompts), "-o", str(out), "--dtype", "float32", "--device", "cpu", "--top-k", "5",
                           "--targets", " heads, tails"], capsysbinary, monkeypatch)
    assert code == 0, err
    got = open_trace(out)
    want = trace_table(real_loaded, TraceSettings(top_k=5, targets=[" heads", " tails"]), records())
    assert_same_rows(got.table, want, atol=1e-4)
    assert got.meta["model"] == real_loaded.source.label
    assert got.meta["weights_sha256"] == real_loaded.source.weights_sha256
    top1 = got.table.filter(got.table.column("prompt_index").to_numpy() == 1).sort_by("position")
    assert top1.column("topk_ids")[-1].as_py()[0] == real_loaded.tokenizer(" Paris")["input_ids"][0]


def test_actor_errors_come_back_as_one_line(local_ray, tiny_model_dir, prompt_file, tmp_path, capsysbinary,
                                            monkeypatch):
    """The driver cannot check the actors' device; their UsageError must still reach the user as one line."""
    out = tmp_path / "trace"
    code, err = ray_trace([str(prompt_file), "-m", str(tiny_model_dir), "-o", str(out), "--device", "cuda"],
                          capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "--device", "CUDA is not available")
    assert not out.exists() and not list(tmp_path.glob(".trace*"))


def test_driver_checks_fail_before_any_actor(local_ray, tiny_model_dir, prompt_file, tmp_path, capsysbinary,
                                             monkeypatch):
    base = [str(prompt_file), "-m", str(tiny_model_dir)]
    cases = [
        (["-o", str(tmp_path / "a"), "--ray-actors", "3"], ("--ray-cpus-per-actor", "need 3 CPU(s)", "has 2")),
        (["-o", str(tmp_path / "a"), "--ray-gpus-per-actor", "1"], ("--ray-gpus-per-actor", "has 0")),
        (["-o", str(tmp_path / "a"), "--top-k", "100000"], ("--top-k", "vocabulary size")),
        (["-o", "-"], ("-o", "directory of Parquet part files")),
        (["-o", str(tmp_path / "a"), "--format", "jsonl"], ("--format",)),
        (["-o", str(prompt_file)], ("is also an input",)),
        (["-o", str(tmp_path / "a"), "--resume"], ("--resume",)),
    ]
    for extra, needles in cases:
        code, err = ray_trace([*base, *extra], capsysbinary, monkeypatch)
        assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "a").exists()


def test_ray_options_need_the_ray_engine(tiny_model_dir, prompt_file, tmp_path, capsysbinary, monkeypatch):
    code, _, err = run_cli(["trace", str(prompt_file), "-m", str(tiny_model_dir), "-o", str(tmp_path / "t.parquet"),
                            "--ray-actors", "2"], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "--ray-actors", "--engine ray")


def test_missing_ray_says_how_to_install(tiny_model_dir, prompt_file, tmp_path, capsysbinary, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    code, err = ray_trace([str(prompt_file), "-m", str(tiny_model_dir), "-o", str(tmp_path / "t")],
                          capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "--engine", "pip install 'llmprobe[ray]'")


def test_compare_on_ray_gives_the_local_rows(local_ray, tiny_series, coin_prompts, capsys, monkeypatch):
    """``compare --engine ray``: each model on its own actor (two at once), the same rows as the local engine."""
    models = [str(tiny_series / "steps" / f"step-{step:06d}") for step in (0, 200)]
    rows = {}
    for engine in (["--engine", "ray", "--ray-actors", "2"], []):
        code, out, err = run_cli(["compare", *models, "--prompts", str(coin_prompts), "--bootstrap", "5", "--format",
                                  "json", "-q", *engine], capsys, monkeypatch)
        assert code == 0, err
        rows[bool(engine)] = [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in json.loads(out)]
    assert rows[True] == rows[False]
    assert [row["verdict"] for row in rows[True]] == ["low-mass", "consistent"]
