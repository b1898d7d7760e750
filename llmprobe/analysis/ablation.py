"""``llmprobe ablate``: which component of the network carries the Bayesian updating? (issue 22)

A sweep ablates one component at a time — every attention head, attention output, MLP output or block
of the chosen layers, or directions of the residual stream (the top principal components after block L
over the marks, read against random unit directions at the same layer, as Paper III of the
wind-tunnel series does) — and scores each ablated model as ``fit-posterior`` scores a trace. The
numbers come from :class:`~llmprobe.tracing.sweep.SweepEngine` (one run: the residual stream entering
block L computed once, blocks >= L rerun per component, the head applied at the marks only); each
component's marks go through the same :func:`~llmprobe.analysis.marks.category_marks` and
:func:`~llmprobe.analysis.fits.fit_posterior` as a trace's (with every fit-posterior option, the
scorecard left out), so a row equals ``trace --ablate X`` + ``fit-posterior`` of that trace.

The sweep table (:data:`SWEEP_SCHEMA`; :func:`open_sweep` reads it back): one row per component, the
un-ablated baseline first (``index`` 0, component ``baseline``):

* what: ``component`` (``3.1``, ``3.attn``, ``3.mlp``, ``3``, ``3.pc1``, ``3.random2``), ``kind`` (baseline,
  head, attn, mlp, block, pca, random), ``layer``, ``head``; ``direction``: a direction's unit vector
  (pca and random rows; ``trace --ablate-direction`` takes it saved as a ``.npy``);
* the fit: ``mean_kl_bits`` (mean KL(Bayes‖model) over every mark, Bayes under the ``--prior``
  reference, as fit-posterior's mean) and ``delta_kl_bits`` (its change from the baseline's);
  ``kl_model_filter_bits`` (KL(model‖best filter), the forgetting filter scored out of sample when
  sequences could be held out); ``gamma`` with ``gamma_ci_low``/``gamma_ci_high``; ``alpha0`` (the
  exact-Bayes fit's prior strength) and ``alpha0_forgetting``; ``exact_bayes_rejected``; ``verdict`` and
  ``verdict_flipped`` (differs from the baseline's); ``mass`` (mean probability on the categories);
  ``n_marks_used``;
* the distributions at the marks: ``mean_entropy_bits`` and ``delta_entropy_bits`` (full next-token
  entropy), ``top1_agreement`` (fraction of marks whose most probable next token is the baseline's);
* ``fit_error``: why a component could not be fitted (its verdict is then ``no-fit``, its numbers null);
  the baseline must fit, or the sweep stops before its first component.

The file's key-value metadata (:data:`SWEEP_META_KEY`, JSON): the run's trace metadata (model, its
weights' sha256, the trace settings, the targets, versions), ``sweep`` (the options), ``fit`` (every
fit-posterior option), ``components`` (their names, in order) and ``baseline`` (its verdict and sentence).
This module reads and builds the table; :mod:`llmprobe.analysis.ablation_run` runs a sweep.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.analysis.fit_options import PosteriorOptions
from llmprobe.analysis.fits import fit_posterior, posterior_marks
from llmprobe.analysis.results import PosteriorResult
from llmprobe.bayes.filter import LN2
from llmprobe.errors import ParameterError, UsageError
from llmprobe.tracing.reader import Trace

if TYPE_CHECKING:
    from llmprobe.tracing.sweep import Component, ComponentScores

OVER_CHOICES = ("heads", "layers", "attn", "mlp", "directions")
KIND_OF_OVER = {"heads": "head", "layers": "block", "attn": "attn", "mlp": "mlp"}
ABLATIONS = ("zero", "mean")
SWEEP_FORMAT = "llmprobe.sweep/1"
SWEEP_META_KEY = b"llmprobe.sweep"
NO_FIT = "no-fit"

SWEEP_SCHEMA = pa.schema([
    pa.field("index", pa.int32(), nullable=False),
    pa.field("component", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("layer", pa.int16()),
    pa.field("head", pa.int16()),
    pa.field("mean_kl_bits", pa.float64()),
    pa.field("delta_kl_bits", pa.float64()),
    pa.field("kl_model_filter_bits", pa.float64()),
    pa.field("gamma", pa.float64()),
    pa.field("gamma_ci_low", pa.float64()),
    pa.field("gamma_ci_high", pa.float64()),
    pa.field("alpha0", pa.float64()),
    pa.field("alpha0_forgetting", pa.float64()),
    pa.field("exact_bayes_rejected", pa.bool_()),
    pa.field("verdict", pa.string(), nullable=False),
    pa.field("verdict_flipped", pa.bool_()),
    pa.field("mass", pa.float64()),
    pa.field("n_marks_used", pa.int32()),
    pa.field("mean_entropy_bits", pa.float64()),
    pa.field("delta_entropy_bits", pa.float64()),
    pa.field("top1_agreement", pa.float64()),
    pa.field("fit_error", pa.string()),
    pa.field("direction", pa.list_(pa.float64())),
])
DERIVED = ("delta_kl_bits", "verdict_flipped", "delta_entropy_bits")  # from the baseline row, when the rows are merged


@dataclass(frozen=True)
class SweepOptions:
    """What a sweep ablates, checked when built (errors name the parameter; the CLI shows its flag).

    ``over``: heads, layers (whole blocks), attn, mlp or directions; ``layers``: the layers swept
    (``all``, the default, or ``0,4,8``); ``ablation``: zero or mean (each activation's mean over the
    run's positions); ``directions``: ``pca:K@L`` specs (the top K principal components after block L),
    needed by and only with ``over="directions"``; ``random_controls``: random unit directions per
    direction layer, drawn from a generator seeded by (``seed``, layer)."""

    over: str
    layers: str | None = None
    ablation: str = "zero"
    directions: tuple[str, ...] = ()
    random_controls: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        from llmprobe.tracing.lens import parse_layers

        if self.over not in OVER_CHOICES:
            raise ParameterError("over", f"expected {', '.join(OVER_CHOICES)}, got {self.over!r}")
        if self.ablation not in ABLATIONS:
            raise ParameterError("ablation", f"expected zero or mean, got {self.ablation!r}")
        if self.random_controls < 0:
            raise ParameterError("random_controls", f"must be 0 or more, got {self.random_controls}")
        if self.over == "directions":
            if not self.directions:
                raise ParameterError("directions", "--over directions needs --directions pca:K@L (the top K principal"
                                                   " components of the residual stream after block L)")
            if self.layers is not None:
                raise ParameterError("layers", "--over directions takes its layers from --directions pca:K@L")
            self.direction_layers()
        else:
            if self.directions:
                raise ParameterError("directions", "only applies with --over directions")
            if self.random_controls:
                raise ParameterError("random_controls", "only applies with --over directions")
            if self.layers is not None:
                parse_layers(self.layers, None)

    def direction_layers(self) -> dict[int, int]:
        """{layer: K} of the ``pca:K@L`` specs."""
        found: dict[int, int] = {}
        for spec in self.directions:
            kind, _, rest = spec.partition(":")
            count, at, layer = rest.partition("@")
            try:
                count_value, layer_value = int(count), int(layer)
            except ValueError:
                count_value = layer_value = -1
            if kind != "pca" or not at or count_value < 1 or layer_value < 0:
                raise ParameterError("directions", f"expected pca:K@L (K >= 1 components after 0-based block L),"
                                                   f" got {spec!r}")
            if layer_value in found:
                raise ParameterError("directions", f"layer {layer_value} is given twice")
            found[layer_value] = count_value
        return found

    def sites(self, components: list[Component]) -> set[tuple[str, int]]:
        """The (site, layer) pairs whose means a mean ablation of ``components`` needs."""
        return {(c.kind, c.layer) for c in components if c.kind in KIND_OF_OVER.values()}


def sweep_components(options: SweepOptions, n_layers: int, n_heads: int) -> list[Component]:
    """The baseline, then every component ``options`` ask for, layer by layer (the order of the rows)."""
    from llmprobe.tracing.lens import parse_layers
    from llmprobe.tracing.sweep import BASELINE, Component

    found = [BASELINE]
    if options.over == "directions":
        for layer, count in sorted(options.direction_layers().items()):
            if layer >= n_layers:
                raise ParameterError("directions", f"layer {layer} is out of range: the model has decoder layers"
                                                   f" 0..{n_layers - 1}")
            found += [Component(f"{layer}.pc{rank + 1}", "pca", layer, rank) for rank in range(count)]
            found += [Component(f"{layer}.random{n + 1}", "random", layer, n) for n in range(options.random_controls)]
    else:
        kind = KIND_OF_OVER[options.over]
        for layer in parse_layers(options.layers or "all", n_layers):
            if kind == "head":
                found += [Component(f"{layer}.{head}", "head", layer, head) for head in range(n_heads)]
            else:
                found.append(Component(str(layer) if kind == "block" else f"{layer}.{kind}", kind, layer))
    if len(found) == 1:
        raise UsageError("the sweep has no components to ablate", where="--layers")
    return found


# ------------------------------------------------------------------------------------------ one component
def fit_marks(table: pa.Table, trace_meta: dict[str, Any], label: str, fit: PosteriorOptions) -> PosteriorResult:
    """fit-posterior of a component's marks (a trace table of its scored rows), without the scorecard."""
    marks = posterior_marks(Trace(table, trace_meta, None, label), label)
    return fit_posterior(marks, **asdict(fit), scorecard=False)


def component_row(index: int, component: Component, scores: ComponentScores, baseline: ComponentScores,
                  measured: np.ndarray, result: PosteriorResult | None, fit_error: str | None = None,
                  direction: np.ndarray | None = None) -> dict[str, Any]:
    """A component's row of the sweep table, before the baseline-relative columns (:data:`DERIVED`)."""
    row: dict[str, Any] = {name: None for name in SWEEP_SCHEMA.names}
    row.update(index=index, component=component.name, kind=component.kind, layer=component.layer,
               head=component.head, verdict=NO_FIT, fit_error=fit_error,
               mean_entropy_bits=float(scores.entropy[measured].mean() / LN2),
               top1_agreement=float((scores.top1[measured] == baseline.top1[measured]).mean()),
               direction=None if direction is None else [float(x) for x in direction])
    if result is not None:
        held = result.scores.forgetting.held
        row.update(mean_kl_bits=result.distances.mean_kl_bits, kl_model_filter_bits=held.kl_bits,
                   gamma=result.test.free.gamma, gamma_ci_low=float(result.test.gamma_ci[0]),
                   gamma_ci_high=float(result.test.gamma_ci[1]), alpha0=result.test.exact.alpha0,
                   alpha0_forgetting=result.test.free.alpha0, exact_bayes_rejected=bool(result.test.rejected),
                   verdict=result.verdict, mass=result.distances.mean_mass, n_marks_used=result.counts.used)
    return row


@dataclass(frozen=True)
class FitJob:
    """What a component's row needs once its scores are known: everything but the model, so a worker
    process can fit it (numpy and scipy only) while the model scores the next component."""

    index: int
    component: Component
    marks: pa.Table  # the scored rows as a trace table (SweepEngine.marks_table)
    scores: ComponentScores
    baseline: ComponentScores
    measured: np.ndarray
    direction: np.ndarray | None
    trace_meta: dict[str, Any]
    fit: PosteriorOptions

    def row(self) -> dict[str, Any]:
        """The component's row: its marks fitted, compared with the baseline. A component whose marks cannot be
        fitted (too little mass on the categories, say) gets a ``no-fit`` row saying why; the baseline must fit."""
        label = f"{self.trace_meta.get('model')} with {self.component.name} ablated"
        try:
            result, error = fit_marks(self.marks, self.trace_meta, label, self.fit), None
        except UsageError as exc:
            if self.component.kind == "baseline":
                raise UsageError(f"the un-ablated model's marks cannot be fitted, so no component can be read"
                                 f" against them: {exc}") from None
            result, error = None, str(exc)
        return component_row(self.index, self.component, self.scores, self.baseline, self.measured, result, error,
                             self.direction)


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SWEEP_SCHEMA)


