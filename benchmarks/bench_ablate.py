"""Benchmark 11: ``llmprobe ablate`` (issue 22) against the naive loop, and the known answers on the control.

Run: python benchmarks/bench_ablate.py [--quick] [--layers all|L,L...] [--n-max N] [--sequences S]
                                       [--bootstrap B] [--fit-workers N] [--control DIR]

Part 1, the sweep's cost: a head sweep of the default model (SmolLM2-135M-Instruct, float32, CPU) on
coin prompts (configs/experiments/coin.toml), measured side by side in one run on the same prompts:

* sweep: ``llmprobe ablate PROMPTS --over heads -o`` in-process, the steps of
  :func:`llmprobe.analysis.ablation_run.run_ablation` on the model loaded once (one run, the baseline
  pass, per head blocks >= L rerun on the cached residual stream and the output head applied at the marks
  only, each head's fit, its row committed to a work directory; the table merged and written);
* naive: per head, ``trace --ablate L.H`` then ``fit-posterior`` as in-process calls of the same pipeline
  (a :class:`~llmprobe.tracing.run.TraceRun` with the intervention — prompts encoded, every position traced
  and written as Parquet — read back and fitted with the scorecard, as the command does), on the same model.

The two alternate layer by layer (sweep then naive, naive then sweep, ...), so load from other jobs on a
shared machine falls on both alike; wall and CPU seconds are summed per side.

Both give one row per head; the rows' numbers (KL, KL(model‖filter), γ and its interval, α0, mass,
entropy, top-1 agreement) must agree within 1e-4 (α0 relative) and the verdicts must match. The ratio
sweep / naive is the goal (<= 0.6); the fits' share is printed too (the sweep leaves out only the
scorecard; the rest of a fit costs both sides the same).

* peers (:data:`PEER_SWEEPS`, when installed: ``pip install -e '.[peers]'`` in a virtual environment of its own):
  the same head sweep written with nnsight and with TransformerLens, each tool's documented way of ablating a
  head — nnsight: ``TransformersModel(model).trace(inputs)`` with head H's columns of ``o_proj``'s input set
  to zero and ``lm_head.output`` saved; TransformerLens: ``TransformerBridge.boot_transformers`` on the same
  checkpoint directory (its own copy of the weights, eager attention as it forces) and ``run_with_hooks`` zeroing
  head H of ``blocks.L.attn.hook_z`` — a full forward per head and batch with the logits at every position. Both
  get the sweep's own batches (the same left-padded inputs) and scored rows, reduce the logits at those rows
  (target log-probabilities, entropy, top-1) and hand them to the same fit in the same worker pool
  (:func:`~llmprobe.analysis.ablation_run.score_components`), so only the model part differs. They take turns with
  the sweep and the naive loop layer by layer; a peer that cannot run says why.

Part 2, ``--control DIR`` (a wind-tunnel control, ``llmprobe wind-tunnel configs/control/coin.toml -o DIR``):
the known answers that need a trained Bayesian model, on its own experiment's prompts —

* the un-ablated control: verdict consistent;
* every attention output ablated (``--ablate L.attn`` for every L): no position reads another, so the
  predictions at marks ending in the same token are identical (<= 1e-6) whatever the counts, and the
  verdict is neither consistent nor rejected;
* ``ablate --over heads``: the heads whose ablation moves the fit most;
* ``ablate --over directions --directions pca:1@L --random-controls 8`` at each layer: the top principal
  component's change of KL against the random directions' spread.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Callable, Iterator

import _common  # noqa: F401  (sets LLMPROBE_CACHE)

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI does (llmprobe/cli/app.py), before numpy loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a shared CPU: no spinning threads (docs/performance.md)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from _common import ROOT, emit, machine

from llmprobe.analysis.ablation import (
    SWEEP_SCHEMA,
    SweepOptions,
    component_row,
    finished_table,
    fit_marks,
    rows_table,
    sweep_components,
    sweep_of,
)
from llmprobe.analysis.ablation_run import (
    default_fit_workers,
    fit_pool,
    make_engine,
    run_ablation,
    score_component,
    score_components,
)
from llmprobe.analysis.fit_options import PosteriorOptions
from llmprobe.analysis.fits import fit_posterior, posterior_marks
from llmprobe.experiments import generate, load_experiment, write_jsonl
from llmprobe.files import atomic_file
from llmprobe.model.loading import LoadedModel, ModelOptions, load_model
from llmprobe.model.structure import DecoderBlocks
from llmprobe.progress import SILENT
from llmprobe.tracing.checkpoint import WorkDir
from llmprobe.tracing.interventions import parse_ablation
from llmprobe.tracing.prompts import read_prompts
from llmprobe.tracing.reader import open_trace
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from llmprobe.tracing.sweep import Component, ComponentScores, SweepEngine
from llmprobe.tracing.targets import scored_positions
from llmprobe.tracing.writer import open_trace_sink

TOLERANCE = 1e-4
COMPARED = ("mean_kl_bits", "kl_model_filter_bits", "gamma", "gamma_ci_low", "gamma_ci_high", "mass",
            "mean_entropy_bits", "top1_agreement")
GAMMA = ("gamma", "gamma_ci_low", "gamma_ci_high")
"""γ and its interval: where a fit is poor (no γ explains the model) its likelihood is flat in γ, and logits that
differ in float32's last digits (another tool's order of operations) can move γ or a bootstrap bound across
[0, 1]; the peers' rows are compared on the other columns and on these apart."""

