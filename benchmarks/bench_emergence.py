"""When does a model become Bayesian: the documented series (docs/emergence.md) trained, compared and timed.

Run: python benchmarks/bench_emergence.py [--work DIR] [--reuse] [--skip-baselines] [--repeats R]

1. Train, through the CLI as the doc does, the coin control (configs/control/coin.toml) at 4 sizes, saved at 8
   steps each:  llmprobe wind-tunnel configs/control/coin.toml --layers 1,4 --hidden 16,64 --steps 560
   --save-every 80 -o WORK/series   (wall and CPU time).
2. Compare the 32 checkpoints and the default SmolLM2 on the experiment's own 90 prompts:
   llmprobe compare WORK/series default --prompts WORK/coin.jsonl -o WORK/compare.parquet, then plot-compare.
   --reuse keeps an existing WORK/series and WORK/compare.parquet (steps 1-2 then say so and are not timed).
3. Check the known answers (issue 23): the untrained step-0 checkpoints are not consistent; the last checkpoint of
   the default-size control (4 layers x 64) is; KL(Bayes‖model) under the true prior falls at least tenfold
   from the first to the last checkpoint of every size.
4. Overhead of ``compare`` against the same models one by one (on a subset, every 4th checkpoint, so the runs stay
   minutes; SmolLM2's own trace would be the same work in both), alternated A B B A ... (--repeats R of each) on
   the shared machine, medians and minima:
   * in-process, one by one: per model ``load_model`` + its own TraceRun (tokenizing again) + ``fit_posterior``:
     the same library work without compare's sharing and bookkeeping (goal: compare <= 1.10 x this);
   * command line, one by one: ``llmprobe trace`` + ``llmprobe fit-posterior`` per model, as a user would without
     compare (each a fresh process: imports, load, tokenization), once.
5. Per-step training cost with and without --save-every (the 1 x 16 size, 560 steps, alternated, --repeats R of
   each): training seconds exclude saving (the goal: the same per-step cost), the whole command includes it.

Goal: steps 1-2 together <= 20 minutes on 2 CPU cores. The machine may be shared: the load average is printed.
Ends with one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LLMPROBE_CACHE", "/tmp/lpcache")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI sets it (llmprobe/cli/app.py): threaded BLAS slows fits
CONFIG = ROOT / "configs" / "control" / "coin.toml"
SERIES = ["--layers", "1,4", "--hidden", "16,64", "--steps", "560", "--save-every", "80"]
DEFAULT_SIZE = "L4-H64"  # the default control's size


def llmprobe(*args: str) -> tuple[float, str]:
    """Run the CLI as a user would: (wall seconds, stdout); stderr passes through."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "llmprobe", *args], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          stdout=subprocess.PIPE, text=True, check=True)
    return time.perf_counter() - started, done.stdout


def cpu_children() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def load() -> float:
    return os.getloadavg()[0]


def one_by_one_in_process(models: list[str], prompts: str, prior: str) -> tuple[float, float]:
    """Each model as its own job in this process: load, trace (its own tokenization), fit; (wall, CPU) seconds."""
    from llmprobe.analysis.fits import fit_posterior, posterior_marks
    from llmprobe.model.loading import load_model
    from llmprobe.tracing.prompts import read_prompts
    from llmprobe.tracing.reader import Trace
    from llmprobe.tracing.run import TraceRun, release_device_memory
    from llmprobe.tracing.settings import TraceSettings

    started, cpu = time.perf_counter(), time.process_time()
    for spec in models:
        loaded = load_model(None if spec == "default" else spec, device="cpu", dtype="float32")
        run = TraceRun(TraceSettings(), read_prompts(prompts), {"command": "bench"}).start(loaded)
        trace = Trace(run.table(), run.metadata(), run.vocab, spec)
        fit_posterior(posterior_marks(trace), prior)
        del loaded, run, trace
        release_device_memory()
    return time.perf_counter() - started, time.process_time() - cpu


