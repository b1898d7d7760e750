"""Training data for a control: exchangeable sequences under a known prior, rendered by the experiment itself.

Each training sequence draws θ from the prior, then n_max + 1 outcomes from θ, and is rendered by
:func:`llmprobe.experiments.generate` (so templates, cues, indices and every later
placeholder are exactly what ``llmprobe experiment`` writes): the text is the experiment's prompt
for that sequence extended by one outcome, and its marks 0..n_max are the positions where the
model is scored. At each mark the exact posterior predictive under the prior (the Bayes-optimal
next-outcome distribution) is computed from the running counts with :mod:`llmprobe.bayes`.

The tokenizer (:func:`build_tokenizer`) is a byte-level BPE from the ``tokenizers`` library trained
on rendered sequences, with the experiment's recurring pieces added as whole tokens: every category
target, and the text between marks (prefix, separators, cues) when there are few enough distinct
pieces. So each outcome is exactly one token, every mark falls on a token boundary (marks are
exact), and any other text still encodes (bytes). Saved as tokenizer.json it loads with
``AutoTokenizer``.

Determinism: everything is drawn from numpy generators derived from one seed; the same seed,
experiment and prior give the same token ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmprobe.bayes import mixture_posterior_predictive
from llmprobe.control.prior import KnownPrior
from llmprobe.errors import UsageError
from llmprobe.experiments import Experiment, generate

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
MAX_PIECES = 256  # more distinct between-mark texts than this are left to BPE
BPE_MERGES = 256
TOKENIZER_SAMPLE = 512  # sequences the tokenizer is trained on


@dataclass(frozen=True)
class Sequences:
    """A batch of rendered training sequences, as token ids with the marks located.

    ``ids[b]`` starts with BOS; ``mark_sequence``/``mark_position`` locate every mark (the token
    whose logits predict the outcome); ``outcome`` is the outcome that followed and ``bayes`` the
    exact posterior predictive there, (M, K).
    """

    ids: list[list[int]]
    mark_sequence: np.ndarray
    mark_position: np.ndarray
    mark_n: np.ndarray
    outcome: np.ndarray
    bayes: np.ndarray


def training_experiment(experiment: Experiment) -> Experiment:
    """The experiment as one marks prompt per θ with one more outcome, so every mark 0..n_max is followed by one.

    The per-n options (``ns``, ``draws``) only choose which prompts are traced, so they are dropped;
    a chain of phases is refused: its sequences are not exchangeable, so no prior describes them.
    """
    if experiment.phases is not None:
        raise UsageError("experiment.phases: a chain of θs is not exchangeable; a control needs one θ per"
                         " sequence (use theta or thetas)", where=experiment.where)
    plain = dataclasses.replace(experiment, ns=None, draws="nested")
    return plain.with_overrides(n_max=experiment.n_max + 1, sequences=1, layout="marks")


def render(experiment: Experiment, prior: KnownPrior, rng: np.random.Generator, count: int) -> list[dict[str, Any]]:
    """``count`` marks-layout records, θ from the prior for each, outcomes seeded from ``rng``.

    An experiment with several templates renders each θ with every template, so ``count`` records
    come from ceil(count / templates) θs.
    """
    base = training_experiment(experiment)
    per_theta = max(1, len(base.templates))
    thetas = prior.sample_thetas(rng, -(-count // per_theta))
    seed = int(rng.integers(0, 2**31))
    drawn = dataclasses.replace(base, thetas=tuple(tuple(float(x) for x in t) for t in thetas))
    return list(generate(drawn, seed=seed))[:count]


def _pieces(records: list[dict[str, Any]], targets: list[str]) -> list[str]:
    """The texts between marks with the targets cut out: the lead before mark 0, then what follows each target."""
    found: set[str] = set()
    for rec in records:
        prompt, marks, outcomes = rec["prompt"], rec["marks"], rec["outcomes"]
        found.add(prompt[: marks[0]["offset"]])
        for j, outcome in enumerate(outcomes):
            start = marks[j]["offset"] + len(targets[outcome])
            found.add(prompt[start : marks[j + 1]["offset"]])  # the rest of the outcome's text + template
    found.discard("")
    return sorted(found)


def build_tokenizer(experiment: Experiment, prior: KnownPrior, seed: int) -> Tokenizer:
    """A byte-level BPE with the experiment's targets (and recurring between-mark texts) as whole tokens."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    records = render(experiment, prior, rng, TOKENIZER_SAMPLE)
    targets = experiment.targets
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(SPECIAL_TOKENS) + len(alphabet) + BPE_MERGES,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator([r["prompt"] for r in records], trainer)
    pieces = _pieces(records, targets)
    whole = targets + (pieces if len(pieces) <= MAX_PIECES else [])
    tokenizer.add_tokens([AddedToken(t, normalized=False, single_word=False, lstrip=False, rstrip=False)
                          for t in whole])
    bos = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos)])
    for target in targets:
        if len(tokenizer.encode(target, add_special_tokens=False).ids) != 1:  # pragma: no cover - added tokens
            raise UsageError(f"target {target!r} is not one token", where=experiment.where)
    return tokenizer


def target_ids(tokenizer: Tokenizer, experiment: Experiment) -> list[int]:
    return [tokenizer.encode(c.target, add_special_tokens=False).ids[0] for c in experiment.categories]


def encode(records: list[dict[str, Any]], tokenizer: Tokenizer, prior: KnownPrior, targets: list[int]) -> Sequences:
    """Token ids of the records and, per mark 0..n_max, its token, next outcome and posterior predictive."""
    encodings = tokenizer.encode_batch([r["prompt"] for r in records])
    rows, positions, ns, outcomes, counts = [], [], [], [], []
    for b, (rec, enc) in enumerate(zip(records, encodings)):
        ends = np.array([end for _, end in enc.offsets])
        offsets = np.array([m["offset"] for m in rec["marks"][:-1]])
        at = np.searchsorted(ends, offsets, side="right") - 1
        if not np.array_equal(ends[at], offsets) or not np.array_equal(
                np.array(enc.ids)[at + 1], np.array(targets)[rec["outcomes"]]):
            raise UsageError("the tokenizer does not split the prompt at its marks", where=rec["id"])
        rows.append(np.full(len(at), b))
        positions.append(at)
        ns.append(np.arange(len(at)))
        outcomes.append(np.asarray(rec["outcomes"]))
        counts.append(np.array([m["counts"] for m in rec["marks"][:-1]], dtype=float))
    all_counts = np.concatenate(counts)
    return Sequences(
        ids=[list(e.ids) for e in encodings],
        mark_sequence=np.concatenate(rows),
        mark_position=np.concatenate(positions),
        mark_n=np.concatenate(ns),
        outcome=np.concatenate(outcomes),
        bayes=mixture_posterior_predictive(prior.weights, prior.alphas, all_counts),
    )
