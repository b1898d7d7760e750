"""``llmprobe serve``: the live probe shows ``llmprobe trace``'s numbers, queues requests, survives bad input
and malformed HTTP, refuses a busy port in one line, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import math
import signal
import socket
import threading

import numpy as np
import pytest

from llmprobe.tracing.reader import read_trace
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.viewer.fixtures import (Server, decoded_rows, find, open_page, panel_rows, press, requested_urls,
                                   run_llmprobe)

PROMPT = "I just flipped a coin, and it came up heads, then tails, then"
TARGETS = " heads, tails"
NEW_TOKENS = 3


def tiny_server_args(model_dir) -> list[str]:
    return ["--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--top-k", "5",
            "--limit-prompt-chars", "400", "--limit-new-tokens", "8"]


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    """Two servers started side by side: one for the requests, one to be stopped with Ctrl-C."""
    folders = [tmp_path_factory.mktemp("serve"), tmp_path_factory.mktemp("serve-spare")]
    running = [Server(tiny_server_args(tiny_model_dir), folder, cache=folder / "cache") for folder in folders]
    yield running
    code = running[0].stop(signal.SIGTERM)  # SIGTERM stops it as cleanly as Ctrl-C
    running[1].stop()
    assert code == 0 and "Traceback" not in running[0].stderr(), running[0].stderr()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def cli_trace(tiny_model_dir, tmp_path_factory):
    """The same prompt through ``llmprobe trace`` (in this process), as the page must show it."""
    folder = tmp_path_factory.mktemp("cli")
    prompts = folder / "p.txt"
    prompts.write_text(PROMPT + "\n")
    out = folder / "t.parquet"
    run_llmprobe(["trace", str(prompts), "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32",
                  "--top-k", "5", "--targets", TARGETS, "--max-new-tokens", str(NEW_TOKENS), "-o", str(out), "-q"])
    return read_trace(out)


def test_the_page_shows_what_llmprobe_trace_computes(browser, server, cli_trace, tmp_path):
    open_page(browser, server.url)
    find(browser, "#probe-prompt").send_keys(PROMPT)
    find(browser, "#probe-targets").send_keys(TARGETS)
    tokens = find(browser, "#probe-new-tokens")
    tokens.clear()
    tokens.send_keys(str(NEW_TOKENS))
    find(browser, "#probe-run").click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 60).until(lambda b: b.find_elements("css selector", "#explorer [data-entropy]"))
    positions = cli_trace["position"].tolist()
    assert [int(p) for p, in panel_rows(browser, "#strip [data-position]", "data-position")] == positions
    body = find(browser, "body")
    for number, row in enumerate(cli_trace.itertuples()):
        if number:
            press(body, "ARROW_RIGHT")
        shown = panel_rows(browser, "#topk tr[data-token]", "data-token", "data-prob")
        assert [t for t, _ in shown] == [str(t) for t in row.topk_tokens]
        np.testing.assert_allclose([float(p) for _, p in shown], np.exp(row.topk_logprobs.astype(np.float64)),
                                   rtol=0, atol=1e-6)
        entropy = float(find(browser, "[data-entropy]").get_attribute("data-entropy"))
        assert entropy == pytest.approx(row.entropy / math.log(2), abs=1e-6)
        targets = dict(panel_rows(browser, "#targets tr[data-target]", "data-target", "data-prob"))
        assert float(targets[" heads"]) == pytest.approx(math.exp(row.target_logprobs[0]), abs=1e-6)
    # the request's trace, downloaded as Parquet, is the CLI's trace
    href = find(browser, "#probe-download").get_attribute("href")
    status, data = server.get(href.removeprefix(server.url))
    assert status == 200
    (tmp_path / "download.parquet").write_bytes(data)
    downloaded = read_trace(tmp_path / "download.parquet")
    assert downloaded["token"].tolist() == cli_trace["token"].tolist()
    np.testing.assert_allclose(np.stack(downloaded["topk_logprobs"]), np.stack(cli_trace["topk_logprobs"]), atol=1e-6)
    assert downloaded.attrs["llmprobe"]["command"] == "llmprobe serve"
    assert all(url.startswith(server.url) for url in requested_urls(browser))
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_the_page_shows_a_refusal_and_the_next_request_works(browser, server):
    open_page(browser, server.url)
    find(browser, "#probe-prompt").send_keys("Once upon a time")
    find(browser, "#probe-targets").send_keys(" heads,, tails")
    find(browser, "#probe-run").click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda b: b.find_element("css selector", "#probe-error").is_displayed())
    assert "empty target" in find(browser, "#probe-error").text
    targets = find(browser, "#probe-targets")
    targets.clear()
    find(browser, "#probe-run").click()
    WebDriverWait(browser, 30).until(lambda b: b.find_elements("css selector", "#explorer [data-entropy]"))
    assert not find(browser, "#probe-error").is_displayed()


def test_a_second_request_waits_for_the_first_and_both_are_right(server):
    bodies = [{"prompt": PROMPT * 5, "max_new_tokens": 8}, {"prompt": "Once upon a time", "targets": TARGETS}]
    answers: list = [None, None]

    def ask(i):
        answers[i] = server.post(bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [status for status, _ in answers] == [200, 200], answers
    assert answers[0][1]["id"] != answers[1][1]["id"]
    for body, (_, answer) in zip(bodies, answers):  # each answer is its own prompt's, as if it had been alone
        status, alone = server.post(body)
        assert status == 200
        first, second = decoded_rows(answer["data"]), decoded_rows(alone["data"])
        assert first.keys() == second.keys()
        for name in first:
            np.testing.assert_array_equal(first[name], second[name], err_msg=name)
        assert answer["data"]["tokens"] == alone["data"]["tokens"]


@pytest.mark.parametrize("body,raw,content_type,status,needle", [
    (None, b"{not json", "application/json", 400, "not valid JSON"),
    ([1, 2], None, "application/json", 400, "JSON object"),
    ({"targets": " a"}, None, "application/json", 400, "prompt"),
    ({"prompt": "   "}, None, "application/json", 400, "prompt"),
    ({"prompt": "x" * 401}, None, "application/json", 400, "over this server's limit of 400"),
    ({"prompt": "hi", "targets": "a,,b"}, None, "application/json", 400, "empty target"),
    ({"prompt": "hi", "targets": [1]}, None, "application/json", 400, "targets"),
    ({"prompt": "hi", "max_new_tokens": 9}, None, "application/json", 400, "limit of 8"),
    ({"prompt": "hi", "max_new_tokens": -1}, None, "application/json", 400, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": "3"}, None, "application/json", 400, "max_new_tokens"),
    ({"prompt": "a\ud800b"}, None, "application/json", 400, "surrogate"),
    ({"prompt": "hi"}, None, "text/plain", 415, "application/json"),
    (None, b"x" * (2 << 20), "application/json", 413, "KiB"),
    (None, b"[" * 200_000 + b"]" * 200_000, "application/json", 400, "not valid JSON"),  # the parser's recursion
])
def test_bad_input_is_a_json_error_and_the_server_stays_up(server, body, raw, content_type, status, needle):
    if body is not None and raw is None:
        import json

        raw = json.dumps(body).encode()  # json escapes the lone surrogate as \ud800
    code, answer = server.post(body, raw=raw, content_type=content_type)
    assert code == status and needle in answer["error"], answer
    code, answer = server.post({"prompt": "still up"})
    assert code == 200 and answer["data"]["prompts"][0]["id"] == str(answer["id"])


def test_unknown_paths_and_forgotten_traces_are_404(server):
    assert server.get("nope")[0] == 404
    assert server.get("api/trace/999999.parquet")[0] == 404
    assert server.post({"prompt": "hi"}, path="api/other")[0] == 404


def raw_exchange(url: str, payload: bytes) -> bytes:
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_malformed_http_leaves_the_server_up(server):
    assert b"400" in raw_exchange(server.url, b"GARBAGE\r\n\r\n")  # an HTTP/0.9-style line: a bare error page
    assert b"400" in raw_exchange(server.url, bytes(range(256)) * 4 + b"\r\n\r\n")
    assert raw_exchange(server.url, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 414")
    raw_exchange(server.url, b"POST /api/trace HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"prompt\"")  # the body stops short
    raw_exchange(server.url, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the headers stop short
    answer = raw_exchange(server.url, b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 403") and b"loopback" in answer  # DNS rebinding is refused
    assert server.get("")[0] == 200
    assert server.post({"prompt": "still up"})[0] == 200


def test_a_busy_port_is_one_line_naming_it(capsys, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code, _, err = run_cli(["serve", "--port", str(port), "--model", "/no/such/model"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--port", f"port {port}", "already in use")


def test_another_address_needs_allow_remote(capsys, monkeypatch):
    code, _, err = run_cli(["serve", "--host", "0.0.0.0", "--port", "0"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--host", "--allow-remote")


def test_ctrl_c_stops_it_cleanly(servers):
    running = servers[1]
    assert running.post({"prompt": "hi"})[0] == 200
    assert running.stop(signal.SIGINT) == 0
    assert "Traceback" not in running.stderr() and running.stderr().strip().endswith("stopped")


@pytest.mark.real_model
def test_on_the_default_model_the_probe_is_the_trace(real_loaded, tmp_path):
    from llmprobe.api import trace_table

    running = Server(["--device", "cpu", "--dtype", "float32", "--top-k", "5"], tmp_path, cache=None)
    try:
        status, answer = running.post({"prompt": PROMPT, "targets": TARGETS, "max_new_tokens": 2})
    finally:
        assert running.stop(signal.SIGINT) == 0
    assert status == 200, answer
    expected = trace_table(PROMPT, real_loaded, top_k=5, targets=[" heads", " tails"], max_new_tokens=2).table
    rows = decoded_rows(answer["data"])
    tokens = answer["data"]["tokens"]
    assert [tokens[i] for i in rows["token"]] == expected.column("token").to_pylist()
    for name, column in (("topk_logprob", "topk_logprobs"), ("target_logprob", "target_logprobs")):
        # probabilities to 1e-6 (the server runs one thread, this process two: float32 sums differ in order)
        np.testing.assert_allclose(np.exp(rows[name].astype(np.float64)),
                                   np.exp(np.concatenate(expected.column(column).to_pylist())), rtol=0, atol=1e-6)
