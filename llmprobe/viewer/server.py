"""``llmprobe serve``: the live probe — the explorer page, filled by one loaded model, one request at a time.

Why the standard library: :class:`http.server.ThreadingHTTPServer` is enough for a loopback tool
that one researcher keeps open. It adds no dependency (llmprobe installs no web framework), and the
work is serialized anyway — one model, one lock — so an async framework would buy nothing. The
threads only let waiting requests queue on the lock and let the page and downloads be served while a
trace runs.

Endpoints:

* ``GET /`` — the page (:func:`llmprobe.viewer.page.render_page` in live mode: a form, then the
  same explorer as ``llmprobe view``);
* ``POST /api/trace`` — JSON ``{"prompt": str, "targets": "a,b" | [str], "max_new_tokens": int}``;
  answers ``{"id", "seconds", "data"}`` with ``data`` the page's data model of this one trace
  (:func:`llmprobe.viewer.data.page_data`), or a 4xx with ``{"error": "one line"}`` the page shows;
* ``GET /api/trace/ID.parquet`` — the request's trace as an llmprobe Parquet trace (the last
  :data:`KEPT_TRACES` requests are kept).

Invariants:

* **Same numbers as ``llmprobe trace``.** A request is traced by :func:`llmprobe.api.trace_table`,
  the pipeline of the ``trace`` command, on the model loaded once at start.
* **One at a time.** A lock around the model: a second request waits for the first (a queue, not
  a crash), then gets its own answer.
* **Bad input is an answer, not a crash.** Oversized bodies (413), prompts over the character limit
  or the model's context, bad targets, bad JSON (400), wrong content type (415), unknown paths (404)
  each get one JSON error line; malformed HTTP gets the standard library's 400; the server keeps
  serving. An unexpected failure inside a request is a 500 with one line (and one log line), never a
  stopped server.
* **Loopback unless asked.** The server binds 127.0.0.1 by default; any other address needs
  ``allow_remote`` (the CLI's ``--allow-remote``, which warns on stderr: whoever reaches the port can
  run the model). On loopback, requests whose ``Host`` is not a loopback name are refused (403), so a
  web page elsewhere cannot reach the model through DNS rebinding; ``POST`` needs
  ``application/json``, which a cross-site form cannot send.
* **A busy port is one line** naming the port (:class:`~llmprobe.errors.UsageError`), found before
  the model is loaded.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import re
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from collections.abc import Callable
from urllib.parse import urlsplit

from llmprobe.errors import UsageError

KEPT_TRACES = 16  # the last requests whose Parquet can be downloaded
MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 16 << 20  # an oversized body up to this size is read (and dropped) before the 413
SOCKET_TIMEOUT_S = 60  # a client that stops sending mid-request is dropped after this long
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
TRACE_PATH = re.compile(r"/api/trace/(\d+)\.parquet")
SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 20_000
    max_new_tokens: int = 64


class RequestError(Exception):
    """A request the server refuses: an HTTP status and one line for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Probe:
    """The model side of the server: checks a request, traces it under the lock, keeps it for download."""

    def __init__(self, loaded: Any, *, top_k: int, limits: Limits, model_name: str) -> None:
        self.loaded = loaded
        self.top_k = top_k
        self.limits = limits
        self.model_name = model_name
        self.lock = threading.Lock()
        self.traces: OrderedDict[int, Any] = OrderedDict()
        self.count = 0

    def request(self, body: Any) -> dict[str, Any]:
        """A parsed JSON request -> the answer; :class:`RequestError` for anything the page must show."""
        from llmprobe.api import trace_table
        from llmprobe.viewer.data import page_data

        prompt, targets, new_tokens = self.parse(body)
        with self.lock:  # one model, one request at a time: the others wait here
            self.count += 1
            number = self.count
            started = time.perf_counter()
            try:
                trace = trace_table([{"id": str(number), "prompt": prompt}], self.loaded, top_k=self.top_k,
                                    targets=targets, max_new_tokens=new_tokens)
            except UsageError as exc:
                raise RequestError(400, str(exc)) from None
            seconds = time.perf_counter() - started
        trace = replace(trace, meta={**trace.meta, "command": "llmprobe serve", "prompts": "<llmprobe serve>"},
                        source=f"<request {number}>")
        with self.lock:
            self.traces[number] = trace
            while len(self.traces) > KEPT_TRACES:
                self.traces.popitem(last=False)
        return {"id": number, "seconds": seconds, "data": page_data(trace)}

    def parse(self, body: Any) -> tuple[str, list[str], int]:
        if not isinstance(body, dict):
            raise RequestError(400, "the request must be a JSON object with a prompt")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(400, "prompt: give some text to trace")
        if len(prompt) > self.limits.max_prompt_chars:
            raise RequestError(400, f"prompt: {len(prompt):,} characters is over this server's limit of"
                                    f" {self.limits.max_prompt_chars:,} (llmprobe serve --limit-prompt-chars)")
        targets = body.get("targets") or []
        if isinstance(targets, str):
            targets = targets.split(",")
        if not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise RequestError(400, "targets: expected comma-separated text or a list of strings")
        if any(t == "" for t in targets):
            raise RequestError(400, "targets: an empty target (two commas, or a comma at an end); write each"
                                    " target as the text that follows the prompt, e.g. ' heads, tails'")
        if any(SURROGATE.search(text) for text in [prompt, *targets]):
            raise RequestError(400, "the prompt or a target holds a lone surrogate (text that is not valid Unicode)")
        new_tokens = body.get("max_new_tokens", 0)
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
            raise RequestError(400, "max_new_tokens: expected a whole number, 0 or more")
        if new_tokens > self.limits.max_new_tokens:
            raise RequestError(400, f"max_new_tokens: {new_tokens} is over this server's limit of"
                                    f" {self.limits.max_new_tokens} (llmprobe serve --limit-new-tokens)")
        return prompt, targets, new_tokens

    def parquet(self, number: int) -> bytes | None:
        """The request's trace as a Parquet file's bytes, written by the trace writer (None: not kept)."""
        from llmprobe.tracing.writer import parquet_bytes

        with self.lock:
            trace = self.traces.get(number)
        return None if trace is None else parquet_bytes(trace.table, trace.meta, trace.vocab)

    def page_config(self) -> dict[str, Any]:
        return {"model": self.model_name, "top_k": self.top_k,
                "limits": {"max_prompt_chars": self.limits.max_prompt_chars,
                           "max_new_tokens": self.limits.max_new_tokens}}


