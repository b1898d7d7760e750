"""Benchmark 13: where in the network — the numbers of docs/localize.md, from the sweeps its commands write.

Run: python benchmarks/localize.py [--run] [--out DIR]

With ``--run``, first the shell blocks of docs/localize.md run in order, as written, in a fresh clone of the
committed HEAD (as benchmarks/run_docs.py runs the docs: ``llmprobe`` is this interpreter's), each command
line timed, and the sweeps are read there (the times in the doc add up to 1.7 hours on a loaded machine).
Then, for each model the doc sweeps (the default SmolLM2 on the coin experiment; the wind-tunnel control; the
mixture control), from ``DIR/localize-*.parquet`` (read with :func:`llmprobe.analysis.ablation.open_sweep`):

* the un-ablated verdict and KL(Bayes‖model);
* the five components whose ablation moves KL(Bayes‖model) most (heads, attention and MLP outputs, blocks
  together), with γ, the verdict, and every component whose ablation flips the verdict;
* attention against MLP: per layer, the change when the attention output or the MLP output is ablated;
* directions: per layer, the top principal components' change against the random directions' largest.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from _common import ROOT, emit, machine

from llmprobe.analysis.ablation import open_sweep

MODELS = {"SmolLM2 on the coin experiment": "localize", "wind-tunnel control (one Dirichlet prior)": "localize-control",
          "wind-tunnel control (mixture prior)": "localize-mixture"}
KINDS = ("heads", "attn", "mlp", "layers", "directions")


def run_doc(work: Path) -> tuple[Path, list[dict]]:
    """Every command of docs/localize.md's shell blocks, in order, as written, in a fresh clone in ``work`` (as
    benchmarks/run_docs.py runs the docs); the clone and the commands' wall times."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_docs

    clone, env = run_docs.fresh_clone(work)
    timed = []
    for block in run_docs.blocks(clone):
        if block.doc != "docs/localize.md" or block.skip:
            continue
        for command in block.commands():
            start = time.perf_counter()
            subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=clone, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            print(f"  {seconds:7.1f} s  {command}", flush=True)
            timed.append({"command": command, "seconds": round(seconds, 1)})
    return clone, timed


def sweeps_of(out: Path, stem: str) -> dict:
    found = {}
    for kind in KINDS:
        path = out / f"{stem}-{kind}.parquet"
        if path.is_file():
            found[kind] = open_sweep(path)
    return found


def summarize(name: str, sweeps: dict) -> dict:
    base = next(iter(sweeps.values())).baseline
    print(f"\n{name}: un-ablated verdict {base['verdict']}, KL(Bayes‖model) {base['mean_kl_bits']:.4f} bits,"
          f" γ {base['gamma']:.3f} [{base['gamma_ci_low']:.3f}, {base['gamma_ci_high']:.3f}]")
    components = pd.concat([s.frame.iloc[1:] for kind, s in sweeps.items() if kind != "directions"])
    top = components.sort_values("delta_kl_bits", ascending=False, na_position="last").head(5)
    print("  the five components whose ablation moves KL(Bayes‖model) most:")
    for row in top.itertuples():
        print(f"    {row.component:<8} ΔKL {row.delta_kl_bits:+.4f} bits  γ {row.gamma:.3f} [{row.gamma_ci_low:.3f},"
              f" {row.gamma_ci_high:.3f}]  verdict {row.verdict}{' (flipped)' if row.verdict_flipped else ''}")
    flips = components[components["verdict_flipped"]]
    print(f"  verdict flipped by {len(flips)} of {len(components)} components"
          + (": " + ", ".join(f"{r.component} ({r.verdict})" for r in flips.itertuples()) if len(flips) else ""))
    result = {"baseline": {"verdict": base["verdict"], "mean_kl_bits": round(float(base["mean_kl_bits"]), 5)},
              "top": [{"component": r.component, "delta_kl_bits": round(float(r.delta_kl_bits), 5),
                       "verdict": r.verdict} for r in top.itertuples()],
              "flips": [r.component for r in flips.itertuples()]}
    if "attn" in sweeps and "mlp" in sweeps:
        attn = sweeps["attn"].frame.iloc[1:].set_index("layer")["delta_kl_bits"]
        mlp = sweeps["mlp"].frame.iloc[1:].set_index("layer")["delta_kl_bits"]
        print(f"  attention vs MLP output ablated: attention larger in {int((attn > mlp).sum())} of {len(attn)} layers;"
              f" largest attention {int(attn.idxmax())} ({attn.max():+.4f}), largest MLP {int(mlp.idxmax())}"
              f" ({mlp.max():+.4f});"
              f" mean attention {attn.mean():+.4f}, MLP {mlp.mean():+.4f} bits")
        result["attn_vs_mlp"] = {"attn_mean": round(float(attn.mean()), 5), "mlp_mean": round(float(mlp.mean()), 5)}
    if "directions" in sweeps:
        frame = sweeps["directions"].frame.iloc[1:]
        for layer, rows in frame.groupby("layer"):
            real = rows[rows["kind"] == "pca"]
            randoms = rows[rows["kind"] == "random"]["delta_kl_bits"]
            print(f"  after block {int(layer)}: " + ", ".join(f"{r.component.split('.')[1]} {r.delta_kl_bits:+.4f}"
                                                         f" ({r.verdict})" for r in real.itertuples())
                  + f"; {len(randoms)} random directions: |ΔKL| up to {randoms.abs().max():.4f}")
        result["directions"] = {int(layer): {"pca": [round(float(v), 5) for v in rows[rows["kind"] == "pca"]
                                                     ["delta_kl_bits"]],
                                             "random_max_abs": round(float(rows[rows["kind"] == "random"]
                                                                           ["delta_kl_bits"].abs().max()), 5)}
                                for layer, rows in frame.groupby("layer")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true",
                        help="first run docs/localize.md's commands in a fresh clone, timed, and read the sweeps there")
    parser.add_argument("--out", default=str(ROOT / "out"), help="where the doc's commands wrote (default out/)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(f"machine: {machine()}")
    result: dict = {"benchmark": "localize"}
    with tempfile.TemporaryDirectory(prefix="llmprobe-localize-") as work:
        out = Path(args.out)
        if args.run:
            clone, result["commands"] = run_doc(Path(work))
            out = clone / "out"
        for name, stem in MODELS.items():
            sweeps = sweeps_of(out, stem)
            if sweeps:
                result[stem] = summarize(name, sweeps)
            else:
                print(f"\n{name}: no sweeps in {out} ({stem}-*.parquet)")
    emit(result)


if __name__ == "__main__":
    main()
