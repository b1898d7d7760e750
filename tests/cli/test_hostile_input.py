"""Hostile and unlucky input to every command: byte-order marks, lone surrogates, binary files, Parquet
prompts, NaN in JSON, broken priors, impossible options, NaN-producing models, overlong prompts,
damaged traces and directories of disagreeing parts. Each is refused with one line naming the file
or option (exit 2), or — for a BOM, a Parquet table of prompts, a hidden work directory — handled as
the user meant.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmprobe.analysis.priors import read_prior
from llmprobe.tracing.checkpoint import work_dir_for
from llmprobe.tracing.encoding import PromptEncoder
from llmprobe.tracing.reader import read_trace
from llmprobe.tracing.schema import META_KEY, VOCAB_KEY
from tests.cli.fault_fixtures import COIN, coin_trace, fit_table, flip_a_byte_in_pages
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.plots.fixtures import mixture_prior_json

pytestmark = pytest.mark.usefixtures("one_thread")

BOM = b"\xef\xbb\xbf"


@pytest.fixture
def trace_cli(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    """``trace PROMPTS -o OUT --model tiny ...`` in-process; returns (code, stdout bytes, stderr)."""
    def run(prompts, output, *extra, model=None):
        args = ["trace", str(prompts), "-o", str(output), "--model", str(model or tiny_model_dir), "--device", "cpu",
                "--top-k", "3", "-q", *extra]
        return run_cli(args, capsysbinary, monkeypatch)
    return run


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with one NaN in its output head: every logit row becomes NaN."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path_factory.mktemp("nan-llama")
    for item in tiny_model_dir.iterdir():
        shutil.copy(item, directory / item.name)
    weights = load_file(directory / "model.safetensors")
    weights["lm_head.weight"][0, 0] = float("nan")
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


# ---------------------------------------------------------------------------------------- the BOM


def test_a_bom_in_a_prompt_file_is_not_a_token(trace_cli, tmp_path):
    plain, bom = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_bytes(b"The capital of France is\nOnce upon a time\n")
    bom.write_bytes(BOM + plain.read_bytes())
    for prompts, output in ((plain, tmp_path / "plain.parquet"), (bom, tmp_path / "bom.parquet")):
        code, _, err = trace_cli(prompts, output)
        assert code == 0, err
    a, b = read_trace(tmp_path / "plain.parquet"), read_trace(tmp_path / "bom.parquet")
    assert a["token_id"].tolist() == b["token_id"].tolist()


def test_a_bom_in_a_targets_file_is_not_part_of_the_first_target(trace_cli, tmp_path):
    prompts, targets = tmp_path / "p.txt", tmp_path / "targets.txt"
    prompts.write_text("The capital of France is\n")
    targets.write_bytes(BOM + b" Paris\n Rome\n")
    code, _, err = trace_cli(prompts, tmp_path / "out.parquet", "--targets-file", str(targets))
    assert code == 0, err
    meta = json.loads(pq.read_schema(tmp_path / "out.parquet").metadata[META_KEY])
    assert [t["text"] for t in meta["targets"]] == [" Paris", " Rome"]


def test_a_bom_in_a_toml_or_prior_file_is_ignored(tmp_path, capsys, monkeypatch):
    config = tmp_path / "coin.toml"
    config.write_bytes(BOM + COIN.read_bytes())
    code, out, err = run_cli(["experiment", str(config)], capsys, monkeypatch)
    assert code == 0, err
    assert out == run_cli(["experiment", str(COIN)], capsys, monkeypatch)[1]
    prior = mixture_prior_json(tmp_path / "prior.json", [1.0], [[2.0, 3.0]], ["heads", "tails"])
    bom_prior = tmp_path / "bom.json"
    bom_prior.write_bytes(BOM + prior.read_bytes())
    assert np.array_equal(read_prior(str(bom_prior)).alphas, read_prior(str(prior)).alphas)


# ------------------------------------------------------------------------------ text that is not text


@pytest.mark.parametrize("line", [r'{"prompt": "heads \udfff tails"}', r'{"id": "\ud800", "prompt": "ok"}',
                                  r'{"prompt": "ok", "note": ["\udc00"]}'])
def test_lone_surrogates_are_refused(line, trace_cli, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n' + line + "\n")
    code, _, err = trace_cli(prompts, tmp_path / "out.parquet")
    assert_one_line_error(code, err, "p.jsonl:2", "lone UTF-16 surrogate")
    assert not (tmp_path / "out.parquet").exists()


def test_a_binary_file_is_refused(trace_cli, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"a fine line\n\x7fELF\x02\x01\x00\x00binary\n")
    code, _, err = trace_cli(prompts, tmp_path / "out.parquet")
    assert_one_line_error(code, err, "p.txt:2", "binary")


def test_a_parquet_table_of_prompts_is_traced(trace_cli, tiny_loaded, tmp_path):
    table = pa.table({"id": ["a", "b"], "prompt": ["The capital of France is", "Once upon a time"],
                      "source": ["x", "y"]})
    prompts = tmp_path / "prompts.bin"  # recognised by content, not by name
    pq.write_table(table, prompts)
    code, _, err = trace_cli(prompts, tmp_path / "out.parquet")
    assert code == 0, err
    frame = read_trace(tmp_path / "out.parquet")
    assert sorted(frame["prompt_id"].unique()) == ["a", "b"]
    assert frame["meta"].iloc[0] == {"source": "x"}  # read_trace parses it (issue 16)


def test_a_parquet_file_without_prompts_is_refused(trace_cli, tiny_loaded, tmp_path):
    from tests.cli.fault_fixtures import text_trace

    trace = text_trace(tiny_loaded, tmp_path / "a-trace.parquet")  # a trace is not a prompt file
    code, _, err = trace_cli(trace, tmp_path / "out.parquet")
    assert_one_line_error(code, err, "a-trace.parquet", '"prompt" column')


def test_jsonl_output_writes_null_for_nan(trace_cli, tmp_path, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "The capital of France is", "score": NaN, "odds": [Infinity, 1.5]}\n')
    code, out, err = trace_cli(prompts, "-", "--format", "jsonl")
    assert code == 0, err

    def no_constants(name):
        raise AssertionError(f"bare {name} in JSONL output")

    rows = [json.loads(line, parse_constant=no_constants) for line in out.decode().splitlines()[1:]]  # after the header
    assert rows and all(row["meta"] == {"score": None, "odds": [None, 1.5]} for row in rows)


# ---------------------------------------------------------------------------------------- priors


@pytest.mark.parametrize("document,needle", [
    ({"categories": ["heads", "tails"], "alpha": [-1.0, 2.0]}, "positive"),
    ({"categories": ["heads", "tails"], "alpha": [0.0, 2.0]}, "positive"),
    ('{"alpha": [NaN, 2.0]}', "finite"),
    ('{"alpha": [Infinity, 2.0]}', "finite"),
    ({"alpha": [1e300, 1e300]}, "at most"),
    ({"mixture": {"alphas": [[1.0, 2.0], [3.0, 1.0]], "weights": [1.5, -0.5]}}, "non-negative"),
    ({"mixture": {"alphas": [[1.0, 2.0], [3.0, 1.0]]}}, "needs 'weights'"),
    ({"categories": ["a", "b", "c"], "alpha": [1.0, 2.0, 3.0]}, "prior is over"),
    ({"alpha": ["1", "2"]}, "JSON numbers"),
    ({"alpha": [True, 2.0]}, "JSON numbers"),
    ({"format": "llmprobe.prior/1", "categories": ["heads", "tails"]}, "not a fitted prior"),
    ({"categories": 7, "alpha": [1.0, 2.0]}, "'categories'"),
    ([1, 2], "not a fitted prior"),
])
def test_broken_priors_are_one_line(document, needle, tiny_loaded, tmp_path, capsys, monkeypatch):
    trace = coin_trace(tiny_loaded, tmp_path)
    prior = tmp_path / "prior.json"
    prior.write_text(document if isinstance(document, str) else json.dumps(document))
    code, _, err = run_cli(["fit-posterior", str(trace), "--prior", str(prior), "--bootstrap", "2", "-q"], capsys,
                           monkeypatch)
    assert_one_line_error(code, err, str(prior), needle)
    if needle != "prior is over":  # plot-prior reads through the same reader
        code, _, err = run_cli(["plot-prior", str(prior), "-o", str(tmp_path / "p.png")], capsys, monkeypatch)
        assert_one_line_error(code, err, str(prior))


def test_prior_files_without_categories_are_refused_where_they_are_applied(tiny_loaded, tmp_path, capsys,
                                                                             monkeypatch):
    """Issue 26 item 5: a fit-prior file or a fit-posterior --json summary with its `categories` removed was
    applied in the trace's category order unchecked; every reader that applies a prior (fit-posterior --prior,
    wind-tunnel --prior) refuses it, naming the file and the key. plot-prior, which applies it to nothing,
    still draws it."""
    trace = coin_trace(tiny_loaded, tmp_path, sequences=2)
    rows_prior, summary = tmp_path / "rows.json", tmp_path / "summary.json"
    assert run_cli(["fit-prior", str(trace), "-o", str(rows_prior), "-q"], capsys, monkeypatch)[0] == 0
    code, out, err = run_cli(["fit-posterior", str(trace), "--bootstrap", "2", "--min-mass", "0", "--json", "-q"],
                             capsys, monkeypatch)
    assert code == 0, err
    summary.write_text(out)
    for path in (rows_prior, summary):
        document = json.loads(path.read_text())
        for holder in (document if isinstance(document, list) else [document]):
            assert holder.pop("categories") == ["heads", "tails"]
        path.write_text(json.dumps(document))
    for path in (rows_prior, summary):
        code, _, err = run_cli(["fit-posterior", str(trace), "--prior", str(path), "--bootstrap", "2", "--min-mass",
                                "0", "-q"], capsys, monkeypatch)
        assert_one_line_error(code, err, str(path), "'categories'")
    control = tmp_path / "control"
    code, _, err = run_cli(["wind-tunnel", str(COIN.parents[1] / "control" / "coin.toml"), "-o", str(control),
                            "--prior", str(rows_prior), "-q"], capsys, monkeypatch)
    assert_one_line_error(code, err, str(rows_prior), "'categories'")
    assert not control.exists()
    code, _, err = run_cli(["plot-prior", str(rows_prior), "-o", str(tmp_path / "p.png")], capsys, monkeypatch)
    assert code == 0, err


DEEP = "[" * 100_000 + "]" * 100_000  # deeper than any parser recurses


@pytest.mark.parametrize("kind", ["prompts", "prior", "martingale", "experiment", "jsonl trace"])
def test_input_nested_too_deeply_to_parse_is_one_line(kind, tiny_loaded, tiny_model_dir, tmp_path, capsys,
                                                      monkeypatch):
    """Issue 26 (readers of others' files): JSON or TOML nested 100,000 deep made the parsers raise
    RecursionError, an "unexpected" exit 1, in every reader; it is bad input like any other."""
    trace = coin_trace(tiny_loaded, tmp_path)
    path = tmp_path / {"prompts": "p.jsonl", "prior": "prior.json", "martingale": "m.jsonl", "experiment": "e.toml",
                       "jsonl trace": "t.jsonl"}[kind]
    path.write_text({"prompts": '{"prompt": "hi", "x": ' + DEEP + "}\n", "prior": DEEP, "martingale": DEEP + "\n",
                     "experiment": "a = " + DEEP + "\n",
                     "jsonl trace": '{"llmprobe_trace_header": 1, "meta": ' + DEEP + "}\n"}[kind])
    args = {"prompts": ["trace", str(path), "-m", str(tiny_model_dir), "-o", str(tmp_path / "out.parquet")],
            "prior": ["fit-posterior", str(trace), "--prior", str(path), "-o", str(tmp_path / "out.parquet")],
            "martingale": ["fit-posterior", str(trace), "--martingale", str(path), "-o", str(tmp_path / "out.parquet")],
            "experiment": ["experiment", str(path), "-o", str(tmp_path / "out.parquet")],
            "jsonl trace": ["inspect", str(path)]}[kind]
    code, _, err = run_cli([*args, "-q"] if kind != "jsonl trace" else args, capsys, monkeypatch)
    assert_one_line_error(code, err, str(path))
    assert not (tmp_path / "out.parquet").exists()


# --------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("command", ["trace", "experiment", "fit-prior", "fit-posterior", "continuity", "martingale"])
def test_negative_seeds_are_refused_by_every_command(command, tmp_path, capsys, monkeypatch):
    first = {"experiment": str(COIN), "martingale": str(COIN)}.get(command, str(tmp_path / "anything"))
    code, _, err = run_cli([command, first, "--seed", "-1"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--seed")


def test_max_components_zero_is_refused(tiny_loaded, tmp_path, capsys, monkeypatch):
    trace = coin_trace(tiny_loaded, tmp_path)
    code, _, err = run_cli(["fit-prior", str(trace), "--components", "auto", "--max-components", "0"], capsys,
                           monkeypatch)
    assert_one_line_error(code, err, "--max-components")


def test_top_p_below_float32_resolution_is_refused(trace_cli, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n")
    code, _, err = trace_cli(prompts, tmp_path / "out.parquet", "--sample", "--max-new-tokens", "2",
                             "--top-p", "1e-12")
    assert_one_line_error(code, err, "--top-p", "float32")


def test_a_nan_model_is_one_line_when_sampling(trace_cli, nan_model_dir, tmp_path):
    """Issue 26 item 4: NaN while sampling fails the same way on every try, so the work directory is deleted
    (it was kept, with 0 prompts), and the line is not run on into a resume hint ("not written 0 of 2 ...")."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\nThe capital of France is\n")
    output = tmp_path / "out.parquet"
    code, _, err = trace_cli(prompts, output, "--sample", "--max-new-tokens", "2", model=nan_model_dir)
    assert_one_line_error(code, err, "NaN")
    assert "saved" not in err and "resume" not in err
    assert not output.exists() and not work_dir_for(str(output)).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


