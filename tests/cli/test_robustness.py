"""Bad input of every kind fails with one clear stderr line, a non-zero exit, no traceback and no output;
untrusted checkpoints run no code unless asked; NaN/Inf never reaches a trace.

Most cases run the CLI in-process on the tiny model (``llmprobe.cli.main``); broken checkpoints are
copies of the tiny model with one thing damaged.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmprobe.tracing.checkpoint import work_dir_for
from llmprobe.tracing.encoding import PromptEncoder
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from llmprobe.errors import UsageError
from llmprobe.tracing.prompts import PromptRecord
from llmprobe.tracing.schema import META_KEY, encode_metadata, trace_schema
from tests.cli_helpers import run_cli

PACKAGE = Path(__file__).resolve().parents[2] / "llmprobe"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def assert_refused(result: tuple[int, str, str], *needles: str) -> str:
    code, _, err = result
    assert code != 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llmprobe: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(output: Path) -> None:
    assert not output.exists()
    assert not work_dir_for(str(output)).exists()
    assert [p.name for p in output.parent.glob(f".{output.name}*")] == []


@pytest.fixture
def trace_cli(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Run ``trace PROMPTS -o tmp/out.parquet --model tiny ...``; returns (result, output path)."""
    output = tmp_path / "out.parquet"

    def run(prompts, *extra, model=None):
        args = ["trace", str(prompts), "-o", str(output), "--model", str(model or tiny_model_dir), "--device", "cpu",
                *extra]
        return run_cli(args, capsys, monkeypatch), output

    return run


@pytest.fixture
def ok_prompts(tmp_path) -> Path:
    path = tmp_path / "ok.txt"
    path.write_text("The capital of France is\nOnce upon a time\n")
    return path


# ------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("name,content,needles", [
    ("missing.txt", None, ["missing.txt", "no such prompt file"]),
    ("empty.txt", b"", ["empty.txt", "no prompts found"]),
    ("blank.txt", b"\n   \n\t\n\r\n", ["blank.txt", "no prompts found"]),
    ("latin1.txt", b"fine\nalso fine\ncaf\xe9 au lait\n", ["latin1.txt:3", "not valid UTF-8", "column 4"]),
    ("bad.jsonl", b'{"prompt": "ok"}\n\n{"prompt": "broken"\n', ["bad.jsonl:3", "invalid JSON"]),
    ("list.jsonl", b'["a", "b"]\n', ["list.jsonl:1", "JSON object"]),
    ("noprompt.jsonl", b'{"prompt": "ok"}\n{"text": "no prompt field"}\n', ["noprompt.jsonl:2", '"prompt"']),
    ("number.jsonl", b'{"prompt": 42}\n', ["number.jsonl:1", "must be a string"]),
    ("dupe.jsonl", b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n',
     ["dupe.jsonl:3", "duplicate id 'a'", "line 1"]),
    ("dupenum.jsonl", b'{"id": 1, "prompt": "x"}\n{"id": "1", "prompt": "y"}\n', ["dupenum.jsonl:2", "duplicate id"]),
    ("far.jsonl", b'{"prompt": "abc", "marks": [{"offset": 9}]}\n', ["far.jsonl:1", "mark 0", "outside the prompt"]),
    ("zero.jsonl", b'{"prompt": "abc", "marks": [{"offset": 0}]}\n', ["zero.jsonl:1", "outside the prompt"]),
    ("unsorted.jsonl", b'{"prompt": "abcdef", "marks": [{"offset": 4}, {"offset": 2}]}\n',
     ["unsorted.jsonl:1", "mark 1", "must increase"]),
    ("floatmark.jsonl", b'{"prompt": "abcdef", "marks": [{"offset": 2.5}]}\n', ["floatmark.jsonl:1", "integer"]),
    ("nooffset.jsonl", b'{"prompt": "abcdef", "marks": [{"at": 2}]}\n', ["nooffset.jsonl:1", "offset"]),
])
def test_bad_prompt_files(trace_cli, tmp_path, name, content, needles):
    prompts = tmp_path / name
    if content is not None:
        prompts.write_bytes(content)
    result, output = trace_cli(prompts)
    assert_refused(result, *needles)
    assert_nothing_written(output)


