"""A comparison's rows: one model's Bayesian numbers (:class:`ComparisonRow`), measured from a started trace
run (:func:`measure`), and the comparison table written by ``llmprobe compare`` and read by plot-compare and
the report (:func:`read_comparison`, :func:`turning_points`).

:func:`measure` traces one model and fits it by :func:`llmprobe.analysis.fits.fit_posterior` with the
comparison's options, exactly as ``fit-posterior`` fits a trace file (so a comparison of one model gives
``trace`` + ``fit-posterior``'s numbers), and reduces it to one row: verdict, KL(Bayes‖model), KL to the
best filter, γ and its interval, α0, entropy error, mass on the categories; step, layers, width,
parameters. A model that puts almost no mass on the categories (an untrained checkpoint) gets a
:data:`LOW_MASS` row: no fit, no verdict. Running a comparison — models listed, resumable rows, Ray — is
:mod:`llmprobe.compare`'s.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.analysis.fit_options import PosteriorOptions
from llmprobe.analysis.fits import fit_posterior, posterior_marks
from llmprobe.analysis.marks import CategoryMarks
from llmprobe.analysis.priors import reference_prior
from llmprobe.analysis.results import PosteriorResult
from llmprobe.bayes import mixture_posterior_predictive
from llmprobe.bayes.metrics import kl_bits, total_variation
from llmprobe.errors import ParameterError, UsageError
from llmprobe.progress import Reporter
from llmprobe.tracing.reader import Trace
from llmprobe.tracing.run import TraceRun

COMPARISON_FORMAT = "llmprobe.comparison/1"

META_KEY = b"llmprobe.comparison"

LOW_MASS = "low-mass"
"""A row's verdict when too few marks carry ``min_mass`` on the categories to fit anything (an untrained
checkpoint): no verdict, since the model is not predicting a category there."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of a comparison as listed; a series contributes one entry per checkpoint."""

    index: int
    spec: str  # what --model takes: a directory, a .gguf file, or "default"
    name: str  # how rows and figures name it
    series: str | None  # a series checkpoint's size (L2-H32), else None
    step: int | None  # training step, where known (a series, or a control's training.json)
    true_prior: str | None  # a control's prior.json: the prior it was trained under


@dataclass(frozen=True)
class ModelFacts:
    """What a comparison records about a model itself, read from it once loaded."""

    label: str  # the trace metadata's model name
    layers: int | None
    hidden: int | None
    parameters: int
    weights_sha256: str | None


@dataclass(frozen=True)
class ComparisonRow:
    """One model's numbers: the verdict (fit-posterior's, or :data:`LOW_MASS`) and the measures the emergence
    figure draws (the column names of the table).

    ``kl_bits``: mean over marks of KL(Bayes‖model) in bits under ``prior``; ``kl_best_filter_bits``: the mean
    KL(model‖best filter) the verdict reads (the forgetting filter, out of sample where sequences could be held
    out); ``gamma`` and its bootstrap interval; ``alpha0``: the exact-Bayes filter's prior strength;
    ``entropy_mae_bits``: mean |entropy(model) − entropy(Bayes)|; ``mass``: mean probability on the categories."""

    index: int
    name: str
    model: str
    series: str | None
    step: int | None
    layers: int | None
    hidden: int | None
    parameters: int
    verdict: str
    kl_bits: float
    kl_best_filter_bits: float
    gamma: float
    gamma_low: float
    gamma_high: float
    exact_bayes_rejected: bool
    alpha0: float
    entropy_mae_bits: float
    mass: float
    tv: float
    marks: int
    marks_used: int
    prior: str
    weights_sha256: str | None
    load_seconds: float
    trace_seconds: float
    fit_seconds: float

    @classmethod
    def of(cls, entry: ModelEntry, facts: ModelFacts, result: PosteriorResult, prior: str,
           seconds: tuple[float, float, float]) -> ComparisonRow:
        test, distances = result.test, result.distances
        return cls(
            index=entry.index, name=entry.name, model=entry.spec, series=entry.series, step=entry.step,
            layers=facts.layers, hidden=facts.hidden, parameters=facts.parameters, verdict=result.verdict,
            kl_bits=distances.mean_kl_bits, kl_best_filter_bits=result.scores.forgetting.held.kl_bits,
            gamma=float(test.free.gamma), gamma_low=float(test.gamma_ci[0]), gamma_high=float(test.gamma_ci[1]),
            exact_bayes_rejected=bool(test.rejected), alpha0=float(test.exact.alpha0),
            entropy_mae_bits=distances.entropy_mae_bits, mass=distances.mean_mass, tv=distances.mean_tv,
            marks=result.counts.marks, marks_used=result.counts.used, prior=prior,
            weights_sha256=facts.weights_sha256, load_seconds=seconds[0], trace_seconds=seconds[1],
            fit_seconds=seconds[2])

