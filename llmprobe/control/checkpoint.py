"""Write a trained control as an ordinary Hugging Face checkpoint directory, atomically.

The directory holds config.json, generation_config.json, model.safetensors, tokenizer.json (+ its
config), README.md (a model card: the prior, the data, the seed, the training curve), prior.json
(the known prior as an ``llmprobe.prior/1`` file, for ``fit-posterior --prior``), training.json
(the same facts, machine-readable, with the step it was taken at) and experiment.toml (the
experiment it was trained on).

:func:`control_dir` builds it in a staging directory (:func:`llmprobe.files.atomic_dir`) and moves it
into place only when complete: an interrupted run leaves no directory. Without ``replace``
(``--force``) the move never replaces: an output that another run created while this one trained is
kept and this run fails with one line (two ``wind-tunnel`` runs to one ``-o``: the second to finish
loses, whole). A series' checkpoints (:mod:`llmprobe.control.series`) are added while the control
trains, each its own atomic directory under ``steps/`` of the staging directory
(:meth:`ControlDir.add_step`); the final model is written into the directory itself at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from llmprobe.control.data import BOS, EOS, PAD
from llmprobe.control.series import STEPS, step_name
from llmprobe.control.train import TrainedControl
from llmprobe.files import atomic_dir, created_meanwhile, umask, write_atomic
from llmprobe.model.gguf import quiet_transformers

CARD_POINTS = 10  # rows of the training curve in the model card


class ControlDir:
    """A control directory being built (:func:`control_dir`): ``final`` is the model written into it at the
    end; :meth:`add_step` saves a series checkpoint under ``steps/`` now."""

    def __init__(self, root: Path) -> None:
        self.root = root  # the staging directory
        self.final: TrainedControl | None = None
        self.steps: list[TrainedControl] = []  # the checkpoints added, in order (all share the live model)

    def add_step(self, trained: TrainedControl) -> None:
        """Save ``trained`` (the model as it is now) as ``steps/step-NNNNNN``, atomically."""
        steps = self.root / STEPS
        steps.mkdir(exist_ok=True)
        with control_dir(steps / step_name(trained.step), replace=False) as checkpoint:
            checkpoint.final = trained
        self.steps.append(trained)


def save_control(trained: TrainedControl, output: str | Path, *, replace: bool = False) -> Path:
    """Write ``trained`` to ``output``; an existing one is replaced only with ``replace`` (the CLI's --force)."""
    with control_dir(output, replace=replace) as directory:
        directory.final = trained
    return Path(output)


@contextmanager
def control_dir(output: str | Path, *, replace: bool = False) -> Iterator[ControlDir]:
    """A control directory at ``output``, built while the block runs and committed after it (see the module
    docstring). The block sets ``final``, the model written into it; a grid's root directory has none (it
    holds the sizes' directories)."""
    target = Path(output)
    quiet_transformers()  # no "Writing model shards" bar on stderr
    committing = False
    try:
        with atomic_dir(target, replace=replace) as staging:
            directory = ControlDir(staging)
            yield directory
            trained = directory.final
            if trained is not None:
                trained.model.save_pretrained(staging)
                tokenizer = PreTrainedTokenizerFast(tokenizer_object=trained.tokenizer, bos_token=BOS,
                                                    eos_token=EOS, pad_token=PAD, model_max_length=trained.context)
                tokenizer.save_pretrained(staging)
                write_atomic(staging / "training.json", json.dumps(trained.summary(), indent=1) + "\n")
                write_atomic(staging / "prior.json", json.dumps(trained.prior.to_dict(), indent=1) + "\n")
                source = Path(trained.experiment.where)
                if source.is_file():
                    write_atomic(staging / "experiment.toml", source.read_bytes())
                write_atomic(staging / "README.md", model_card(trained, target.name))
                for path in staging.iterdir():
                    if path.is_file():  # safetensors writes its file private; outputs get the umask's permissions
                        path.chmod(0o666 & ~umask())
            committing = True
    except FileExistsError:
        if not committing:
            raise
        raise created_meanwhile(output) from None


def model_card(trained: TrainedControl, name: str) -> str:
    """A short model card: what the control is, the prior, the data, the seed, the curve."""
    s, exp, prior = trained.settings, trained.experiment, trained.prior
    held = trained.held_out
    rows = _thin(trained.curve, CARD_POINTS)
    curve = "\n".join(f"| {r['step']} | {r['loss']:.4f} | {r['kl_bits']:.2e} | {r['seconds']:.0f} |" for r in rows)
    components = "\n".join(f"| {w:.4g} | {', '.join(f'{a:g}' for a in alpha)} |"
                           for w, alpha in zip(prior.weights, prior.alphas))
    return f"""---
library_name: transformers
tags: [llmprobe, positive-control, bayesian, wind-tunnel]
---
# {name}: a Bayesian positive control for `{exp.name}`

A small `LlamaForCausalLM` trained by `llmprobe wind-tunnel` on sequences drawn under a known prior,
so its exact Bayesian prediction at every mark is known: after counts n the Bayes-optimal next
outcome is the posterior predictive of the prior below. Use it to calibrate what llmprobe's
fits report for a model that is Bayesian by construction (see docs/wind-tunnel.md).

## Prior

{prior.describe()} over the categories {', '.join(exp.category_names)} (targets {', '.join(map(repr, exp.targets))}),
`--prior {prior.canonical}` (given as `{prior.spec}`); `prior.json` holds it for `llmprobe fit-posterior --prior`.

| weight | concentrations |
|---|---|
{components}

## Data

Experiment `{exp.name}` ({exp.where}, copied as `experiment.toml`), rendered by llmprobe's own
experiment templates. Each training sequence draws θ from the prior and {exp.n_max + 1} outcomes
from θ; the model is scored at marks n = 0..{exp.n_max}. {trained.sequences_seen:,} sequences
({trained.step} steps of {s.batch_size}{_in_series(trained)}), objective `{s.objective}`
({'cross-entropy to the exact posterior predictive at the marks' if s.objective == 'posterior'
  else 'next-token cross-entropy on the sampled outcomes'}; next-token loss elsewhere).

## Model and training

{s.layers} layers, hidden size {s.hidden}, {s.heads} heads, MLP {s.intermediate}; {trained.parameters:,}
parameters; vocabulary {trained.tokenizer.get_vocab_size()} tokens (byte-level BPE with every target as one
token); context {trained.context} tokens. AdamW, peak learning rate {s.learning_rate:g}, {s.warmup_steps}
warm-up steps then cosine decay; seed {s.seed}; device {s.device}, {s.threads} thread(s); {trained.seconds:.0f} s of
training ({trained.cpu_seconds:.0f} CPU-seconds).

Held-out KL(Bayes ‖ model) at the marks of {held['sequences']} fresh sequences ({held['marks']:,} marks),
in bits: **{held['kl_bits_trained']:.2e}** after {trained.step} steps, {held['kl_bits_untrained']:.2e} untrained.

## Training curve

Means over the steps since the previous row; KL(Bayes ‖ model) in bits at the training batches' marks.

| step | loss | KL (bits) | seconds |
|---|---|---|---|
{curve}
"""


def _in_series(trained: TrainedControl) -> str:
    if trained.step == trained.settings.steps:
        return ""
    return f"; a checkpoint of a series, {trained.settings.steps} steps in all"


def _thin(curve: list[dict[str, float]], points: int) -> list[dict[str, float]]:
    if len(curve) <= points:
        return curve
    stride = len(curve) / points
    return [curve[min(len(curve) - 1, round((i + 1) * stride) - 1)] for i in range(points)]
