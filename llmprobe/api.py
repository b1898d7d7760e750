"""The notebook API: the CLI's pipeline as Python functions that take and return Python objects.

    import llmprobe
    model = llmprobe.load_model()                                  # the default SmolLM2-135M-Instruct
    prompts = llmprobe.experiment("configs/experiments/coin.toml", n_max=8, sequences=2)
    trace = llmprobe.trace(prompts, model=model, top_k=5)          # a DataFrame, as read_trace gives
    fit = llmprobe.fit_posterior(trace)                            # .summary (dict), .table, .by_n
    fit.verdict, fit.summary["verdict_sentence"]                   # the conclusion; print(fit) leads with it

Each function runs the same library code as its command (``trace`` the same :class:`Tracer`,
``fit_posterior`` the same fit), so the numbers are the CLI's numbers (tests/cli/test_api.py checks
it on the default model). Nothing is printed and nothing is written: results are return values,
errors are :class:`llmprobe.errors.UsageError` with the message the CLI would print. Heavy
libraries load on first call, so ``import llmprobe`` stays light.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmprobe.errors import ParameterError, UsageError

if TYPE_CHECKING:
    import pandas as pd

    from llmprobe.analysis.results import PosteriorResult
    from llmprobe.analysis.scaling import ScalingResult
    from llmprobe.model.loading import LoadedModel
    from llmprobe.tracing.reader import Trace

TRACE_COLUMNS_FOR_FITS = ("prompt_index", "prompt_id", "position", "layer", "target_seq_logprobs", "mark_index",
                          "mark", "meta")


def load_model(model: str | None = None, *, device: str = "auto", dtype: str = "auto", **options: Any) -> LoadedModel:
    """A model ready to trace: ``model`` as ``--model`` takes it (None: the embedded default); ``options``
    are :func:`llmprobe.model.loading.load_model`'s (``device_map``, ``max_memory``, ``trust_remote_code``...)."""
    from llmprobe.model.loading import load_model as load

    return load(model, device=device, dtype=dtype, **options)


def experiment(config: str | Path, *, seed: int | None = None, n_max: int | None = None,
               sequences: int | None = None, layout: str | None = None,
               permutations: int | None = None) -> list[dict[str, Any]]:
    """The prompt records ``llmprobe experiment CONFIG`` writes, as dicts (arguments override the TOML;
    ``permutations``: each sequence also in that many shuffled orders, for the exchangeability test)."""
    from llmprobe.experiments import generate, load_experiment

    return list(generate(load_experiment(config), seed=seed, n_max=n_max, sequences=sequences, layout=layout,
                         permutations=permutations))


def trace(prompts: str | Iterable[str | dict[str, Any]], model: str | LoadedModel | None = None, *, top_k: int = 20,
          targets: list[str] | None = None, max_new_tokens: int = 0, **settings: Any) -> pd.DataFrame:
    """Trace prompts as ``llmprobe trace`` does and return the trace as :func:`llmprobe.read_trace` would.

    ``prompts``: a prompt string, a JSONL-style dict (``prompt``, ``id``, ``marks``, other fields), or a
    list of strings and/or such dicts, e.g. :func:`experiment`'s records, whose targets are picked up as
    in the CLI. ``targets``: a list of strings (a single string is one target). ``model``: a
    :func:`load_model` result (load once, trace often) or a ``--model`` value. ``settings``: the other
    :class:`~llmprobe.tracing.settings.TraceSettings` (``layers``, ``chat``, ``batch_size``, ``sample``,
    ``seed``, ``save_embeddings``, ...). A bad argument is a :class:`~llmprobe.errors.ParameterError`
    naming it. The run metadata is in ``frame.attrs["llmprobe"]``.
    """
    from llmprobe.tracing.reader import trace_frame

    return trace_frame(trace_table(prompts, model, top_k=top_k, targets=targets, max_new_tokens=max_new_tokens,
                                   **settings))


def trace_table(prompts: str | Iterable[str | dict[str, Any]], model: str | LoadedModel | None = None, *,
                top_k: int = 20, targets: list[str] | None = None, max_new_tokens: int = 0, **settings: Any) -> Trace:
    """Like :func:`trace`, as the Arrow :class:`~llmprobe.tracing.reader.Trace` every reader works on."""
    from llmprobe.model.loading import LoadedModel
    from llmprobe.tracing.prompts import records_from_objects
    from llmprobe.tracing.reader import Trace
    from llmprobe.tracing.run import TraceRun
    from llmprobe.tracing.settings import TraceSettings

    names = [f.name for f in fields(TraceSettings) if f.name not in ("top_k", "targets", "max_new_tokens")]
    for name in settings:
        if name not in names:
            raise ParameterError(name, "not a trace setting (they are: top_k, targets, max_new_tokens,"
                                       f" {', '.join(names)})")
    if not (model is None or isinstance(model, (str, Path, LoadedModel))):
        raise ParameterError("model", f"expected a load_model() result, a path or a model name, got"
                                      f" {type(model).__name__}")
    targets = [targets] if isinstance(targets, str) else [] if targets is None else targets
    run = TraceRun(TraceSettings(top_k=top_k, targets=targets, max_new_tokens=max_new_tokens, **settings),
                   lambda: records_from_objects(_prompt_objects(prompts)), {"command": "llmprobe.trace (Python)"})
    loaded = model if isinstance(model, LoadedModel) else load_model(None if model is None else str(model))
    run.start(loaded)
    return Trace(run.table(), run.metadata(), run.vocab, "<llmprobe.trace>")