def test_a_directory_is_not_a_prompt_file(trace_cli, tmp_path):
    result, output = trace_cli(tmp_path)
    assert_refused(result, str(tmp_path), "is a directory")
    assert_nothing_written(output)


def test_marks_in_one_token_are_refused_before_any_forward_pass(trace_cli, tmp_path):
    prompts = tmp_path / "same.jsonl"  # offsets 1 and 2 both fall in the tiny tokenizer's first token "he"
    prompts.write_text('{"prompt": "ok"}\n' + json.dumps({"id": "m", "prompt": "hello", "marks": [
        {"offset": 1}, {"offset": 2}]}) + "\n")
    result, output = trace_cli(prompts)
    assert_refused(result, "prompt 'm' (line 2)", "same token")
    assert_nothing_written(output)


def long_prompt(words: int = 400) -> str:
    return " ".join(["heads", "tails", "then", "the coin"] * (words // 4))


def test_a_prompt_longer_than_the_context_is_refused_or_truncated_as_asked(trace_cli, tiny_loaded, tmp_path):
    text = long_prompt()
    ids = tiny_loaded.tokenizer(text)["input_ids"]
    context = tiny_loaded.model.config.max_position_embeddings
    assert len(ids) > context + 10
    prompts = tmp_path / "long.jsonl"
    early, late = 5, len(text) - 3  # a mark in the first tokens and one in the last
    prompts.write_text('{"prompt": "short one"}\n' + json.dumps(
        {"id": "long", "prompt": text, "marks": [{"offset": early, "k": "early"}, {"offset": late, "k": "late"}]})
        + "\n")
    result, output = trace_cli(prompts)
    assert_refused(result, "prompt 'long' (line 2)", f"{len(ids)} tokens", f"context is {context}", "--truncate")
    assert_nothing_written(output)
    result, output = trace_cli(prompts, "--truncate", "middle")
    assert_refused(result, "--truncate", "middle")

    for side, kept in (("left", ids[-context:]), ("right", ids[:context])):
        result, output = trace_cli(prompts, "--truncate", side, "-q", "--force")
        assert result[0] == 0, result[2]
        table = pq.read_table(output)
        assert json.loads(table.schema.metadata[META_KEY])["settings"]["truncate"] == side
        rows = table.filter(pa.compute.equal(table.column("prompt_id"), "long")).to_pylist()
        assert [r["token_id"] for r in rows] == kept
        marks = {json.loads(r["mark"])["k"]: r for r in rows if r["mark"] is not None}
        assert set(marks) == ({"late"} if side == "left" else {"early"})  # marks on cut tokens are dropped
        mark = next(iter(marks.values()))
        spans = tiny_loaded.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        offset = late if side == "left" else early
        original = max(i for i, (s, e) in enumerate(spans) if s < offset)
        assert mark["position"] == original - (len(ids) - context if side == "left" else 0)


def test_left_truncation_keeps_a_leading_bos(tiny_loaded):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_loaded.source.path)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.padding_side = "left"
    loaded = dataclasses.replace(tiny_loaded, tokenizer=tokenizer)
    encoder = PromptEncoder(loaded.tokenizer, TraceSettings(top_k=2, truncate="left"), max_context=10)
    text = long_prompt(20)
    full = tokenizer(text)["input_ids"]
    assert full[0] == 0 and len(full) > 10
    encoded = encoder.encode(PromptRecord(index=0, id="x", text=text, line=1, marks=[{"offset": len(text)}]))
    assert encoded.ids == [0, *full[-9:]]
    assert encoded.marks_at == {9: 0}


# ------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("args,needles", [
    (["--top-k", "0"], ["--top-k", "1 or more"]),
    (["--top-k", "100000"], ["--top-k", "vocabulary size"]),
    (["--device", "tpu9"], ["--device", "tpu9"]),
    (["--device", "cuda:7"], ["--device", "cuda:7"]),
    (["--dtype", "float8"], ["--dtype", "float8"]),
    (["--targets", ""], ["--targets", "target '' tokenizes to nothing"]),
    (["--targets", " heads,"], ["--targets", "target '' tokenizes to nothing"]),
    (["--targets", " heads, tails, heads"], ["--targets", "duplicate", "' heads'"]),
    (["--max-new-tokens", "-1"], ["--max-new-tokens", "0 or more"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--format", "xml"], ["--format", "xml"]),
])
def test_bad_options(trace_cli, ok_prompts, args, needles):
    result, output = trace_cli(ok_prompts, *args)
    assert_refused(result, *needles)
    assert_nothing_written(output)


def test_a_dtype_the_device_cannot_run(trace_cli, ok_prompts, monkeypatch):
    """Simulated: this CPU runs every dtype, so the half-precision softmax kernel is made to be missing."""
    softmax = torch.Tensor.softmax

    def no_half_kernel(self, *args, **kwargs):
        if self.dtype == torch.float16:
            raise RuntimeError('"softmax_lastdim_kernel_impl" not implemented for \'Half\'')
        return softmax(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "softmax", no_half_kernel)
    result, output = trace_cli(ok_prompts, "--dtype", "float16")
    assert_refused(result, "--dtype", "float16 does not run on cpu", "not implemented")
    assert_nothing_written(output)


# ------------------------------------------------------------------------------------------- models


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_weights(directory: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


def test_nonexistent_model_path(trace_cli, ok_prompts, tmp_path):
    result, output = trace_cli(ok_prompts, model=tmp_path / "nowhere")
    assert_refused(result, "nowhere", "no such model")
    assert_nothing_written(output)


def test_directory_without_config(trace_cli, ok_prompts, tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "noconfig")
    (model / "config.json").unlink()
    result, output = trace_cli(ok_prompts, model=model)
    assert_refused(result, "noconfig", "no config.json")
    assert_nothing_written(output)


def test_directory_without_weights(trace_cli, ok_prompts, tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "noweights")
    (model / "model.safetensors").unlink()
    result, output = trace_cli(ok_prompts, model=model)
    assert_refused(result, "noweights", "no weight files")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(trace_cli, ok_prompts, tiny_model_dir, tmp_path, damage):
    model = copy_model(tiny_model_dir, tmp_path / damage)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(range(256)) * 40)
    result, output = trace_cli(ok_prompts, model=model)
    assert_refused(result, damage, "cannot load model")
    assert_nothing_written(output)


def test_corrupt_gguf(trace_cli, ok_prompts, tmp_path):
    bad_magic = tmp_path / "bad.gguf"
    bad_magic.write_bytes(b"GGML" + bytes(1000))
    result, output = trace_cli(ok_prompts, model=bad_magic)
    assert_refused(result, "bad.gguf", "not a GGUF file")
    assert_nothing_written(output)
    from llmprobe.model.sources import default_gguf

    truncated = tmp_path / "truncated.gguf"  # a real GGUF header (the default model's), cut short
    with open(default_gguf(), "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    result, output = trace_cli(ok_prompts, "-q", model=truncated)
    assert_refused(result, "truncated.gguf", "cannot load GGUF file")
    assert_nothing_written(output)


def test_an_architecture_transformers_cannot_load(trace_cli, ok_prompts, tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "alien")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "alien_transformer"
    (model / "config.json").write_text(json.dumps(config))
    result, output = trace_cli(ok_prompts, model=model)
    assert_refused(result, "alien", "cannot load model", "alien_transformer")
    assert_nothing_written(output)


def fake_hub_cache(root: Path, repo: str, model_dir: Path) -> Path:
    """The layout huggingface_hub keeps offline: models--org--name/{refs/main, snapshots/<rev>/...}."""
    entry = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(model_dir, entry / "snapshots" / "0123abcd")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abcd")
    return root


def test_a_hub_id_resolves_from_the_local_cache_only(trace_cli, ok_prompts, tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    empty = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty / "hub"))  # read at import time
    result, output = trace_cli(ok_prompts, model="someorg/tiny-llama")
    assert_refused(result, "someorg/tiny-llama", "not in the local Hugging Face cache", "never downloads")
    assert_nothing_written(output)
    fake_hub_cache(empty / "hub", "someorg/tiny-llama", tiny_model_dir)
    result, output = trace_cli(ok_prompts, "-q", model="someorg/tiny-llama")
    assert result[0] == 0, result[2]
    meta = json.loads(pq.read_schema(output).metadata[META_KEY])
    assert meta["model"] == "someorg/tiny-llama" and meta["model_revision"] == "0123abcd"


# ------------------------------------------------------------------------------------------- security


def test_pickle_weights_need_allow_pickle(trace_cli, ok_prompts, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    model = copy_model(tiny_model_dir, tmp_path / "pickled")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    result, output = trace_cli(ok_prompts, model=model)
    assert_refused(result, "pickled", "pytorch_model.bin", "--allow-pickle")
    assert_nothing_written(output)
    result, output = trace_cli(ok_prompts, "--allow-pickle", "-q", model=model)
    assert result[0] == 0, result[2]


def test_safetensors_are_preferred_over_pickle(trace_cli, ok_prompts, tiny_model_dir, tmp_path):
    """With both present, the pickle file is never opened (here it is a booby trap that is not a pickle)."""
    model = copy_model(tiny_model_dir, tmp_path / "both")
    (model / "pytorch_model.bin").write_bytes(b"not a pickle; loading it would fail")
    result, output = trace_cli(ok_prompts, "-q", model=model)
    assert result[0] == 0, result[2]


def test_checkpoint_code_needs_trust_remote_code(trace_cli, ok_prompts, tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "custom")
    sentinel = tmp_path / "code-ran"
    (model / "custom_llama.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    pass\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_llama.CustomConfig", "AutoModelForCausalLM": "custom_llama.CustomModel"}
    (model / "config.json").write_text(json.dumps(config))
    result, output = trace_cli(ok_prompts, model=model)
    assert_refused(result, "custom", "auto_map", "--trust-remote-code")
    assert_nothing_written(output)
    assert not sentinel.exists()


def test_prompt_text_is_only_data(trace_cli, tmp_path, tiny_loaded):
    """Paths, code and templates in a prompt file are traced as text; nothing is opened or run."""
    sentinel = tmp_path / "pwned"
    texts = [str(sentinel), f"__import__('os').system('touch {sentinel}')", "{{ 7 * 7 }} ${HOME} $(touch x)"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"../{i}", "prompt": t, "path": str(sentinel), "eval": t}) + "\n"
                               for i, t in enumerate(texts)))
    result, output = trace_cli(prompts, "-q")
    assert result[0] == 0, result[2]
    assert not sentinel.exists() and not (tmp_path / "x").exists()
    table = pq.read_table(output)
    for i, text in enumerate(texts):
        rows = table.filter(pa.compute.equal(table.column("prompt_id"), f"../{i}")).to_pylist()
        assert tiny_loaded.tokenizer.decode([r["token_id"] for r in rows]) == text
        assert json.loads(rows[0]["meta"]) == {"path": str(sentinel), "eval": text}


