"""The ``llmprobe`` command line on the tiny model: outputs, pipes, and one-line errors."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from llmprobe.tracing.reader import read_trace
from llmprobe.tracing.schema import META_KEY
from tests.cli_helpers import assert_one_line_error, run_cli






@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("The capital of France is\n\nOnce upon a time\n")
    return path


def test_trace_writes_parquet_with_metadata(tiny_model_dir, prompt_file, tmp_path, capsysbinary, monkeypatch):
    out = tmp_path / "t.parquet"
    code, stdout, err = run_cli(["trace", str(prompt_file), "-o", str(out), "--model", str(tiny_model_dir),
                                 "--targets", " heads, tails", "--top-k", "4", "-q"], capsysbinary, monkeypatch)
    assert code == 0, err
    assert stdout == b""
    frame = read_trace(out)
    assert list(frame["prompt_id"].unique()) == ["1", "3"]  # ids are 1-based line numbers, blank lines skipped
    assert frame["topk_tokens"].iloc[0].shape == (4,)
    meta = json.loads(pq.read_schema(out).metadata[META_KEY])
    for key in ("llmprobe_version", "model", "weights_sha256", "dtype", "device", "settings", "targets",
                "torch_version", "transformers_version", "command", "created_utc"):
        assert key in meta, key
    assert meta["settings"]["top_k"] == 4
    assert [t["text"] for t in meta["targets"]] == [" heads", " tails"]
    assert meta["weights_sha256"].startswith("sha256:")


def test_jsonl_to_stdout_is_only_json(tiny_model_dir, capsysbinary, monkeypatch):
    code, stdout, err = run_cli(["trace", "-", "--model", str(tiny_model_dir), "--max-new-tokens", "3",
                                 "-o", "-", "--format", "jsonl"], capsysbinary, monkeypatch,
                                stdin=b"The capital of France is\n")
    assert code == 0, err
    lines = stdout.decode().splitlines()
    header, *rows = [json.loads(line) for line in lines]  # a header record first (issue 16)
    assert "llmprobe_trace_header" in header and header["meta"]["settings"]["max_new_tokens"] == 3
    assert {r["phase"] for r in rows} == {"prompt", "generated"}
    assert "loaded" in err  # logs go to stderr


def test_csv_to_stdout(tiny_model_dir, capsysbinary, monkeypatch):
    code, stdout, err = run_cli(["trace", "-", "--model", str(tiny_model_dir), "-o", "-", "--format", "csv",
                                 "--top-k", "2"], capsysbinary, monkeypatch, stdin=b"Once upon a time\n")
    assert code == 0, err
    header, first = stdout.decode().splitlines()[:2]
    assert header.startswith("prompt_index,prompt_id,position,phase")
    assert first.startswith("0,1,0,prompt")


def test_jsonl_prompts_keep_ids_and_fields(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "Once upon a time", "topic": "story"}) + "\n")
    out = tmp_path / "t.parquet"
    code, _, err = run_cli(["trace", str(prompts), "-o", str(out), "--model", str(tiny_model_dir), "-q"],
                           capsysbinary, monkeypatch)
    assert code == 0, err
    frame = read_trace(out)
    assert set(frame["prompt_id"]) == {"a"}
    assert frame["meta"].iloc[0] == {"topic": "story"}  # read_trace parses it (issue 16)


def test_existing_output_is_never_replaced_without_force(tiny_model_dir, prompt_file, tmp_path, capsysbinary,
                                                         monkeypatch):
    out = tmp_path / "t.parquet"
    out.write_bytes(b"precious")
    code, _, err = run_cli(["trace", str(prompt_file), "-o", str(out), "--model", str(tiny_model_dir)],
                           capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "already exists", "--force")
    assert out.read_bytes() == b"precious"
    code, _, err = run_cli(["trace", str(prompt_file), "-o", str(out), "--model", str(tiny_model_dir), "--force",
                            "-q"], capsysbinary, monkeypatch)
    assert code == 0, err
    assert pq.read_metadata(out).num_rows > 0


@pytest.mark.parametrize("content,needles", [
    (None, ["no such prompt file"]),
    (b"", ["no prompts found"]),
    (b"\n  \n\n", ["no prompts found"]),
    (b'{"prompt": "ok"}\n{"prompt": "broken"\n', ["p.jsonl:2", "invalid JSON"]),
    (b'{"text": "no prompt field"}\n', ["p.jsonl:1", "\"prompt\""]),
    (b'{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', ["p.jsonl:2", "duplicate id"]),
    (b'{"prompt": "abc", "marks": [{"offset": 9}]}\n', ["p.jsonl:1", "outside the prompt"]),
    (b'{"prompt": "abcdef", "marks": [{"offset": 4}, {"offset": 2}]}\n', ["p.jsonl:1", "must increase"]),
    (b'{"prompt": "caf\xe9"}\n', ["p.jsonl:1", "UTF-8", "column 16"]),
])
def test_bad_prompt_files(tiny_model_dir, tmp_path, capsysbinary, monkeypatch, content, needles):
    prompts = tmp_path / "p.jsonl"
    if content is not None:
        prompts.write_bytes(content)
    out = tmp_path / "t.parquet"
    code, _, err = run_cli(["trace", str(prompts), "-o", str(out), "--model", str(tiny_model_dir)],
                           capsysbinary, monkeypatch)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()
    assert list(tmp_path.glob("*.partial")) == []


@pytest.mark.parametrize("args,needles", [
    (["--device", "tpu9"], ["--device", "tpu9"]),
    (["--dtype", "float8"], ["--dtype", "float8"]),
    (["--format", "xml"], ["--format", "xml"]),
    (["--top-k", "0"], ["--top-k"]),
    (["--top-k", "many"], ["--top-k"]),
    (["--max-new-tokens", "-2"], ["--max-new-tokens"]),
    (["--input-format", "yaml"], ["--input-format"]),
    (["--no-such-option"], ["--no-such-option"]),
])
def test_bad_option_values(tiny_model_dir, prompt_file, tmp_path, capsysbinary, monkeypatch, args, needles):
    out = tmp_path / "t.parquet"
    code, _, err = run_cli(["trace", str(prompt_file), "-o", str(out), "--model", str(tiny_model_dir), *args],
                           capsysbinary, monkeypatch)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_missing_model_path(prompt_file, tmp_path, capsysbinary, monkeypatch):
    code, _, err = run_cli(["trace", str(prompt_file), "-o", str(tmp_path / "t.parquet"), "--model",
                            str(tmp_path / "nope")], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "nope", "no such model")


def test_inspect_shows_positions_and_json(tiny_model_dir, prompt_file, tmp_path, capsysbinary, monkeypatch):
    out = tmp_path / "t.parquet"
    run_cli(["trace", str(prompt_file), "-o", str(out), "--model", str(tiny_model_dir), "-q"], capsysbinary,
            monkeypatch)
    code, stdout, err = run_cli(["inspect", str(out), "--prompt", "3", "--json"], capsysbinary, monkeypatch)
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.decode().splitlines()]
    frame = read_trace(out)
    expected = frame[frame["prompt_id"] == "3"]
    assert [r["token"] for r in rows] == list(expected["token"])
    assert rows[0]["top"][0]["id"] == int(expected["topk_ids"].iloc[0][0])
    code, stdout, err = run_cli(["inspect", str(out), "--prompt", "3"], capsysbinary, monkeypatch)
    assert code == 0 and b"prompt 3" in stdout and "prompt 3" not in err  # the result on stdout (issue 16)
    code, _, err = run_cli(["inspect", str(out), "--prompt", "nope"], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "nope")


def test_inspect_refuses_non_traces(tmp_path, capsysbinary, monkeypatch):
    import pyarrow as pa

    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1]}), plain)
    text = tmp_path / "text.parquet"
    text.write_text("hello")
    code, _, err = run_cli(["inspect", str(plain)], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "not an llmprobe trace")
    code, _, err = run_cli(["inspect", str(text)], capsysbinary, monkeypatch)
    assert_one_line_error(code, err, "not a Parquet file")