Forward = Callable[[dict, "Component | None"], torch.Tensor]
"""A peer's forward: (a batch's model inputs, the head to ablate or None) -> logits [B, T, V]."""


class PeerEngine:
    """The sweep's plan (a :class:`~llmprobe.tracing.sweep.SweepEngine`: its batches, scored rows and marks
    table) with a peer tool's forward in place of the sweep's scoring: what
    :func:`~llmprobe.analysis.ablation_run.fit_job` reads of an engine (``scores``, ``marks_table``,
    ``baseline``, ``measured``, ``directions``)."""

    def __init__(self, plan: SweepEngine, forward: Forward) -> None:
        if plan.multi_token:
            raise ValueError("the peers' sweeps score single-token targets only")
        self.plan, self.forward = plan, forward
        self.targets = [ids[0] for ids in plan.tracer.target_tokens]
        self.measured, self.directions = plan.measured, {}
        self.baseline = self._scores(None)

    def scores(self, component: Component) -> ComponentScores:
        return self.baseline if component.kind == "baseline" else self._scores(component)

    def marks_table(self, scores: ComponentScores) -> pa.Table:
        return self.plan.marks_table(scores)

    def _scores(self, component: Component | None) -> ComponentScores:
        targets, entropy, top1 = [], [], []
        for batch in self.plan.batches:
            logits = self.forward(batch.inputs, component)
            width = logits.shape[1]
            for b, e in enumerate(batch.prompts):
                logprobs = torch.log_softmax(logits[b, [width - len(e.ids) + p for p in scored_positions(e)]].float(),
                                             dim=-1)
                targets.append(logprobs[:, self.targets].numpy())
                entropy.append(-(logprobs.exp() * logprobs).sum(-1).numpy())
                top1.append(logprobs.argmax(-1).numpy().astype(np.int32))
        return ComponentScores(np.concatenate(targets).astype(np.float32), np.concatenate(entropy),
                               np.concatenate(top1))


def nnsight_forward(loaded: LoadedModel) -> Forward:
    """nnsight's way: trace the wrapped model, set head H's columns of ``o_proj``'s input to zero, save the logits."""
    import nnsight

    if hasattr(nnsight, "TransformersModel"):  # nnsight >= 0.7; LanguageModel is deprecated there
        wrapped = nnsight.TransformersModel(loaded.model, task="text-generation", tokenizer=loaded.tokenizer)
    else:
        wrapped = nnsight.LanguageModel(loaded.model, tokenizer=loaded.tokenizer)
    width = DecoderBlocks.of(loaded.model).head_dim

    def forward(inputs: dict, component: Component | None) -> torch.Tensor:
        with torch.inference_mode(), wrapped.trace(inputs):
            if component is not None:
                heads = wrapped.model.layers[component.layer].self_attn.o_proj.input
                heads[:, :, component.head * width:(component.head + 1) * width] = 0
            logits = wrapped.lm_head.output.save()
        return logits
    return forward


