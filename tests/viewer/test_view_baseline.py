"""``llmprobe view ABLATED --baseline PLAIN``: both models side by side, the change per position, and a baseline
that is not one refused in one line."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from llmprobe.analysis.shift import kl_lower_bound_bits
from llmprobe.tracing.reader import open_trace, read_trace
from llmprobe.viewer.data import page_data
from llmprobe.viewer.page import write_view
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.plots.fixtures import experiment_records, text_records, write_trace
from tests.viewer.fixtures import (COIN_TARGETS, ablated_coin, choose_option, choose_prompt, click_position, find,
                                   open_page, panel_rows)

INTERVENTION = "interventions: zero-ablated block 1"


@pytest.fixture(scope="module")
def pair(tiny_loaded, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ablated")
    plain, ablated, fit = ablated_coin(tiny_loaded, folder, n_max=4)
    both = write_view(str(ablated), str(fit), str(folder / "both.html"), force=False, baseline_source=str(plain))
    alone = write_view(str(ablated), None, str(folder / "alone.html"), force=False)
    return plain, ablated, fit, both, alone


def row_of(frame, prompt_id: str, position: int):
    return frame[(frame["prompt_id"] == prompt_id) & (frame["position"] == position)].iloc[0]


def top_k(row) -> list[tuple[str, float]]:
    return [(str(t), float(np.exp(np.float64(lp)))) for t, lp in zip(row["topk_tokens"], row["topk_logprobs"])]


def assert_same(shown, expected):
    assert [t for t, _ in shown] == [t for t, _ in expected]
    np.testing.assert_allclose([float(p) for _, p in shown], [p for _, p in expected], rtol=0, atol=1e-6)


def test_the_panel_shows_the_baseline_and_the_ablated_top_k_side_by_side(browser, pair):
    plain_path, ablated_path, _, page, _ = pair
    plain, ablated = read_trace(plain_path), read_trace(ablated_path)
    ids = list(dict.fromkeys(ablated["prompt_id"]))
    open_page(browser, page.as_uri())
    assert find(browser, "#interventions").text == INTERVENTION
    assert str(plain_path) in find(browser, "#baseline-line").text
    changed = 0
    for prompt in (0, len(ids) - 1):
        choose_prompt(browser, prompt)
        positions = ablated.loc[ablated["prompt_id"] == ids[prompt], "position"].tolist()
        for position in (positions[1], positions[len(positions) // 2], positions[-2]):
            click_position(browser, position)
            base, mine = row_of(plain, ids[prompt], position), row_of(ablated, ids[prompt], position)
            assert_same(panel_rows(browser, "#baseline-topk tr[data-token]", "data-token", "data-baseline-prob"),
                        top_k(base))
            assert_same(panel_rows(browser, "#topk tr[data-token]", "data-token", "data-prob"), top_k(mine))
            changed += top_k(base) != top_k(mine)
            delta = math.exp(mine["next_logprob"]) - math.exp(base["next_logprob"])
            assert float(find(browser, "#delta-next").get_attribute("data-delta-next-prob")) == \
                pytest.approx(delta, abs=1e-6)
            assert float(find(browser, "#baseline-entropy").get_attribute("data-baseline-entropy")) == \
                pytest.approx(base["entropy"] / math.log(2), abs=1e-6)
            kl = kl_lower_bound_bits(np.stack([base["topk_ids"]]), np.stack([base["topk_logprobs"]]),
                                     np.stack([mine["topk_ids"]]), np.stack([mine["topk_logprobs"]]),
                                     np.array([mine["next_token_id"]]), np.array([base["next_logprob"]]),
                                     np.array([mine["next_logprob"]]))[0]
            assert float(find(browser, "#change-kl").get_attribute("data-change-kl-bits")) == pytest.approx(kl,
                                                                                                          abs=1e-9)
            targets = {t: float(p) for t, p in panel_rows(browser, "#targets tr[data-target]", "data-target",
                                                           "data-baseline-prob")}
            for text in COIN_TARGETS:
                assert targets[text] == pytest.approx(math.exp(base[f"target_logprob[{text}]"]), abs=1e-6)
    assert changed  # the ablation moved the distributions: the two panels are not one trace shown twice
    # colour by the change: the KL bound after each token, then each token's change of probability
    before = panel_rows(browser, "#strip [data-position]", "style")
    choose_option(browser, "#color-by", "kl")
    after_kl = panel_rows(browser, "#strip [data-position]", "style")
    assert after_kl != before and find(browser, "#legend").text.endswith("bits")
    choose_option(browser, "#color-by", "delta")
    assert panel_rows(browser, "#strip [data-position]", "style") not in (before, after_kl)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_at_a_mark_the_baseline_stands_beside_the_ablated_model_and_bayes(browser, pair):
    plain_path, _, _, page, _ = pair
    plain = read_trace(plain_path)
    open_page(browser, page.as_uri())
    marked = plain[plain["mark_index"].notna()]
    first = marked.iloc[len(marked) // 2]
    choose_prompt(browser, int(first["prompt_index"]))
    click_position(browser, int(first["position"]))
    seq = np.exp(np.asarray(first["target_seq_logprobs"], np.float64))
    expected = dict(zip(("heads", "tails"), seq / seq.sum()))  # the baseline's category distribution, renormalized
    shown = {c: float(b) for c, b in panel_rows(browser, "#posterior tr[data-category]", "data-category",
                                                  "data-baseline-prob")}
    assert shown.keys() == expected.keys()
    for category, prob in shown.items():
        assert prob == pytest.approx(expected[category], abs=1e-9)
    whole = {t: float(p) for t, p in panel_rows(browser, "#targets tr[data-target]", "data-target",
                                                 "data-baseline-seq-prob")}
    assert [whole[t] for t in COIN_TARGETS] == pytest.approx(seq.tolist(), abs=1e-6)


def test_the_ablated_trace_alone_renders_as_before_and_names_its_intervention(browser, pair):
    _, ablated_path, _, _, page = pair
    ablated = read_trace(ablated_path)
    open_page(browser, page.as_uri())
    assert find(browser, "#interventions").text == INTERVENTION
    first = ablated["prompt_id"].iloc[0]
    click_position(browser, 3)
    assert_same(panel_rows(browser, "#topk tr[data-token]", "data-token", "data-prob"),
                top_k(row_of(ablated, first, 3)))
    assert panel_rows(browser, "#baseline-topk, #change-kl, [data-baseline-prob]", "id") == []
    assert [v for v, in panel_rows(browser, "#color-by option", "value")] == ["surprisal", "entropy"]


def test_the_data_model_holds_the_baseline_row_for_row(pair):
    plain_path, ablated_path, _, _, _ = pair
    data = page_data(open_trace(str(ablated_path)), baseline=open_trace(str(plain_path)))
    from tests.viewer.fixtures import decoded_rows

    base = decoded_rows({"rows": data["baseline"]["rows"]})
    order = read_trace(plain_path).sort_values(["prompt_index", "position"])
    k = data["baseline"]["top_k"]
    np.testing.assert_array_equal(base["topk_logprob"].reshape(-1, k), np.stack(order["topk_logprobs"]))
    assert [[data["tokens"][i] for i in row] for row in base["topk"].reshape(-1, k)] == \
        [list(t) for t in order["topk_tokens"]]
    np.testing.assert_array_equal(base["next_logprob"], order["next_logprob"].to_numpy(np.float32))
    assert data["baseline"]["interventions"] is None and data["interventions"] == INTERVENTION


@pytest.mark.parametrize("case,needles", [
    ("other prompts", ["is not a baseline of", "its prompt number 1 is 'p0'"]),
    ("other tokens", ["is not a baseline of", "its token is", "where the trace has"]),
    ("fewer prompts", ["is not a baseline of", "rows", "the trace goes on with prompt"]),
    ("logit lens", ["is not a baseline of", "logit-lens rows"]),
    ("missing", ["no such baseline trace", "--baseline"]),
])
def test_a_baseline_of_other_prompts_or_tokens_is_one_line_and_nothing_is_written(
        case, needles, pair, tiny_loaded, tmp_path, capsysbinary, monkeypatch):
    _, ablated_path, fit_path, _, _ = pair
    baseline = tmp_path / "baseline.parquet"
    records = experiment_records(tmp_path, n_max=4, sequences=1)
    if case == "other prompts":
        write_trace(tiny_loaded, baseline, text_records(), top_k=5)
    elif case == "other tokens":
        text = records[1].text  # one outcome flipped, at the same offset: the marks stay where they were
        records[1] = dataclasses.replace(records[1], text=text.replace("heads", "tails", 1) if "heads" in text
                                         else text.replace("tails", "heads", 1))
        write_trace(tiny_loaded, baseline, records, top_k=5, targets=COIN_TARGETS)
    elif case == "fewer prompts":
        write_trace(tiny_loaded, baseline, records[:-1], top_k=5, targets=COIN_TARGETS)
    elif case == "logit lens":
        from llmprobe.tracing.run import TraceRun
        from llmprobe.tracing.settings import TraceSettings
        from llmprobe.tracing.writer import open_trace_sink

        run = TraceRun(TraceSettings(top_k=5, layers="all"), records, {"command": "test"}).start(tiny_loaded)
        with open_trace_sink(str(baseline), "parquet", run.schema, run.metadata(), run.vocab) as sink:
            for batch in run.batches():
                sink.write(batch)
    out = tmp_path / "page.html"
    code, _, err = run_cli(["view", str(ablated_path), str(fit_path), "--baseline", str(baseline), "-o", str(out)],
                           capsysbinary, monkeypatch)
    assert_one_line_error(code, err, str(baseline), *needles)
    assert not out.exists()
