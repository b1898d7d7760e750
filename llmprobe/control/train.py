"""Train a small Llama on sequences drawn under a known prior, so its exact Bayesian answer is known.

Design:

* The model is a fresh :class:`transformers.LlamaForCausalLM` from a :class:`LlamaConfig` whose
  sizes are :class:`ControlSettings` (defaults: 4 layers, width 64) and whose context is the longest
  training sequence (longer prompts were never seen, so ``trace`` refuses them rather than guess).
* Objective ``posterior`` (default): at every mark the target is the exact posterior predictive
  under the prior (cross-entropy to it); elsewhere, the ordinary next token. Under the prior the
  outcome after a mark *is* distributed as that predictive, so this has the same expected gradient
  and the same minimizer as plain next-token training on the sampled outcomes (objective
  ``next-token``, as in the wind-tunnel papers), with far less noise: the control gets there in minutes.
* The curve records, every ``log_every`` steps, the mean loss and the mean KL(Bayes || model) in
  bits at the marks of the training batches (model renormalized over the targets, as ``fit-posterior``
  does). A held-out set of sequences, drawn once, measures the same KL before and after training.
* Deterministic on one machine: the data come from numpy generators derived from ``seed`` and
  the weights from ``torch.manual_seed(seed)``; the same seed, settings and thread count give the
  same checkpoint on the CPU. Nothing here prints: progress goes to ``on_step`` and the reporter.
* A series (``save_every``): at step 0 (untrained), every ``save_every`` steps and at the last,
  ``on_checkpoint`` gets a :class:`TrainedControl` of the model as it is then (its curve so far and
  its held-out KL at that step) and must save it before returning; training then continues. The
  held-out evaluation draws no random numbers and the model has no dropout, so a series trains
  exactly the weights of a run without one; the step timer stops while a checkpoint is handled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from llmprobe.control.data import BOS, EOS, PAD, Sequences, build_tokenizer, encode, render, target_ids
from llmprobe.control.prior import KnownPrior
from llmprobe.control.settings import ControlSettings
from llmprobe.experiments import Experiment
from llmprobe.progress import SILENT, Reporter

_LN2 = math.log(2.0)


@dataclass(frozen=True)
class StepStats:
    step: int  # 1-based, of ``total``
    total: int
    loss: float
    kl_bits: float  # mean KL(Bayes || model) at this batch's marks


@dataclass
class TrainedControl:
    """A trained control and what its model card reports."""

    model: Any  # LlamaForCausalLM
    tokenizer: Tokenizer
    experiment: Experiment
    prior: KnownPrior
    settings: ControlSettings
    curve: list[dict[str, float]] = field(default_factory=list)
    held_out: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time while training: what a shared machine does not inflate
    sequences_seen: int = 0
    parameters: int = 0
    context: int = 0
    step: int = 0  # optimizer steps done (the series' checkpoints are taken before the last)

    def summary(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment.name,
            "experiment_file": self.experiment.where,
            "categories": self.experiment.category_names,
            "targets": self.experiment.targets,
            "n_max": self.experiment.n_max,
            "prior": self.prior.describe(),
            "prior_spec": self.prior.canonical,
            "prior_given_as": self.prior.spec,
            "settings": asdict(self.settings),
            "parameters": self.parameters,
            "context_tokens": self.context,
            "vocab_size": self.tokenizer.get_vocab_size(),
            "step": self.step,
            "sequences_seen": self.sequences_seen,
            "train_seconds": round(self.seconds, 1),
            "train_cpu_seconds": round(self.cpu_seconds, 1),
            "held_out": self.held_out,
            "curve": self.curve,
        }


def _config(tokenizer: Tokenizer, settings: ControlSettings, context: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=settings.hidden, intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers, num_attention_heads=settings.heads, num_key_value_heads=settings.heads,
        max_position_embeddings=context, bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS), pad_token_id=tokenizer.token_to_id(PAD), tie_word_embeddings=True,
    )


def _tensors(batch: Sequences, pad_id: int, device) -> tuple[torch.Tensor, ...]:
    width = max(len(ids) for ids in batch.ids)
    input_ids = torch.full((len(batch.ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch.ids), width), dtype=torch.long)
    for b, ids in enumerate(batch.ids):  # right padding: real tokens keep positions 0..len-1
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
    rows = torch.as_tensor(batch.mark_sequence, dtype=torch.long)
    cols = torch.as_tensor(batch.mark_position, dtype=torch.long)
    bayes = torch.as_tensor(batch.bayes, dtype=torch.float32)
    return tuple(t.to(device) for t in (input_ids, mask, rows, cols, bayes))


def _batch_loss(model, batch: Sequences, targets: torch.Tensor, objective: str, pad_id: int,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss and the per-mark KL(Bayes || model renormalized over the targets) in bits."""
    input_ids, mask, rows, cols, bayes = _tensors(batch, pad_id, device)
    logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1)
    next_lp = logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    other = mask[:, 1:].bool().clone()
    other[rows, cols] = False  # marks are scored below
    mark_lp = logp[rows, cols][:, targets]  # (M, K)
    if objective == "posterior":
        mark_terms = -(bayes * mark_lp).sum(-1)
    else:
        mark_terms = -next_lp[rows, cols]
    loss = (-next_lp[other].sum() + mark_terms.sum()) / (other.sum() + mark_terms.numel())
    renormalized = mark_lp - torch.logsumexp(mark_lp, dim=-1, keepdim=True)
    kl = (torch.special.xlogy(bayes, bayes) - bayes * renormalized).sum(-1) / _LN2
    return loss, kl


