"""What a trace computes, as options: :class:`TraceSettings`, and the sizes the batch planning uses.

:meth:`TraceSettings.validate` holds every check that needs no model, types included (a notebook passes
any Python value); :class:`llmprobe.tracing.run.TraceRun` makes it once per run, before a prompt file (or
stdin) is read or a model loaded, so a bad option fails in a second. A bad value is a
:class:`~llmprobe.errors.ParameterError` naming the field (``top_k``), which the CLI shows as its flag
(``--top-k``). The checks that need the model (top-k within the vocabulary, targets that
tokenize, lens layers in range) are made where the model is, when the engine is built for it.

The settings are recorded whole in every trace's metadata and are part of the resume fingerprint
(:mod:`llmprobe.tracing.checkpoint`): a field added here is recorded and guarded against a mismatched
resume with no further work, as the interventions are (:mod:`llmprobe.tracing.interventions`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llmprobe.errors import ParameterError, UsageError
from llmprobe.tracing.interventions import Intervention
from llmprobe.tracing.lens import parse_layers

FLOAT32_EPS = float(np.finfo(np.float32).eps)
SORT_WINDOW_BATCHES = 32  # prompts are length-sorted within windows of this many batches
AUTO = "auto"  # --batch-size auto: as many prompts as fit, halving on out-of-memory
AUTO_MAX_BATCH = 64  # the most prompts --batch-size auto puts in one batch (and its planning size)
CHAT_MODES = ("user", "prefill")


@dataclass
class TraceSettings:
    top_k: int = 20
    targets: list[str] = field(default_factory=list)
    max_new_tokens: int = 0
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int | str = 8  # or AUTO
    chat: bool | str = False  # False, True (= "user") or one of CHAT_MODES
    truncate: str | None = None  # "left" | "right": cut prompts longer than the context instead of failing
    layers: str | None = None  # logit lens: "all" or "0,4,8" (0-based decoder layers; docs/analyses.md)
    save_embeddings: bool = False  # keep the output head's input at marks (else the last position)
    interventions: list[Intervention] = field(default_factory=list)  # applied to every forward pass, in order

    def validate(self) -> None:
        """The checks that need no model, so bad options fail before a model load."""
        self._check_types()
        if self.chat not in (False, True, *CHAT_MODES):
            raise ParameterError("chat", f"expected {' or '.join(CHAT_MODES)}, got {self.chat!r}")
        if self.truncate not in (None, "left", "right"):
            raise ParameterError("truncate", f"expected left or right, got {self.truncate!r}")
        if self.top_k < 1:
            raise ParameterError("top_k", f"must be 1 or more, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ParameterError("max_new_tokens", f"must be 0 or more, got {self.max_new_tokens}")
        if self.seed < 0:
            raise ParameterError("seed", f"must be 0 or more, got {self.seed}")
        if self.batch_size != AUTO and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ParameterError("batch_size", f"must be 1 or more, or auto; got {self.batch_size!r}")
        if self.sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ParameterError("sample", "sampling needs --temperature > 0 and 0 < --top-p <= 1")
        if self.sample and self.top_p < FLOAT32_EPS:  # the float32 nucleus cut would drop every token
            raise ParameterError("top_p", f"must be at least {FLOAT32_EPS:.2g} (float32 resolution),"
                                          f" got {self.top_p:g}")
        for intervention in self.interventions:
            intervention.validate()
        if self.layers is not None:
            parse_layers(self.layers, None)
            if self.max_new_tokens:
                raise ParameterError("layers", "the logit lens covers prompt positions only; trace generated text as a"
                                               " prompt instead of combining it with --max-new-tokens")

    def _check_types(self) -> None:
        """Each field holds what it means (a notebook passes any value): whole numbers, numbers, flags, a list
        of target strings, an optional layer spec."""
        def whole(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("top_k", "max_new_tokens", "seed"):
            if not whole(getattr(self, name)):
                raise ParameterError(name, f"expected a whole number, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ParameterError(name, f"expected a number, got {value!r}")
        for name in ("sample", "save_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ParameterError(name, f"expected True or False, got {getattr(self, name)!r}")
        if not (isinstance(self.targets, (list, tuple)) and all(isinstance(t, str) for t in self.targets)):
            raise ParameterError("targets", f"expected a list of strings, got {self.targets!r}")
        if self.layers is not None and not isinstance(self.layers, str):
            raise ParameterError("layers", f"expected 'all' or comma-separated layer numbers, got {self.layers!r}")
        if self.batch_size != AUTO and not whole(self.batch_size):
            raise ParameterError("batch_size", f"expected a whole number or 'auto', got {self.batch_size!r}")

    @property
    def chat_mode(self) -> str | None:
        """None (no chat template), "user" or "prefill"."""
        return "user" if self.chat is True else self.chat or None

    @property
    def batch_prompts(self) -> int:
        """Prompts per batch to plan with: the fixed size, or the most that ``auto`` puts in a batch."""
        return AUTO_MAX_BATCH if self.batch_size == AUTO else int(self.batch_size)

    @property
    def window_prompts(self) -> int:
        """Prompts per length-sorting window (a resume restarts at a window's first prompt)."""
        return self.batch_prompts * SORT_WINDOW_BATCHES


def parse_batch_size(text: str) -> int | str:
    """``--batch-size``: a positive integer or ``auto``."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"expected a positive integer or auto, got {text!r}", where="--batch-size") from None
    if value < 1:
        raise UsageError(f"must be 1 or more, or auto; got {value}", where="--batch-size")
    return value
