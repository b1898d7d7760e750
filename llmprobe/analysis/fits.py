"""``fit-prior`` and ``fit-posterior``: traces in, Bayesian comparisons out.

The statistics live in :mod:`llmprobe.bayes` (pure numpy/scipy); this module turns a trace's marks
(:mod:`llmprobe.analysis.marks`) into their inputs and their results into a typed
:class:`~llmprobe.analysis.results.PosteriorResult` (its ``summary`` is the ``--json`` document) or,
for fit-prior, the prior file's JSON. Every option and its check is :class:`PosteriorOptions`'s, so
the Python API and the command line run the same fit and refuse the same input, naming the
parameter (the CLI shows its flag).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np

from llmprobe.analysis.fit_options import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_FOLDS,
    DEFAULT_MAX_COMPONENTS,
    DEFAULT_MIN_MASS,
    PosteriorOptions,
    check_at_least,
    parse_components,
)
from llmprobe.analysis.fit_tables import long_table, summarize_by_n
from llmprobe.analysis.marks import CategoryMarks, category_marks, sequence_inputs
from llmprobe.analysis.martingale import MartingaleResult
from llmprobe.analysis.priors import PRIOR_OVER_ROWS, reference_prior
from llmprobe.analysis.protocols import peer_statistics
from llmprobe.analysis.results import Distances, FilterScores, MarkCounts, PosteriorResult, Scores
from llmprobe.analysis.scorecard import build_scorecard, read_martingale
from llmprobe.bayes import (
    fit_dirichlet_mixture,
    fit_dirichlet_multinomial_mixture,
    mixture_posterior_predictive,
    select_components,
)
from llmprobe.bayes.updating import UpdatingFit, held_out_predictions, select_updating_prior, sequence_folds
from llmprobe.bayes.verdict import (
    Evidence,
    decide,
    frequency_follower,
    never_updating,
    recency,
    score,
    shared_constant,
    true_theta,
)
from llmprobe.errors import ParameterError, UsageError
from llmprobe.progress import SILENT, Reporter
from llmprobe.tracing.reader import Trace

PRIOR_FORMAT = "llmprobe.prior/1"


# ------------------------------------------------------------------------------------------ fit-prior
def fit_prior(cm: CategoryMarks, components: str | int, max_components: int, from_counts: bool, n: list[int] | None,
              seed: int) -> dict[str, Any]:
    """Fit the *prior over rows*: a Dirichlet (mixture) over the model's category distributions across
    marks and prompts, or over the examples' counts. Not the *updating prior* (fit-posterior).

    ``components``: a number or ``auto`` (chosen by BIC among 1..``max_components``); ``n``: only the
    marks after these numbers of examples (all marks when None). Shuffled orders are left out: their rows
    repeat the originals' evidence."""
    k = parse_components(components)
    cm = cm.originals()
    check_at_least(max_components, 1, "max_components")
    keep = np.ones(len(cm), dtype=bool) if n is None else np.isin(cm.marks["n"].to_numpy(), n)
    if not keep.any():
        raise ParameterError("n", f"no marks with n in {n}")
    if from_counts:
        if cm.counts is None:
            raise ParameterError("from_counts", "the trace's marks carry no counts (experiment prompts do)")
        last = cm.marks.assign(_row=np.arange(len(cm)))[keep].groupby("sequence")["_row"].max().to_numpy()
        data = cm.counts[last]
        data = data[data.sum(axis=1) > 0]
        if data.shape[0] < 2:
            raise ParameterError("n", f"only {data.shape[0]} sequence(s) with examples before the chosen marks;"
                                      " counts after n = 0 examples are empty, so a fit to counts needs marks with"
                                      " n >= 1")
    else:
        data = cm.probs[keep]
    if data.shape[0] < 2:
        raise UsageError(f"only {data.shape[0]} distribution(s) to fit; a prior needs several")
    try:
        if k is None:
            selection = select_components(data, max_components, seed, counts=from_counts)
            best, table = selection.best, selection.table
        else:
            fit = fit_dirichlet_multinomial_mixture if from_counts else fit_dirichlet_mixture
            best = fit(data, k, seed)
            table = [{"n_components": k, "loglik": best.loglik, "bic": best.bic}]
    except ValueError as exc:  # data the fit cannot take (e.g. a category never counted)
        raise UsageError(f"cannot fit a prior over rows to these marks: {exc}", where=cm.label) from None
    return {
        "format": PRIOR_FORMAT,
        "kind": PRIOR_OVER_ROWS,
        "trace": cm.label,
        "categories": cm.categories,
        "data": "counts" if from_counts else "probabilities",
        "n_rows": int(data.shape[0]),
        "n_filter": n,
        "mixture": best.to_dict(),
        "selection": table,
    }