class ProbeServer(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for a client that keeps its connection open
    probe: Probe | None = None  # set once the model is loaded; the port is bound first
    page: bytes = b""
    check_host = True
    log: Callable[[str], None] = staticmethod(lambda message: None)

    def handle_error(self, request, client_address) -> None:  # one line, never a traceback
        import sys

        exc = sys.exc_info()[1]
        self.log(f"{client_address[0]}: connection failed ({type(exc).__name__}: {exc})")


class ProbeServerV6(ProbeServer):
    address_family = socket.AF_INET6


class Handler(BaseHTTPRequestHandler):
    server: ProbeServer
    server_version = "llmprobe"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S

    def do_GET(self) -> None:
        if not self._host_allowed():
            return
        path = urlsplit(self.path).path
        if path == "/":
            self._send(200, self.server.page, "text/html; charset=utf-8", page=True)
            return
        match = TRACE_PATH.fullmatch(path)
        if match:
            data = self.server.probe.parquet(int(match.group(1))) if self.server.probe else None
            if data is None:
                self._json(404, {"error": f"trace {match.group(1)} is not kept (the server keeps the last"
                                          f" {KEPT_TRACES} requests)"})
                return
            self._send(200, data, "application/vnd.apache.parquet",
                       extra={"Content-Disposition": f'attachment; filename="probe-{match.group(1)}.parquet"'})
            return
        self._json(404, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:
        if not self._host_allowed():
            return
        path = urlsplit(self.path).path
        if path != "/api/trace":
            self._json(404, {"error": f"no such endpoint: {path}"})
            return
        if self.headers.get_content_type() != "application/json":
            self._json(415, {"error": "send the request as application/json"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._json(411, {"error": "the request needs a Content-Length"})
            return
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            remaining = length if length <= DRAIN_BYTES else 0  # read what was sent: the client sees the answer
            while remaining > 0:                                # rather than a reset connection
                chunk = self.rfile.read(min(1 << 16, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
            self._json(413, {"error": f"the request is over {MAX_BODY_BYTES // 1024} KiB"})
            return
        try:
            body = json.loads(self.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            self._json(400, {"error": "the request is not valid JSON"})
            return
        try:
            answer = self.server.probe.request(body)
        except RequestError as exc:
            self._json(exc.status, {"error": str(exc)})
            return
        except Exception as exc:  # a bug or an environment fault: this request fails, the server stays
            self.server.log(f"request failed: {type(exc).__name__}: {exc}")
            self._json(500, {"error": f"unexpected {type(exc).__name__}: {exc}"})
            return
        self._json(200, answer)

    def _host_allowed(self) -> bool:
        host = self.headers.get("Host")
        if not self.server.check_host or host is None:
            return True
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.strip("[]").lower() in LOOPBACK_NAMES:
            return True
        self._json(403, {"error": f"this server answers only on loopback addresses, not for host {host!r}"})
        return False

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload, allow_nan=False).encode("ascii"), "application/json")

    def _send(self, status: int, body: bytes, content_type: str, *, page: bool = False,
              extra: dict[str, str] | None = None) -> None:
        from llmprobe.viewer.page import content_security_policy

        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if page:
            self.send_header("Content-Security-Policy", content_security_policy(live=True) + "; frame-ancestors 'none'")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log(f"{self.address_string()} {format % args}")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int, *, allow_remote: bool) -> ProbeServer:
    """Bind the port (before the model loads, so a busy port fails in a second)."""
    if not is_loopback(host) and not allow_remote:
        raise UsageError(f"{host} is reachable from other machines, and whoever reaches the server can run the"
                         " model; add --allow-remote to mean it (default: 127.0.0.1)", where="--host")
    host = host.strip("[]")
    kind = ProbeServerV6 if ":" in host else ProbeServer
    try:
        server = kind((host, port), Handler)
    except socket.gaierror as exc:
        raise UsageError(f"not an address to listen on ({exc.strerror})", where="--host") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is already in use (another server?); choose another with"
                             " --port, or --port 0 for any free one", where="--port") from None
        raise UsageError(f"cannot listen on {host} port {port} ({exc.strerror or exc})", where="--port") from None
    server.check_host = not allow_remote
    return server


def url_of(server: ProbeServer) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def start(server: ProbeServer, probe: Probe, log: Callable[[str], None]) -> None:
    """Attach the loaded model and the page; then ``server.serve_forever()`` answers requests."""
    from llmprobe.viewer.page import render_page

    server.probe = probe
    server.log = log
    page = render_page({"format": 1, "live": probe.page_config()}, title=f"llmprobe serve — {probe.model_name}",
                       subtitle="type a prompt: the model's next-token distribution at every position", live=True)
    server.page = page.encode("utf-8")
