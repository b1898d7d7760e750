"""Builders for the explorer's tests: traces and fits with known content, a headless Chromium, a live server.

The browser is the system's Chromium driven by Selenium with the system chromedriver: Selenium
Manager is never asked to find or download anything (``SE_OFFLINE``, explicit driver and binary paths).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from llmprobe.tracing.prompts import PromptRecord
from tests.plots.fixtures import experiment_records, write_trace

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
COIN_TARGETS = [" heads", " tails"]
SERVER_START_S = 120


def browser_missing() -> str | None:
    """Why no browser test can run here, or None when Chromium, chromedriver and Selenium are all present."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def start_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not download a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--disable-dev-shm-usage", "--window-size=1400,1000", "--disable-gpu",
                     "--disable-extensions", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-default-apps"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def open_page(browser, url: str) -> None:
    """Load ``url`` and wait until the page's script has drawn its first panel."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("performance")  # drop what earlier pages logged
    browser.get_log("browser")
    browser.get(url)
    WebDriverWait(browser, 15).until(
        lambda b: b.execute_script("return !!(window.llmprobeView && window.llmprobeView.timings.ready)"))


def requested_urls(browser) -> list[str]:
    """Every URL the page asked the network stack for since the last call (the DevTools performance log)."""
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def panel_rows(browser, selector: str, *attributes: str) -> list[tuple]:
    """The attributes of every element matching ``selector``, as tuples (strings)."""
    return browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(n => arguments[1].map(a => n.getAttribute(a)));",
        selector, list(attributes))


def find(browser, css: str):
    """The element matching a CSS selector (test modules import nothing from selenium: see conftest.py)."""
    return browser.find_element("css selector", css)


def press(element, key: str) -> None:
    """Send a named key (``ARROW_RIGHT``, ``HOME``, ...) to ``element``."""
    from selenium.webdriver.common.keys import Keys

    element.send_keys(getattr(Keys, key))


def alert_open(browser) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        _ = browser.switch_to.alert.text
    except NoAlertPresentException:
        return False
    return True


def choose_prompt(browser, index: int) -> None:
    choose_option(browser, "#prompt-select", str(index))


def choose_option(browser, css: str, value: str) -> None:
    """Select the option of value ``value`` in the select element matching ``css``, as a user does."""
    from selenium.webdriver.support.ui import Select

    Select(find(browser, css)).select_by_value(value)


def click_position(browser, position: int) -> None:
    find(browser, f"#strip [data-position='{position}']").click()


def selected_position(browser) -> int:
    return int(browser.execute_script("return document.querySelector('#strip .selected').dataset.position"))


# ------------------------------------------------------------------------------------------ traces and fits
def coin_trace_and_fit(loaded, folder: Path, *, sequences: int = 1, n_max: int = 4) -> tuple[Path, Path]:
    """A coin-experiment trace of ``loaded`` with its targets (top-5) and its fit-posterior table (the
    tiny model puts little mass on the targets, so no mark is left out: ``--min-mass 0``)."""
    folder.mkdir(parents=True, exist_ok=True)
    trace = write_trace(loaded, folder / "coin.parquet", experiment_records(folder, n_max=n_max, sequences=sequences),
                        top_k=5, targets=COIN_TARGETS)
    fit = folder / "coin.fit.parquet"
    run_llmprobe(["fit-posterior", str(trace), "--bootstrap", "10", "--min-mass", "0", "-o", str(fit), "-q"])
    return trace, fit


def ablated_coin(loaded, folder: Path, *, n_max: int = 4) -> tuple[Path, Path, Path]:
    """The coin experiment traced twice by ``loaded`` — as it is (the baseline) and with block 1
    zero-ablated — with targets (top-5), and the fit-posterior table of the ablated trace."""
    from llmprobe.tracing.interventions import parse_ablation

    folder.mkdir(parents=True, exist_ok=True)
    records = experiment_records(folder, n_max=n_max, sequences=1)
    plain = write_trace(loaded, folder / "plain.parquet", records, top_k=5, targets=COIN_TARGETS)
    ablated = write_trace(loaded, folder / "ablated.parquet", records, top_k=5, targets=COIN_TARGETS,
                          interventions=[parse_ablation("1")])
    fit = folder / "ablated.fit.parquet"
    run_llmprobe(["fit-posterior", str(ablated), "--bootstrap", "10", "--min-mass", "0", "-o", str(fit), "-q"])
    return plain, ablated, fit


def run_llmprobe(args: list[str]) -> None:
    """``llmprobe ARGS`` in this process (its output goes wherever pytest captures it); fails on an error."""
    from llmprobe.cli import main

    try:
        main(args)
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"llmprobe {' '.join(args)} exited with {exc.code}") from None


HOSTILE_TEXTS = [
    "<script>window.__pwned = 1; alert(1)</script> the end",
    "ok </script><script>window.__pwned = 2</script><!-- and -->",
    '<img src=x onerror="window.__pwned = 3; alert(3)"> picture',
    "quote \"'; window.__pwned = 4; // \u2028 line \u2029 para & amp",
]
HOSTILE_ID = "</script><script>window.__pwned=5</script>"


def hostile_trace(loaded, path: Path) -> Path:
    """A trace whose prompts, ids, JSONL fields and marks carry markup and script, and whose fields, marks and
    run metadata carry lone surrogates. The tracer refuses surrogates in its input, but JSON text in a
    trace (``meta``, ``mark``, the run metadata: a command line with undecodable bytes) can hold them as
    ``\\ud800`` escapes, which every reader decodes back to lone surrogates."""
    import pyarrow as pa

    from llmprobe.tracing.reader import open_trace
    from llmprobe.tracing.writer import open_trace_sink

    records = [PromptRecord(index=i, id=HOSTILE_ID if i == 0 else f"h{i}", text=text, line=i + 1,
                            marks=[{"offset": 5, "note": "<b onmouseover=alert(6)>"}],
                            meta={"note": "</script><img src=x onerror=alert(7)>", "bad": "x-SURROGATE-y"})
               for i, text in enumerate(HOSTILE_TEXTS)]
    plain = write_trace(loaded, path.with_name("plain-" + path.name), records, top_k=4, max_new_tokens=2)
    trace = open_trace(plain)
    table = trace.table
    for name in ("mark", "meta"):
        escaped = [None if v is None else v.replace("-SURROGATE-", "\\ud800").replace("}", ', "s": "\\udfff"}', 1)
                   for v in table.column(name).to_pylist()]
        table = table.set_column(table.column_names.index(name), name, pa.array(escaped, pa.string()))
    meta = {**trace.meta, "command": "llmprobe trace caf\udce9.jsonl"}  # argv bytes that are not UTF-8
    with open_trace_sink(str(path), "parquet", table.schema, meta, trace.vocab) as sink:
        for batch in table.to_batches():
            sink.write(batch)
    return path


# ------------------------------------------------------------------------------------------ the live server
def llmprobe_env(cache: Path | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    if cache is not None:
        env["LLMPROBE_CACHE"] = str(cache)
    return env


class Server:
    """``llmprobe serve`` in a subprocess on a free port (``--port 0``; the URL is its first stdout line).

    The process starts at once; :attr:`url` waits until it serves, so several servers start side by side."""

    def __init__(self, args: list[str], folder: Path, cache: Path | None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = folder / "serve.out", folder / "serve.err"
        self.process = subprocess.Popen([sys.executable, "-m", "llmprobe", "serve", "--port", "0", *args],
                                        stdout=self.stdout_path.open("wb"), stderr=self.stderr_path.open("wb"),
                                        env=llmprobe_env(cache), cwd=folder)
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            self._url = self._wait_for_url()
        return self._url

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            text = self.stdout_path.read_text()
            if "serving " in text:
                return text.split("serving ", 1)[1].split()[0]
            if self.process.poll() is not None:
                raise RuntimeError(f"llmprobe serve exited with {self.process.returncode}: {self.stderr()}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llmprobe serve did not start in {SERVER_START_S} s: {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def post(self, body: Any, *, raw: bytes | None = None, content_type: str = "application/json",
             path: str = "api/trace") -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": content_type})
        return self._answer(request)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    @staticmethod
    def _answer(request) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self, signal_number: int | None = None) -> int:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal_number or signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def decoded_rows(data: dict[str, Any]) -> dict[str, np.ndarray]:
    """The typed arrays of a page data model's rows, decoded as the page's script decodes them."""
    from llmprobe.viewer.columns import untyped

    return {name: untyped(spec) for name, spec in data["rows"].items() if isinstance(spec, dict)}
