"""Files written by someone else (issue 26): every reader validates types and shapes before use.

Property-based: valid files (a Parquet trace's metadata and vocabulary, a JSONL trace's header and rows, a
fit-prior file, a fit-posterior summary, martingale results, an experiment TOML, a wind-tunnel config's
prior, a GGUF header) are mutated — a value anywhere in them replaced by a JSON value of another shape, or
deleted; bytes of a header flipped — and handed to the command that reads them. Whatever the mutation, the
command either accepts the file (exit 0) or refuses it with one ``llmprobe: error:`` line naming the file
(exit 2): never a traceback, never an "unexpected" exit 1, never an output file left behind a refusal.

Bounded so the suite stays fast: each property runs a fixed, derandomized set of examples (``SETTINGS``);
``LLMPROBE_FUZZ_EXAMPLES=500`` runs that many fresh random ones per property instead, for a longer hunt.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, note, settings, strategies as st

from llmprobe.tracing.schema import META_KEY, VOCAB_KEY, decode_vocab
from llmprobe.tracing.writer import open_trace_sink
from tests.cli.fault_fixtures import COIN, REPO, coin_trace
from tests.cli_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

HUNT = int(os.environ.get("LLMPROBE_FUZZ_EXAMPLES", 0))
SETTINGS = settings(max_examples=HUNT or 25, deadline=None, derandomize=not HUNT, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SCALARS = (st.none() | st.booleans() | st.integers(-3, 10**6) | st.sampled_from([2**63, -1.5, 0.0, 1e308])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=4))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=4)


def json_paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document (a long list: its first two items and its last)."""
    found = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            found += json_paths(value, (*prefix, key))
    elif isinstance(document, list):
        indices = range(len(document)) if len(document) <= 3 else (0, 1, len(document) - 1)
        for index in indices:
            found += json_paths(document[index], (*prefix, index))
    return found


@st.composite
def mutations(draw, document: Any, values: st.SearchStrategy = JSON_VALUES, whole: bool = True) -> Any:
    """``document`` with one value replaced by one of ``values``, or deleted (a key, a list item); ``whole``:
    the document itself may be replaced too."""
    path = draw(st.sampled_from(json_paths(document)[0 if whole else 1:]))
    if not path:
        note("replaced the whole document")
        return draw(values)
    mutated = copy.deepcopy(document)
    holder = mutated
    for step in path[:-1]:
        holder = holder[step]
    if draw(st.booleans()):
        del holder[path[-1]]
        note(f"deleted {path}")
    else:
        holder[path[-1]] = draw(values)
        note(f"set {path} to {holder[path[-1]]!r}")
    return mutated


def assert_accepted_or_one_line(result: tuple[int, Any, str], named: str, leftovers: list[Path] = (),
                                accepted_line: str | None = None) -> None:
    """Exit 0, or exit 2 with one line naming ``named`` (or ``accepted_line``: the refusal that follows once the
    file was accepted) and none of ``leftovers`` written."""
    code, _, err = result
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "llmprobe: error: unexpected " not in err, err
    if code == 0:
        return
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("llmprobe: error:"), err
    assert named in lines[0] or (accepted_line is not None and accepted_line in lines[0]), lines[0]
    for path in leftovers:
        assert not path.exists(), f"{path} written by a run that failed: {lines[0]}"


def dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # NaN and Infinity as Python writes them: others' files may too


# ------------------------------------------------------------------------------------------------ traces
@pytest.fixture(scope="module")
def coin(tiny_loaded, tmp_path_factory) -> Path:
    return coin_trace(tiny_loaded, tmp_path_factory.mktemp("coin"), sequences=2)


@pytest.fixture(scope="module")
def coin_jsonl(coin, tmp_path_factory) -> list[Any]:
    """The coin trace's scored rows (its marks and prompt ends, which the fits read) as --format jsonl writes
    them: [header, row, row, ...] as JSON values."""
    table = pq.read_table(coin)
    table = table.filter(pc.is_valid(table.column("target_seq_logprobs")))
    meta = json.loads(table.schema.metadata[META_KEY])
    path = tmp_path_factory.mktemp("jsonl") / "coin.jsonl"
    with open_trace_sink(str(path), "jsonl", table.schema.remove_metadata(), meta,
                         decode_vocab(pq.read_metadata(coin).metadata)) as sink:
        for batch in table.to_batches(max_chunksize=5):
            sink.write(batch)
    return [json.loads(line) for line in path.read_text().splitlines()]


