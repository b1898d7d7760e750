"""Builders shared by the figure and report tests: traces, fit tables and priors with known content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.plots.icl import FIT_COLUMNS
from llmprobe.tracing.run import TraceRun
from llmprobe.tracing.settings import TraceSettings
from llmprobe.tracing.prompts import PromptRecord, read_prompts
from llmprobe.tracing.writer import open_trace_sink


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


TEXTS = ["The capital of France is", "I just flipped a coin, and it came up heads, then"]


def write_trace(loaded, path: Path, records: list[PromptRecord], top_k: int = 8, targets=(),
                max_new_tokens: int = 0, interventions=()) -> Path:
    """A trace file exactly as ``llmprobe trace`` writes it (TraceRun -> atomic Parquet sink)."""
    settings = TraceSettings(top_k=top_k, targets=list(targets), max_new_tokens=max_new_tokens,
                             interventions=list(interventions))
    run = TraceRun(settings, records, {"command": "test"}).start(loaded)
    with open_trace_sink(str(path), "parquet", run.schema, run.metadata(), run.vocab) as sink:
        for batch in run.batches():
            sink.write(batch)
    return path


def text_records(texts=TEXTS) -> list[PromptRecord]:
    return [PromptRecord(index=i, id=f"p{i}", text=t, line=i + 1) for i, t in enumerate(texts)]


def coin_trace(loaded, directory: Path) -> Path:
    """A one-prompt trace (``directory/t.parquet``): what a report needs besides the table under test."""
    return write_trace(loaded, directory / "t.parquet", text_records(["I just flipped a coin"]), top_k=3)


def experiment_records(tmp_path: Path, n_max: int = 4, sequences: int = 1) -> list[PromptRecord]:
    from llmprobe.experiments import generate, load_experiment, write_jsonl

    experiment = load_experiment(Path(__file__).resolve().parents[2] / "configs/experiments/coin.toml")
    path = tmp_path / "coin.jsonl"
    with path.open("w") as handle:
        write_jsonl(generate(experiment, seed=3, n_max=n_max, sequences=sequences, layout=None), handle)
    return read_prompts(str(path), "auto")


def synthetic_fit(thetas, sequences=3, n_max=6, categories=("heads", "tails"), trace="synthetic",
                  seed=0) -> pd.DataFrame:
    """A fit-posterior table in the documented long format, from a uniform-prior Bayes learner plus noise."""
    rng = np.random.default_rng(seed)
    k = len(categories)
    alpha = np.ones(k)
    rows, seq = [], 0
    for theta in thetas:
        for _ in range(sequences):
            outcomes = rng.choice(k, size=n_max, p=theta)
            counts = np.zeros(k)
            for n in range(n_max + 1):
                bayes = (alpha + counts) / (alpha.sum() + n)
                model = bayes * np.exp(rng.normal(0, 0.3, k))
                model /= model.sum()
                per_mark = {
                    "mass": rng.uniform(0.6, 0.95),
                    "tv": 0.5 * np.abs(model - bayes).sum(),
                    "kl_bits": float((bayes * np.log2(bayes / model)).sum()),
                    "entropy_model_bits": float(-(model * np.log2(model)).sum()),
                    "entropy_bayes_bits": float(-(bayes * np.log2(bayes)).sum()),
                }
                for c in range(k):
                    rows.append({"trace": trace, "prompt_id": f"coin-s{seq:04d}", "sequence": seq, "n": n,
                                 "category": categories[c], "count": int(counts[c]), "theta": float(theta[c]),
                                 "model_prob": model[c], "bayes_prob": bayes[c], **per_mark})
                if n < n_max:
                    counts[outcomes[n]] += 1
            seq += 1
    return pd.DataFrame(rows, columns=list(FIT_COLUMNS))


def write_fit(frame: pd.DataFrame, path: Path, summaries=None) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
        return path
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if summaries is not None:
        table = table.replace_schema_metadata({b"llmprobe.fit": json.dumps(summaries).encode()})
    pq.write_table(table, path)
    return path


def mixture_prior_json(path: Path, weights, alphas, categories) -> Path:
    """A prior in the layout ``llmprobe fit-prior`` writes (format, trace, categories, mixture)."""
    from llmprobe.bayes import MixtureFit

    fit = MixtureFit(np.asarray(weights, float), np.asarray(alphas, float), -1.0, 10.0, 3, True)
    path.write_text(json.dumps({"format": "llmprobe.prior/1", "trace": "synthetic", "categories": list(categories),
                                "mixture": fit.to_dict()}))
    return path


THETAS = [[0.2, 0.8], [0.7, 0.3]]


def comparison_table(path: Path) -> Path:
    """A `compare -o` table with known content: two sizes of a series over steps 0, 10, 20 (L2-H16 turns consistent
    at step 10 and stays; L1-H8 never does) and one model without a step (SmolLM2, poor-fit)."""
    from llmprobe.analysis.comparison import COLUMNS, META_KEY, ComparisonRow
    from llmprobe.analysis.fit_tables import write_table_file

    def row(index: int, name: str, series: str | None, step: int | None, parameters: int, verdict: str,
            kl: float) -> dict:
        fitted = verdict != "low-mass"
        nan = float("nan")
        return vars(ComparisonRow(
            index=index, name=name, model=name, series=series, step=step, layers=1, hidden=8, parameters=parameters,
            verdict=verdict, kl_bits=kl, kl_best_filter_bits=kl / 2 if fitted else nan,
            gamma=0.9 if fitted else nan, gamma_low=0.8 if fitted else nan, gamma_high=1.0 if fitted else nan,
            exact_bayes_rejected=False, alpha0=5.0 if fitted else nan, entropy_mae_bits=kl if fitted else nan,
            mass=0.9 if fitted else 0.01, tv=kl, marks=10, marks_used=10 if fitted else 0, prior="fit",
            weights_sha256=None, load_seconds=0.1, trace_seconds=0.1, fit_seconds=0.1))

    rows = [row(0, "L1-H8@0", "L1-H8", 0, 1000, "low-mass", 0.3),
            row(1, "L1-H8@10", "L1-H8", 10, 1000, "no-updating", 0.1),
            row(2, "L1-H8@20", "L1-H8", 20, 1000, "poor-fit", 0.08),
            row(3, "L2-H16@0", "L2-H16", 0, 5000, "low-mass", 0.3),
            row(4, "L2-H16@10", "L2-H16", 10, 5000, "consistent", 0.01),
            row(5, "L2-H16@20", "L2-H16", 20, 5000, "consistent", 0.001),
            row(6, "SmolLM2-135M-Instruct", None, None, 134_515_008, "poor-fit", 0.7)]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    write_table_file(frame, str(path), False, {META_KEY: json.dumps({"format": "llmprobe.comparison/1"}).encode()})
    return path


def planted_sweep(path: Path, components: list[tuple], model: str = "planted", sha: str = "0" * 64,
                  baseline: tuple = (0.5, "consistent")) -> Path:
    """A sweep table (as ``llmprobe ablate -o`` writes it) whose rows are given: each component as (name, kind,
    layer, head, mean KL bits or None for a no-fit, verdict); the baseline's KL and verdict first. The table's
    own code derives the changes from the baseline and the flips."""
    from llmprobe.analysis.ablation import SWEEP_SCHEMA, finished_table, rows_table

    def row(index, name, kind, layer, head, kl, verdict):
        values = {field: None for field in SWEEP_SCHEMA.names}
        values.update(index=index, component=name, kind=kind, layer=layer, head=head, mean_kl_bits=kl,
                      verdict=verdict, mean_entropy_bits=1.0, top1_agreement=1.0)
        return values
    rows = [row(0, "baseline", "baseline", None, None, *baseline)]
    rows += [row(i + 1, *component) for i, component in enumerate(components)]
    meta = {"model": model, "weights_sha256": sha, "targets": [{"text": " heads"}, {"text": " tails"}],
            "sweep": {"over": "heads", "ablation": "zero"}, "components": [r["component"] for r in rows]}
    pq.write_table(finished_table([rows_table(rows)], meta), path)
    return path