def _prompt_objects(prompts: Any) -> list[Any]:
    """``trace``'s ``prompts`` as a list: one string or one record dict is one prompt."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Iterable):
        raise ParameterError("prompts", f"expected a prompt string, a record dict or a list of them, got"
                                        f" {type(prompts).__name__}")
    return list(prompts)


def _check_options(options: dict[str, Any], function: Any, besides: tuple[str, ...]) -> None:
    """Every keyword in ``options`` is one of ``function``'s keyword-only options (not one of ``besides``):
    else a ParameterError naming it and the options there are."""
    import inspect

    known = [name for name, p in inspect.signature(function).parameters.items()
             if p.kind is p.KEYWORD_ONLY and name not in besides]
    for name in options:
        if name not in known:
            raise ParameterError(name, f"not an option here (they are: {', '.join(known)})")


def fit_posterior(trace: Any, *, prior: str = "fit", bootstrap: int = 200, seed: int = 0,
                  label: str | None = None, **options: Any) -> PosteriorResult:
    """``llmprobe fit-posterior``: model vs Bayesian posterior predictive at every mark.

    ``trace``: a DataFrame from :func:`trace` or :func:`llmprobe.read_trace`, a Trace, or a path.
    ``options``: the command's other options under their parameter names (``components``,
    ``max_components``, ``min_mass``, ``folds``, ``by``, ``gamma_variant``; see
    :class:`llmprobe.analysis.fit_options.PosteriorOptions`), so ``by="template"`` is ``--by template``,
    and ``martingale`` (``--martingale``: the ``llmprobe martingale --json`` file of the same model, or
    its results). The result (:class:`~llmprobe.analysis.results.PosteriorResult`) has the verdict
    (``.verdict``, ``.conclusion``), the fits (``.test``), the scores (``.scores``), ``.summary`` (the
    ``--json`` dict), ``.table`` (the ``-o`` per-mark table), ``.by_n`` (the per-n table the CLI shows)
    and ``.scorecard`` (the field's other tests, read after the verdict).
    """
    from llmprobe.analysis.fits import fit_posterior as fit, posterior_marks

    _check_options(options, fit, ("reporter",))
    return fit(posterior_marks(_as_trace(trace), label), prior, bootstrap, seed, **options)


def fit_scaling(trace: Any, *, tasks: int = 2, fit_fraction: float = 0.5, min_mass: float = 0.05,
                label: str | None = None) -> ScalingResult:
    """``llmprobe fit-scaling``: the ICL curve against the Bayesian scaling law and its baselines
    (:class:`~llmprobe.analysis.scaling.ScalingResult`: ``.curve``, ``.comparison``, ``.predictions()``,
    ``.to_dict()`` the ``--json`` document)."""
    from llmprobe.analysis.fits import posterior_marks
    from llmprobe.analysis.scaling import fit_scaling as fit

    return fit(posterior_marks(_as_trace(trace), label), tasks, fit_fraction, min_mass)


def fit_prior(trace: Any, *, components: str | int = 1, max_components: int = 5, from_counts: bool = False,
              n: list[int] | None = None, seed: int = 0) -> dict[str, Any]:
    """``llmprobe fit-prior``: the Dirichlet (mixture) prior as the JSON document the CLI writes."""
    from llmprobe.analysis.fits import fit_prior as fit
    from llmprobe.analysis.marks import category_marks

    return fit(category_marks(_as_trace(trace)), components, max_components, from_counts, n, seed)


def _as_trace(trace: Any) -> Trace:
    """A path, a Trace, or a trace DataFrame (columns as read_trace gives them) as a Trace."""
    import pandas as pd
    import pyarrow as pa

    from llmprobe.tracing.reader import Trace, open_trace

    if isinstance(trace, Trace):
        return trace
    if isinstance(trace, (str, Path)):
        return open_trace(trace)
    if not isinstance(trace, pd.DataFrame):
        raise UsageError(f"expected a trace DataFrame, a Trace or a path, got {type(trace).__name__}", where="trace")
    meta = trace.attrs.get("llmprobe")
    if meta is None:
        raise UsageError("the DataFrame carries no trace metadata (attrs['llmprobe']); pass the frame that"
                         " llmprobe.trace or llmprobe.read_trace returned", where="trace")
    columns = {}
    for name in TRACE_COLUMNS_FOR_FITS:
        if name not in trace.columns:
            continue
        values = trace[name]
        if name in ("mark", "meta"):  # read_trace parses them into dicts; the fits read the JSON text
            values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
        elif name == "target_seq_logprobs":
            values = [None if v is None else list(v) for v in values]
        else:
            values = values.astype(object).where(values.notna(), None).tolist()
        columns[name] = values
    return Trace(pa.table(columns), meta, None, "<DataFrame>")