COLUMNS = tuple(f.name for f in fields(ComparisonRow))


@dataclass
class Measured:
    """A model's row, its fit summary (the ``fit-posterior --json`` document) and, when kept, its trace."""

    row: ComparisonRow
    summary: dict[str, Any]
    trace: Trace | None = None


def model_facts(loaded) -> ModelFacts:
    config = loaded.model.config
    return ModelFacts(loaded.source.label, getattr(config, "num_hidden_layers", None),
                      getattr(config, "hidden_size", None), sum(p.numel() for p in loaded.model.parameters()),
                      loaded.source.weights_sha256)


def measure(entry: ModelEntry, run: TraceRun, facts: ModelFacts, options: PosteriorOptions, load_seconds: float,
            reporter: Reporter, keep_trace: bool = False) -> Measured:
    """Trace ``entry`` with its started ``run`` and fit it: ``fit-posterior``'s numbers for its trace (or, when
    too few marks carry ``min_mass`` on the categories to fit, a :data:`LOW_MASS` row)."""
    started = time.perf_counter()
    with reporter.progress(f"{entry.name}: tracing", total=len(run.records)) as advance:
        table = pa.Table.from_batches(list(run.batches(on_prompts_done=advance)), schema=run.schema)
    trace = Trace(table, run.metadata(), run.vocab, entry.name)
    traced = time.perf_counter()
    marks = posterior_marks(trace, facts.label)
    try:
        result = fit_posterior(marks, **asdict(options), reporter=reporter)
    except ParameterError as exc:
        if exc.parameter != "min_mass":
            raise
        reporter.log(f"{entry.name}: {exc.message}; recorded as {LOW_MASS}")
        row, summary = _low_mass(entry, facts, marks, options, (load_seconds, traced - started, 0.0), exc.message)
        return Measured(row, summary, trace if keep_trace else None)
    row = ComparisonRow.of(entry, facts, result, options.prior,
                           (load_seconds, traced - started, time.perf_counter() - traced))
    return Measured(row, result.summary, trace if keep_trace else None)


def _low_mass(entry: ModelEntry, facts: ModelFacts, marks: CategoryMarks, options: PosteriorOptions,
              seconds: tuple[float, float, float], reason: str) -> tuple[ComparisonRow, dict[str, Any]]:
    """The row of a model that puts (almost) no mass on the categories: no fit, no verdict; the mass and, under
    a reference prior, the descriptive KL(Bayes‖model) and TV over every mark (the model renormalized over the
    categories, as fit-posterior averages them)."""
    marks = marks.originals()
    kl = tv = math.nan
    if options.prior != "fit":
        mixture = reference_prior(options.prior, marks.categories).mixture
        bayes = mixture_posterior_predictive(mixture.weights, mixture.alphas, marks.counts)
        kl = float(kl_bits(bayes, marks.probs).mean())
        tv = float(total_variation(bayes, marks.probs).mean())
    mass = float(marks.mass.mean())
    nan = math.nan
    row = ComparisonRow(
        index=entry.index, name=entry.name, model=entry.spec, series=entry.series, step=entry.step,
        layers=facts.layers, hidden=facts.hidden, parameters=facts.parameters, verdict=LOW_MASS, kl_bits=kl,
        kl_best_filter_bits=nan, gamma=nan, gamma_low=nan, gamma_high=nan, exact_bayes_rejected=False, alpha0=nan,
        entropy_mae_bits=nan, mass=mass, tv=tv, marks=len(marks),
        marks_used=int((marks.mass >= options.min_mass).sum()),
        prior=options.prior, weights_sha256=facts.weights_sha256, load_seconds=seconds[0], trace_seconds=seconds[1],
        fit_seconds=seconds[2])
    summary = {"trace": facts.label, "categories": marks.categories, "verdict": LOW_MASS,
               "verdict_sentence": f"no verdict: {reason}", "mean_kl_bits": kl, "mean_tv": tv, "mean_mass": mass}
    return row, summary