def test_a_nan_model_is_one_line_in_martingale(nan_model_dir, capsys, monkeypatch):
    code, _, err = run_cli(["martingale", str(COIN), "--model", str(nan_model_dir), "--device", "cpu", "--n", "0,1",
                            "--sequences", "1", "--paths", "2", "--bootstrap", "10", "-q"], capsys, monkeypatch)
    assert_one_line_error(code, err, "NaN or infinite")


def test_martingale_refuses_prompts_longer_than_the_context(tiny_model_dir, capsys, monkeypatch):
    """The tiny model's context is 512 tokens; 400 coin flips do not fit (trace refuses them too)."""
    code, out, err = run_cli(["martingale", str(COIN), "--model", str(tiny_model_dir), "--device", "cpu",
                              "--n", "400", "--sequences", "1", "--paths", "2", "--bootstrap", "10", "-q", "--json"],
                             capsys, monkeypatch)
    assert_one_line_error(code, err, "--n", "context is 512 tokens")
    assert out == ""


def test_plot_icl_refuses_non_numeric_or_impossible_probabilities(tmp_path, capsys, monkeypatch):
    import pandas as pd

    frame = pd.read_parquet(fit_table(tmp_path / "fit.parquet"))
    for value, needle in (("high", "not a number"), ("1.5", "not a probability")):
        bad = frame.astype({"model_prob": object})
        bad.loc[3, "model_prob"] = value
        path = tmp_path / "bad.csv"
        bad.to_csv(path, index=False)
        output = tmp_path / "icl.png"
        code, _, err = run_cli(["plot-icl", str(path), "-o", str(output)], capsys, monkeypatch)
        assert_one_line_error(code, err, "bad.csv", "model_prob", needle)
        assert not output.exists()


