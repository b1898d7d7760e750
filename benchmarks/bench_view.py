"""Benchmark 10: the explorer — page size and speed in headless Chromium, and the live probe against a trace.

Run: python benchmarks/bench_view.py [--quick] [--rows 20000] [--workdir DIR] [--repeats R]

1. Traces the coin experiment (50 flips a prompt, marks, targets " heads"/" tails") on the default
   model with ``llmprobe trace`` until the trace has about ``--rows`` rows, fits it with
   ``llmprobe fit-posterior``, and writes ``llmprobe view TRACE FIT``. Reports the page's bytes (and
   per row), the time to build it, and, in the system's headless Chromium, the time from navigation
   start until the first panel was drawn (``llmprobeView.timings.ready``, measured by the page with
   ``performance.now()``) and the time one selection takes — moving to a position and switching
   prompts, each followed by a forced layout — as median and maximum over many selections.
   Goals (issue 24): page <= 5 MB, first panel <= 1 s, a selection <= 50 ms.
2. Starts ``llmprobe serve`` on the default model and times a 30-token prompt through it (the
   HTTP round trip, JSON included), alternated with the same prompt through
   :func:`llmprobe.api.trace_table` on a model loaded in this process, both warm, and the server's
   overhead (the round trip less the trace time the server reports). Goal: serve / trace <= 1.5.

``--workdir DIR`` keeps the trace, fit and page there and reuses them on the next run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two processes take turns: neither may spin while idle
import _common  # noqa: F401  (sets LLMPROBE_CACHE)
from _common import COIN, ROOT, emit, fixed_length_records, interleaved, machine, median

GOALS = {"page_mb": 5.0, "first_panel_s": 1.0, "select_ms": 50.0, "serve_ratio": 1.5}
ROWS_PER_SEQUENCE = 150  # about, for 50 flips with marks


def llmprobe(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "llmprobe", *args], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def build_inputs(folder: Path, rows: int) -> tuple[Path, Path]:
    """A coin trace of about ``rows`` rows and its fit (kept in ``folder`` and reused when present)."""
    trace, fit = folder / "coin.parquet", folder / "coin.fit.parquet"
    if trace.exists() and fit.exists():
        return trace, fit
    import pyarrow.parquet as pq

    from llmprobe.experiments import generate, load_experiment, write_jsonl

    experiment = load_experiment(COIN)
    sequences = -(-rows // ROWS_PER_SEQUENCE)
    prompts = folder / "coin.jsonl"
    with prompts.open("w") as handle:
        records = list(generate(experiment, n_max=50, sequences=-(-sequences // len(experiment.thetas)),
                                layout="marks"))[:sequences]
        write_jsonl(records, handle)
    started = time.perf_counter()
    llmprobe("trace", str(prompts), "-o", str(trace), "--device", "cpu", "--dtype", "float32", "--force", "-q")
    print(f"traced {pq.read_metadata(trace).num_rows} rows in {time.perf_counter() - started:.0f} s", flush=True)
    llmprobe("fit-posterior", str(trace), "--bootstrap", "50", "-o", str(fit), "--force", "-q")
    return trace, fit


def browser_timings(page: Path, selections: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from tests.viewer.fixtures import browser_missing, open_page, start_browser

    reason = browser_missing()
    if reason:
        raise SystemExit(f"no browser: {reason}")
    browser = start_browser()
    try:
        loads = []
        for _ in range(3):
            open_page(browser, page.as_uri())
            loads.append(browser.execute_script("return window.llmprobeView.timings.ready") / 1000)
        moves = browser.execute_script("""
            const api = window.llmprobeView, n = arguments[0], out = {position: [], prompt: []};
            const prompts = document.querySelectorAll('#prompt-select option').length;
            for (let i = 0; i < n; i++) {
              let t = performance.now();
              api.selectPrompt((i * 7919) % prompts);
              document.body.offsetHeight;  // the layout the selection causes, not only the script
              out.prompt.push(performance.now() - t);
              const tokens = document.querySelectorAll('#strip [data-position]');
              t = performance.now();
              api.selectPosition(Number(tokens[(i * 31) % tokens.length].dataset.position));
              document.body.offsetHeight;
              out.position.push(performance.now() - t);
            }
            return out;""", selections)
    finally:
        browser.quit()
    position, prompt = sorted(moves["position"]), sorted(moves["prompt"])
    return {"first_panel_s": median(loads), "first_panel_s_max": max(loads),
            "select_position_ms": median(position), "select_position_ms_max": position[-1],
            "select_prompt_ms": median(prompt), "select_prompt_ms_max": prompt[-1]}


def serve_ratio(repeats: int) -> dict[str, float]:
    from llmprobe.api import trace_table
    from llmprobe.model.loading import load_model

    loaded = load_model(None, device="cpu", dtype="float32")
    prompt = fixed_length_records(loaded.tokenizer, 30, 1)[0].text
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "serve.out"
        server = subprocess.Popen([sys.executable, "-m", "llmprobe", "serve", "--port", "0", "--device", "cpu",
                                   "--dtype", "float32", "-q"], stdout=out.open("wb"), cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            deadline = time.monotonic() + 300
            while "serving " not in out.read_text():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("llmprobe serve did not start")
                time.sleep(0.2)
            url = out.read_text().split("serving ", 1)[1].split()[0] + "api/trace"
            body = json.dumps({"prompt": prompt, "targets": " heads, tails"}).encode()

            overheads: list[float] = []

            def served() -> None:
                request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                started = time.perf_counter()
                with urllib.request.urlopen(request, timeout=120) as response:
                    answer = json.loads(response.read())
                overheads.append(time.perf_counter() - started - answer["seconds"])  # all but the trace itself

            def traced() -> None:
                trace_table(prompt, loaded, top_k=20, targets=[" heads", " tails"])

            times = interleaved({"serve": served, "trace": traced}, repeats)
        finally:
            server.send_signal(signal.SIGTERM)  # as Ctrl-C; SIGINT may be ignored when this runs in the background
            server.wait(timeout=60)
    ratios = [s / t for s, t in zip(times["serve"], times["trace"])]
    return {"serve_s": median(times["serve"]), "trace_s": median(times["trace"]), "serve_ratio": median(ratios),
            "serve_ratio_best": min(times["serve"]) / min(times["trace"]), "serve_overhead_ms": 1000 * median(overheads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 rows, fewer selections and repeats")
    parser.add_argument("--rows", type=int, default=None, help="trace rows (default 20,000; quick 2,000)")
    parser.add_argument("--workdir", default=None, help="keep (and reuse) the trace, fit and page here")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    rows = args.rows or (2000 if args.quick else 20000)
    repeats = args.repeats or (5 if args.quick else 11)
    print(machine(), flush=True)

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.workdir or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        trace, fit = build_inputs(folder, rows)
        from llmprobe.tracing.reader import open_trace
        from llmprobe.viewer.page import build_view

        started = time.perf_counter()
        html = build_view(str(trace), str(fit))
        build_s = time.perf_counter() - started
        page = folder / "coin.view.html"
        page.write_text(html, encoding="utf-8")  # a benchmark artefact, not an llmprobe output
        size = page.stat().st_size
        trace_rows = open_trace(trace, ["prompt_index"]).table.num_rows
        result = {"rows": trace_rows, "page_mb": size / 1e6, "page_bytes_per_row": size / trace_rows,
                  "build_s": build_s, **browser_timings(page, 20 if args.quick else 100)}
    print(f"page: {result['page_mb']:.2f} MB for {trace_rows:,} rows ({result['page_bytes_per_row']:.0f} bytes a row;"
          f" goal <= {GOALS['page_mb']} MB), built in {build_s:.1f} s")
    print(f"first panel drawn {result['first_panel_s']:.2f} s after navigation start (median of 3; goal <="
          f" {GOALS['first_panel_s']} s)")
    print(f"selecting a position: {result['select_position_ms']:.1f} ms median, {result['select_position_ms_max']:.1f}"
          f" ms max; switching prompts: {result['select_prompt_ms']:.1f} ms median,"
          f" {result['select_prompt_ms_max']:.1f} ms max (goal <= {GOALS['select_ms']} ms)", flush=True)
    result.update(serve_ratio(repeats))
    print(f"30-token prompt: serve {result['serve_s'] * 1000:.0f} ms, trace_table {result['trace_s'] * 1000:.0f} ms;"
          f" ratio {result['serve_ratio']:.2f} (median of {repeats}; best/best {result['serve_ratio_best']:.2f};"
          f" goal <= {GOALS['serve_ratio']}); HTTP, JSON and the page's data add {result['serve_overhead_ms']:.0f} ms"
          " (median)")
    emit({key: (round(value, 4) if isinstance(value, float) and math.isfinite(value) else value)
          for key, value in result.items()})


if __name__ == "__main__":
    main()