def test_no_module_evaluates_or_unpickles():
    """A static guard: no eval/exec, pickle, marshal, yaml.load or shell in llmprobe's own code."""
    forbidden = {"eval", "exec", "compile", "__import__"}
    modules = {"pickle", "marshal", "shelve", "dill", "yaml", "subprocess"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in forbidden:
                found.append(f"{path.name}:{node.lineno} {node.func.id}()")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "system":
                found.append(f"{path.name}:{node.lineno} .system()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                found += [f"{path.name}:{node.lineno} import {n}" for n in names if n.split(".")[0] in modules]
    assert found == []


def test_experiment_configs_are_toml_data(tmp_path):
    from llmprobe.experiments import load_experiment

    config = tmp_path / "x.toml"
    config.write_text('name = "__import__(\'os\').system(\'touch pwned\')"\n[[[not toml')
    with pytest.raises(UsageError):
        load_experiment(config)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------- numerics


def test_nan_logits_are_reported_with_prompt_and_position(trace_cli, ok_prompts, tiny_model_dir, tmp_path):
    """A NaN in one output-embedding row makes every log-normalizer NaN: refused at the first row."""
    model = edit_weights(copy_model(tiny_model_dir, tmp_path / "nan"),
                         lambda w: w["lm_head.weight"][7].fill_(float("nan")))
    result, output = trace_cli(ok_prompts, "-q", model=model)  # -q: no load log or progress bar before it
    line = assert_refused(result, "is NaN or infinite", "position 0", "not written")
    assert "prompt '1' (line 1)" in line or "prompt '2' (line 2)" in line
    assert_nothing_written(output)


def test_float16_overflow_is_caught_and_float32_is_fine(trace_cli, ok_prompts, tiny_model_dir, tmp_path):
    """Logits of order 1e5 overflow float16 (max 65504) but are ordinary float32 numbers."""
    model = edit_weights(copy_model(tiny_model_dir, tmp_path / "loud"), lambda w: w["lm_head.weight"].mul_(2e4))
    result, output = trace_cli(ok_prompts, "--dtype", "float16", "-q", model=model)
    assert_refused(result, "NaN or infinite", "position", "--dtype float32")
    assert_nothing_written(output)
    result, output = trace_cli(ok_prompts, "--dtype", "float32", "-q", model=model)
    assert result[0] == 0, result[2]
    assert np.isfinite(pq.read_table(output).column("entropy").to_numpy()).all()


def test_nan_inside_list_and_nullable_columns_is_found():
    """Every float column is checked; nulls (no next token, unscored positions) are not NaN."""
    from llmprobe.tracing.schema import check_finite

    schema = trace_schema(top_k=2, n_targets=2)
    records = [PromptRecord(index=0, id="a", text="x", line=4), PromptRecord(index=1, id="b", text="y", line=5)]

    def batch(**override):
        columns = {
            "prompt_index": [0, 1, 1], "prompt_id": ["a", "b", "b"], "position": [0, 0, 1],
            "phase": pa.DictionaryArray.from_arrays(pa.array([0, 0, 0], pa.int8()), pa.array(["prompt", "generated"])),
            "token_id": [1, 2, 3], "token": ["x", "y", "z"], "next_token_id": [None, 3, None],
            "next_token": [None, "z", None], "next_logprob": [None, -1.0, None], "next_rank": [None, 1, None],
            "entropy": [1.0, 1.0, 1.0], "topk_ids": [[1, 2]] * 3, "topk_logprobs": [[-1.0, -2.0]] * 3,
            "target_logprobs": [[-1.0, -2.0]] * 3, "target_seq_logprobs": [[-1.0, -2.0], None, [-1.5, -2.5]],
            "mark_index": [None] * 3, "mark": [None] * 3, "meta": [None] * 3,
        }
        columns.update(override)
        return pa.RecordBatch.from_arrays([pa.array(columns[f.name], f.type) for f in schema], schema=schema)

    check_finite(batch(), records)  # nulls are fine
    cases = {
        "next_logprob": [None, float("nan"), None],
        "topk_logprobs": [[-1.0, -2.0], [-1.0, -2.0], [-1.0, float("-inf")]],
        "target_seq_logprobs": [[-1.0, -2.0], None, [float("inf"), -2.5]],
        "entropy": [1.0, 1.0, float("nan")],
    }
    for name, values in cases.items():
        with pytest.raises(UsageError) as caught:
            check_finite(batch(**{name: values}), records)
        position = 0 if name == "next_logprob" else 1
        assert str(caught.value).startswith(f"prompt 'b' (line 5): {name} is NaN or infinite at position {position}")


# ------------------------------------------------------------------------------------------- traces


def write_fake_trace(path: Path, meta: dict | None, n_targets: int = 0) -> Path:
    schema = trace_schema(top_k=1, n_targets=n_targets)
    if meta is not None:
        schema = schema.with_metadata(encode_metadata(meta, ["a", "b"]))
    pq.write_table(schema.empty_table(), path)
    return path


@pytest.fixture
def tiny_trace(trace_cli, ok_prompts):
    result, output = trace_cli(ok_prompts, "-q")
    assert result[0] == 0, result[2]
    return output


def test_not_a_parquet_file(tmp_path, capsys, monkeypatch):
    text = tmp_path / "notes.parquet"
    text.write_text("just text\n")
    assert_refused(run_cli(["inspect", str(text)], capsys, monkeypatch), "notes.parquet", "not a Parquet file")
    assert_refused(run_cli(["fit-prior", str(text)], capsys, monkeypatch), "notes.parquet", "not a Parquet file")


def test_a_parquet_file_that_is_not_a_trace(tmp_path, capsys, monkeypatch):
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), other)
    assert_refused(run_cli(["inspect", str(other)], capsys, monkeypatch), "other.parquet", "not an llmprobe trace")
    assert_refused(run_cli(["fit-posterior", str(other)], capsys, monkeypatch), "not an llmprobe trace")