@pytest.mark.parametrize("spec", ["-3", "-3:", "2:-1"])
def test_plot_refuses_negative_positions(spec, tiny_loaded, tmp_path, capsys, monkeypatch):
    from tests.cli.fault_fixtures import text_trace

    trace = text_trace(tiny_loaded, tmp_path / "t.parquet")
    output = tmp_path / "t.png"
    code, _, err = run_cli(["plot", str(trace), "--prompt", "p0", f"--positions={spec}", "-o", str(output)], capsys,
                           monkeypatch)
    assert_one_line_error(code, err, "--positions")
    assert not output.exists()


# ---------------------------------------------------------------------------------------- sizes


def test_an_enormous_n_max_is_refused_before_allocating(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["experiment", str(COIN), "--n-max", str(10**11)], capsys, monkeypatch)
    assert_one_line_error(code, err, "n_max", "<= 100000")
    config = tmp_path / "big.toml"
    config.write_text(COIN.read_text().replace("n_max = ", "n_max = 100000000000 #", 1))
    code, _, err = run_cli(["experiment", str(config)], capsys, monkeypatch)
    assert_one_line_error(code, err, "big.toml", "n_max", "<= 100000")


def test_a_huge_one_line_prompt_is_refused_before_tokenizing(trace_cli, tmp_path, monkeypatch):
    prompts = tmp_path / "huge.txt"
    prompts.write_text("short prompt\n" + "heads tails " * 400_000 + "\n")  # 4.8 MB on line 2
    encode = PromptEncoder.encode

    def guarded(self, record):
        assert len(record.text) < 100_000, "the huge prompt was tokenized"
        return encode(self, record)

    monkeypatch.setattr(PromptEncoder, "encode", guarded)
    code, _, err = trace_cli(prompts, tmp_path / "out.parquet")
    assert_one_line_error(code, err, "prompt '2' (line 2)", "characters", "context is 512 tokens")


