"""The Ray options (``--engine ray`` and ``--ray-*``) as data: checked without importing Ray, torch or the engine,
so that a typo in them fails in well under a second. :mod:`llmprobe.tracing.ray_runner` runs with them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmprobe.errors import UsageError

if TYPE_CHECKING:
    from llmprobe.tracing.settings import TraceSettings

TASKS_PER_ACTOR = 4  # blocks per actor when sizing tasks automatically, so actors finish close together


@dataclass
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray on this machine
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    prompts_per_task: int | None = None  # prompts per actor call (and roughly per part file)

    def validate(self) -> None:
        if self.actors < 1:
            raise UsageError(f"must be 1 or more, got {self.actors}", where="--ray-actors")
        if not self.cpus_per_actor > 0:
            raise UsageError(f"must be more than 0, got {self.cpus_per_actor}", where="--ray-cpus-per-actor")
        if self.gpus_per_actor < 0:
            raise UsageError(f"must be 0 or more, got {self.gpus_per_actor}", where="--ray-gpus-per-actor")
        if self.prompts_per_task is not None and self.prompts_per_task < 1:
            raise UsageError(f"must be 1 or more, got {self.prompts_per_task}", where="--ray-prompts-per-task")

    def task_size(self, n_prompts: int, settings: TraceSettings) -> int:
        """Enough prompts per call to fill length-sorted batches (at most one sorting window), few enough
        that every actor gets work."""
        if self.prompts_per_task is not None:
            return self.prompts_per_task
        spread = math.ceil(n_prompts / (self.actors * TASKS_PER_ACTOR))
        return min(settings.window_prompts, max(settings.batch_prompts, spread))


def ray_options_for(engine: str, address: str | None, actors: int | None, cpus_per_actor: float | None,
                    gpus_per_actor: float | None, prompts_per_task: int | None) -> RayOptions | None:
    """The ``--ray-*`` options as RayOptions for ``--engine ray``, None for the local engine."""
    if engine not in ("local", "ray"):
        raise UsageError(f"unknown engine {engine!r} (expected local or ray)", where="--engine")
    given = {"--ray-address": address, "--ray-actors": actors, "--ray-cpus-per-actor": cpus_per_actor,
             "--ray-gpus-per-actor": gpus_per_actor, "--ray-prompts-per-task": prompts_per_task}
    if engine == "local":
        stray = next((flag for flag, value in given.items() if value is not None), None)
        if stray:
            raise UsageError("only applies with --engine ray", where=stray)
        return None
    defaults = RayOptions()
    return RayOptions(address=address, actors=defaults.actors if actors is None else actors,
                      cpus_per_actor=defaults.cpus_per_actor if cpus_per_actor is None else cpus_per_actor,
                      gpus_per_actor=defaults.gpus_per_actor if gpus_per_actor is None else gpus_per_actor,
                      prompts_per_task=prompts_per_task)