def test_a_trace_without_targets_cannot_be_fitted(tiny_trace, capsys, monkeypatch):
    assert_refused(run_cli(["fit-prior", str(tiny_trace)], capsys, monkeypatch),
                   str(tiny_trace), "target_seq_logprobs", "--targets")
    assert_refused(run_cli(["fit-posterior", str(tiny_trace)], capsys, monkeypatch), "target_seq_logprobs")


def test_a_trace_without_marks_or_categories_cannot_be_fitted(trace_cli, ok_prompts, capsys, monkeypatch):
    """Targets alone give scores at the last position, but a posterior fit needs the experiment's marks."""
    result, output = trace_cli(ok_prompts, "--targets", " heads, tails", "-q")
    assert result[0] == 0, result[2]
    assert_refused(run_cli(["fit-posterior", str(output)], capsys, monkeypatch), "marks", "llmprobe experiment")


def test_traces_from_two_models_do_not_mix(tmp_path, capsys, monkeypatch):
    parts = tmp_path / "parts"
    parts.mkdir()
    write_fake_trace(parts / "part-0.parquet", {"model": "model-a", "weights_sha256": "aa"})
    write_fake_trace(parts / "part-1.parquet", {"model": "model-b", "weights_sha256": "bb"})
    for command in (["inspect", str(parts)], ["fit-prior", str(parts)]):
        assert_refused(run_cli(command, capsys, monkeypatch), "parts come from different models", "model-a",
                       "model-b")
    write_fake_trace(parts / "part-1.parquet", {"model": "model-a", "weights_sha256": "cc"})  # same name, new weights
    assert_refused(run_cli(["inspect", str(parts)], capsys, monkeypatch), "weights_sha256")


