"""Shuffled orders of each sequence (``experiment.permutations`` / ``experiment --permutations K``): the
exchangeability test's input. K = 0 changes nothing; K > 0 adds reorderings of exactly the same examples."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest

from llmprobe.errors import UsageError
from llmprobe.experiments import generate, load_experiment, loads_experiment, write_jsonl
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.experiments.test_experiments import check_marks_record

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "experiments"


def jsonl(records) -> str:
    buffer = io.StringIO()
    write_jsonl(records, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["coin", "die", "mapping", "categorical"])
def test_no_permutations_is_byte_identical(name):
    exp = load_experiment(CONFIGS / f"{name}.toml")
    plain = jsonl(generate(exp, sequences=2, n_max=6))
    assert jsonl(generate(exp, sequences=2, n_max=6, permutations=0)) == plain
    keyed = (CONFIGS / f"{name}.toml").read_text().replace("[experiment]\n", "[experiment]\npermutations = 0\n", 1)
    assert jsonl(generate(loads_experiment(keyed), sequences=2, n_max=6)) == plain
    assert "permutation" not in plain


@pytest.mark.parametrize("name", ["coin", "mapping"])
def test_each_sequence_is_followed_by_reorderings_of_its_own_examples(name):
    exp = load_experiment(CONFIGS / f"{name}.toml")
    records = list(generate(exp, sequences=2, n_max=8, permutations=3))
    originals = [r for r in records if "permutation" not in r]
    assert [r["id"] for r in originals] == [r["id"] for r in generate(exp, sequences=2, n_max=8)]
    assert jsonl(originals) == jsonl(generate(exp, sequences=2, n_max=8))  # the originals are untouched
    assert len(records) == 4 * len(originals) and len({r["id"] for r in records}) == len(records)
    for index, original in enumerate(originals):
        shuffled = records[4 * index + 1: 4 * index + 4]
        assert records[4 * index] is original or records[4 * index] == original
        assert [r["permutation"] for r in shuffled] == [1, 2, 3]
        for r in shuffled:
            check_marks_record(exp, r)  # a valid marks record: counts, offsets, no whitespace before a mark
            assert r["id"] == f"{original['id']}-p{r['permutation']:02d}" and r["permutation_of"] == original["id"]
            for key in ("sequence", "theta", "theta_index", "replicate", "n_max", "seed", "layout", "targets"):
                assert r[key] == original[key], key
            assert Counter(r["outcomes"]) == Counter(original["outcomes"])
            assert r["marks"][-1]["counts"] == original["marks"][-1]["counts"]
            if "cues" in original:  # an example is a (cue, outcome) pair; the query cue stays last
                n = len(original["outcomes"])
                assert Counter(zip(r["cues"][:n], r["outcomes"])) == Counter(zip(original["cues"][:n],
                                                                                 original["outcomes"]))
                assert r["cues"][-1] == original["cues"][-1]
    # random orders, not one fixed rotation: over the coin sweep some reorderings differ from the original
    assert any(r["outcomes"] != o["outcomes"] for o in originals for r in records if r.get("permutation_of") == o["id"])


def test_orders_are_deterministic_and_extend_when_k_grows():
    exp = load_experiment(CONFIGS / "coin.toml")
    three = jsonl(generate(exp, sequences=2, n_max=10, permutations=3))
    assert three == jsonl(generate(load_experiment(CONFIGS / "coin.toml"), sequences=2, n_max=10, permutations=3))
    five = [r for r in generate(exp, sequences=2, n_max=10, permutations=5)]
    kept = [r for r in five if r.get("permutation", 0) <= 3]
    assert jsonl(kept) == three
    assert jsonl(generate(exp, sequences=2, n_max=10, permutations=3, seed=exp.seed + 1)) != three


BASE = """
[experiment]
name = "p"
n_max = 4
sequences = 1
seed = 1
theta = [0.5, 0.5]
{extra}
[template]
prefix = "P"
example = "{{outcome}}"
separator = ","
[[categories]]
name = "a"
target = "A"
[[categories]]
name = "b"
target = "B"
"""


@pytest.mark.parametrize(("extra", "needle"), [
    ("permutations = -1", "experiment.permutations: must be >= 0"),
    ("permutations = 2.5", "experiment.permutations: must be an integer"),
    ("permutations = 100000", "experiment.permutations: must be <= 1000"),
    ('permutations = 2\nlayout = "per-n"', "experiment.permutations: shuffled orders are rendered as marks records"),
    ('permutations = 2\nlayout = "both"', "layout is 'both'"),
])
def test_bad_permutations_name_the_key(extra, needle):
    with pytest.raises(UsageError, match="permutations") as info:
        loads_experiment(BASE.format(extra=extra))
    assert needle in str(info.value)


def test_a_chain_of_thetas_is_not_exchangeable():
    chain = BASE.format(extra="permutations = 2").replace("theta = [0.5, 0.5]",
                                                          "phases = [{theta = [0.9, 0.1], n = 2},"
                                                          " {theta = [0.1, 0.9], n = 2}]")
    with pytest.raises(UsageError, match="experiment.permutations: a chain of θs"):
        loads_experiment(chain)


def test_overrides_are_checked_eagerly():
    exp = loads_experiment(BASE.format(extra=""))
    with pytest.raises(UsageError, match=r"permutations \(override\): must be >= 0"):
        generate(exp, permutations=-2)
    with pytest.raises(UsageError, match=r"permutations \(override\): shuffled orders"):
        generate(exp, permutations=2, layout="per-n")
    shuffled = loads_experiment(BASE.format(extra="permutations = 2"))
    with pytest.raises(UsageError, match=r"layout \(override\)"):
        generate(shuffled, layout="both")


def test_the_command_line_option(tmp_path, capsys, monkeypatch):
    config = str(CONFIGS / "coin.toml")
    code, out, err = run_cli(["experiment", config, "--n-max", "3", "--sequences", "1", "--permutations", "2"], capsys,
                             monkeypatch)
    assert code == 0, err
    assert len(out.splitlines()) == 33 and "wrote 33 prompts" in err
    output = tmp_path / "p.jsonl"
    code, _, err = run_cli(["experiment", config, "--permutations", "-1", "-o", str(output)], capsys, monkeypatch)
    assert_one_line_error(code, err, "--permutations")
    code, _, err = run_cli(["experiment", config, "--permutations", "2", "--layout", "per-n", "-o", str(output)],
                           capsys, monkeypatch)
    assert_one_line_error(code, err, "permutations (override)", "marks")
    assert not output.exists()
