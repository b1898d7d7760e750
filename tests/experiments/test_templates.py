"""[[templates]] experiments: placeholders, split points, independent vs nested draws, chains of θ, errors."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llmprobe.errors import UsageError
from llmprobe.experiments import generate, load_experiment, loads_experiment, write_jsonl
from tests.cli_helpers import assert_one_line_error, run_cli

PEERS = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "peers"

TEMPLATED = '''
[experiment]
name = "t"
n_max = 3
sequences = 2
seed = 5
thetas = [[0.7, 0.3], [0.25, 0.75]]

[template]
example = "{outcome}"

[[templates]]
name = "a"
instruction = "Heads {theta_percent}% (p={theta}, tails {theta_percent[1]}%): {category} vs {category[1]}, {n} of {n_max}.\\n"
prefix = "Flips:"
separator = ","

[[templates]]
prefix = "[{n}]I got"
separator = ", then"
example = "{outcome}{{!}}"

[[categories]]
name = "heads"
target = " heads"

[[categories]]
name = "tails"
target = " tails"
'''

WORDS = {0: " heads", 1: " tails"}


def _sub(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def _jsonl(records) -> str:
    buf = io.StringIO()
    write_jsonl(records, buf)
    return buf.getvalue()


def test_placeholders_render_byte_exact():
    exp = loads_experiment(TEMPLATED)
    records = list(generate(exp))
    assert len(records) == 2 * 2 * 2  # θ × template × replicate, one marks record each
    first = records[0]
    instruction = "Heads 70% (p=0.7, tails 30%): heads vs tails, 3 of 3.\n"
    expected = instruction + "Flips:" + ",".join(WORDS[o] for o in first["outcomes"]) + ","
    assert first["prompt"] == expected
    assert first["split"] == len(instruction) and first["template"] == 0 and first["template_name"] == "a"
    assert [m["offset"] for m in first["marks"]] == [len(instruction) + 6 + 7 * j for j in range(4)]
    second = records[2]  # θ 0, template 1, replicate 0
    assert second["template"] == 1 and "split" not in second and "template_name" not in second
    assert second["prompt"] == "[3]I got" + "".join(WORDS[o] + "{!}, then" for o in second["outcomes"])
    low = next(r for r in records if r["theta"] == [0.25, 0.75])
    assert low["prompt"].startswith("Heads 25% (p=0.25, tails 75%)")
    # {n} is the prompt's own count in per-n prompts
    per_n = [r for r in generate(exp, layout="per-n") if r["template"] == 1 and r["theta_index"] == 0]
    assert [r["prompt"][:3] for r in per_n[:4]] == ["[0]", "[1]", "[2]", "[3]"]
    # same seed, same bytes; another seed, other flips
    assert _jsonl(generate(exp, layout="both")) == _jsonl(generate(loads_experiment(TEMPLATED), layout="both"))
    assert _jsonl(generate(exp, seed=6, n_max=20)) != _jsonl(generate(exp, n_max=20))


def test_single_template_form_keeps_its_streams():
    """A [[templates]] twin of a [template] file with shared draws gives the same records plus `template`."""
    legacy = '''
[experiment]
name = "c"
n_max = 6
sequences = 3
seed = 9
thetas = [[0.3, 0.7], [0.9, 0.1]]
layout = "both"

[template]
prefix = "I got {literal}"
example = "{outcome}"
separator = ", then"
'''
    cats = TEMPLATED[TEMPLATED.index("[[categories]]"):]
    templated = legacy.replace("seed = 9", 'seed = 9\ntemplate_draws = "shared"').replace(
        "[template]", "[[templates]]").replace("{literal}", "{{literal}}")
    old = list(generate(loads_experiment(legacy + cats)))
    new = list(generate(loads_experiment(templated + cats)))
    assert old[0]["prompt"].startswith("I got {literal}")  # the original form's prefix is literal
    assert [{k: v for k, v in r.items() if k != "template"} for r in new] == old
    assert all(r["template"] == 0 for r in new)


def test_templates_draw_their_own_flips_unless_shared():
    many = _sub(TEMPLATED, "n_max = 3", "n_max = 30")
    own = [r for r in generate(loads_experiment(many)) if r["theta_index"] == 0 and r["replicate"] == 0]
    assert own[0]["outcomes"] != own[1]["outcomes"]
    shared = loads_experiment(_sub(many, "seed = 5", 'seed = 5\ntemplate_draws = "shared"'))
    same = [r for r in generate(shared) if r["theta_index"] == 0 and r["replicate"] == 0]
    assert same[0]["outcomes"] == same[1]["outcomes"] and same[0]["prompt"] != same[1]["prompt"]


def test_nested_and_independent_draws():
    base = _sub(TEMPLATED, "n_max = 3", 'n_max = 12\nlayout = "per-n"\nns = [0, 1, 5, 12]')
    nested = [r for r in generate(loads_experiment(base)) if r["template"] == 0]
    independent_exp = loads_experiment(_sub(base, "seed = 5", 'seed = 5\ndraws = "independent"'))
    independent = [r for r in generate(independent_exp) if r["template"] == 0]
    assert [r["marks"][0]["n"] for r in nested[:4]] == [0, 1, 5, 12]
    for records in (nested, independent):
        for r in records:
            assert r["marks"][0]["offset"] == len(r["prompt"]) and len(r["outcomes"]) == r["marks"][0]["n"]
            assert sum(r["marks"][0]["counts"]) == r["marks"][0]["n"]
    # nested: one sequence cut at each n; independent: every prompt its own sequence, redrawn
    assert len({r["sequence"] for r in nested[:4]}) == 1
    assert all(b["outcomes"][: len(a["outcomes"])] == a["outcomes"] for a, b in zip(nested[:3], nested[1:4]))
    assert len({r["sequence"] for r in independent}) == len(independent)
    pairs = [(a, b) for a, b in zip(independent, independent[1:]) if a["replicate"] == b["replicate"]
             and a["theta_index"] == b["theta_index"] and a["marks"][0]["n"] < b["marks"][0]["n"] and a["outcomes"]]
    assert any(b["outcomes"][: len(a["outcomes"])] != a["outcomes"] for a, b in pairs)
    # an n's draws do not depend on which other n are asked for
    fewer = loads_experiment(_sub(_sub(base, "ns = [0, 1, 5, 12]", "ns = [5]"), "seed = 5",
                                  'seed = 5\ndraws = "independent"'))
    only5 = [r["outcomes"] for r in generate(fewer)]
    assert only5 == [r["outcomes"] for r in generate(independent_exp) if r["marks"][0]["n"] == 5]


def test_independent_draws_follow_theta():
    text = _sub(_sub(TEMPLATED, "n_max = 3", 'n_max = 1\nlayout = "per-n"\ndraws = "independent"\nns = [1]'),
                "sequences = 2", "sequences = 600").replace("thetas = [[0.7, 0.3], [0.25, 0.75]]", "theta = [0.7, 0.3]")
    firsts = Counter(r["outcomes"][0] for r in generate(loads_experiment(text)))
    assert sum(firsts.values()) == 1200 and abs(firsts[0] / 1200 - 0.7) < 0.05  # 4 standard errors


def test_phases_chain_thetas_and_each_mark_carries_its_own():
    text = _sub(TEMPLATED, "n_max = 3\n", "").replace(
        "thetas = [[0.7, 0.3], [0.25, 0.75]]", "phases = [{theta = [0.9, 0.1], n = 40}, {theta = [0.1, 0.9], n = 40}]")
    text = text.replace("Heads {theta_percent}% (p={theta}, tails {theta_percent[1]}%): ", "").replace(
        "sequences = 2", "sequences = 30")
    exp = loads_experiment(text)
    assert exp.n_max == 80
    records = [r for r in generate(exp) if r["template"] == 0]
    first_half = np.mean([o == 0 for r in records for o in r["outcomes"][:40]])
    second_half = np.mean([o == 0 for r in records for o in r["outcomes"][40:]])
    assert abs(first_half - 0.9) < 0.03 and abs(second_half - 0.1) < 0.03
    marks = records[0]["marks"]
    assert marks[39]["theta"] == [0.9, 0.1] and marks[40]["theta"] == [0.1, 0.9] and marks[80]["theta"] == [0.1, 0.9]
    assert records[0]["phases"] == [{"theta": [0.9, 0.1], "n": 40}, {"theta": [0.1, 0.9], "n": 40}]


def test_shipped_peer_configs():
    icl = load_experiment(PEERS / "coin_icl.toml")
    records = list(generate(icl))
    assert len(records) == 11 * 3 * 5 and {r["template"] for r in records} == {0, 1, 2}
    assert all("split" in r and r["marks"][0]["offset"] > r["split"] for r in records)
    assert next(r for r in records if r["theta"] == [0.7, 0.3])["prompt"].startswith(
        "A coin is weighted so that it lands heads 70% of the time.")
    chain = list(generate(load_experiment(PEERS / "coin_chain.toml")))
    assert len(chain) == 3 and len({tuple(r["outcomes"]) for r in chain}) == 1 and len(chain[0]["marks"]) == 61
    die = list(generate(load_experiment(PEERS / "die_icl.toml")))
    assert len(die) == 3 * 3 * 5 and "80 percent" in die[-1]["prompt"]


BAD = [
    ("unknown-placeholder", _sub(TEMPLATED, 'prefix = "Flips:"', 'prefix = "Flips {thetaa}:"'),
     ["templates[0].prefix", "unknown placeholder {thetaa}"]),
    ("format-spec", _sub(TEMPLATED, "{theta}", "{theta:.2f}"), ["templates[0].instruction", "{theta:.2f}"]),
    ("category-index", _sub(TEMPLATED, "{category[1]}", "{category[2]}"),
     ["templates[0].instruction", "category 2", "there are 2"]),
    ("outcome-in-prefix", _sub(TEMPLATED, 'prefix = "Flips:"', 'prefix = "{outcome}"'),
     ["templates[0].prefix", "{outcome}"]),
    ("empty-list", TEMPLATED[: TEMPLATED.index("[[templates]]")] + "templates = []\n"
     + TEMPLATED[TEMPLATED.index("[[categories]]"):], ["templates", "empty"]),
    ("split-missing", _sub(TEMPLATED, "seed = 5", 'seed = 5\nchat = "prefill"'),
     ["templates[1].instruction", "missing split point"]),
    ("shared-example-missing", _sub(TEMPLATED, '[template]\nexample = "{outcome}"\n', ""),
     ["templates[0].example", "missing"]),
    ("whitespace-before-mark", _sub(TEMPLATED, 'separator = ","', 'separator = ", "'),
     ["templates[0].separator", "whitespace"]),
    ("unknown-key", _sub(TEMPLATED, 'name = "a"', 'name = "a"\nprefx = "x"'), ["templates[0].prefx", "prefix"]),
    ("instruction-in-legacy", TEMPLATED[: TEMPLATED.index("[template]")]
     + '[template]\nprefix = "x"\nexample = "{outcome}"\nseparator = ","\ninstruction = "y"\n'
     + TEMPLATED[TEMPLATED.index("[[categories]]"):], ["template.instruction", "[[templates]]"]),
    ("ns-with-marks", _sub(TEMPLATED, "n_max = 3", "n_max = 3\nns = [1]"), ["experiment.ns", "per-n"]),
    ("ns-above-n_max", _sub(TEMPLATED, "n_max = 3", 'n_max = 3\nlayout = "per-n"\nns = [1, 4]'),
     ["experiment.ns", "n_max"]),
    ("theta-with-phases", TEMPLATED.replace("thetas = [[0.7, 0.3], [0.25, 0.75]]",
                                            "phases = [{theta = [0.5, 0.5], n = 3}]"),
     ["templates[0].instruction", "phases"]),
    ("draws-bad", _sub(TEMPLATED, "seed = 5", 'seed = 5\ndraws = "fresh"'), ["experiment.draws", "independent"]),
]


@pytest.mark.parametrize("name,text,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_templated_configs(tmp_path, name, text, needles):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_experiment(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_bad_config_is_one_line_on_the_command_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bad.toml"
    path.write_text(_sub(TEMPLATED, "seed = 5", 'seed = 5\nchat = "prefill"'))
    code, out, err = run_cli(["experiment", str(path)], capsys, monkeypatch)
    assert_one_line_error(code, err, "bad.toml", "templates[1].instruction")
    assert out == ""


def test_martingale_refuses_templated_experiments():
    from llmprobe.analysis.martingale import model_martingale

    with pytest.raises(UsageError, match="single-\\[template\\]"):
        model_martingale(None, loads_experiment(TEMPLATED), [0], paths=1, horizon=1)