# ------------------------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_real_model_truncation_equals_a_plain_forward_pass_over_the_kept_tokens(real_loaded):
    """The context is shrunk to 24 tokens so a short prompt overflows it; the kept window is then traced
    exactly as if it had been the whole prompt."""
    settings = TraceSettings(top_k=3)
    run = TraceRun(settings, []).start(real_loaded)
    text = "I just flipped a coin, and it came up heads, then tails, then heads, then heads, then tails, then"
    record = PromptRecord(index=0, id="c", text=text, line=1)
    full = real_loaded.tokenizer(text)["input_ids"]
    assert len(full) > 24
    with pytest.raises(UsageError, match="context is 24 tokens; shorten it or pass --truncate"):
        PromptEncoder(real_loaded.tokenizer, settings, max_context=24).encode(record)
    for side, kept in (("left", full[-24:]), ("right", full[:24])):
        truncating = PromptEncoder(real_loaded.tokenizer, TraceSettings(top_k=3, truncate=side), max_context=24)
        encoded = truncating.encode(record)
        rows = run.for_prompts([encoded]).table().to_pylist()
        assert [r["token_id"] for r in rows] == kept
        with torch.no_grad():
            logits = real_loaded.model(input_ids=torch.tensor([kept])).logits[0].double()
        reference = torch.log_softmax(logits, -1)
        for i, row in enumerate(rows[:-1]):
            assert row["next_logprob"] == pytest.approx(float(reference[i, kept[i + 1]]), abs=1e-4)