def comparison_frame(measured: list[Measured]) -> pd.DataFrame:
    return pd.DataFrame([asdict(m.row) for m in measured], columns=list(COLUMNS))


@dataclass
class ComparisonTable:
    """A comparison read back (``plot-compare``, ``report``): the rows and, from Parquet, the metadata."""

    frame: pd.DataFrame
    meta: dict[str, Any]
    source: str


def is_comparison(path: str | Path) -> bool:
    """Whether ``path`` is a comparison table (a Parquet file carrying the comparison metadata)."""
    try:
        return META_KEY in (pq.read_schema(path).metadata or {})
    except (OSError, pa.ArrowException):
        return False


def read_comparison(source: str) -> ComparisonTable:
    """A ``compare -o`` table (Parquet or CSV); one line naming the file when it is not one."""
    path = Path(source)
    if not path.is_file():
        raise UsageError("no such file", where=source)
    meta: dict[str, Any] = {}
    try:
        if path.read_bytes()[:4] == b"PAR1":
            table = pq.read_table(path)
            raw = (table.schema.metadata or {}).get(META_KEY)
            meta = json.loads(raw) if raw else {}
            frame = table.to_pandas()
        else:
            frame = pd.read_csv(path, dtype={"name": str, "model": str, "series": str, "verdict": str})
    except (OSError, ValueError, pa.ArrowException, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UsageError(f"not a readable comparison table ({str(exc).splitlines()[0]})", where=source) from None
    missing = [c for c in ("name", "step", "parameters", "verdict", "kl_bits") if c not in frame.columns]
    if missing:
        raise UsageError(f"not a comparison table (`llmprobe compare -o`): no {', '.join(missing)} column(s)",
                         where=source)
    if frame.empty:
        raise UsageError("the comparison table has no rows", where=source)
    return ComparisonTable(frame, meta, source)


@dataclass(frozen=True)
class Turn:
    """Where one group of a comparison (a series' size, else one model) becomes consistent: ``step`` is the first
    checkpoint from which every later one is consistent (None: its last is not)."""

    group: str
    parameters: int
    step: int | None
    last_step: int | None
    last_verdict: str


def group_of(frame: pd.DataFrame) -> pd.Series:
    """Each row's group: its series' size, else its own name."""
    return frame["series"].where(frame["series"].notna(), frame["name"]).astype(str)


def turning_points(frame: pd.DataFrame) -> list[Turn]:
    """Per group, in the table's order, the step at which the verdict turns consistent (see :class:`Turn`)."""
    turns = []
    for group, rows in frame.assign(_group=group_of(frame)).groupby("_group", sort=False):
        rows = rows.sort_values("step", na_position="first")
        consistent = (rows["verdict"] == "consistent").to_numpy()
        tail = len(consistent)
        while tail and consistent[tail - 1]:
            tail -= 1
        step = rows["step"].iloc[tail] if tail < len(rows) else None
        last = rows.iloc[-1]
        turns.append(Turn(str(group), int(last["parameters"]), None if step is None or pd.isna(step) else int(step),
                          None if pd.isna(last["step"]) else int(last["step"]), str(last["verdict"])))
    return turns
