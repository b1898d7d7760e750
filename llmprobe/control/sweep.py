"""Train a series: one control per size of a sweep, saved at the steps of ``save_every``, and its manifest.

:class:`Sweep` is what ``wind-tunnel`` was asked for: the sizes (``--layers`` x ``--hidden``, or the
experiment's ``[sweep]`` table) and the shared settings. Every size is checked before the first one
trains, so a width that does not divide into the heads fails in a second, not after an hour.
:func:`train_series` trains the sizes one after another under the same prior, data and seed (each
size's data and weights come from the seed alone, so a size trains the same weights alone or in a
grid) and writes the layout of :mod:`llmprobe.control.series` through
:func:`llmprobe.control.checkpoint.control_dir`: the whole series appears when it is complete, and
never replaces one another run wrote meanwhile unless ``replace`` (``--force``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from typing import Any

from llmprobe.control.checkpoint import ControlDir, control_dir
from llmprobe.control.prior import KnownPrior
from llmprobe.control.series import MANIFEST, STEPS, SeriesCheckpoint, Size, Sweep, manifest_document, step_name
from llmprobe.control.train import StepStats, train_control
from llmprobe.experiments import Experiment
from llmprobe.files import write_atomic
from llmprobe.progress import SILENT, Reporter

StepBar = Callable[[str, int], AbstractContextManager[Callable[[StepStats], None]]]
"""A progress display for one size's training: (label, steps) -> a context yielding ``on_step``."""


def train_series(experiment: Experiment, prior: KnownPrior, sweep: Sweep, output: str, *, replace: bool = False,
                 reporter: Reporter = SILENT, bar: StepBar | None = None) -> dict[str, Any]:
    """Train every size of ``sweep`` and write the series at ``output``; returns the manifest's facts."""
    sweep.validate()
    grid = len(sweep.sizes) > 1
    checkpoints: list[SeriesCheckpoint] = []
    sizes: list[dict[str, Any]] = []

    def train_size(size: Size, directory: ControlDir, prefix: str) -> None:
        settings = sweep.settings_for(size)
        if grid:
            reporter.log(f"size {size.name} ({len(sizes) + 1} of {len(sweep.sizes)})")
        with (bar or _no_bar)(size.name if grid else "training", settings.steps) as on_step:
            trained = train_control(experiment, prior, settings, reporter, on_step, on_checkpoint=directory.add_step)
        directory.final = trained
        size_path = prefix.rstrip("/") or "."
        saved = [(f"{prefix}{STEPS}/{step_name(s.step)}", s) for s in directory.steps]
        for path, snapshot in saved or [(size_path, trained)]:
            checkpoints.append(SeriesCheckpoint(
                path=path, size=size.name, step=snapshot.step, steps=settings.steps, layers=size.layers,
                hidden=size.hidden, parameters=snapshot.parameters,
                held_out_kl_bits=snapshot.held_out["kl_bits_trained"]))
        sizes.append({"name": size.name, "path": size_path, "layers": size.layers,
                      "hidden": size.hidden, "heads": settings.heads, "intermediate": settings.intermediate,
                      "parameters": trained.parameters, "train_seconds": round(trained.seconds, 1),
                      "train_cpu_seconds": round(trained.cpu_seconds, 1), "held_out": trained.held_out})

    def facts() -> dict[str, Any]:
        return {"experiment": experiment.name, "experiment_file": experiment.where, "prior": prior.describe(),
                "prior_spec": prior.canonical, "seed": sweep.settings.seed, "steps": sweep.settings.steps,
                "save_every": sweep.settings.save_every,
                "settings": {k: v for k, v in asdict(sweep.settings).items() if k not in ("layers", "hidden")},
                "sizes": sizes}

    with control_dir(output, replace=replace) as root:
        if grid:
            for size in sweep.sizes:
                with control_dir(root.root / size.name) as directory:
                    train_size(size, directory, f"{size.name}/")
        else:
            train_size(sweep.sizes[0], root, "")
        write_atomic(root.root / MANIFEST, manifest_document(checkpoints, facts()))
    return {**facts(), "checkpoints": [asdict(c) for c in checkpoints]}


def _no_bar(label: str, total: int) -> AbstractContextManager[Callable[[StepStats], None]]:
    return nullcontext(lambda stats: None)