@pytest.mark.real_model
def test_real_model_non_finite_logits_are_caught_at_their_position(real_loaded):
    """Logits made infinite at one position (as a float16 overflow would) are reported at exactly that
    position of the right prompt; the positions before it are fine."""
    from llmprobe.tracing.schema import check_finite

    records = [PromptRecord(index=0, id="paris", text="The capital of France is", line=1),
               PromptRecord(index=1, id="coin", text="I just flipped a coin, and it came up heads", line=2)]
    run = TraceRun(TraceSettings(top_k=5, batch_size=1), records).start(real_loaded)
    coin_length = len(real_loaded.tokenizer(records[1].text)["input_ids"])
    bad_position = 4

    def overflow(module, args):
        hidden = args[0]
        if hidden.shape[1] != coin_length:  # only the coin prompt's forward pass
            return None
        hidden = hidden.clone()
        hidden[0, bad_position] = float("inf")
        return (hidden,)

    for batch in run.batches():
        check_finite(batch, records)  # the untouched model is finite everywhere
    handle = real_loaded.model.get_output_embeddings().register_forward_pre_hook(overflow)
    try:
        with pytest.raises(UsageError) as caught:
            list(run.batches())  # each batch is checked before it is handed out
    finally:
        handle.remove()
    assert str(caught.value).startswith(
        f"prompt 'coin' (line 2): entropy is NaN or infinite at position {bad_position}")