def transformer_lens_forward(loaded: LoadedModel) -> Forward:
    """TransformerLens's way: a bridge over the same checkpoint, ``run_with_hooks`` zeroing head H of hook_z."""
    import transformer_lens

    if not hasattr(transformer_lens, "TransformerBridge"):
        raise ImportError("TransformerLens < 4 has no TransformerBridge for a local Llama checkpoint",
                          name="transformer_lens")
    bridge = transformer_lens.TransformerBridge.boot_transformers(
        str(loaded.source.path), device="cpu", dtype=torch.float32, tokenizer=loaded.tokenizer)
    bridge.eval()

    def forward(inputs: dict, component: Component | None) -> torch.Tensor:
        hooks = []
        if component is not None:
            def zero_head(z: torch.Tensor, hook) -> torch.Tensor:  # z: [batch, position, head, head_dim]
                z[:, :, component.head] = 0
                return z
            hooks.append((f"blocks.{component.layer}.attn.hook_z", zero_head))
        with torch.inference_mode():
            return bridge.run_with_hooks(inputs["input_ids"], return_type="logits",
                                         attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"],
                                         fwd_hooks=hooks)
    return forward


PEER_SWEEPS: dict[str, Callable[[LoadedModel], Forward]] = {"nnsight": nnsight_forward,
                                                           "TransformerLens": transformer_lens_forward}
"""name -> a builder of the peer's forward on the loaded model (ImportError: not installed). Each runs the sweep's
head sweep as :class:`PeerEngine`, timed beside the sweep, its rows checked against the sweep's."""


def cpu_seconds() -> float:
    """CPU seconds of this process and its children so far (the sweep's fit workers; psutil, which Ray brings,
    sees running children; without it only finished ones count)."""
    try:
        import psutil
    except ImportError:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system
    me = psutil.Process()
    return sum(p.cpu_times().user + p.cpu_times().system for p in [me, *me.children(recursive=True)])


