"""The README's screenshots of ``llmprobe view``: the default model on the coin experiment, in headless Chromium.

Run: python benchmarks/view_screenshot.py [-o docs/figures/view.png]
     python benchmarks/view_screenshot.py --ablate 8.1 [-o docs/figures/view-ablate.png]

Traces the coin experiment (20 flips, 2 sequences a θ) on the default model, fits it, writes the
page, opens it in the system's Chromium, selects a mark half-way through a θ = 0.7 sequence, and
saves a screenshot (PNG, palette-quantized to stay a few hundred KB). With ``--ablate SPEC`` the
same prompts are traced a second time with ``trace --ablate SPEC``; the page is the ablated trace
and its fit beside the plain trace (``view --baseline``), its tokens coloured by the change.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401  (sets LLMPROBE_CACHE)
from _common import COIN, ROOT


def llmprobe(folder: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "llmprobe", *args], check=True, cwd=folder,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", help="the PNG (default: docs/figures/view.png, with --ablate"
                                                " docs/figures/view-ablate.png)")
    parser.add_argument("--theta", type=float, default=0.7, help="the sequence's P(heads) to show")
    parser.add_argument("--ablate", metavar="SPEC", help="show trace --ablate SPEC beside the plain trace")
    args = parser.parse_args()
    output = args.output or str(ROOT / "docs/figures" / ("view-ablate.png" if args.ablate else "view.png"))
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from tests.viewer.fixtures import open_page, start_browser

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        llmprobe(work, "experiment", str(COIN), "--n-max", "20", "--sequences", "2", "-o", "coin.jsonl", "-q")
        llmprobe(work, "trace", "coin.jsonl", "-o", "coin.parquet", "--device", "cpu", "--dtype", "float32", "-q")
        if args.ablate:
            llmprobe(work, "trace", "coin.jsonl", "--ablate", args.ablate, "-o", "ablated.parquet", "--device", "cpu",
                     "--dtype", "float32", "-q")
            llmprobe(work, "fit-posterior", "ablated.parquet", "-o", "ablated.fit.parquet", "-q")
            llmprobe(work, "view", "ablated.parquet", "ablated.fit.parquet", "--baseline", "coin.parquet",
                     "-o", "coin.view.html", "-q")
        else:
            llmprobe(work, "fit-posterior", "coin.parquet", "-o", "coin.fit.parquet", "-q")
            llmprobe(work, "view", "coin.parquet", "coin.fit.parquet", "-o", "coin.view.html", "-q")
        browser = start_browser()
        try:
            browser.set_window_size(1400, 2060 if args.ablate else 1180)  # two top-k lists, then the fit
            open_page(browser, (work / "coin.view.html").as_uri())
            browser.execute_script("""
                const data = JSON.parse(document.getElementById('llmprobe-data').textContent);
                const index = data.prompts.findIndex(p => p.meta && Array.isArray(p.meta.theta)
                                                          && Math.abs(p.meta.theta[0] - arguments[0]) < 1e-9);
                window.llmprobeView.selectPrompt(Math.max(index, 0));
                const marks = [...document.querySelectorAll('#strip .tok.mark')];
                marks[Math.floor(marks.length / 2)].click();
                const list = document.getElementById('prompt-select');
                list.scrollTop = list.selectedOptions[0].offsetTop - list.offsetTop - 20;
                const colour = document.getElementById('color-by');
                if (arguments[1]) { colour.value = 'kl'; colour.dispatchEvent(new Event('change')); }""",
                                   args.theta, bool(args.ablate))
            png = browser.get_screenshot_as_png()
        finally:
            browser.quit()
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    image.save(output, optimize=True)
    print(f"wrote {output} ({Path(output).stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
