"""Tests for the experiment generator (llmprobe/experiments/ and configs/experiments/*.toml)."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmprobe.errors import UsageError
from llmprobe.experiments import generate, load_experiment, loads_experiment, write_jsonl

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "experiments"
SHIPPED = sorted(CONFIG_DIR.glob("*.toml"))
REQUIRED_FIELDS = {"id", "prompt", "marks", "targets", "categories", "theta", "experiment", "sequence",
                   "layout", "outcomes"}


# ----------------------------------------------------------------------------------------------
# Invariant checks shared by the example-based and property tests


def check_marks_record(exp, rec) -> None:
    k = len(exp.categories)
    assert REQUIRED_FIELDS <= rec.keys()
    assert rec["layout"] == "marks"
    assert rec["targets"] == exp.targets and rec["categories"] == exp.category_names
    assert len(rec["theta"]) == k and abs(sum(rec["theta"]) - 1) < 1e-6
    prompt, marks, outcomes = rec["prompt"], rec["marks"], rec["outcomes"]
    n_max = rec["n_max"]
    assert len(outcomes) == n_max and all(0 <= o < k for o in outcomes)
    assert all(rec["theta"][o] > 0 for o in outcomes)  # θ_k = 0 is never drawn
    assert len(marks) == n_max + 1
    offsets = [m["offset"] for m in marks]
    assert all(isinstance(o, int) for o in offsets)
    assert all(a < b for a, b in zip(offsets, offsets[1:])), "marks strictly increasing"
    assert 0 < offsets[0] and offsets[-1] == len(prompt), "last mark at the end of the prompt"
    assert prompt.startswith(exp.prefix)
    for j, mark in enumerate(marks):
        assert mark["n"] == j
        expected = np.bincount(np.asarray(outcomes[:j], dtype=int), minlength=k).tolist()
        assert mark["counts"] == expected
        assert sum(mark["counts"]) == mark["n"]
        before = prompt[: mark["offset"]]
        assert before and not before[-1].isspace(), "no whitespace right before a mark"
        if j < n_max:
            # The text between this mark and the next begins with the recorded outcome's target.
            segment = prompt[mark["offset"] : offsets[j + 1]]
            assert segment.startswith(exp.targets[outcomes[j]]), (segment, outcomes[j])
            assert segment.startswith(exp.categories[outcomes[j]].text)
    if rec.get("cues") is not None:
        assert len(rec["cues"]) == n_max + 1 and len(set(rec["cues"])) == n_max + 1


def check_per_n_records(exp, marks_rec, per_n) -> None:
    """The per-n prompts are exactly the marks prompt cut at each mark, with the same fields."""
    assert [r["marks"][0]["n"] for r in per_n] == list(range(marks_rec["n_max"] + 1))
    for rec, mark in zip(per_n, marks_rec["marks"]):
        n = mark["n"]
        assert rec["layout"] == "per-n"
        width = max(2, len(str(marks_rec["n_max"])))
        assert rec["id"] == f"{marks_rec['id']}-n{n:0{width}d}"
        assert rec["prompt"] == marks_rec["prompt"][: mark["offset"]]
        assert rec["marks"] == [mark] and mark["offset"] == len(rec["prompt"])
        assert rec["outcomes"] == marks_rec["outcomes"][:n]
        for key in ("targets", "categories", "theta", "experiment", "sequence", "theta_index", "replicate",
                    "seed", "n_max"):
            assert rec[key] == marks_rec[key]
        if "cues" in marks_rec:
            assert rec["cues"] == marks_rec["cues"][: n + 1]


def check_all(exp, records) -> None:
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "ids unique"
    marks = [r for r in records if r["layout"] == "marks"]
    by_seq: dict[int, list] = {}
    for r in records:
        if r["layout"] == "per-n":
            by_seq.setdefault(r["sequence"], []).append(r)
    for rec in marks:
        check_marks_record(exp, rec)
        if by_seq:
            check_per_n_records(exp, rec, by_seq[rec["sequence"]])
    # JSONL round trip keeps every record (and so every offset) intact.
    buf = io.StringIO()
    assert write_jsonl(records, buf) == len(records)
    lines = buf.getvalue().splitlines()
    assert len(lines) == len(records)
    assert [json.loads(line) for line in lines] == records


# ----------------------------------------------------------------------------------------------
# Shipped configs


def test_shipped_configs_present():
    assert {p.stem for p in SHIPPED} >= {"coin", "die", "mapping", "categorical"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_generates(path):
    exp = load_experiment(path)
    assert exp.name == path.stem
    records = list(generate(exp, sequences=2, layout="both"))
    assert len(records) == len(exp.thetas) * 2 * (1 + exp.n_max + 1)
    check_all(exp, records)
    # Full default run: right count, all marks-layout invariants.
    full = list(generate(exp))
    assert len(full) == len(exp.thetas) * exp.sequences * (1 if exp.layout == "marks" else exp.n_max + 1)
    for rec in full[:50]:
        if rec["layout"] == "marks":
            check_marks_record(exp, rec)


def test_coin_text_and_marks():
    exp = load_experiment(CONFIG_DIR / "coin.toml")
    assert exp.targets == [" heads", " tails"]
    assert exp.thetas[0] == (0.0, 1.0) and exp.thetas[-1] == (1.0, 0.0)
    assert [t[0] for t in exp.thetas] == pytest.approx([i / 10 for i in range(11)])
    rec = next(r for r in generate(exp, n_max=6) if r["theta"] == [0.5, 0.5])
    prompt = rec["prompt"]
    assert prompt.startswith("I just flipped a coin, and it came up ")
    assert prompt.endswith(", then")
    words = ["heads", "tails"]
    for j, mark in enumerate(rec["marks"]):
        rest = prompt[mark["offset"] :]
        if j == len(rec["marks"]) - 1:
            assert rest == ""
        else:
            assert rest.startswith(" " + words[rec["outcomes"][j]])
            assert prompt[: mark["offset"]].endswith(("came up", ", then"))
    expected = "I just flipped a coin, and it came up" + "".join(
        f" {words[o]}, then" for o in rec["outcomes"]
    )
    assert prompt == expected
    assert rec["id"].startswith("coin-s") and len(rec["id"]) == len("coin-s0000")


def test_coin_per_n_ids():
    exp = load_experiment(CONFIG_DIR / "coin.toml")
    recs = list(generate(exp, n_max=3, sequences=1, layout="per-n"))
    assert recs[0]["id"] == "coin-s0000-n00" and recs[3]["id"] == "coin-s0000-n03"
    assert recs[0]["prompt"] == "I just flipped a coin, and it came up"
    assert all(r["layout"] == "per-n" and len(r["marks"]) == 1 for r in recs)


def test_die_and_mapping_text():
    die = load_experiment(CONFIG_DIR / "die.toml")
    assert die.targets == [f" {i}" for i in range(1, 7)] and die.category_names == [str(i) for i in range(1, 7)]
    assert die.thetas[0] == tuple([1 / 6] * 6)
    rec = next(generate(die, n_max=3))
    assert rec["prompt"].startswith("I just rolled a six-sided die, and it showed ")
    mapping = load_experiment(CONFIG_DIR / "mapping.toml")
    first_letters = [t.strip()[0] for t in mapping.targets]
    assert len(set(first_letters)) == len(first_letters), "labels differ in their first token"
    assert all(t.startswith(" ") and t[1:].isalpha() and t[1:].islower() for t in mapping.targets)
    assert not set(t.strip() for t in mapping.targets) & set(mapping.cues), "labels are not cue words"
    rec = next(generate(mapping))
    lines = rec["prompt"].split("\n")
    assert lines[-1].endswith(" ->") and lines[-1].split(" ")[0] in mapping.cues
    assert all(line.split(" -> ")[1] in {t.strip() for t in mapping.targets} for line in lines[1:-1])


# ----------------------------------------------------------------------------------------------
# Determinism and statistics


def _jsonl(exp, **kw) -> str:
    buf = io.StringIO()
    write_jsonl(generate(exp, **kw), buf)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["coin", "mapping"])
def test_same_seed_identical_output(name):
    exp = load_experiment(CONFIG_DIR / f"{name}.toml")
    a = _jsonl(exp, sequences=3, layout="both")
    b = _jsonl(load_experiment(CONFIG_DIR / f"{name}.toml"), sequences=3, layout="both")
    assert a == b and a.isascii()
    c = _jsonl(exp, sequences=3, layout="both", seed=exp.seed + 1)
    assert c != a


def test_different_seed_different_outcomes():
    exp = load_experiment(CONFIG_DIR / "coin.toml")
    a = [r["outcomes"] for r in generate(exp, seed=1)]
    b = [r["outcomes"] for r in generate(exp, seed=2)]
    assert a != b
    # θ = (0, 1) and (1, 0) are deterministic whatever the seed; the rest differ.
    assert a[0] == b[0] == [1] * exp.n_max


def test_streams_stable_under_sweep_and_length_changes():
    base = """