@SETTINGS
@given(data=st.data())
def test_a_mutated_jsonl_trace_header_or_row(data, coin_jsonl, tmp_path_factory, capsys, monkeypatch):
    """Issue 26 item 6 among them: a header whose vocab is not a list, or a list of integers."""
    lines = data.draw(mutations(coin_jsonl))
    path = tmp_path_factory.mktemp("mutated") / "t.jsonl"
    path.write_text("\n".join(dump(line) for line in (lines if isinstance(lines, list) else [lines])) + "\n")
    fit = path.parent / "p.json"
    for args in (["inspect", str(path), "--format", "tsv"], ["fit-prior", str(path), "-o", str(fit), "-q"]):
        assert_accepted_or_one_line(run_cli(args, capsys, monkeypatch), str(path), [fit])


@SETTINGS
@given(data=st.data())
def test_a_parquet_trace_with_mutated_metadata(data, coin, tmp_path_factory, capsys, monkeypatch):
    table = pq.read_table(coin)
    meta = json.loads(table.schema.metadata[META_KEY])
    vocab = decode_vocab(pq.read_metadata(coin).metadata)
    document = data.draw(mutations({"meta": meta, "vocab": vocab[:3]}))
    kv = {}
    if isinstance(document, dict) and "meta" in document:
        kv[META_KEY] = dump(document["meta"]).encode()
    if isinstance(document, dict) and "vocab" in document:
        mutated_vocab = document["vocab"]
        kv[VOCAB_KEY] = dump(mutated_vocab + vocab[3:] if isinstance(mutated_vocab, list) else mutated_vocab).encode()
    work = tmp_path_factory.mktemp("mutated")
    path = work / "t.parquet"
    pq.write_table(table.replace_schema_metadata(kv), path)
    for args in (["inspect", str(path), "--format", "tsv"], ["fit-prior", str(path), "-o", str(work / "p.json"), "-q"]):
        assert_accepted_or_one_line(run_cli(args, capsys, monkeypatch), str(path), [work / "p.json"])


# ------------------------------------------------------------------------------------------ priors, fits
@pytest.fixture(scope="module")
def prior_files(coin) -> dict[str, Any]:
    """A fit-prior file, a fit-posterior --json summary and `martingale --json` results, as JSON values."""
    import llmprobe

    martingale = [{"n": n, "horizon": 1, "states": 4, "paths": 8, "statistic": 0.02, "p_value": 0.4,
                   "mean_tv_deviation": 0.01, "mean_category_mass": 0.9} for n in (0, 2)]
    return {"rows": json.loads(json.dumps(llmprobe.fit_prior(coin))),
            "summary": json.loads(json.dumps(llmprobe.fit_posterior(coin, bootstrap=2, min_mass=0.0).summary)),
            "martingale": martingale}


@pytest.mark.parametrize("kind", ["rows", "summary"])
@SETTINGS
@given(data=st.data())
def test_a_mutated_prior_file(kind, data, prior_files, coin, tmp_path_factory, capsys, monkeypatch):
    """A fit-prior file or a fit-posterior summary given as --prior (issue 26 item 5 among them: no categories)."""
    work = tmp_path_factory.mktemp("mutated")
    prior = work / "prior.json"
    prior.write_text(dump(data.draw(mutations(prior_files[kind]))))
    args = ["fit-posterior", str(coin), "--prior", str(prior), "--bootstrap", "2", "--min-mass", "0", "-o",
            str(work / "fit.parquet"), "-q"]
    assert_accepted_or_one_line(run_cli(args, capsys, monkeypatch), str(prior), [work / "fit.parquet"])


@SETTINGS
@given(data=st.data())
def test_mutated_martingale_results(data, prior_files, coin, tmp_path_factory, capsys, monkeypatch):
    work = tmp_path_factory.mktemp("mutated")
    results = work / "martingale.jsonl"
    lines = data.draw(mutations(prior_files["martingale"]))
    results.write_text("\n".join(dump(line) for line in (lines if isinstance(lines, list) else [lines])) + "\n")
    args = ["fit-posterior", str(coin), "--martingale", str(results), "--bootstrap", "2", "--min-mass", "0", "-o",
            str(work / "fit.parquet"), "-q"]
    assert_accepted_or_one_line(run_cli(args, capsys, monkeypatch), str(results), [work / "fit.parquet"])


