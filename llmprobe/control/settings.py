"""What a control is: model sizes and the training run, with their defaults and checks (no torch here).

The ``wind-tunnel`` command takes its option defaults from :class:`ControlSettings`, so the CLI,
the library and the docs cannot disagree about them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmprobe.errors import UsageError

OBJECTIVES = ("posterior", "next-token")


@dataclass(frozen=True)
class ControlSettings:
    """Model sizes and the training run; the CLI's defaults are these (about 3 CPU-minutes for the coin control)."""

    layers: int = 4
    hidden: int = 64
    heads: int = 4
    intermediate: int = 256
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    objective: str = "posterior"
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # CPU threads; the matrices are small, so more threads rarely help and often hurt
    eval_sequences: int = 256
    log_every: int = 0  # 0: about 50 points over the run

    def validate(self) -> None:
        positive = {"layers": "--layers", "hidden": "--hidden", "heads": "--heads", "intermediate": "--intermediate",
                    "steps": "--steps", "batch_size": "--batch-size", "threads": "--threads",
                    "eval_sequences": "--eval-sequences"}
        for name, flag in positive.items():
            if getattr(self, name) < 1:
                raise UsageError(f"must be 1 or more, got {getattr(self, name)}", where=flag)
        if self.hidden % self.heads:
            raise UsageError(f"--hidden {self.hidden} must be a multiple of --heads {self.heads}", where="--hidden")
        if (self.hidden // self.heads) % 2:
            raise UsageError(f"the head width --hidden/--heads = {self.hidden // self.heads} must be even (rotary"
                             " embeddings)", where="--heads")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UsageError(f"must be > 0, got {self.learning_rate}", where="--learning-rate")
        if self.warmup_steps < 0:
            raise UsageError(f"must be 0 or more, got {self.warmup_steps}", where="--warmup-steps")
        if self.objective not in OBJECTIVES:
            raise UsageError(f"expected one of {', '.join(OBJECTIVES)}, got {self.objective!r}", where="--objective")

    @property
    def every(self) -> int:
        return self.log_every or max(1, self.steps // 50)