@pytest.mark.parametrize("command", ["fit-prior", "fit-posterior"])
def test_fits_check_the_output_before_fitting(command, tiny_loaded, tmp_path, capsys, monkeypatch):
    import llmprobe.analysis.fits

    trace = coin_trace(tiny_loaded, tmp_path)
    taken = tmp_path / ("prior.json" if command == "fit-prior" else "fit.parquet")
    taken.write_text("keep me")

    def never(*args, **kwargs):
        raise AssertionError("fitted before checking -o")

    monkeypatch.setattr(llmprobe.analysis.fits, command.replace("-", "_"), never)
    code, out, err = run_cli([command, str(trace), "-o", str(taken)], capsys, monkeypatch)
    assert_one_line_error(code, err, str(taken), "already exists")
    assert out == "" and taken.read_text() == "keep me"


# ---------------------------------------------------------------------------------- damaged traces


def rewrite(trace: Path, path: Path, *, meta: bytes | None = None, vocab: bytes | None | bool = True,
            drop: str | None = None) -> Path:
    table = pq.read_table(trace)
    kv = dict(table.schema.metadata)
    if meta is not None:
        kv[META_KEY] = meta
    if vocab is None:
        kv.pop(VOCAB_KEY, None)  # a trace written now keeps its vocabulary in the file metadata only
    elif vocab is not True:
        kv[VOCAB_KEY] = vocab
    if drop:
        table = table.drop_columns([drop])
    pq.write_table(table.replace_schema_metadata(kv), path)
    return path