# ------------------------------------------------------------------------------------------ fit-posterior
POSTERIOR_INPUT = ("a trace of experiment prompts (written by `llmprobe experiment`: marks with running counts and"
                   " outcome sequences) traced with their categories' targets (experiment prompts carry them)")
"""Everything fit-posterior needs, named whole in the first message about any part of it."""


def posterior_marks(trace: Trace, label: str | None = None) -> CategoryMarks:
    """The category marks of a trace for :func:`fit_posterior`; one error naming every requirement."""
    return category_marks(trace, label, needs=POSTERIOR_INPUT)


def fit_posterior(cm: CategoryMarks, prior: str = "fit", bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, *,
                  components: str | int = "1", max_components: int = DEFAULT_MAX_COMPONENTS,
                  min_mass: float = DEFAULT_MIN_MASS, folds: int = DEFAULT_FOLDS, by: str | None = None,
                  gamma_variant: str | None = None,
                  martingale: str | Path | Sequence[MartingaleResult] | None = None,
                  reporter: Reporter = SILENT, scorecard: bool = True) -> PosteriorResult:
    """The updating prior, the exact-Bayes test under it, out-of-sample scores, baselines and the verdict
    (options: :class:`~llmprobe.analysis.fit_options.PosteriorOptions`), then the scorecard of the field's
    other tests (:mod:`llmprobe.analysis.scorecard`; ``martingale``: ``llmprobe martingale --json`` output,
    as a file or its results). ``reporter`` shows progress through the slow steps (choosing components, the
    bootstrap, held-out fits).

    Shuffled orders (``experiment --permutations``) feed the scorecard's exchangeability test only: every
    fit, score and the verdict are on the original orders, so a trace gives the same verdict with or without
    them. Counting them too would count each sequence's examples once per order: the bootstrap and the folds,
    which take sequences as independent, would see copies of one sequence as several (narrower intervals, and a
    held-out sequence's reorderings in the fitting folds).

    ``scorecard=False`` leaves the scorecard out (``result.scorecard`` is None): a sweep that fits hundreds
    of ablated traces reads only the verdict and its evidence, which the scorecard never changes."""
    options = PosteriorOptions(prior, bootstrap, seed, components, max_components, min_mass, folds, by, gamma_variant)
    if isinstance(martingale, (str, Path)):
        martingale = read_martingale(martingale)
    everything, cm = cm, cm.originals()
    n_components = options.n_components
    if cm.counts is None:
        raise UsageError(f"the marks carry no running counts; fit-posterior needs {POSTERIOR_INPUT}", where=cm.label)
    reference = None if prior == "fit" else reference_prior(prior, cm.categories)
    outcomes, sequence, position = sequence_inputs(cm, f"fit-posterior needs {POSTERIOR_INPUT}")
    used = cm.mass >= min_mass
    used_sequences = np.unique(sequence[used])
    if used.sum() < 2:
        raise ParameterError("min_mass", f"only {int(used.sum())} of {len(cm)} marks have mass >= {min_mass} on the"
                                         " categories; nothing to fit")
    weights = used.astype(float)
    n_folds = min(folds, used_sequences.size)
    fold = None
    if n_folds >= 2:  # deal the sequences that have used marks; the others carry no weight anywhere
        dealt = np.isin(sequence, used_sequences)
        fold = np.zeros(len(cm), dtype=np.int64)
        fold[dealt] = sequence_folds(sequence[dealt], n_folds, seed)
    selection: list[dict[str, float]] = []
    if n_components is None:
        if fold is None:
            raise ParameterError("components", "needs 2 or more sequences to choose components out of sample")
        with reporter.progress(f"{cm.label}: choosing 1-{max_components} components", max_components * n_folds) \
                as advance:
            model, selection = select_updating_prior(cm.probs, outcomes, sequence, position, max_components, fold,
                                                     weights=weights, seed=seed, advance=advance)
    else:
        model = UpdatingFit(cm.probs, outcomes, sequence, position, n_components, weights=weights, seed=seed)
    with reporter.progress(f"{cm.label}: bootstrap of γ", bootstrap) as advance:
        test = model.test(n_bootstrap=bootstrap, seed=seed, selection=selection, advance=advance)
    exact_in, free_in = model.predict(test.exact), model.predict(test.free)
    if fold is None:
        exact_out, free_out = exact_in, free_in
    else:
        with reporter.progress(f"{cm.label}: out-of-sample fits", n_folds) as advance:
            exact_out, free_out = held_out_predictions(model, fold, test.profile, advance)

    if reference is None:  # --prior fit: the fitted updating prior is the per-mark Bayes column
        bayes = exact_in
    else:
        bayes = mixture_posterior_predictive(reference.mixture.weights, reference.mixture.alphas, cm.counts)
    last = np.array([outcomes[s][p - 1] if p > 0 else -1 for s, p in zip(sequence, position)], dtype=np.int64)
    baselines = {
        "never_updating": never_updating(cm.probs, sequence, position),
        "frequency": frequency_follower(cm.counts),
        "recency": recency(last, len(cm.categories)),
    }
    if cm.theta is not None:
        baselines["true_theta"] = true_theta(cm.theta)
    scored = Scores(
        out_of_sample=fold is not None, n_folds=n_folds if fold is not None else 0,
        exact_bayes=_filter_scores(cm.probs, weights, exact_in, None if fold is None else exact_out),
        forgetting=_filter_scores(cm.probs, weights, free_in, None if fold is None else free_out),
        baselines={name: score(cm.probs, predictions, weights) for name, predictions in baselines.items()},
        reference=None if reference is None else score(cm.probs, bayes, weights),
        reference_kind=None if reference is None else reference.kind,
        # the alpha_0 -> infinity member of the filter family, fitted (on the other folds) like the filters
        shared_constant=score(cm.probs, shared_constant(cm.probs, weights, fold), weights))
    scores = scored.to_dict()  # the verdict's evidence below reads the summary's scores
    held = "out_of_sample" if fold is not None else "in_sample"
    verdict = decide(Evidence(
        best_kl_bits=scores["forgetting"][f"kl_bits_{held}"], exact_kl_bits=scores["exact_bayes"][f"kl_bits_{held}"],
        never_kl_bits=scores["never_updating"]["kl_bits"], constant_kl_bits=scores["shared_constant"]["kl_bits"],
        out_of_sample=fold is not None,
        gamma=test.free.gamma, gamma_ci=test.gamma_ci, rejected=test.rejected,
        alpha0_at_bound=test.exact.at_bound or test.free.at_bound,
        converged=all(f.converged or f.at_bound for f in (test.exact, test.free)),
        never_updates=test.exact.n_components == 1 and test.exact.at_bound,
        components_chosen=n_components is None or n_components > 1))

    table = long_table(cm, bayes, free_in, exact_out, used)
    n_inexact = int((~cm.marks["exact"].to_numpy(dtype=bool)).sum()) if "exact" in cm.marks else 0
    card = None if not scorecard else build_scorecard(
        everything, cm, bayes, used, outcomes, sequence, position, min_mass=min_mass,
        bayes_name="exact Bayes under the fitted updating prior (γ = 1)" if reference is None
        else f"exact Bayes under --prior {reference.source}", martingale=martingale)
    return PosteriorResult(
        label=cm.label, categories=cm.categories, options=options, conclusion=verdict, test=test, scores=scored,
        reference=reference, counts=MarkCounts(len(cm), int(used.sum()), n_inexact, len(outcomes)),
        distances=Distances.of(table, cm.theta is not None), peers=peer_statistics(cm, bayes, by, gamma_variant),
        table=table, by_n=summarize_by_n(table), scorecard=card)


def _filter_scores(probs: np.ndarray, weights: np.ndarray, inside: np.ndarray,
                   outside: np.ndarray | None) -> FilterScores:
    """A fitted filter's predictions scored in sample and (None: nothing could be held out) out of sample."""
    return FilterScores(score(probs, inside, weights), None if outside is None else score(probs, outside, weights))
