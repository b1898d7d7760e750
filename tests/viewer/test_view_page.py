"""``llmprobe view`` in a real browser: the panels show the trace's and the fit's own numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from llmprobe.analysis.results import gamma_test_line, verdict_line
from llmprobe.plots.icl import open_fit
from llmprobe.tracing.reader import read_trace
from llmprobe.viewer.page import write_view
from tests.plots.fixtures import text_records
from tests.viewer.fixtures import (choose_prompt, click_position, coin_trace_and_fit, find, open_page, panel_rows,
                                   press, requested_urls, selected_position)


@pytest.fixture(scope="module")
def coin(tiny_loaded, tmp_path_factory):
    folder = tmp_path_factory.mktemp("view")
    trace, fit = coin_trace_and_fit(tiny_loaded, folder, sequences=1, n_max=4)
    page = write_view(str(trace), str(fit), str(folder / "coin.html"), force=False)
    return trace, fit, page


@pytest.fixture(scope="module")
def lens(tiny_loaded, tmp_path_factory):
    from llmprobe.tracing.run import TraceRun
    from llmprobe.tracing.settings import TraceSettings
    from llmprobe.tracing.writer import open_trace_sink

    folder = tmp_path_factory.mktemp("lens")
    run = TraceRun(TraceSettings(top_k=3, layers="all"), text_records(), {"command": "test"}).start(tiny_loaded)
    trace = folder / "lens.parquet"
    with open_trace_sink(str(trace), "parquet", run.schema, run.metadata(), run.vocab) as sink:
        for batch in run.batches():
            sink.write(batch)
    return trace, write_view(str(trace), None, str(folder / "lens.html"), force=False)


def expected_topk(frame: pd.DataFrame, prompt_id: str, position: int) -> list[tuple[str, float]]:
    row = frame[(frame["prompt_id"] == prompt_id) & (frame["position"] == position)].iloc[0]
    return [(str(t), float(np.exp(np.float64(lp)))) for t, lp in zip(row["topk_tokens"], row["topk_logprobs"])]


def shown_topk(browser) -> list[tuple[str, float]]:
    return [(token, float(prob)) for token, prob in panel_rows(browser, "#topk tr[data-token]", "data-token", "data-prob")]


def assert_same_topk(shown, expected):
    assert [t for t, _ in shown] == [t for t, _ in expected]
    np.testing.assert_allclose([p for _, p in shown], [p for _, p in expected], rtol=0, atol=1e-6)


def test_selected_position_shows_the_traces_top_k(browser, coin):
    trace, _, page = coin
    frame = read_trace(trace)
    ids = list(dict.fromkeys(frame["prompt_id"]))
    open_page(browser, page.as_uri())
    for prompt in (0, 3, len(ids) - 1):
        choose_prompt(browser, prompt)
        strip = find(browser, "#strip")
        assert strip.get_attribute("data-prompt-id") == ids[prompt]
        positions = frame.loc[frame["prompt_id"] == ids[prompt], "position"].tolist()
        assert [int(p) for p, in panel_rows(browser, "#strip [data-position]", "data-position")] == positions
        for position in (positions[0], positions[len(positions) // 2], positions[-1]):
            click_position(browser, position)
            assert selected_position(browser) == position
            assert_same_topk(shown_topk(browser), expected_topk(frame, ids[prompt], position))
            row = frame[(frame["prompt_id"] == ids[prompt]) & (frame["position"] == position)].iloc[0]
            entropy = float(find(browser, "[data-entropy]").get_attribute("data-entropy"))
            assert entropy == pytest.approx(float(row["entropy"]) / math.log(2), abs=1e-6)
            targets = dict(panel_rows(browser, "#targets tr[data-target]", "data-target", "data-prob"))
            for text in (" heads", " tails"):
                assert float(targets[text]) == pytest.approx(math.exp(row[f"target_logprob[{text}]"]), abs=1e-6)


def test_keys_move_the_selection_and_the_panel_follows(browser, coin):
    trace, _, page = coin
    frame = read_trace(trace)
    first = frame["prompt_id"].iloc[0]
    last_position = int(frame.loc[frame["prompt_id"] == first, "position"].max())
    open_page(browser, page.as_uri())
    body = find(browser, "body")
    click_position(browser, 2)
    press(body, "ARROW_RIGHT")
    press(body, "ARROW_RIGHT")
    assert selected_position(browser) == 4
    assert_same_topk(shown_topk(browser), expected_topk(frame, first, 4))
    press(body, "ARROW_LEFT")
    assert selected_position(browser) == 3
    assert_same_topk(shown_topk(browser), expected_topk(frame, first, 3))
    press(body, "END")
    assert selected_position(browser) == last_position
    press(body, "ARROW_RIGHT")  # the end stays the end
    assert selected_position(browser) == last_position
    press(body, "HOME")
    assert selected_position(browser) == 0


def test_posterior_panel_shows_the_fit_tables_numbers(browser, coin):
    trace, fit_path, page = coin
    table = open_fit(str(fit_path)).frame
    ids = list(dict.fromkeys(read_trace(trace)["prompt_id"]))
    open_page(browser, page.as_uri())
    for prompt_id in (ids[1], ids[-2]):
        choose_prompt(browser, ids.index(prompt_id))
        marks = table[table["prompt_id"] == prompt_id]
        for position in sorted(marks["position"].unique())[::2]:
            click_position(browser, int(position))
            expected = marks[marks["position"] == position].set_index("category")
            shown = {c: (float(m), float(b)) for c, m, b in panel_rows(
                browser, "#posterior tr[data-category]", "data-category", "data-model-prob", "data-bayes-prob")}
            assert set(shown) == {"heads", "tails"}
            for category, (model, bayes) in shown.items():
                assert model == pytest.approx(expected.loc[category, "model_prob"], abs=1e-12)
                assert bayes == pytest.approx(expected.loc[category, "bayes_prob"], abs=1e-12)
            kl = find(browser, "[data-kl-bits]").get_attribute("data-kl-bits")
            assert float(kl) == pytest.approx(expected["kl_bits"].iloc[0], abs=1e-12)
        # the chart draws one point per mark of this sequence, at the model's P(heads)
        points = panel_rows(browser, "#fit-chart circle.point", "data-n", "cy")
        assert sorted(int(n) for n, _ in points) == sorted(marks["n"].unique())
    click_position(browser, 1)  # not a mark
    assert find(browser, "#fit-none").is_displayed()


def test_the_verdict_comes_first_with_the_gamma_test_beside_it(browser, coin):
    _, fit_path, page = coin
    summary = open_fit(str(fit_path)).summaries[0]
    open_page(browser, page.as_uri())
    main = find(browser, "main")
    first = main.find_element("xpath", "./*[1]")
    paragraphs = first.find_elements("tag name", "p")
    assert first.get_attribute("id") == "conclusion"
    assert paragraphs[0].text == verdict_line(summary) and paragraphs[0].get_attribute("id") == "verdict"
    assert paragraphs[1].text == gamma_test_line(summary)
    assert find(browser, "#gamma-test").location["y"] > paragraphs[0].location["y"]


def test_search_colour_switch_and_no_network(browser, coin):
    trace, _, page = coin
    frame = read_trace(trace)
    open_page(browser, page.as_uri())
    search = find(browser, "#prompt-search")
    wanted = frame["prompt_id"].iloc[-1]
    search.send_keys(wanted)
    options = panel_rows(browser, "#prompt-select option", "value")
    assert len(options) == 1
    search.clear()
    search.send_keys("heads, then")  # text, not id
    texts = frame.groupby("prompt_id", sort=False)["token"].apply("".join)
    assert len(panel_rows(browser, "#prompt-select option", "value")) == texts.str.contains("heads, then").sum()
    before = panel_rows(browser, "#strip [data-position]", "style")
    find(browser, "#color-by").send_keys("entropy")
    assert panel_rows(browser, "#strip [data-position]", "style") != before
    urls = requested_urls(browser)
    assert urls and all(url == page.as_uri() for url in urls), urls
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_logit_lens_slider_and_grid(browser, lens):
    trace, page = lens
    frame = read_trace(trace)
    layers = sorted(frame["layer"].unique())
    open_page(browser, page.as_uri())
    first = frame["prompt_id"].iloc[0]
    mine = frame[frame["prompt_id"] == first]
    cells = panel_rows(browser, "#lens-grid td[data-layer]", "data-layer", "data-position")
    assert len(cells) == len(mine)  # one cell per (layer, position)
    grid = {(int(layer), int(position)): text for layer, position, text in browser.execute_script(
        "return [...document.querySelectorAll('#lens-grid td[data-layer]')]"
        ".map(n => [n.dataset.layer, n.dataset.position, n.textContent]);")}
    for row in mine.itertuples():
        assert grid[(row.layer, row.position)] == row.topk_tokens[0].replace(" ", "\u2423").replace("\n", "\u23ce")
    click_position(browser, 2)
    slider = find(browser, "#layer-slider")
    press(slider, "HOME")  # the slider's own keys: to the first layer
    expected = frame[(frame["prompt_id"] == first) & (frame["layer"] == layers[0])]
    row = expected[expected["position"] == 2].iloc[0]
    assert_same_topk(shown_topk(browser), [(str(t), float(np.exp(np.float64(lp))))
                                           for t, lp in zip(row["topk_tokens"], row["topk_logprobs"])])
    assert selected_position(browser) == 2
    find(browser, f"#lens-grid td[data-layer='{layers[-1]}'][data-position='1']").click()
    assert selected_position(browser) == 1
    assert_same_topk(shown_topk(browser), expected_topk(frame[frame["layer"] == layers[-1]], first, 1))