class Clock:
    """Wall and CPU seconds (this process and its children) summed per name over the ``with clock(name):`` blocks."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), cpu_seconds()
        yield
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu_seconds() - cpu


def coin_prompts(n_max: int, sequences: int, directory: Path) -> Path:
    path = directory / "coin.jsonl"
    with open(path, "w") as stream:
        write_jsonl(generate(load_experiment(ROOT / "configs/experiments/coin.toml"), n_max=n_max,
                             sequences=sequences), stream)
    return path


def naive_row(loaded: LoadedModel, records: list, index: int, component, fit: PosteriorOptions, directory: Path,
              ablation: str, baseline: ComponentScores | None) -> tuple[dict, ComponentScores]:
    """``trace --ablate X`` + ``fit-posterior`` of one component, in-process, on the loaded model: its row, and its
    scores at the marks (the baseline's serve the later rows' top-1 agreement)."""
    interventions = [] if component.kind == "baseline" else [parse_ablation(component.name, ablation)]
    run = TraceRun(TraceSettings(interventions=interventions), records).start(loaded)
    path = directory / "naive.parquet"
    with open_trace_sink(str(path), "parquet", run.schema, run.metadata(), run.vocab, replace=True) as sink:
        for batch in run.batches():
            sink.write(batch)
    trace = open_trace(path)
    result = fit_posterior(posterior_marks(trace), **vars(fit))  # with the scorecard, as the command
    marks = trace.table.filter(trace.table.column("mark_index").is_valid())
    marks = marks.sort_by([("prompt_index", "ascending"), ("position", "ascending")])
    scores = ComponentScores(np.zeros((marks.num_rows, 0), np.float32),
                             marks.column("entropy").to_numpy().astype(np.float32),
                             np.array([ids[0] for ids in marks.column("topk_ids").to_pylist()]))
    row = component_row(index, component, scores, baseline or scores, np.ones(marks.num_rows, bool), result)
    return row, scores


def compare(rows: list[dict], reference: list[dict], columns: tuple[str, ...] = COMPARED) -> tuple[float, float, int]:
    """(largest absolute difference of ``columns``, largest relative difference of alpha0, how many verdicts
    differ)."""
    absolute = max(abs(a[k] - b[k]) for a, b in zip(rows, reference) for k in columns
                   if a[k] is not None and b[k] is not None)
    relative = max(abs(a["alpha0"] - b["alpha0"]) / abs(b["alpha0"]) for a, b in zip(rows, reference)
                   if a["alpha0"] is not None and b["alpha0"])
    return absolute, relative, sum(a["verdict"] != b["verdict"] for a, b in zip(rows, reference))


def sweep_part(args, directory: Path) -> dict:
    prompts = coin_prompts(args.n_max, args.sequences, directory)
    records = read_prompts(str(prompts))
    fit = PosteriorOptions(bootstrap=args.bootstrap)
    options = SweepOptions("heads", args.layers)
    loaded = load_model(None, device="cpu", dtype="float32")
    blocks = DecoderBlocks.of(loaded.model)
    components = sweep_components(options, len(blocks), blocks.n_heads)
    print(f"machine: {machine()}")
    print(f"model {loaded.source.label}, float32 on the CPU; {len(records)} coin prompts (n_max {args.n_max},"
          f" {sum(len(r.marks) for r in records)} marks); {len(components) - 1} heads (layers {args.layers});"
          f" fits with {args.bootstrap} bootstrap resamples; the sweep fits in {args.fit_workers} worker process(es)",
          flush=True)
    clock = Clock()
    output = directory / "sweep.parquet"
    with clock("sweep"):  # as run_ablation does it, on the model already loaded: one run, the baseline pass
        run = TraceRun(TraceSettings(top_k=1), records).start(loaded)
        engine = make_engine(run, options, components, SILENT)
        metadata = {**run.metadata(), "sweep": vars(options), "fit": vars(fit)}
        trace_meta = {"model": metadata["model"], "targets": metadata["targets"]}
        work = WorkDir.open(str(output), {"bench": 1}, {})
    sweep_rows: dict[int, dict] = {}
    naive: dict[int, dict] = {}
    baseline = None

    def commit(row: dict) -> None:
        work.commit(rows_table([row]).to_batches()[0], [row["index"]])
        sweep_rows[row["index"]] = row
    with clock("sweep"):  # the baseline is fitted first, in-process, as run_ablation does
        commit(score_component(engine, 0, components[0], fit, trace_meta))
    with clock("naive"):
        naive[0], baseline = naive_row(loaded, records, 0, components[0], fit, directory, options.ablation, None)
    peers, peer_rows, unavailable = {}, {}, {}
    for name, build in PEER_SWEEPS.items():
        try:
            with clock(name):  # the peer's setup (wrapping the model, or booting its own copy) and its baseline
                peers[name] = PeerEngine(engine, build(loaded))
                peer_rows[name] = {0: score_component(peers[name], 0, components[0], fit, trace_meta)}
        except ImportError as exc:
            unavailable[name] = f"not installed ({exc}); pip install -e '.[peers]' in a virtual environment of its own"
        except Exception as exc:  # a peer that installs but cannot run this model: say exactly why
            unavailable[name] = f"cannot run on {loaded.source.label}: {type(exc).__name__}: {exc}"
    layers = sorted({c.layer for c in components[1:]})
    sides = ["sweep", "naive", *peers]
    with fit_pool(args.fit_workers) as pool:
        for turn, layer in enumerate(layers):  # every side takes its turn layer by layer: load falls on all alike
            chunk = [i for i, c in enumerate(components) if c.layer == layer]
            for side in (sides if turn % 2 == 0 else sides[::-1]):
                with clock(side):
                    if side == "sweep":
                        score_components(engine, components, chunk, fit, trace_meta, pool, commit, lambda n: None)
                    elif side == "naive":
                        for index in chunk:
                            naive[index], _ = naive_row(loaded, records, index, components[index], fit, directory,
                                                        options.ablation, baseline)
                    else:
                        rows = peer_rows[side]
                        score_components(peers[side], components, chunk, fit, trace_meta, pool,
                                         lambda row, rows=rows: rows.__setitem__(row["index"], row), lambda n: None)
            print(f"  layer {layer:>2}: " + ", ".join(f"{side} {clock.wall[side]:7.1f} s" for side in sides)
                  + " so far", flush=True)
    with clock("sweep"):
        table = finished_table(list(work.tables(SWEEP_SCHEMA)), metadata)
        with atomic_file(output, "wb") as stream:
            pq.write_table(table, stream)
        work.remove()
    sweep = sweep_of(table)
    ratio, cpu_ratio = (clock.wall["sweep"] / clock.wall["naive"]), clock.cpu["sweep"] / clock.cpu["naive"]
    sweep_list = [sweep_rows[i] for i in range(len(components))]
    absolute, relative, verdicts = compare(sweep_list, [naive[i] for i in range(len(components))])
    print(f"  sweep  {clock.wall['sweep']:8.1f} s wall, {clock.cpu['sweep']:8.1f} s CPU (ablate: one run, blocks >= L"
          " per head, the head at the marks, the fit without the scorecard, a committed row per head)")
    print(f"  naive  {clock.wall['naive']:8.1f} s wall, {clock.cpu['naive']:8.1f} s CPU (trace --ablate + fit-posterior"
          " per head)")
    print(f"  ratio sweep / naive {ratio:.3f} wall, {cpu_ratio:.3f} CPU (goal <= 0.6); rows agree within"
          f" {absolute:.1e} (α0 {relative:.1e} relative), {verdicts} verdict(s) differ (goal: within {TOLERANCE},"
          " none)")
    print(f"  {sweep.headline()}; the five largest changes:")
    for _, row in sweep.components.head(5).iterrows():
        print(f"    {row['component']:<6} ΔKL {row['delta_kl_bits']:+.3f} bits  γ {row['gamma']:.3f}"
              f" [{row['gamma_ci_low']:.3f}, {row['gamma_ci_high']:.3f}]  verdict {row['verdict']}"
              f"  top-1 agreement {row['top1_agreement']:.2f}")
    print(f"  load average at the end: {os.getloadavg()[0]:.1f}")
    fit_seconds = time_fits(records, loaded, fit, components[:4])
    result = {"benchmark": "ablate", "heads": len(components) - 1, "prompts": len(records),
              "sweep_seconds": round(clock.wall["sweep"], 1), "naive_seconds": round(clock.wall["naive"], 1),
              "ratio": round(ratio, 4), "cpu_ratio": round(cpu_ratio, 4), "max_abs_diff": float(f"{absolute:.2e}"),
              "alpha0_rel_diff": float(f"{relative:.2e}"), "verdicts_differ": verdicts}
    print(f"  a head's fit alone (fit-posterior without the scorecard, the sweep's): {fit_seconds:.2f} s median")
    result["fit_seconds"] = round(fit_seconds, 3)
    for name in peers:
        mine = [peer_rows[name][i] for i in range(len(components))]
        absolute, relative, verdicts = compare(mine, sweep_list, tuple(c for c in COMPARED if c not in GAMMA))
        gamma_diff, _, _ = compare(mine, sweep_list, GAMMA)
        peer_ratio = clock.wall["sweep"] / clock.wall[name]
        print(f"  {name:<16} {clock.wall[name]:8.1f} s wall, {clock.cpu[name]:8.1f} s CPU; sweep / {name}"
              f" {peer_ratio:.3f} wall (goal <= 1/1.5 = 0.667); KL, KL(model‖filter), mass, entropy and top-1 within"
              f" {absolute:.1e} of the sweep's, γ and its interval within {gamma_diff:.1e}, α0 {relative:.1e}"
              f" relative; {verdicts} verdict(s) differ")
        result.setdefault("peers", {})[name] = {
            "seconds": round(clock.wall[name], 1), "cpu_seconds": round(clock.cpu[name], 1),
            "sweep_over_peer": round(peer_ratio, 4), "max_abs_diff": float(f"{absolute:.2e}"),
            "gamma_abs_diff": float(f"{gamma_diff:.2e}"), "alpha0_rel_diff": float(f"{relative:.2e}"),
            "verdicts_differ": verdicts}
    for name, why in unavailable.items():
        print(f"  {name:<16} {why}")
        result.setdefault("peers", {})[name] = {"unavailable": why}
    return result


def time_fits(records: list, loaded: LoadedModel, fit: PosteriorOptions, components: list) -> float:
    """The median time of one component's fit as the sweep does it (its marks from a plain run)."""
    from llmprobe.tracing.sweep import SweepEngine

    engine = SweepEngine(TraceRun(TraceSettings(top_k=1), records).start(loaded))
    meta = {"model": "bench", "targets": [{"text": t} for t in engine.run.settings.targets]}
    seconds = []
    for component in components:
        table = engine.marks_table(engine.scores(component))
        start = time.perf_counter()
        fit_marks(table, meta, "bench", fit)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def control_part(control: str, args, directory: Path) -> dict:
    """The known answers on a trained wind-tunnel control (see the module docstring)."""
    config = load_experiment(ROOT / "configs/control/coin.toml")
    prompts = directory / "control.jsonl"
    with open(prompts, "w") as stream:
        write_jsonl(generate(config, sequences=args.control_sequences), stream)
    records = read_prompts(str(prompts))
    loaded = load_model(control, device="cpu", dtype="float32")
    blocks = DecoderBlocks.of(loaded.model)
    fit = PosteriorOptions(bootstrap=args.bootstrap)
    print(f"control {control}: {len(blocks)} layers x {blocks.n_heads} heads; {len(records)} prompts,"
          f" {sum(len(r.marks) for r in records)} marks", flush=True)
    found: dict = {}
    for name, interventions in (("un-ablated", []),
                                ("every attention output ablated", [parse_ablation(f"{layer}.attn")
                                                                    for layer in range(len(blocks))])):
        run = TraceRun(TraceSettings(top_k=1, interventions=interventions), records).start(loaded)
        path = directory / "control.parquet"
        with open_trace_sink(str(path), "parquet", run.schema, run.metadata(), run.vocab, replace=True) as sink:
            for batch in run.batches():
                sink.write(batch)
        trace = open_trace(path)
        result = fit_posterior(posterior_marks(trace), **vars(fit), scorecard=False)
        marks = trace.table.filter(trace.table.column("mark_index").is_valid())
        spread = 0.0
        by_token: dict[int, list] = {}
        tokens, scores = marks.column("token_id").to_pylist(), marks.column("target_seq_logprobs").to_pylist()
        for token, logprobs in zip(tokens, scores):
            by_token.setdefault(token, []).append(logprobs)
        for values in by_token.values():
            values = np.asarray(values)
            spread = max(spread, float(np.abs(values - values[0]).max()))
        print(f"  {name:<32} verdict {result.verdict:<12} KL(Bayes‖model) {result.distances.mean_kl_bits:.4f} bits;"
              f" marks ending in the same token differ by up to {spread:.1e}")
        found[name] = {"verdict": result.verdict, "mean_kl_bits": result.distances.mean_kl_bits, "spread": spread}
    heads = run_ablation(str(prompts), None, SweepOptions("heads"), fit, TraceSettings(top_k=1),
                         ModelOptions(control, "cpu", "float32"), SILENT, command="bench_ablate --control")
    print(f"  head sweep: {heads.headline()}")
    for _, row in heads.components.head(3).iterrows():
        print(f"    {row['component']:<5} verdict {row['verdict']:<12} γ {row['gamma']:.3f} [{row['gamma_ci_low']:.3f},"
              f" {row['gamma_ci_high']:.3f}]  ΔKL {row['delta_kl_bits']:+.4f} bits")
    found["heads"] = heads.components.head(3)[["component", "verdict", "gamma", "delta_kl_bits"]].to_dict("records")
    directions = []
    for layer in range(len(blocks)):
        options = SweepOptions("directions", directions=(f"pca:1@{layer}",), random_controls=args.random_controls)
        sweep = run_ablation(str(prompts), None, options, fit, TraceSettings(top_k=1),
                             ModelOptions(control, "cpu", "float32"), SILENT, command="bench_ablate --control")
        frame = sweep.frame.set_index("component")
        top = float(frame.loc[f"{layer}.pc1", "delta_kl_bits"])
        randoms = frame[frame["kind"] == "random"]["delta_kl_bits"].abs()
        print(f"  after block {layer}: pc1 ΔKL {top:+.4f} bits; {len(randoms)} random directions |ΔKL| up to"
              f" {randoms.max():.4f} (median {randoms.median():.4f})", flush=True)
        directions.append({"layer": layer, "pc1_delta_kl": top, "random_max_abs": float(randoms.max())})
    found["directions"] = directions
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 layers (0, 15, 29), 50 bootstrap resamples")
    parser.add_argument("--layers", default=None, help="layers swept (default all; quick 0,15,29)")
    parser.add_argument("--n-max", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=1, help="coin sequences per theta (11 thetas)")
    parser.add_argument("--bootstrap", type=int, default=None, help="fit bootstrap resamples (default 200, quick 50)")
    parser.add_argument("--fit-workers", type=int, default=default_fit_workers(),
                        help="the sweep's fit processes (default: half the CPUs; 0: fits in the main process)")
    parser.add_argument("--control", metavar="DIR", help="also the known answers on a wind-tunnel control")
    parser.add_argument("--control-sequences", type=int, default=2, help="coin sequences per theta for the control")
    parser.add_argument("--random-controls", type=int, default=8)
    parser.add_argument("--control-only", action="store_true", help="skip part 1")
    args = parser.parse_args()
    args.layers = args.layers or ("0,15,29" if args.quick else "all")
    args.bootstrap = args.bootstrap or (50 if args.quick else 200)
    result: dict = {"benchmark": "ablate"}
    with tempfile.TemporaryDirectory(prefix="bench-ablate-") as temp:
        if not args.control_only:
            result = sweep_part(args, Path(temp))
        if args.control:
            result["control"] = control_part(args.control, args, Path(temp))
    emit(json.loads(json.dumps(result, default=float)))


if __name__ == "__main__":
    main()