[experiment]
name = "s"
n_max = 10
sequences = 3
seed = 5
{thetas}
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
    one = loads_experiment(base.format(thetas="thetas = [[0.3, 0.7]]"))
    three = loads_experiment(base.format(thetas="thetas = [[0.5, 0.5], [0.3, 0.7], [0.9, 0.1]]"))
    out_one = [r["outcomes"] for r in generate(one)]
    out_three = [r["outcomes"] for r in generate(three) if r["theta"] == [0.3, 0.7]]
    assert out_one == out_three, "adding θs does not change the others"
    more = [r["outcomes"] for r in generate(one, sequences=5, n_max=25)]
    assert [o[:10] for o in more[:3]] == out_one, "more sequences / longer sequences extend, not reshuffle"


def test_empirical_frequencies_approach_theta():
    exp = load_experiment(CONFIG_DIR / "coin.toml")
    flips = Counter()
    for rec in generate(exp, sequences=400, n_max=50):
        if rec["theta"] == [0.3, 0.7]:
            flips.update(rec["outcomes"])
    total = sum(flips.values())
    assert total == 400 * 50
    assert abs(flips[0] / total - 0.3) < 0.02

    die = load_experiment(CONFIG_DIR / "die.toml")
    for theta_index, theta in enumerate(die.thetas):
        counts = np.zeros(6)
        for rec in generate(die, sequences=300, n_max=40):
            if rec["theta_index"] == theta_index:
                counts += np.bincount(rec["outcomes"], minlength=6)
        np.testing.assert_allclose(counts / counts.sum(), theta, atol=0.02)