def corrupt_pages(trace: Path, path: Path) -> Path:
    """The same file with bytes in the middle of its data pages overwritten (footer intact)."""
    data = bytearray(trace.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    for i in range(200, len(data) - footer - 8 - 200, 97):
        data[i] = (data[i] + 101) % 256
    path.write_bytes(bytes(data))
    return path


DAMAGE = {
    "pages": (lambda t, p: corrupt_pages(t, p), "damaged"),
    # issue 26: one flipped byte used to read back as a wrong number; the page checksums catch it
    "one-flipped-byte": (lambda t, p: flip_a_byte_in_pages(t, "topk_logprobs", p), "damaged"),
    "meta-not-json": (lambda t, p: rewrite(t, p, meta=b"{not json"), "not valid JSON"),
    "meta-a-list": (lambda t, p: rewrite(t, p, meta=b"[1, 2]"), "not a JSON object"),
    "vocab-not-json": (lambda t, p: rewrite(t, p, vocab=b"[oops"), "vocabulary"),
    "no-token-column": (lambda t, p: rewrite(t, p, drop="token"), "no token column"),
    "no-prompt-index": (lambda t, p: rewrite(t, p, drop="prompt_index"), "prompt_index"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["inspect", "plot", "report", "fit-prior", "fit-posterior"])
def test_a_damaged_trace_is_one_line_in_every_reader(command, damage, tiny_loaded, tmp_path_factory, capsys,
                                                     monkeypatch):
    base = tmp_path_factory.getbasetemp() / "damage-base"
    base.mkdir(exist_ok=True)
    trace = base / "coin.parquet"
    if not trace.exists():
        coin_trace(tiny_loaded, base)
    make, needle = DAMAGE[damage]
    work = tmp_path_factory.mktemp("damaged")
    bad = make(trace, work / "bad.parquet")
    args = {"inspect": ["inspect", str(bad)],
            "plot": ["plot", str(bad), "--prompt", "coin-s0000", "-o", str(work / "f.png")],
            "report": ["report", str(bad), "-o", str(work / "r.html")],
            "fit-prior": ["fit-prior", str(bad), "-q"],
            "fit-posterior": ["fit-posterior", str(bad), "--bootstrap", "2", "-q"]}[command]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "bad.parquet", needle)
    assert sorted(p.name for p in work.iterdir()) == ["bad.parquet"]


@pytest.mark.parametrize("vocab", [7, "abc", [1, 2, 3]])
def test_a_jsonl_header_whose_vocab_is_not_strings_is_one_line(vocab, tiny_loaded, tmp_path, capsys, monkeypatch):
    """Issue 26 item 6: a JSONL header written by someone else whose vocab is not a list ended in an unexpected
    TypeError (exit 1); one holding integers was accepted and every token shown as "∅"."""
    from llmprobe.tracing.schema import decode_vocab
    from llmprobe.tracing.writer import open_trace_sink

    trace = coin_trace(tiny_loaded, tmp_path)
    jsonl = tmp_path / "t.jsonl"
    table = pq.read_table(trace)
    meta = json.loads(table.schema.metadata[META_KEY])
    with open_trace_sink(str(jsonl), "jsonl", table.schema.remove_metadata(), meta,
                         decode_vocab(pq.read_metadata(trace).metadata)) as sink:
        sink.write(table.to_batches()[0])
    assert run_cli(["inspect", str(jsonl)], capsys, monkeypatch)[0] == 0
    lines = jsonl.read_text().splitlines()
    header = json.loads(lines[0])
    header["vocab"] = vocab
    jsonl.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    code, out, err = run_cli(["inspect", str(jsonl)], capsys, monkeypatch)
    assert_one_line_error(code, err, str(jsonl), "vocabulary is not a JSON list of strings")
    assert not out


def test_a_trace_without_vocabulary_still_reads_with_ids(tiny_loaded, tmp_path, capsys, monkeypatch):
    trace = rewrite(coin_trace(tiny_loaded, tmp_path), tmp_path / "novocab.parquet", vocab=None)
    code, _, err = run_cli(["inspect", str(trace), "--prompt", "coin-s0000", "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert read_trace(trace)["topk_tokens"].iloc[0][0].startswith("#")


def test_parts_with_targets_in_another_order_are_refused(tiny_loaded, tmp_path, capsys, monkeypatch):
    parts = tmp_path / "parts"
    parts.mkdir()
    coin_trace(tiny_loaded, parts, "a.parquet")
    coin_trace(tiny_loaded, parts, "b.parquet", targets=tuple(reversed((" heads", " tails"))))
    code, out, err = run_cli(["fit-prior", str(parts), "-q"], capsys, monkeypatch)
    assert_one_line_error(code, err, str(parts), "different targets")
    assert out == ""


def test_a_hidden_work_directory_inside_a_trace_directory_is_skipped(tiny_loaded, tmp_path, capsys, monkeypatch):
    parts = tmp_path / "parts"
    parts.mkdir()
    coin_trace(tiny_loaded, parts, "a.parquet")
    hidden = parts / ".b.parquet.parts"
    hidden.mkdir()
    (hidden / "part-00000.parquet").write_bytes(b"half-written by a running trace")
    (parts / ".b.parquet.x1y2.partial").write_bytes(b"a merge in progress")
    code, _, err = run_cli(["fit-prior", str(parts), "-q", "--json"], capsys, monkeypatch)
    assert code == 0, err


def test_a_refused_pickle_under_allow_pickle_is_one_plain_line_and_runs_nothing(trace_cli, tiny_model_dir,
                                                                               tmp_path):
    """A pickle that torch's weights-only loader refuses: one line, without torch's terminal escapes."""
    import io
    import pickle
    import zipfile

    import torch

    class Payload:
        def __reduce__(self):
            return (print, ("PAYLOAD RAN",))

    model = tmp_path / "pickled"
    model.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, model / item.name)
    weights = model / "pytorch_model.bin"
    torch.save({"x": torch.zeros(1)}, weights)
    buffer = io.BytesIO()
    with zipfile.ZipFile(weights) as source, zipfile.ZipFile(buffer, "w") as target:
        for entry in source.infolist():
            data = source.read(entry.filename)
            target.writestr(entry, pickle.dumps(Payload(), protocol=2) if entry.filename.endswith("data.pkl") else data)
    weights.write_bytes(buffer.getvalue())
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n")
    code, out, err = trace_cli(prompts, tmp_path / "out.parquet", "--allow-pickle", model=model)
    assert_one_line_error(code, err, "cannot load model")
    assert "\x1b" not in err and b"PAYLOAD RAN" not in out and "PAYLOAD RAN" not in err
