"""What a control is: model sizes and the training run, with their defaults and checks (no torch here).

The ``wind-tunnel`` command takes its option defaults from :class:`ControlSettings`, so the CLI,
the library and the docs cannot disagree about them. ``save_every`` asks for a checkpoint series
(:meth:`ControlSettings.checkpoint_steps`: steps 0, N, 2N, ... and the last); it never changes the
training itself, so the same seed gives the same final weights with or without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from llmprobe.errors import UsageError

OBJECTIVES = ("posterior", "next-token")


@dataclass(frozen=True)
class ControlSettings:
    """Model sizes and the training run; the CLI's defaults are these (about 3 CPU-minutes for the coin control)."""

    layers: int = 4
    hidden: int = 64
    heads: int = 4
    intermediate: int | None = None  # None: 4 x hidden (256 at the default width)
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
    save_every: int | None = None  # a checkpoint every this many steps (and at 0 and the last); None: none

    def validate(self) -> None:
        positive = {"layers": "--layers", "hidden": "--hidden", "heads": "--heads", "intermediate": "--intermediate",
                    "steps": "--steps", "batch_size": "--batch-size", "threads": "--threads",
                    "eval_sequences": "--eval-sequences", "save_every": "--save-every"}
        for name, flag in positive.items():
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"must be 1 or more, got {value}", where=flag)
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

    def resolved(self) -> ControlSettings:
        """These settings with the MLP width filled in (4 x hidden unless given)."""
        return replace(self, intermediate=self.intermediate or 4 * self.hidden)

    def checkpoint_steps(self) -> list[int]:
        """The steps a series saves: 0, N, 2N, ... and the last (none without ``save_every``)."""
        if self.save_every is None:
            return []
        return sorted({*range(0, self.steps, self.save_every), self.steps})