def compare_in_process(models: list[str], prompts: str, prior: str) -> tuple[float, float]:
    """The same models through ``compare``'s library path; (wall, CPU) seconds."""
    from llmprobe.compare import Comparison, expand_models, run_comparison
    from llmprobe.analysis.fit_options import PosteriorOptions
    from llmprobe.model.loading import ModelOptions
    from llmprobe.progress import SILENT
    from llmprobe.tracing.prompts import read_prompts
    from llmprobe.tracing.settings import TraceSettings

    started, cpu = time.perf_counter(), time.process_time()
    comparison = Comparison(expand_models(models), read_prompts(prompts), prompts, TraceSettings(),
                            PosteriorOptions(prior), ModelOptions(device="cpu", dtype="float32"), "bench")
    run_comparison(comparison, None, SILENT)
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "out" / "emergence"), help="where everything is written")
    parser.add_argument("--reuse", action="store_true", help="keep an existing WORK/series")
    parser.add_argument("--skip-baselines", action="store_true", help="only steps 1-3")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side in steps 4 and 5")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    series, prompts, table = work / "series", work / "coin.jsonl", work / "compare.parquet"
    result: dict = {"load_before": load()}
    print(f"machine: {os.cpu_count()} cores, load average {load():.2f}", flush=True)

    reuse = args.reuse and series.exists() and table.exists()
    if reuse:
        print(f"reusing {series} and {table}: training and compare not timed in this run", flush=True)
    else:
        cpu = cpu_children()
        result["train_seconds"], _ = llmprobe("wind-tunnel", str(CONFIG), *SERIES, "-o", str(series), "--force", "-q")
        result["train_cpu_seconds"] = cpu_children() - cpu
        llmprobe("experiment", str(CONFIG), "-o", str(prompts), "--force", "-q")
        cpu = cpu_children()
        result["compare_seconds"], _ = llmprobe("compare", str(series), "default", "--prompts", str(prompts), "-o",
                                                str(table), "--force", "-q")
        result["compare_cpu_seconds"] = cpu_children() - cpu
        llmprobe("plot-compare", str(table), "-o", str(work / "emergence.png"), "--force", "-q")
        result["load_after_compare"] = load()

    import pandas as pd

    from llmprobe.analysis.comparison import read_comparison, turning_points

    pd.set_option("display.width", 250)

    frame = read_comparison(str(table)).frame
    manifest = json.loads((series / "manifest.json").read_text())
    print(frame[["name", "parameters", "verdict", "kl_bits", "kl_best_filter_bits", "gamma", "gamma_low",
                 "gamma_high", "alpha0", "entropy_mae_bits", "mass", "load_seconds", "trace_seconds",
                 "fit_seconds"]].to_string(index=False), flush=True)
    checks = {}
    stepped = frame[frame["series"].notna()]
    checks["step 0 not consistent"] = bool((stepped.loc[stepped["step"] == 0, "verdict"] != "consistent").all())
    last = stepped[stepped["series"] == DEFAULT_SIZE].sort_values("step").iloc[-1]
    checks[f"{DEFAULT_SIZE} last consistent"] = last["verdict"] == "consistent"
    drops = {size: float(rows.sort_values("step")["kl_bits"].iloc[0] / rows.sort_values("step")["kl_bits"].iloc[-1])
             for size, rows in stepped.groupby("series")}
    checks["KL falls >= 10x in every size"] = all(d >= 10 for d in drops.values())
    result.update(checks=checks, kl_drop=drops, turns=[asdict(t) for t in turning_points(frame)],
                  sizes={s["name"]: {"parameters": s["parameters"], "train_seconds": s["train_seconds"],
                                     "train_cpu_seconds": s["train_cpu_seconds"]} for s in manifest["sizes"]})
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}", flush=True)
    print("KL(Bayes‖model) first/last checkpoint:", {k: f"{v:.0f}x" for k, v in drops.items()})
    print("turns consistent:", [(t.group, t.step) for t in turning_points(frame)], flush=True)
    if not reuse:
        total = result["train_seconds"] + result["compare_seconds"]
        print(f"train {result['train_seconds']:.0f} s wall ({result['train_cpu_seconds']:.0f} CPU-s), compare"
              f" {result['compare_seconds']:.0f} s wall ({result['compare_cpu_seconds']:.0f} CPU-s); total"
              f" {total / 60:.1f} min (goal <= 20)", flush=True)

    if not args.skip_baselines:
        prior = frame["prior"].iloc[0]  # the controls' training prior, as compare resolved it
        subset = [m for i, m in enumerate(frame.loc[frame["series"].notna(), "model"]) if i % 4 == 3]
        print(f"overhead on {len(subset)} models: {', '.join(subset)}", flush=True)
        compare_runs, alone_runs = [], []
        for order in ("AB", "BA") * ((args.repeats + 1) // 2):
            for which in order:
                if which == "A":
                    compare_runs.append(compare_in_process(subset, str(prompts), prior))
                else:
                    alone_runs.append(one_by_one_in_process(subset, str(prompts), prior))
        cli = 0.0
        for i, model in enumerate(subset):
            trace = work / f"baseline-{i}.parquet"
            model_args = [] if model == "default" else ["--model", model]
            wall, _ = llmprobe("trace", str(prompts), *model_args, "-o", str(trace), "--force", "-q")
            cli += wall
            wall, _ = llmprobe("fit-posterior", str(trace), "--prior", prior, "--json", "-q")
            cli += wall
        result.update(overhead_models=len(subset), compare_in_process=compare_runs, one_by_one_in_process=alone_runs,
                      one_by_one_cli=cli)
        for kind, i in (("wall", 0), ("cpu", 1)):
            mine, theirs = [r[i] for r in compare_runs], [r[i] for r in alone_runs]
            ratio = statistics.median(mine) / statistics.median(theirs)
            result[f"compare_over_one_by_one_{kind}"] = ratio
            print(f"{kind}: compare {statistics.median(mine):.1f} s (fastest {min(mine):.1f}) vs one by one in-process"
                  f" {statistics.median(theirs):.1f} s (fastest {min(theirs):.1f}): ratio {ratio:.3f}, fastest"
                  f" {min(mine) / min(theirs):.3f} (goal <= 1.10)", flush=True)
        print(f"one by one on the command line (trace + fit-posterior, wall) {cli:.1f} s: compare's ratio"
              f" {statistics.median(r[0] for r in compare_runs) / cli:.3f}", flush=True)

        per_step = {"plain": [], "series": []}
        per_step_cpu = {"plain": [], "series": []}
        commands = {"plain": [], "series": []}
        for order in (("plain", "series"), ("series", "plain")) * ((args.repeats + 1) // 2):
            for kind in order:
                out = work / f"step-cost-{kind}"
                extra = ["--save-every", "80"] if kind == "series" else []
                wall, text = llmprobe("wind-tunnel", str(CONFIG), "--layers", "1", "--hidden", "16", "--steps", "560",
                                      *extra, "-o", str(out), "--force", "--json", "-q")
                document = json.loads(text)
                facts = document["sizes"][0] if kind == "series" else document
                per_step[kind].append(facts["train_seconds"])
                per_step_cpu[kind].append(facts["train_cpu_seconds"])
                commands[kind].append(wall)
        result.update(train_seconds_plain=per_step["plain"], train_seconds_series=per_step["series"],
                      train_cpu_seconds_plain=per_step_cpu["plain"], train_cpu_seconds_series=per_step_cpu["series"],
                      command_seconds_plain=commands["plain"], command_seconds_series=commands["series"])
        print(f"per-step cost (L1-H16, 560 steps): training {statistics.median(per_step['series']):.1f} s (fastest"
              f" {min(per_step['series']):.1f}) with --save-every 80 vs {statistics.median(per_step['plain']):.1f} s"
              f" (fastest {min(per_step['plain']):.1f}) without: ratio"
              f" {statistics.median(per_step['series']) / statistics.median(per_step['plain']):.3f}, fastest"
              f" {min(per_step['series']) / min(per_step['plain']):.3f}; whole command"
              f" {statistics.median(commands['series']):.1f} s vs {statistics.median(commands['plain']):.1f} s; training"
              f" CPU seconds {statistics.median(per_step_cpu['series']):.1f} vs"
              f" {statistics.median(per_step_cpu['plain']):.1f} (ratio"
              f" {statistics.median(per_step_cpu['series']) / statistics.median(per_step_cpu['plain']):.3f})",
              flush=True)
    result["load_after"] = load()
    print("RESULT " + json.dumps(result, default=float))


if __name__ == "__main__":
    main()