# ----------------------------------------------------------------------------------------------
# Validation


VALID = """\
[experiment]
name = "t"
n_max = 3
sequences = 2
seed = 1
theta = [0.25, 0.75]

[template]
prefix = "I flipped a coin and got"
example = "{outcome}"
separator = ", then"

[[categories]]
name = "heads"
target = " heads"

[[categories]]
name = "tails"
target = " tails"
"""

MAPPING = """\
[experiment]
name = "m"
n_max = 2
sequences = 1
seed = 1
theta = [0.5, 0.5]

[template]
prefix = "Words:\\n"
example = "{cue} ->{outcome}"
separator = "\\n"
cues = ["blick", "wug", "dax"]

[[categories]]
name = "zorp"
target = " zorp"

[[categories]]
name = "mib"
target = " mib"
"""


def _sub(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


INVALID = [
    # (name, toml text, substrings the message must contain)
    ("bad-toml", _sub(VALID, 'name = "t"', 'name = "t'), ["invalid TOML", "line 2"]),
    ("missing-n_max", _sub(VALID, "n_max = 3\n", ""), ["experiment.n_max", "missing"]),
    ("missing-seed", _sub(VALID, "seed = 1\n", ""), ["experiment.seed", "missing"]),
    ("missing-name", _sub(VALID, 'name = "t"\n', ""), ["experiment.name", "missing"]),
    ("missing-example", _sub(VALID, 'example = "{outcome}"\n', ""), ["template.example", "missing"]),
    ("missing-template", VALID.split("[template]")[0] + "[[categories]]" + VALID.split("[[categories]]", 1)[1],
     ["[template]", "missing"]),
    ("missing-categories", VALID.split("[[categories]]")[0], ["categories", "missing"]),
    ("one-category", VALID.rsplit("[[categories]]", 1)[0].replace("[0.25, 0.75]", "[1.0]"),
     ["at least two"]),
    ("missing-theta", _sub(VALID, "theta = [0.25, 0.75]\n", ""), ["experiment.theta", "missing"]),
    ("theta-sum", _sub(VALID, "[0.25, 0.75]", "[0.25, 0.70]"), ["experiment.theta", "sum to 1"]),
    ("theta-negative", _sub(VALID, "[0.25, 0.75]", "[-0.25, 1.25]"), ["experiment.theta[0]", ">= 0"]),
    ("theta-nan", _sub(VALID, "[0.25, 0.75]", "[nan, 1.0]"), ["experiment.theta[0]", "finite"]),
    ("theta-length", _sub(VALID, "[0.25, 0.75]", "[0.25, 0.25, 0.5]"), ["experiment.theta", "3 entries", "2 categories"]),
    ("theta-type", _sub(VALID, "[0.25, 0.75]", '["a", 1.0]'), ["experiment.theta[0]", "number"]),
    ("theta-bool", _sub(VALID, "[0.25, 0.75]", "[true, 0.0]"), ["experiment.theta[0]", "number"]),
    ("theta-and-thetas", _sub(VALID, "theta = [0.25, 0.75]", "theta = [0.25, 0.75]\nthetas = [[0.5, 0.5]]"),
     ["either theta or thetas"]),
    ("thetas-bad-entry", _sub(VALID, "theta = [0.25, 0.75]", "thetas = [[0.5, 0.5], [0.5, 0.6]]"),
     ["experiment.thetas[1]", "sum to 1"]),
    ("thetas-duplicate", _sub(VALID, "theta = [0.25, 0.75]", "thetas = [[0.5, 0.5], \"uniform\"]"),
     ["experiment.thetas[1]", "duplicate"]),
    ("thetas-empty", _sub(VALID, "theta = [0.25, 0.75]", "thetas = []"), ["experiment.thetas", "non-empty"]),
    ("n_max-negative", _sub(VALID, "n_max = 3", "n_max = -1"), ["experiment.n_max", ">= 0"]),
    ("n_max-float", _sub(VALID, "n_max = 3", "n_max = 3.0"), ["experiment.n_max", "integer"]),
    ("sequences-zero", _sub(VALID, "sequences = 2", "sequences = 0"), ["experiment.sequences", ">= 1"]),
    ("seed-negative", _sub(VALID, "seed = 1", "seed = -3"), ["experiment.seed", ">= 0"]),
    ("layout", _sub(VALID, "seed = 1", 'seed = 1\nlayout = "pern"'), ["experiment.layout", "per-n"]),
    ("name-space", _sub(VALID, 'name = "t"', 'name = "my exp"'), ["experiment.name"]),
    ("dup-category-name", _sub(VALID, 'name = "tails"', 'name = "heads"'), ["categories[1].name", "duplicate"]),
    ("dup-target", _sub(VALID, 'target = " tails"', 'target = " heads"'), ["categories[1].target", "duplicate"]),
    ("empty-target", _sub(VALID, 'target = " tails"', 'target = ""'), ["categories[1].target", "empty"]),
    ("text-not-target", _sub(VALID, 'target = " tails"', 'target = " tails"\ntext = " tail"'),
     ["categories[1].text", "begin with"]),
    ("typo-key", _sub(VALID, "n_max = 3", "n_max = 3\nn_maks = 4"), ["experiment.n_maks", "unknown key", "did you mean 'n_max'"]),
    ("unknown-table", VALID + "\n[extra]\nx = 1\n", ["extra", "unknown table"]),
    ("unknown-category-key", _sub(VALID, 'target = " heads"', 'target = " heads"\ncolour = "red"'),
     ["categories[0].colour", "unknown key"]),
    ("theta-in-category", _sub(VALID, "theta = [0.25, 0.75]\n", "") + "theta = [0.25, 0.75]\n",
     ["categories[1].theta", "[experiment]"]),
    ("no-outcome", _sub(VALID, 'example = "{outcome}"', 'example = "x"'), ["template.example", "{outcome}"]),
    ("two-outcomes", _sub(VALID, 'example = "{outcome}"', 'example = "{outcome}{outcome}"'),
     ["template.example", "exactly once"]),
    ("unknown-placeholder", _sub(VALID, 'example = "{outcome}"', 'example = "{foo}{outcome}"'),
     ["template.example", "{foo}"]),
    ("attribute-placeholder", _sub(VALID, 'example = "{outcome}"', 'example = "{outcome.__class__}"'),
     ["template.example", "placeholder"]),
    ("format-spec", _sub(VALID, 'example = "{outcome}"', 'example = "{index:>3}{outcome}"'),
     ["template.example", "placeholder"]),
    ("unbalanced-brace", _sub(VALID, 'example = "{outcome}"', 'example = "{outcome}}"'), ["template.example"]),
    ("separator-trailing-space", _sub(VALID, 'separator = ", then"', 'separator = ", then "'),
     ["template.separator", "whitespace"]),
    ("prefix-trailing-space", _sub(VALID, 'got"', 'got "'), ["template.prefix", "whitespace"]),
    ("example-space-before-outcome", _sub(VALID, 'example = "{outcome}"', 'example = "Flip {index}: {outcome}"'),
     ["template.example", "whitespace"]),
    ("first-mark-at-zero", _sub(VALID, 'prefix = "I flipped a coin and got"', 'prefix = ""'), ["offset 0"]),
    ("example-not-string", _sub(VALID, 'example = "{outcome}"', "example = 3"), ["template.example", "string"]),
    ("cues-missing", _sub(MAPPING, 'cues = ["blick", "wug", "dax"]\n', ""), ["template.cues", "missing"]),
    ("cues-unused", _sub(MAPPING, '"{cue} ->{outcome}"', '"->{outcome}"'), ["template.cues", "{cue}"]),
    ("cues-too-few", _sub(MAPPING, "n_max = 2", "n_max = 3"), ["template.cues", "needs 4"]),
    ("cues-duplicate", _sub(MAPPING, '"dax"]', '"wug"]'), ["template.cues[2]", "duplicate"]),
    ("cue-trailing-space", _sub(MAPPING, '"{cue} ->{outcome}"', '"->{cue}{outcome}"').replace('"dax"', '"dax "'),
     ["cue", "whitespace"]),
]


@pytest.mark.parametrize("name,text,needles", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_config_raises_usage_error(tmp_path, name, text, needles):
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_experiment(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert info.value.where == str(path)
    for needle in needles:
        assert needle in message, (needle, message)


def test_valid_bases_load():
    assert loads_experiment(VALID).thetas == ((0.25, 0.75),)
    assert len(list(generate(loads_experiment(MAPPING)))) == 1


def test_unreadable_files(tmp_path):
    with pytest.raises(UsageError, match="cannot read"):
        load_experiment(tmp_path / "nope.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(VALID.replace('"t"', '"t"  # caf\xe9').encode("latin-1"))
    with pytest.raises(UsageError, match="UTF-8") as info:
        load_experiment(bad)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"n_max": -1}, "n_max"),
        ({"sequences": 0}, "sequences"),
        ({"seed": -1}, "seed"),
        ({"layout": "diagonal"}, "layout"),
        ({"n_max": True}, "n_max"),
    ],
)
def test_invalid_overrides(tmp_path, override, needle):
    path = tmp_path / "ok.toml"
    path.write_text(VALID)
    exp = load_experiment(path)
    with pytest.raises(UsageError) as info:
        generate(exp, **override)  # eager: fails before any record is produced
    assert str(path) in str(info.value) and needle in str(info.value)