def _learning_rate(step: int, settings: ControlSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_kl(model, batch: Sequences, targets: torch.Tensor, pad_id: int, device, chunk: int = 64) -> float:
    """Mean KL(Bayes || model) in bits over the marks of ``batch``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(batch.ids), chunk):
        part = _slice(batch, start, start + chunk)
        _, kl = _batch_loss(model, part, targets, "posterior", pad_id, device)
        total += float(kl.sum())
        count += kl.numel()
    return total / count


def _slice(batch: Sequences, start: int, stop: int) -> Sequences:
    keep = (batch.mark_sequence >= start) & (batch.mark_sequence < stop)
    return Sequences(batch.ids[start:stop], batch.mark_sequence[keep] - start, batch.mark_position[keep],
                     batch.mark_n[keep], batch.outcome[keep], batch.bayes[keep])


def train_control(experiment: Experiment, prior: KnownPrior, settings: ControlSettings,
                  reporter: Reporter = SILENT, on_step: Callable[[StepStats], None] | None = None,
                  on_checkpoint: Callable[[TrainedControl], None] | None = None) -> TrainedControl:
    """Build the tokenizer and model, train them, and measure the held-out KL before and after;
    ``on_checkpoint`` receives the series of ``settings.save_every`` (see the module docstring)."""
    settings = settings.resolved()
    settings.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _train(experiment, prior, settings, reporter, on_step, on_checkpoint or (lambda trained: None))
    finally:
        torch.set_num_threads(threads)


def _train(experiment: Experiment, prior: KnownPrior, settings: ControlSettings, reporter: Reporter,
           on_step: Callable[[StepStats], None] | None,
           on_checkpoint: Callable[[TrainedControl], None]) -> TrainedControl:
    from llmprobe.model.loading import resolve_device

    device = resolve_device(settings.device)
    tokenizer = build_tokenizer(experiment, prior, settings.seed)
    targets_list = target_ids(tokenizer, experiment)
    targets = torch.tensor(targets_list, device=device)
    pad_id = tokenizer.token_to_id(PAD)
    data_rng = np.random.default_rng(np.random.SeedSequence(settings.seed, spawn_key=(1,)))
    eval_rng = np.random.default_rng(np.random.SeedSequence(settings.seed, spawn_key=(2,)))
    held_out = encode(render(experiment, prior, eval_rng, settings.eval_sequences), tokenizer, prior, targets_list)
    context = max(len(ids) for ids in held_out.ids)

    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(_config(tokenizer, settings, context)).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    reporter.log(f"control: {settings.layers} layers x {settings.hidden} wide, {parameters:,} parameters,"
                 f" {context} tokens of context; prior {prior.describe()}")
    untrained = held_out_kl(model, held_out, targets, pad_id, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.98),
                                  weight_decay=0.01)
    curve: list[dict[str, float]] = []
    window_loss, window_kl, window_steps = 0.0, 0.0, 0
    saved = set(settings.checkpoint_steps())
    clock = _TrainingClock()

    def snapshot(steps_done: int, kl_now: float) -> TrainedControl:
        return TrainedControl(
            model=model, tokenizer=tokenizer, experiment=experiment, prior=prior, settings=settings, curve=list(curve),
            held_out={"sequences": settings.eval_sequences, "marks": int(held_out.bayes.shape[0]),
                      "kl_bits_untrained": untrained, "kl_bits_trained": kl_now},
            seconds=clock.wall, cpu_seconds=clock.cpu, sequences_seen=steps_done * settings.batch_size,
            parameters=parameters, context=context, step=steps_done)

    if 0 in saved:
        with clock.paused():
            on_checkpoint(snapshot(0, untrained))
    for step in range(settings.steps):
        model.train()
        batch = encode(render(experiment, prior, data_rng, settings.batch_size), tokenizer, prior, targets_list)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, settings)
        loss, kl = _batch_loss(model, batch, targets, settings.objective, pad_id, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        stats = StepStats(step + 1, settings.steps, float(loss.detach()), float(kl.detach().mean()))
        window_loss, window_kl, window_steps = window_loss + stats.loss, window_kl + stats.kl_bits, window_steps + 1
        if (step + 1) % settings.every == 0 or step + 1 == settings.steps:
            curve.append({"step": step + 1, "loss": window_loss / window_steps, "kl_bits": window_kl / window_steps,
                          "seconds": round(clock.wall, 2)})
            window_loss, window_kl, window_steps = 0.0, 0.0, 0
        if on_step is not None:
            on_step(stats)
        if step + 1 in saved and step + 1 < settings.steps:
            with clock.paused():
                on_checkpoint(snapshot(step + 1, held_out_kl(model, held_out, targets, pad_id, device)))
    clock.stop()
    model.eval()
    trained = snapshot(settings.steps, held_out_kl(model, held_out, targets, pad_id, device))
    if settings.steps in saved:
        on_checkpoint(trained)
    return trained


class _TrainingClock:
    """Wall and CPU seconds of training: started when built, paused while a checkpoint is evaluated and saved."""

    def __init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self._stopped: tuple[float, float] | None = None

    @property
    def wall(self) -> float:
        return (self._stopped[0] if self._stopped else time.perf_counter()) - self._wall

    @property
    def cpu(self) -> float:
        return (self._stopped[1] if self._stopped else time.process_time()) - self._cpu

    def stop(self) -> None:
        self._stopped = (time.perf_counter(), time.process_time())

    @contextmanager
    def paused(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._wall += time.perf_counter() - wall
            self._cpu += time.process_time() - cpu