# ------------------------------------------------------------------------------------------ TOML configs
def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value) if isinstance(value, str) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(value)


def to_toml(document: dict[str, Any]) -> str:
    """A TOML document for a mutated config (``None``, which TOML cannot hold, leaves the key out)."""
    top = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in document.items()
           if v is not None and not isinstance(v, dict) and not _is_table(v)]
    tables: list[str] = []

    def table(path: tuple[str, ...], body: dict[str, Any], brackets: str) -> None:
        tables.append(brackets[0] + ".".join(json.dumps(k) for k in path) + brackets[1])
        tables.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items()
                      if v is not None and not isinstance(v, dict) and not _is_table(v))
        for key, value in body.items():
            if isinstance(value, dict):
                table((*path, key), value, ("[", "]"))
            elif _is_table(value):
                for item in value:
                    table((*path, key), item, ("[[", "]]"))

    for key, value in document.items():
        if isinstance(value, dict):
            table((key,), value, ("[", "]"))
        elif _is_table(value):
            for item in value:
                table((key,), item, ("[[", "]]"))
    return "\n".join(top + tables) + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


TOML_VALUES = st.recursive(st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True, allow_infinity=True)
                           | st.text(max_size=4), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=4)


def test_the_toml_writer_round_trips_the_configs():
    for config in (COIN, REPO / "configs" / "control" / "coin-mixture.toml"):
        document = tomllib.loads(config.read_text())
        assert tomllib.loads(to_toml(document)) == document


@SETTINGS
@given(data=st.data())
def test_a_mutated_experiment_toml(data, tmp_path_factory, capsys, monkeypatch):
    work = tmp_path_factory.mktemp("mutated")
    config = work / "coin.toml"
    document = tomllib.loads(COIN.read_text())
    document["experiment"]["n_max"], document["experiment"]["sequences"] = 4, 1
    config.write_text(to_toml(data.draw(mutations(document, TOML_VALUES, whole=False))))
    result = run_cli(["experiment", str(config), "-o", str(work / "p.jsonl"), "-q"], capsys, monkeypatch)
    assert_accepted_or_one_line(result, str(config), [work / "p.jsonl"])


@SETTINGS
@given(data=st.data())
def test_a_mutated_wind_tunnel_config(data, tmp_path_factory, capsys, monkeypatch):
    """``--steps 0`` is refused after the config and its prior are read, so an accepted config trains nothing."""
    work = tmp_path_factory.mktemp("mutated")
    config = work / "control.toml"
    document = tomllib.loads((REPO / "configs" / "control" / "coin-mixture.toml").read_text())
    config.write_text(to_toml(data.draw(mutations(document, TOML_VALUES, whole=False))))
    result = run_cli(["wind-tunnel", str(config), "-o", str(work / "control"), "--steps", "0", "-q"], capsys,
                     monkeypatch)
    assert result[0] == 2, result[2]
    assert_accepted_or_one_line(result, str(config), [work / "control"], accepted_line="--steps: must be 1 or more")


# ------------------------------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def tiny_gguf_bytes(tiny_model_dir, tmp_path_factory) -> tuple[bytes, int]:
    """The tiny GGUF's bytes and where its tensor data starts (what follows the header)."""
    import gguf

    from tests.model.tiny_gguf import build_tiny_gguf

    path = build_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_model_dir)
    return path.read_bytes(), gguf.GGUFReader(path).data_offset


@settings(SETTINGS, max_examples=HUNT or 12)
@given(data=st.data())
def test_a_gguf_with_a_damaged_header(data, tiny_gguf_bytes, tmp_path_factory, capsys, monkeypatch):
    content, header_end = tiny_gguf_bytes
    flips = data.draw(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(1, 255)), min_size=1,
                               max_size=3))
    damaged = bytearray(content)
    for offset, xor in flips:
        damaged[offset] ^= xor
    work = tmp_path_factory.mktemp("mutated")
    model = work / "m.gguf"
    model.write_bytes(bytes(damaged))
    prompts = work / "p.txt"
    prompts.write_text("heads tails\n")
    monkeypatch.setenv("LLMPROBE_CACHE", str(work / "cache"))
    result = run_cli(["trace", str(prompts), "--model", str(model), "-o", str(work / "t.parquet"), "--device", "cpu",
                      "-q"], capsys, monkeypatch)
    assert_accepted_or_one_line(result, str(model), [work / "t.parquet"])
    assert not list((work / "cache").glob("converted/.*"))  # no staging left behind
