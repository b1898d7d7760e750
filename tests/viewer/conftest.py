"""Fixtures of the explorer's tests: one headless Chromium per module, and the rule for when it may be missing.

The rule, in one place (:func:`browser`): without Chromium, chromedriver or Selenium the browser
tests *skip* with the reason printed at the end of the run — except in CI (``LLMPROBE_CI`` set, as
``.ci/run`` exports it), where a missing browser *fails* them, so CI never passes by skipping.
"""

from __future__ import annotations

import os

import pytest

from tests.viewer.fixtures import browser_missing, start_browser

_skipped: list[str] = []


def in_ci() -> bool:
    return os.environ.get("LLMPROBE_CI", "") not in ("", "0")


@pytest.fixture(scope="module")
def browser():
    reason = browser_missing()
    if reason is not None:
        if in_ci():
            pytest.fail(f"browser tests cannot run in CI: {reason}")
        _skipped.append(reason)
        pytest.skip(f"no browser: {reason}")
    driver = start_browser()
    try:
        yield driver
    finally:
        driver.quit()


def pytest_terminal_summary(terminalreporter):
    if _skipped:
        terminalreporter.write_line(f"tests/viewer: browser tests skipped: {_skipped[0]} (in CI, with LLMPROBE_CI=1,"
                                    " they fail instead)")
