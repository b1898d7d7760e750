"""The verdict's decision table on planted models whose answer is known: planted model → numbers → verdict.

Run: python benchmarks/verdict_table.py [--bootstrap B] [--seed S]

Every planted model of tests/analysis/fixtures.py (``PLANTED``, the models tests/analysis/
test_planted_verdicts.py checks row by row) is written as a synthetic trace and fitted the way
``fit-posterior`` fits it (``--prior fit``, one component, 5 folds, B resamples, seed S). One Markdown row
per model, the table of docs/statistics.md (section 6b): the mean KL(model‖·) in bits out of sample of the
γ = 1 filter (E), the forgetting filter (F), forgetting's gain E − F, each sequence's first prediction (N,
fits nothing), the shared constant (C), γ̂ with its interval, and the verdict. Progress goes to stderr;
the last line is ``RESULT {json}``; the exit status is 1 if a verdict differs from the planted one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, emit

sys.path.insert(0, str(ROOT))  # the planted models live with the tests that check them

from llmprobe.analysis.fits import fit_posterior
from llmprobe.analysis.marks import category_marks
from llmprobe.tracing.reader import open_trace
from tests.analysis.fixtures import PLANTED


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples of γ (fit-posterior's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| planted model | E | F | E − F | N | C | γ̂ [95 % CI] | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    wrong, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for index, planted in enumerate(PLANTED):
            print(f"[{index + 1}/{len(PLANTED)}] {planted.name}", file=sys.stderr, flush=True)
            path = planted.write(Path(tmp) / f"{index}.parquet")
            s = fit_posterior(category_marks(open_trace(path)), "fit", args.bootstrap, args.seed).summary
            scores = s["scores"]
            exact, free = (scores[k]["kl_bits_out_of_sample"] for k in ("exact_bayes", "forgetting"))
            low, high = s["gamma_ci"]
            verdict = f"`{s['verdict']}`" if s["verdict"] == planted.verdict else \
                f"**`{s['verdict']}`** (planted: `{planted.verdict}`)"
            if s["verdict"] != planted.verdict:
                wrong.append(planted.name)
            gain = round(exact - free, 4) + 0.0  # no "-0.0000"
            print(f"| {planted.name} ({planted.experiment}, {s['n_sequences']} seq., n ≤ {planted.n_max})"
                  f" | {exact:.4f} | {free:.4f} | {gain:.4f} | {scores['never_updating']['kl_bits']:.4f}"
                  f" | {scores['shared_constant']['kl_bits']:.4f} | {s['forgetting']['gamma']:.3f}"
                  f" [{low:.3f}, {high:.3f}] | {verdict} |", flush=True)
    emit({"benchmark": "verdict_table", "planted": len(PLANTED), "agree": len(PLANTED) - len(wrong), "wrong": wrong,
          "bootstrap": args.bootstrap, "seconds": round(time.perf_counter() - start, 1)})
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
