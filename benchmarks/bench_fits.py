"""Times the prior fits on 100,000 x 50 synthetic distributions, and the filter fits on 100,000 marks.

Run: python benchmarks/bench_fits.py [--rows N] [--categories K] [--marks M] [--repeats R]
Goals (from the issues): fit_dirichlet < 1 s, a 5-component mixture < 10 s; the robust free filter
fit (fit_bayes: the gamma profile plus refinement) on 100,000 marks < 10 s, and its baseline, the
single gamma = 1 fit, is timed beside it. Prints the median of
``repeats`` runs; ratio = seconds / goal, so < 1 meets the goal. On small shared machines set
OPENBLAS_NUM_THREADS=1: BLAS threads fighting over two cores inflate and scatter the timings.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from llmprobe.bayes import (
    bootstrap_exact_bayes,
    discounted_counts,
    fit_bayes,
    fit_dirichlet,
    fit_dirichlet_mixture,
    posterior_predictive,
)

N_COMPONENTS = 5


def synthetic_mixture(rows: int, categories: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows from a 5-component Dirichlet mixture with random alphas; returns (probs, true alphas)."""
    rng = np.random.default_rng(seed)
    alphas = rng.gamma(1.0, 10.0, size=(N_COMPONENTS, categories)) + 0.1
    labels = rng.integers(0, N_COMPONENTS, size=rows)
    gammas = rng.gamma(alphas[labels])
    return gammas / gammas.sum(axis=1, keepdims=True), alphas


def forgetting_marks(marks: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A gamma = 0.88 filter's noisy predictions on 3 categories at ``marks`` marks (sequences of 20 outcomes)."""
    rng = np.random.default_rng(seed)
    alpha, length = np.array([2.0, 5.0, 1.5]), 19
    n_sequences = marks // (length + 1)
    thetas = rng.dirichlet(alpha, size=n_sequences)
    below = rng.random((n_sequences, length, 1)) > np.cumsum(thetas, axis=1)[:, None, :]
    outcomes = np.minimum(below.sum(axis=2), 2)
    q = posterior_predictive(alpha, discounted_counts(outcomes, 0.88, 3)).reshape(-1, 3)
    draws = rng.gamma(200.0 * q)
    sequence = np.repeat(np.arange(n_sequences), length + 1)
    position = np.tile(np.arange(length + 1), n_sequences)
    return draws / draws.sum(axis=1, keepdims=True), outcomes, sequence, position


def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--categories", type=int, default=50)
    parser.add_argument("--marks", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resamples", type=int, default=5, help="bootstrap resamples timed on the marks")
    args = parser.parse_args()

    probs, _ = synthetic_mixture(args.rows, args.categories, seed=0)
    single_rows = np.random.default_rng(1).dirichlet(np.linspace(0.2, 5.0, args.categories), size=args.rows)
    cases = [
        ("fit_dirichlet", 1.0, lambda: fit_dirichlet(single_rows)),
        (f"fit_dirichlet_mixture (K={N_COMPONENTS})", 10.0, lambda: fit_dirichlet_mixture(probs, N_COMPONENTS, seed=0)),
    ]
    print(f"{args.rows:,} rows x {args.categories} categories, median of {args.repeats}")
    print(f"{'fit':<32} {'seconds':>8} {'goal s':>7} {'ratio':>6}  {'iterations':>10}  converged")
    for name, goal, run in cases:
        seconds, fit = median_seconds(run, args.repeats)
        print(f"{name:<32} {seconds:>8.3f} {goal:>7.1f} {seconds / goal:>6.2f}  {fit.iterations:>10}  {fit.converged}")

    data = forgetting_marks(args.marks, seed=2)
    print(f"\n{data[0].shape[0]:,} marks x 3 categories ({data[2].max() + 1:,} sequences), median of {args.repeats}")
    print(f"{'fit':<32} {'seconds':>8} {'goal s':>7} {'ratio':>6}  {'vs γ=1':>10}  gamma")
    exact_seconds, _ = median_seconds(lambda: fit_bayes(*data, gamma=1.0), args.repeats)
    robust_seconds, free = median_seconds(lambda: fit_bayes(*data), args.repeats)
    for name, seconds, gamma in (("fit_bayes γ = 1 (one L-BFGS-B)", exact_seconds, 1.0),
                                 ("fit_bayes free γ (robust)", robust_seconds, free.gamma)):
        print(f"{name:<32} {seconds:>8.3f} {10.0:>7.1f} {seconds / 10.0:>6.2f}  {seconds / exact_seconds:>10.1f}"
              f"  {gamma:.4f}")
    start = time.perf_counter()
    bootstrap_exact_bayes(*data, n_bootstrap=args.resamples, seed=0)
    per_resample = (time.perf_counter() - start - robust_seconds) / args.resamples
    print(f"{'bootstrap, per resample':<32} {per_resample:>8.3f} {'':>7} {'':>6}  {per_resample / exact_seconds:>10.1f}"
          "  (each reruns the robust fit)")


if __name__ == "__main__":
    main()