def finished_table(parts: list[pa.Table], metadata: dict[str, Any]) -> pa.Table:
    """The committed rows in component order, with the baseline-relative columns filled in and the metadata."""
    table = pa.concat_tables(parts).cast(SWEEP_SCHEMA).sort_by("index")
    if table.num_rows == 0 or table.column("component")[0].as_py() != "baseline":
        raise RuntimeError("the sweep's rows lack the baseline")

    def change(name: str) -> pa.Array:
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        delta = values - values[0]
        return pa.array(delta, pa.float64(), mask=np.isnan(delta))
    verdicts = table.column("verdict").to_pylist()
    derived = {"delta_kl_bits": change("mean_kl_bits"), "delta_entropy_bits": change("mean_entropy_bits"),
               "verdict_flipped": pa.array([v != verdicts[0] for v in verdicts], pa.bool_())}
    for name in DERIVED:
        table = table.set_column(SWEEP_SCHEMA.get_field_index(name), SWEEP_SCHEMA.field(name), derived[name])
    return table.replace_schema_metadata({SWEEP_META_KEY: json.dumps(metadata, ensure_ascii=False)})


# ------------------------------------------------------------------------------------------ reading
@dataclass
class Sweep:
    """A sweep table (one row per component, the baseline first) and its metadata."""

    frame: pd.DataFrame
    meta: dict[str, Any]
    source: str = field(default="<sweep>")

    @property
    def baseline(self) -> pd.Series:
        return self.frame.iloc[0]

    @property
    def components(self) -> pd.DataFrame:
        """The ablated components' rows, by change of mean KL(Bayes‖model), largest first."""
        return self.frame.iloc[1:].sort_values("delta_kl_bits", ascending=False, na_position="last", kind="stable")

    def headline(self) -> str:
        """The sweep in one sentence: the component whose ablation moves the fit most."""
        base = self.baseline
        if len(self.frame) < 2:
            return f"baseline: verdict {base['verdict']}"
        top = self.components.iloc[0]
        what = {"head": "head", "attn": "attention", "mlp": "MLP", "block": "block", "pca": "direction",
                "random": "random direction"}[top["kind"]]
        change = "" if pd.isna(top["delta_kl_bits"]) else f", {top['delta_kl_bits']:+.2g} bits KL(Bayes‖model)"
        flipped = f" (baseline {base['verdict']})" if top["verdict_flipped"] else " (unchanged)"
        return f"ablating {what} {top['component']}: verdict {top['verdict']}{flipped}{change}"


