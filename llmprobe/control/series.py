"""Checkpoint series: the sizes a sweep trains (:class:`Sweep`) and the manifest that lists every checkpoint (no torch
here).

``wind-tunnel --save-every N`` saves the control at steps 0, N, 2N, ... and the last; a size grid
(``--layers 1,2,4 --hidden 16,32,64``, or a ``[sweep]`` table in the experiment TOML) trains one
control per (layers, hidden) under the same prior, data and seed. The output directory is then a
*series*, laid out as

* one size: ``DIR/`` is the final checkpoint (``trace --model DIR`` loads it), ``DIR/steps/step-000400/``
  each saved step, ``DIR/manifest.json``;
* a grid: ``DIR/L2-H32/`` per size, laid out as above without its own manifest, and ``DIR/manifest.json``.

The manifest (:data:`MANIFEST_FORMAT`) lists every checkpoint in order — size by size in the grid's
order, steps ascending — with its path relative to the manifest, step, size, parameter count and
held-out KL at that step; ``llmprobe compare DIR`` expands a series through :func:`read_series`,
which refuses a manifest naming a directory that is not there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from llmprobe.control.settings import ControlSettings
from llmprobe.errors import UsageError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "llmprobe.series/1"
STEPS = "steps"
SWEEP_KEYS = ("layers", "hidden", "save_every")


def step_name(step: int) -> str:
    """A saved step's directory name: ``step-000400``."""
    return f"step-{step:06d}"


@dataclass(frozen=True)
class Size:
    """One model size of a sweep."""

    layers: int
    hidden: int

    @property
    def name(self) -> str:
        return f"L{self.layers}-H{self.hidden}"


@dataclass(frozen=True)
class Sweep:
    """The sizes to train and the settings they share (``layers`` and ``hidden`` are each size's)."""

    sizes: list[Size]
    settings: ControlSettings

    @property
    def is_series(self) -> bool:
        """More than one checkpoint to write: several sizes, or steps to save."""
        return len(self.sizes) > 1 or self.settings.save_every is not None

    def settings_for(self, size: Size) -> ControlSettings:
        return replace(self.settings, layers=size.layers, hidden=size.hidden).resolved()

    def validate(self) -> None:
        for size in self.sizes:
            self.settings_for(size).validate()


def size_grid(layers: list[int], hidden: list[int]) -> list[Size]:
    """Every (layers, hidden) pair, layers outermost, each list in the order given."""
    return [Size(depth, width) for depth in layers for width in hidden]


def parse_size_list(text: str, flag: str) -> list[int]:
    """``1,2,4`` -> [1, 2, 4] (repeats dropped, order kept); each 1 or more."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"expected comma-separated whole numbers, got {text!r}", where=flag) from None
    bad = next((v for v in values if v < 1), None)
    if bad is not None:
        raise UsageError(f"must be 1 or more, got {bad}", where=flag)
    return list(dict.fromkeys(values))


def sweep_table(table: Any, where: str) -> dict[str, Any]:
    """An experiment's ``[sweep]`` table: ``layers = [1, 2, 4]``, ``hidden = [16, 32, 64]``, ``save_every = 75``
    (each optional; the command line wins), checked and returned as ``{key: value}``."""
    if not isinstance(table, dict):
        raise UsageError("sweep: must be a table ([sweep])", where=where)
    unknown = sorted(set(table) - set(SWEEP_KEYS))
    if unknown:
        raise UsageError(f"sweep.{unknown[0]}: unknown key; allowed here: {', '.join(SWEEP_KEYS)}", where=where)
    for key in ("layers", "hidden"):
        value = table.get(key)
        if value is not None and not (isinstance(value, list) and value and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
            raise UsageError(f"sweep.{key}: must be an array of whole numbers, each 1 or more", where=where)
    every = table.get("save_every")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise UsageError(f"sweep.save_every: must be a whole number, 1 or more, got {every!r}", where=where)
    return dict(table)


@dataclass(frozen=True)
class SeriesCheckpoint:
    """One checkpoint of a series: ``path`` relative to the manifest's directory."""

    path: str
    size: str
    step: int
    steps: int
    layers: int
    hidden: int
    parameters: int
    held_out_kl_bits: float

    @property
    def name(self) -> str:
        """How a comparison names it: ``L2-H32@400``."""
        return f"{self.size}@{self.step}"


def manifest_document(checkpoints: list[SeriesCheckpoint], facts: dict[str, Any]) -> str:
    """The manifest's JSON text: ``facts`` (experiment, prior, seed, settings, sizes) and the checkpoints."""
    return json.dumps({"format": MANIFEST_FORMAT, **facts, "checkpoints": [asdict(c) for c in checkpoints]},
                      indent=1) + "\n"


def manifest_path(source: str | Path) -> Path | None:
    """The manifest ``source`` names: the file itself, or ``manifest.json`` in a series directory (None: neither)."""
    path = Path(source)
    if path.is_dir():
        return path / MANIFEST if (path / MANIFEST).is_file() else None
    return path if path.is_file() and path.suffix.lower() == ".json" else None


def read_series(manifest: Path) -> list[tuple[SeriesCheckpoint, Path]]:
    """Every checkpoint the manifest lists, in order, with its directory; one line naming the manifest
    when it is not a series manifest or names a directory that is not there."""
    where = str(manifest)
    try:
        document = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"cannot read the series manifest: {exc}", where=where) from None
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise UsageError(f"not a series manifest (expected \"format\": \"{MANIFEST_FORMAT}\", as `llmprobe"
                         " wind-tunnel --save-every` writes)", where=where)
    entries = document.get("checkpoints")
    if not isinstance(entries, list) or not entries:
        raise UsageError("the series manifest lists no checkpoints", where=where)
    found = []
    for i, entry in enumerate(entries):
        try:
            checkpoint = SeriesCheckpoint(**entry)
        except TypeError:
            raise UsageError(f"checkpoint {i + 1} of the manifest is malformed", where=where) from None
        directory = manifest.parent / checkpoint.path
        if not (directory / "config.json").is_file():
            problem = "is not there" if not directory.exists() else "has no config.json"
            raise UsageError(f"names checkpoint {checkpoint.path}, which {problem}", where=where)
        found.append((checkpoint, directory))
    return found
