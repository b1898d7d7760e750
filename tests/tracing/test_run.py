"""The trace run (llmprobe/tracing/run.py): one validation, targets settled without touching the caller's
settings, each prompt tokenized once per process (a first run, its resume, a resume that repairs a
damaged part; none in a block encoded elsewhere), one plan whose order every step derives from."""

from __future__ import annotations

import collections
import random

import pytest
import transformers

import llmprobe.tracing.run
import llmprobe.tracing.settings
from llmprobe.errors import ParameterError
from llmprobe.tracing.checkpoint import work_dir_for
from llmprobe.tracing.encoding import EncodedPrompt
from llmprobe.tracing.prompts import PromptRecord
from llmprobe.tracing.run import TracePlan, TraceRun
from llmprobe.tracing.settings import TraceSettings
from tests import cli_helpers
from tests.model.comparison import records as marked_records
from tests.tracing.reference import TARGETS

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
WORDS = "the coin came up heads tails then a die showed one two three blick means zorp".split()


def encoded(lengths: list[int]) -> list[EncodedPrompt]:
    return [EncodedPrompt(PromptRecord(i, f"p{i}", "x", i + 1), [0] * n, {}, {}) for i, n in enumerate(lengths)]


def test_the_plan_sorts_each_window_longest_first_and_ranks_follow_it():
    plan = TracePlan(encoded([2, 5, 5, 1, 3, 9, 4]), window_prompts=3)
    assert [[e.record.index for e in window] for window in plan.windows] == [[1, 2, 0], [5, 4, 3], [6]]
    assert plan.ranks() == {1: 0, 2: 1, 0: 2, 5: 3, 4: 4, 3: 5, 6: 6}
    assert [w[0].record.index for w in plan.remaining({0, 1, 2, 4})] == [5, 6]  # window 0 done: skipped
    assert plan.remaining(set(range(7))) == []


def test_targets_are_settled_in_the_run_not_in_the_callers_settings():
    settings = TraceSettings(top_k=3)
    carrying = [PromptRecord(0, "a", "I just flipped a coin", 1, meta={"targets": [" heads", " tails"]})]
    run = TraceRun(settings, carrying)
    assert run.settings.targets == [" heads", " tails"] and settings.targets == []
    explicit = TraceSettings(top_k=3, targets=[" Paris"])
    assert TraceRun(explicit, carrying).settings.targets == [" Paris"]
    assert run.context == {"n_prompts": 1}


def test_options_are_checked_before_the_prompts_are_read():
    def never() -> list[PromptRecord]:
        raise AssertionError("the prompts were read before the options were checked")

    with pytest.raises(ParameterError, match="^max_new_tokens: "):  # the library names its parameter
        TraceRun(TraceSettings(max_new_tokens=-1), never)


def test_a_block_encoded_elsewhere_is_traced_without_tokenizing(tiny_loaded, monkeypatch):
    """What a Ray actor does with the driver's encoded prompts (sent as JSON, marks and extra fields
    included): the same rows, no tokenizer call."""
    settings = TraceSettings(top_k=3, targets=TARGETS, batch_size=2)
    whole = TraceRun(settings, marked_records()).start(tiny_loaded)
    assert any(e.marks_at for e in whole.prompts) and any(e.record.meta for e in whole.prompts)
    expected = whole.table().to_pylist()
    shipped = [EncodedPrompt.from_json(e.to_json()) for e in whole.prompts]
    assert shipped == whole.prompts
    actor = TraceRun(whole.settings, [], whole.context).start(tiny_loaded)
    calls = count_tokenizer_calls(monkeypatch)
    got = actor.for_prompts(shipped).table().to_pylist()
    assert sum(calls.values()) == 0
    assert got == expected
    assert actor.metadata()["n_prompts"] == len(whole.records)


def count_tokenizer_calls(monkeypatch) -> collections.Counter:
    """Text -> calls of any tokenizer on it, from now on."""
    calls: collections.Counter = collections.Counter()
    call = transformers.PreTrainedTokenizerBase.__call__

    def counting(self, text=None, *args, **kwargs):
        calls[text if isinstance(text, str) else repr(text)] += 1
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "__call__", counting)
    return calls


def test_each_prompt_is_tokenized_once_and_planned_once_per_run_resume_and_repair(tiny_model_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    """Before TraceRun a prompt was tokenized twice in every run and three times in a resume that
    repaired a damaged part (once to check it, again per window, again to order the merge)."""
    monkeypatch.setattr(llmprobe.tracing.settings, "SORT_WINDOW_BATCHES", 2)  # windows of 6 prompts
    rng = random.Random(11)
    texts = list(dict.fromkeys(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 20))) for _ in range(20)))
    assert len(texts) == 20
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(texts) + "\n")
    output = tmp_path / "out.parquet"
    args = ["trace", str(prompts), "-o", str(output), "--model", str(tiny_model_dir), "--device", "cpu",
            "--batch-size", "3", "--top-k", "3", "-q"]
    validations = count_calls(monkeypatch, TraceSettings, "validate")
    plans = count_calls(monkeypatch, TracePlan, "__init__")
    merge_orders = count_calls(monkeypatch, TracePlan, "ranks")  # asked for only by a merge after a repair
    calls = count_tokenizer_calls(monkeypatch)
    check, checked = llmprobe.tracing.run.check_finite, []

    def interrupt_at_the_fourth_batch(batch, by_index):
        if len(checked) == 3:
            raise KeyboardInterrupt
        checked.append(1)
        check(batch, by_index)

    def run(extra: list[str], interrupt: bool) -> tuple[int, str]:
        for counter in (calls, validations, plans, merge_orders, checked):
            counter.clear()
        with monkeypatch.context() as m:
            if interrupt:
                m.setattr(llmprobe.tracing.run, "check_finite", interrupt_at_the_fourth_batch)
            code, _, err = cli_helpers.run_cli(args + extra, capsys, monkeypatch)
        runs.append((dict(calls), validations + plans + merge_orders))
        return code, err

    runs: list[tuple[dict, collections.Counter]] = []
    assert run([], interrupt=True)[0] == 130  # the first run
    assert run(["--resume"], interrupt=True)[0] == 130  # a resume
    (work_dir_for(str(output)) / "part-00000.parquet").write_bytes(b"damaged")
    code, err = run(["--resume"], interrupt=False)  # a resume that repairs the part, finishes and merges
    assert code == 0 and output.exists(), err
    for tokenized, _ in runs:
        assert [tokenized.get(text, 0) for text in texts] == [1] * len(texts), tokenized
    assert [steps for _, steps in runs] == [{"validate": 1, "__init__": 1}] * 2 + [{"validate": 1, "__init__": 1,
                                                                                     "ranks": 1}]


def count_calls(monkeypatch, owner: type, name: str) -> collections.Counter:
    counter: collections.Counter = collections.Counter()
    method = getattr(owner, name)

    def counting(self, *args, **kwargs):
        counter[name] += 1
        return method(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return counter
