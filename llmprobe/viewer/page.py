"""``llmprobe view``: the explorer as one self-contained HTML file (and the live probe's page).

Invariants of every page this module writes:

* **No network.** Script and style are inline; the data is inline; a Content-Security-Policy meta
  tag (``default-src 'none'``, the script and the style sheet allowed by their sha256 hashes, images
  only from ``data:``; the live page may also ``connect`` to its own server) forbids any fetch, and a
  ``data:`` icon keeps the browser from asking for ``/favicon.ico``. It opens from ``file://``.
* **Text is text.** The data travels as JSON inside ``<script type="application/json">`` with ``<``,
  ``>``, ``&``, U+2028 and U+2029 written as ``\\u003c``…, so no string in a trace (``</script>``,
  ``<!--``) can end the block; the script puts every string into the page with ``textContent``,
  never as markup. The few strings written by Python (title, verdict) are escaped with
  :func:`html.escape`. A lone surrogate (possible in JSON fields of a trace, never valid UTF-8) is
  replaced by U+FFFD, and the page says how many were.
* **The conclusion first.** With a fit, the page leads with the verdict
  (:func:`~llmprobe.analysis.fits.verdict_line`) and the γ = 1 test beside it, never alone.
* **A changed model says so.** A trace of an intervention names it under the title (as ``inspect``
  and ``report`` do), and a page with a baseline names the baseline trace and what it changed.
* **Written once.** The output is checked before any work and written atomically
  (:mod:`llmprobe.files`); on any error nothing is written.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from html import escape
from pathlib import Path
from typing import Any

from llmprobe.errors import UsageError
from llmprobe.files import check_new_output, write_atomic
from llmprobe.viewer.assets import SCRIPT, STYLE

JSON_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026", 0x2028: "\\u2028", 0x2029: "\\u2029"}
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
DATA_ELEMENT = "llmprobe-data"


class Sanitizer:
    """Replaces lone surrogates (which UTF-8 cannot encode) by U+FFFD and counts them."""

    def __init__(self) -> None:
        self.replaced = 0

    def __call__(self, text: str) -> str:
        clean, count = LONE_SURROGATE.subn("\ufffd", text)
        self.replaced += count
        return clean


def json_block(data: Any, clean: Sanitizer) -> str:
    """``data`` as JSON safe inside a ``<script type="application/json">`` element."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return clean(text).translate(JSON_ESCAPES)


def source_hash(text: str) -> str:
    """The CSP source expression allowing exactly this inline script or style sheet."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy(*, live: bool) -> str:
    """No fetch of any kind; the live page may only talk to the server that sent it."""
    return "; ".join([
        "default-src 'none'", f"script-src {source_hash(SCRIPT)}", f"style-src {source_hash(STYLE)}", "img-src data:",
        "base-uri 'none'", "form-action 'none'", *(["connect-src 'self'"] if live else []),
    ])


def render_page(data: dict[str, Any], *, title: str, subtitle: str = "", live: bool = False) -> str:
    """The page around a data model (:mod:`llmprobe.viewer.data`); ``live``: the probe's form, no data yet."""
    clean = Sanitizer()
    block = json_block(data, clean)
    fit = data.get("fit")
    conclusion = ""
    if fit:
        params = " · ".join(f"{name} = {_short(value)}" for name, value in fit["params"])
        conclusion = (
            '<section id="conclusion" class="conclusion">'
            f'<p id="verdict" class="verdict">{escape(clean(fit["verdict"]))}</p>'
            f'<p id="gamma-test" class="gamma">{escape(clean(fit["gamma_test"]))}</p>'
            + (f'<p class="params">{escape(clean(params))}</p>' if params else "")
            + f'<p class="source">fit {escape(clean(str(fit["source"])))}, trace label'
              f' {escape(clean(str(fit["label"])))}</p></section>')
    head = escape(clean(title))
    sub = escape(clean(subtitle))
    changes = _intervention_lines(data, clean)
    notes = []
    if clean.replaced:
        notes.append(f"{clean.replaced} lone surrogate{'s' if clean.replaced != 1 else ''} (text that is not valid"
                     " Unicode) in the trace replaced by U+FFFD (�).")
    note = f'<p id="notes" class="note">{escape(" ".join(notes))}</p>' if notes else ""
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{escape(content_security_policy(live=live))}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer"><link rel="icon" href="data:,">'
        f"<title>{head}</title><style>{STYLE}</style></head>\n<body>"
        f'<header><h1>{head}</h1><p class="subtitle">{sub}</p>{changes}</header>\n<main>'
        f"{conclusion}{note}"
        f'<div id="app" class="app" data-mode="{"live" if live else "file"}">'
        '<noscript>This page needs JavaScript to show the trace.</noscript></div></main>\n'
        f'<script type="application/json" id="{DATA_ELEMENT}">{block}</script>\n'
        f"<script>{SCRIPT}</script>\n</body></html>\n"
    )


def _intervention_lines(data: dict[str, Any], clean: Sanitizer) -> str:
    """Under the title, what the trace changed in the model, and what its baseline is: these are not the
    model's own numbers, and the reader must see so before any of them."""
    baseline = data.get("baseline")
    lines = []
    if data.get("interventions"):
        lines.append(f'<p id="interventions" class="interventions">{escape(clean(data["interventions"]))}</p>')
    if baseline:
        what = baseline.get("interventions") or "no intervention"
        model = baseline.get("model")
        if model is not None and model != data.get("run", {}).get("model"):
            what = f"model {model}, {what}"
        lines.append(f'<p id="baseline-line" class="subtitle">side by side with the baseline'
                     f' {escape(clean(str(baseline["source"])))} ({escape(clean(what))})</p>')
    return "".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def default_view_output(trace_source: str) -> str:
    if trace_source == "-":
        raise UsageError("give an output file when the trace comes from stdin", where="-o")
    return str(Path(trace_source).with_suffix("")) + ".view.html"


def build_view(trace_source: str, fit_source: str | None = None, baseline_source: str | None = None) -> str:
    """The explorer page of a trace file (and of its fit-posterior table, and of its baseline trace)."""
    from llmprobe.plots.icl import open_fit
    from llmprobe.tracing.reader import open_trace
    from llmprobe.viewer.data import page_data

    trace = open_trace(trace_source)
    baseline = open_trace(baseline_source) if baseline_source is not None else None
    fit = open_fit(fit_source) if fit_source is not None else None
    data = page_data(trace, fit, baseline)
    model = str(trace.meta.get("model") or "unknown model")
    subtitle = (f"trace {trace_source}" + (f", baseline {baseline_source}" if baseline_source else "")
                + (f", fit {fit_source}" if fit_source else ""))
    return render_page(data, title=f"llmprobe view — {model}", subtitle=subtitle)


def write_view(trace_source: str, fit_source: str | None, output: str | None, *, force: bool,
               baseline_source: str | None = None) -> Path:
    """Check the output, build the page, write it atomically; returns its path."""
    path = Path(output if output is not None else default_view_output(trace_source))
    if path.suffix.lower() not in (".html", ".htm"):
        raise UsageError("the page is HTML; name it *.html", where=str(path))
    check_new_output(path, force, inputs=[trace_source, *(source for source in (fit_source, baseline_source) if source)])
    page = build_view(trace_source, fit_source, baseline_source)
    write_atomic(path, page.encode("utf-8"), replace=force)
    return path
