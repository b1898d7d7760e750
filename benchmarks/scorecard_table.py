"""The scorecard on planted models whose answers are known: planted model → each test's number.

Run: python benchmarks/scorecard_table.py [--bootstrap B] [--paths J]

Every planted model of tests/analysis/fixtures.py (``SCORECARD_PLANTED``, the models tests/analysis/
test_scorecard.py checks) is written as a synthetic trace of coin sequences, each followed by its shuffled
orders, its martingale test is run the way ``llmprobe martingale`` runs it on a model (n = 1, 2, 4, 8, 16;
horizon 1; J paths), and it is fitted as ``fit-posterior --martingale`` fits it. One Markdown row per model
(the first table of docs/statistics.md, section 6g): the order spread in bits (and TV) and KL(Bayes‖model)
per order → averaged over orders; the excess code length (growth per example, and per sequence); the
scaling law's held-out RMSE over the best baseline's, with K; the martingale test's rejections at 0.05 and
its largest mean TV; the verdict. Then the curves made by the Bayesian scaling law with known parameters
(tests/bayes/fixtures.py: ``SCALING_PLANTED``), each fitted on n ≤ 20 of 40: the K recovered and every law's
held-out RMSE. Progress goes to stderr; the last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, emit

sys.path.insert(0, str(ROOT))  # the planted models live with the tests that check them

from llmprobe.analysis.fits import fit_posterior, posterior_marks
from llmprobe.analysis.scorecard import MARTINGALE_ALPHA
from llmprobe.bayes.scaling import LAW_NAMES, LAWS, bayesian_law, fit_scaling_laws
from llmprobe.tracing.reader import open_trace
from tests.analysis.fixtures import SCORECARD_PLANTED, planted_martingale, write_martingale, write_trace
from tests.bayes.fixtures import SCALING_PLANTED

MARTINGALE_NS = [1, 2, 4, 8, 16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples of γ (fit-posterior's default)")
    parser.add_argument("--paths", type=int, default=32, help="martingale paths per state (martingale's default)")
    args = parser.parse_args()
    print("| planted model | order spread, bits (TV) | KL(Bayes‖model) per order → averaged"
          " | excess, bits per example (per sequence) | scaling law / best baseline (K)"
          " | martingale: rejected (max TV) | verdict |")
    print("|---|---|---|---|---|---|---|")
    start, rows = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, planted in enumerate(SCORECARD_PLANTED):
            print(f"[{index + 1}/{len(SCORECARD_PLANTED)}] {planted.name}", file=sys.stderr, flush=True)
            prompts = planted.prompts()
            trace = write_trace(Path(tmp) / f"{index}.parquet", prompts, planted.make())
            martingale = write_martingale(Path(tmp) / f"{index}.jsonl", planted_martingale(
                planted.make(), prompts, MARTINGALE_NS, paths=args.paths))
            fit = fit_posterior(posterior_marks(open_trace(trace)), planted.prior, args.bootstrap, 0,
                                martingale=martingale)
            card = fit.scorecard
            order, code, scaling = card.exchangeability, card.code_length, card.scaling
            rejected = sum(r.p_value < MARTINGALE_ALPHA for r in card.martingale)
            largest = max(r.mean_tv_deviation for r in card.martingale)
            prior = "" if planted.prior == "fit" else f", `--prior {planted.prior}`"
            print(f"| {planted.name} (coin, {fit.counts.sequences} seq. × {planted.shuffled + 1} orders,"
                  f" n ≤ {planted.n_max}{prior}) | {order.spread_kl_bits:.4f} ({order.spread_tv:.3f})"
                  f" | {order.kl_bayes_per_order_bits:.4f} → {order.kl_bayes_of_average_bits:.4f}"
                  f" | {code.slope_bits_per_example:+.4f} ({code.mean_bits_per_sequence:+.2f})"
                  f" | {scaling.error_ratio:.2f} ({scaling.efficiency:.3g})"
                  f" | {rejected} of {len(card.martingale)} n ({largest:.3f}) | `{fit.verdict}` |", flush=True)
            rows[planted.name] = {"spread_kl_bits": order.spread_kl_bits, "slope": code.slope_bits_per_example,
                                  "scaling_ratio": scaling.error_ratio, "martingale_rejected": rejected}
    print()
    n = np.arange(41)
    print("| curve made by the law: prior; P per task; K | K fitted | "
          + " | ".join(f"{LAW_NAMES[name]} RMSE held out" for name in LAWS) + " |")
    print("|---|---|---|---|---|---|")
    recovered = []
    for prior, probs, efficiency in SCALING_PLANTED:
        fit = fit_scaling_laws(n, bayesian_law(n, prior, probs, efficiency), n <= 20)
        recovered.append(abs(fit.efficiency / efficiency - 1))
        print(f"| {prior}; {probs}; {efficiency:g} | {fit.efficiency:.4g} | "
              + " | ".join(f"{fit.fits[name].rmse_held_out:.4f}" for name in LAWS) + " |")
    emit({"benchmark": "scorecard_table", "planted": rows, "scaling_efficiency_error": max(recovered),
          "bootstrap": args.bootstrap, "seconds": round(time.perf_counter() - start, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
