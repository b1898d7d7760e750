"""Property tests: prompt parsing round trips, mark-to-token mapping, trace write/read round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llmprobe.tracing.encoding import map_marks
from llmprobe.errors import UsageError
from llmprobe.tracing.prompts import PromptRecord, read_prompts
from llmprobe.tracing.reader import open_trace
from llmprobe.tracing.schema import trace_schema
from llmprobe.tracing.writer import open_trace_sink

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# A line of a text prompt file: anything but line breaks (a lone \r would be stripped as a CRLF ending),
# NUL (a file with a NUL byte is binary, refused) and U+FEFF (a leading one is a byte-order mark, dropped).
line_text = st.text(st.characters(blacklist_characters="\n\r\x00\ufeff", blacklist_categories=("Cs",)),
                    max_size=40)
prompt_text = line_text.filter(lambda t: t.strip() != "")
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), line_text,
                        st.floats(allow_nan=False, allow_infinity=False))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(line_text, inner, max_size=3)),
                          max_leaves=6)


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@SETTINGS
@given(lines=st.lists(st.one_of(prompt_text, st.sampled_from(["", "  ", "\t"])), min_size=1, max_size=12),
       crlf=st.booleans())
def test_text_files_give_one_record_per_non_blank_line(tmp_path, lines, crlf):
    assume(any(line.strip() for line in lines))
    data = ("\r\n" if crlf else "\n").join(lines).encode()
    records = read_prompts(write(tmp_path, "p.txt", data))
    expected = [(str(n), line) for n, line in enumerate(lines, start=1) if line.strip()]
    assert [(r.id, r.text) for r in records] == expected
    assert [r.index for r in records] == list(range(len(expected)))
    assert [r.line for r in records] == [int(i) for i, _ in expected]
    assert all(r.marks == [] and r.meta == {} for r in records)


@st.composite
def jsonl_record(draw, index: int):
    prompt = draw(prompt_text)
    offsets = sorted(draw(st.sets(st.integers(1, len(prompt)), max_size=4)))
    record = {"prompt": prompt}
    if draw(st.booleans()):
        record["id"] = draw(st.one_of(line_text, st.integers(-10**6, 10**6)))
    if offsets or draw(st.booleans()):
        record["marks"] = [{"offset": o, **draw(st.dictionaries(st.sampled_from(["k", "n", "x"]), json_value,
                                                                 max_size=2))} for o in offsets]
    record.update(draw(st.dictionaries(line_text.filter(lambda k: k not in ("id", "prompt", "marks")), json_value,
                                       max_size=3)))
    return record


@SETTINGS
@given(data=st.data(), n=st.integers(1, 6), blank_every=st.integers(0, 3), ascii_only=st.booleans())
def test_jsonl_round_trip(tmp_path, data, n, blank_every, ascii_only):
    records = [data.draw(jsonl_record(i)) for i in range(n)]
    lines, numbers = [], []
    for record in records:
        if blank_every and len(lines) % (blank_every + 1) == blank_every:
            lines.append("")
        lines.append(json.dumps(record, ensure_ascii=ascii_only))
        numbers.append(len(lines))
    ids = [str(r.get("id", number)) for r, number in zip(records, numbers)]
    path = write(tmp_path, "p.jsonl", ("\n".join(lines) + "\n").encode())
    if len(set(ids)) < len(ids):
        with pytest.raises(UsageError, match="duplicate id"):
            read_prompts(path)
        return
    parsed = read_prompts(path)
    assert [p.id for p in parsed] == ids
    assert [p.line for p in parsed] == numbers
    for p, r in zip(parsed, records):
        assert p.text == r["prompt"]
        assert p.marks == r.get("marks", [])
        assert p.meta == {k: v for k, v in r.items() if k not in ("id", "prompt", "marks")}


@SETTINGS
@given(prompt=prompt_text, offsets=st.lists(st.integers(-3, 60), min_size=1, max_size=4))
def test_marks_are_accepted_exactly_when_increasing_and_inside(tmp_path, prompt, offsets):
    record = {"prompt": prompt, "marks": [{"offset": o} for o in offsets]}
    path = write(tmp_path, "p.jsonl", json.dumps(record).encode())
    valid = all(0 < o <= len(prompt) for o in offsets) and all(a < b for a, b in zip(offsets, offsets[1:]))
    if valid:
        assert [m["offset"] for m in read_prompts(path)[0].marks] == offsets
    else:
        with pytest.raises(UsageError, match=r"p\.jsonl:1: mark \d"):
            read_prompts(path)


# ------------------------------------------------------------------------------------------- marks


@SETTINGS
@given(data=st.data(), text=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=60))
def test_a_mark_lands_on_the_last_token_starting_before_it(tiny_loaded, data, text):
    enc = tiny_loaded.tokenizer(text, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    assume(spans)
    offsets = sorted(data.draw(st.sets(st.integers(1, len(text)), min_size=1, max_size=4)))
    record = PromptRecord(index=0, id="x", text=text, line=1, marks=[{"offset": o} for o in offsets])
    # Independently: walk the tokens in order and keep the last whose first character precedes the offset.
    expected = []
    for o in offsets:
        position = None
        for i, (start, end) in enumerate(spans):
            if end > start and start < o:
                position = i
        expected.append(position)
    if len(set(expected)) < len(expected):
        with pytest.raises(UsageError, match="fall in the same token"):
            map_marks(record.marks, spans, 0, record)
        return
    at, exact = map_marks(record.marks, spans, 0, record)
    assert at == {p: i for i, p in enumerate(expected)}
    for o, p in zip(offsets, expected):
        assert exact[p] == (spans[p][1] == o)


@SETTINGS
@given(data=st.data(), text=st.text(st.sampled_from("abcdeht ,.0123456789heads tails"), min_size=1, max_size=60))
def test_an_exact_mark_is_where_the_decoded_prefix_ends(tiny_loaded, data, text):
    """For ASCII text the byte-level tokenizer decodes prefixes exactly, a check that never looks at spans."""
    tok = tiny_loaded.tokenizer
    enc = tok(text, return_offsets_mapping=True)
    offset = data.draw(st.integers(1, len(text)))
    record = PromptRecord(index=0, id="x", text=text, line=1, marks=[{"offset": offset}])
    at, exact = map_marks(record.marks, enc["offset_mapping"], 0, record)
    (position,) = at
    through = tok.decode(enc["input_ids"][: position + 1])
    before = tok.decode(enc["input_ids"][:position])
    assert len(before) < offset <= len(through)  # the token holds the offset's last character
    assert text.startswith(through)
    assert exact[position] == (through == text[:offset])


# ------------------------------------------------------------------------------------------- traces


@st.composite
def trace_batches(draw):
    """Random record batches in the trace schema, nulls included where a trace has them (the next-token columns
    null together, at a prompt's end), and run metadata with a vocabulary."""
    top_k, n_targets = draw(st.integers(1, 4)), draw(st.integers(0, 3))
    schema = trace_schema(top_k, n_targets)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    floats = st.floats(-1e9, 1e9, allow_nan=False, width=32)
    batches = []
    for b in range(draw(st.integers(1, 3))):
        n = draw(st.integers(0, 6))
        maybe = lambda values: [v if rng.random() < 0.7 else None for v in values]  # noqa: E731
        ends = rng.random(n) < 0.3
        at_ends = lambda values: [None if end else v for v, end in zip(values, ends)]  # noqa: E731
        columns = {
            "prompt_index": list(range(b * 10, b * 10 + n)),
            "prompt_id": draw(st.lists(line_text, min_size=n, max_size=n)),
            "position": rng.integers(0, 1000, n).tolist(),
            "phase": pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, 2, n), pa.int8()),
                                                    pa.array(["prompt", "generated"])),
            "token_id": rng.integers(0, 50, n).tolist(), "token": draw(st.lists(line_text, min_size=n, max_size=n)),
            "next_token_id": at_ends(rng.integers(0, 50, n).tolist()), "next_token": at_ends(["t"] * n),
            "next_logprob": at_ends(draw(st.lists(floats, min_size=n, max_size=n))),
            "next_rank": at_ends(rng.integers(1, 50, n).tolist()),
            "entropy": draw(st.lists(floats, min_size=n, max_size=n)),
            "topk_ids": rng.integers(0, 50, (n, top_k)).tolist(),
            "topk_logprobs": rng.normal(size=(n, top_k)).astype(np.float32).tolist(),
            "target_logprobs": rng.normal(size=(n, n_targets)).astype(np.float32).tolist(),
            "target_seq_logprobs": maybe(rng.normal(size=(n, n_targets)).astype(np.float32).tolist()),
            "mark_index": maybe(rng.integers(0, 5, n).tolist()),
            "mark": maybe([json.dumps({"offset": int(i)}) for i in rng.integers(1, 9, n)]),
            "meta": maybe([json.dumps(draw(json_value)) for _ in range(n)]),
        }
        batches.append(pa.RecordBatch.from_arrays([pa.array(columns[f.name], f.type) for f in schema], schema=schema))
    meta = draw(st.fixed_dictionaries({}, optional={"model": line_text, "weights_sha256": line_text,
                                                    "command": json_value, "x": json_value}))
    if n_targets:  # the metadata names what the target columns hold
        meta["targets"] = [{"text": f" t{i}", "token_ids": [i]} for i in range(n_targets)]
    vocab = draw(st.one_of(st.none(), st.lists(line_text, max_size=8)))
    return schema, batches, meta, vocab


@SETTINGS
@given(case=trace_batches())
def test_trace_round_trip(tmp_path_factory, case):
    schema, batches, meta, vocab = case
    path = tmp_path_factory.mktemp("roundtrip") / "t.parquet"
    with open_trace_sink(str(path), "parquet", schema, meta, vocab) as sink:
        for batch in batches:
            sink.write(batch)
    trace = open_trace(path)
    assert trace.table.equals(pa.Table.from_batches(batches, schema=schema))
    assert trace.table.schema.remove_metadata().equals(schema)
    assert {k: v for k, v in trace.meta.items() if k != "trace_format"} == meta
    assert trace.vocab == vocab
    directory = path.parent / "parts"  # the same rows as a directory of one-batch part files
    directory.mkdir()
    for i, batch in enumerate(batches):
        with open_trace_sink(str(directory / f"part-{i}.parquet"), "parquet", schema, meta, vocab) as sink:
            sink.write(batch)
    assert open_trace(directory).table.equals(trace.table)