def is_sweep(path: str | Path) -> bool:
    """Whether ``path`` is a sweep table (a Parquet file carrying the sweep metadata)."""
    try:
        return SWEEP_META_KEY in (pq.read_schema(path).metadata or {})
    except (OSError, pa.ArrowException):
        return False


def open_sweep(path: str | Path) -> Sweep:
    """Read a sweep table written by ``llmprobe ablate -o``; anything else is one error naming the file."""
    source = str(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"not a readable sweep table ({str(exc).splitlines()[0]})", where=source) from None
    raw = (table.schema.metadata or {}).get(SWEEP_META_KEY)
    if raw is None:
        raise UsageError("not a sweep table (no llmprobe.sweep metadata): write one with llmprobe ablate -o",
                         where=source)
    meta = json.loads(raw)
    missing = [name for name in SWEEP_SCHEMA.names if name not in table.column_names]
    if missing:
        raise UsageError(f"the sweep table lacks column(s) {', '.join(missing)}", where=source)
    return Sweep(table.to_pandas(), meta, source)


def sweep_of(table: pa.Table) -> Sweep:
    """A finished sweep table (:func:`finished_table`) as a :class:`Sweep`."""
    return Sweep(table.to_pandas(), json.loads(table.schema.metadata[SWEEP_META_KEY]))