def test_override_needing_more_cues():
    exp = load_experiment(CONFIG_DIR / "mapping.toml")
    with pytest.raises(UsageError, match="cues"):
        list(generate(exp, n_max=len(exp.cues)))
    assert len(next(generate(exp, n_max=len(exp.cues) - 1))["cues"]) == len(exp.cues)


def test_uniform_and_braces():
    text = _sub(VALID, "[0.25, 0.75]", '"uniform"')
    text = _sub(text, 'example = "{outcome}"', 'example = "{{{index}}}:{outcome}"')
    exp = loads_experiment(text)
    assert exp.thetas == ((0.5, 0.5),)
    rec = next(generate(exp, n_max=2))
    assert rec["prompt"].startswith("I flipped a coin and got{1}:")
    check_all(exp, [rec])


# ----------------------------------------------------------------------------------------------
# Property test: random categorical configs


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _lit(s: str) -> str:
    return s.replace("{", "{{").replace("}", "}}")


small_text = st.text(min_size=0, max_size=6)


@st.composite
def categorical_configs(draw):
    k = draw(st.integers(2, 5))
    names = draw(st.lists(st.text(min_size=1, max_size=5), min_size=k, max_size=k, unique=True))
    targets = draw(st.lists(st.text(min_size=1, max_size=5), min_size=k, max_size=k, unique=True))
    suffixes = draw(st.lists(st.one_of(st.just(""), small_text), min_size=k, max_size=k))
    texts = [t + s for t, s in zip(targets, suffixes)]
    weights = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.01, 10)), min_size=k, max_size=k))
    if sum(weights) == 0:
        weights[draw(st.integers(0, k - 1))] = 1.0
    theta = [w / sum(weights) for w in weights]
    prefix = draw(small_text)
    head = draw(small_text)
    use_index = draw(st.booleans())
    tail = draw(small_text)
    separator = draw(small_text)
    example = _lit(head) + ("{index}" if use_index else "") + "{outcome}" + _lit(tail)
    n_max = draw(st.integers(0, 8))
    sequences = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**63))
    lines = [
        "[experiment]",
        'name = "prop"',
        f"n_max = {n_max}",
        f"sequences = {sequences}",
        f"seed = {seed}",
        'layout = "both"',
        f"theta = [{', '.join(repr(t) for t in theta)}]",
        "[template]",
        f"prefix = {_toml_str(prefix)}",
        f"example = {_toml_str(example)}",
        f"separator = {_toml_str(separator)}",
    ]
    for name, target, text in zip(names, targets, texts):
        lines += ["[[categories]]", f"name = {_toml_str(name)}", f"target = {_toml_str(target)}"]
        if text != target:
            lines.append(f"text = {_toml_str(text)}")
    # Independent oracle for the mark-context rule: the text before every mark is non-empty and
    # does not end in whitespace.
    head_r = head + ("1" if use_index else "")
    befores = [prefix + head_r] + [t + tail + separator + head_r for t in texts]
    valid = bool(befores[0]) and not any(b and b[-1].isspace() for b in befores)
    valid = valid and len(set(texts)) == k
    return "\n".join(lines) + "\n", valid, theta


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(categorical_configs())
def test_property_random_categorical(config):
    text, valid, theta = config
    if not valid:
        with pytest.raises(UsageError):
            loads_experiment(text, where="prop.toml")
        return
    exp = loads_experiment(text, where="prop.toml")
    assert list(exp.thetas[0]) == theta
    records = list(generate(exp))
    assert len(records) == exp.sequences * (1 + exp.n_max + 1)
    check_all(exp, records)
    again = list(generate(loads_experiment(text)))
    assert again == records
