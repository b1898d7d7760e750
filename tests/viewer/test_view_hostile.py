"""Hostile text in a trace is shown as text and runs nothing; the page asks the network for nothing."""

from __future__ import annotations

import pytest

from llmprobe.tracing.reader import read_trace
from llmprobe.viewer.page import write_view
from tests.viewer.fixtures import (HOSTILE_ID, HOSTILE_TEXTS, alert_open, choose_prompt, find, hostile_trace, open_page,
                                   panel_rows, requested_urls)


@pytest.fixture(scope="module")
def hostile(tiny_loaded, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    trace = hostile_trace(tiny_loaded, folder / "hostile.parquet")
    return trace, write_view(str(trace), None, str(folder / "hostile.html"), force=False)


def assert_nothing_ran(browser) -> None:
    assert browser.execute_script("return typeof window.__pwned") == "undefined"
    assert not alert_open(browser)
    # one script ran: the page's own (the JSON block is data); no element came from the trace's text
    assert browser.execute_script("return document.scripts.length") == 2
    assert browser.execute_script("return document.images.length") == 0
    assert browser.execute_script("return document.querySelectorAll('[onerror], [onmouseover]').length") == 0


def test_markup_in_prompts_ids_fields_and_marks_is_text(browser, hostile):
    trace, page = hostile
    frame = read_trace(trace)
    open_page(browser, page.as_uri())
    assert_nothing_ran(browser)
    assert find(browser, "#strip").get_attribute("data-prompt-id") == HOSTILE_ID
    for index, text in enumerate(HOSTILE_TEXTS):
        choose_prompt(browser, index)
        tokens = frame.loc[(frame["prompt_id"] == frame["prompt_id"].unique()[index]) & (frame["phase"] == "prompt"),
                           "token"]
        shown = browser.execute_script("return [...document.querySelectorAll('#strip .tok:not(.gen)')]"
                                       ".map(n => n.textContent).join('');")
        assert shown == "".join(tokens).replace(" ", "\u2423").replace("\n", "\u23ce")
        assert "".join(tokens).startswith(text[:20])  # the text went through the model as written
        browser.execute_script(  # every position's panel, with its top-k tokens and targets, drawn once
            "document.querySelectorAll('#strip [data-position]').forEach(n => n.click());")
        find(browser, "details.meta summary").click()
        assert "</script><img src=x onerror=alert(7)>" in find(browser, "#prompt-meta").text
        assert_nothing_ran(browser)
    assert "<b onmouseover=alert(6)>" in browser.execute_script(
        "return document.querySelector('#strip .mark') && (document.querySelector('#strip .mark').click(),"
        " document.getElementById('mark-fields').textContent)")
    options = [text for text, in panel_rows(browser, "#prompt-select option", "value")]
    assert len(options) == len(HOSTILE_TEXTS)
    assert_nothing_ran(browser)


def test_lone_surrogates_are_replaced_and_the_page_says_so(browser, hostile):
    _, page = hostile
    html = page.read_bytes().decode("utf-8")  # valid UTF-8: the writer did not crash on them
    assert "\ud800" not in html
    open_page(browser, page.as_uri())
    note = find(browser, "#notes").text
    assert "lone surrogate" in note and "U+FFFD" in note
    find(browser, "details.meta summary").click()
    assert "x\ufffdy" in find(browser, "#prompt-meta").text
    find(browser, "#run summary").click()
    assert "caf\ufffd.jsonl" in find(browser, "#run-meta").text
    assert int(note.split()[0]) == 1 + 3 * len(HOSTILE_TEXTS)  # the command; "bad" and "s" in each prompt's fields, "s" in its mark


def test_no_request_beyond_the_page_and_no_policy_violation(browser, hostile):
    _, page = hostile
    open_page(browser, page.as_uri())
    for index in range(len(HOSTILE_TEXTS)):
        choose_prompt(browser, index)
        find(browser, "#strip [data-position='1']").click()
    assert requested_urls(browser) == [page.as_uri()]
    assert [e["message"] for e in browser.get_log("browser")] == []  # a blocked script or image would be logged
