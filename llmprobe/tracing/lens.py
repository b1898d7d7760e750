"""Looking inside the forward pass: logit-lens statistics per decoder layer, and prompt embeddings.

Layer numbering (docs/analyses.md): layer ``i`` is the residual-stream output of decoder layer ``i``,
0-based, so a model with L decoder layers has layers 0..L-1. The output of layer L-1 goes through the
final norm and output head to give the model's logits, so the rows of a plain trace *are* layer L-1:
a plain trace joins a lens trace on (prompt_id, position) with layer = L-1.

:func:`probe_internals` attaches (through :mod:`llmprobe.tracing.hooks`), for the duration of one
teacher-forced forward pass,

* a forward hook on each chosen decoder layer that sends the layer's output through :class:`Unembed`
  and reduces the logits on the device with the trace's own :class:`LogitReducer` — the same
  block-wise unembed-and-reduce path as the output layer, so one block of logits exists at a time and
  only top-k, entropy, next-token and target statistics leave the device;
* for models the engine cannot split into body and head (it then traces through a hook on the head),
  a forward pre-hook on the output head that copies the head's input (the final-normed hidden state)
  at the requested positions to the host as float16: the prompt embeddings for the continuity
  analysis. When the engine runs the body itself it reads them off the body's output instead.

All hooks are removed when the block exits, on every path.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from llmprobe.errors import ParameterError
from llmprobe.tracing.hooks import Hooks, on_input, on_output
from llmprobe.tracing.reduction import LogitReducer, StepStats
from llmprobe.model.structure import OutputHead, Unembed, decoder_parts


def parse_layers(spec: str, num_layers: int | None) -> list[int]:
    """``all`` or comma-separated 0-based decoder layer indices -> sorted distinct layers.

    With ``num_layers`` None only the syntax is checked (before a model is loaded).
    """
    text = spec.strip().lower()
    if text == "all":
        return list(range(num_layers or 0))
    layers: set[int] = set()
    for item in text.split(","):
        try:
            layer = int(item)
        except ValueError:
            raise ParameterError("layers", f"expected 'all' or comma-separated layer numbers,"
                                           f" got {item.strip()!r}") from None
        if layer < 0 or (num_layers is not None and layer >= num_layers):
            top = "" if num_layers is None else f": the model has decoder layers 0..{num_layers - 1}"
            raise ParameterError("layers", f"layer {layer} is out of range{top}")
        layers.add(layer)
    return sorted(layers)


@dataclass
class InternalsPlan:
    """What a trace records from inside the model; fixed once per run from the trace settings."""

    layers: list[int]  # layers written (ascending, the output layer included); empty: no lens
    output_layer: int  # L - 1: its rows are the model's own output
    embedding_dim: int  # 0: embeddings not saved

    @classmethod
    def build(cls, model: torch.nn.Module, layers: str | None, save_embeddings: bool) -> InternalsPlan:
        if not layers and not save_embeddings:
            return cls([], -1, 0)
        decoder_layers, _ = decoder_parts(model)
        output_layer = len(decoder_layers) - 1
        written = sorted({*parse_layers(layers, len(decoder_layers)), output_layer}) if layers else []
        head = cast(Any, model).get_output_embeddings()  # a transformers model's method, past Module.__getattr__
        dim = int(head.weight.shape[1]) if save_embeddings else 0
        return cls(written, output_layer, dim)

    @property
    def hooked(self) -> list[int]:
        """Layers that need a lens hook: the output layer's rows come from the output head itself."""
        return [layer for layer in self.layers if layer != self.output_layer]

    def metadata(self, model: torch.nn.Module) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if self.layers:
            meta["lens"] = {"layers": self.layers, "output_layer": self.output_layer,
                            "numbering": "0-based decoder layers; output_layer rows are the model's output"}
        if self.embedding_dim:
            meta["embedding"] = {"dim": self.embedding_dim, "dtype": "float16",
                                 "what": "final-normed hidden state read by the output head",
                                 "tv_lipschitz_bound": Unembed(model).tv_lipschitz_bound()}
        return meta

    def embedding_column(self, rows: list[int], embeddings: torch.Tensor | None, total: int) -> pa.Array:
        """The ``embedding`` column: ``embeddings[i]`` on row ``rows[i]``, null on every other row."""
        values = np.zeros((total, self.embedding_dim), dtype=np.float16)
        valid = np.zeros(total, dtype=bool)
        if rows:
            if embeddings is None:
                raise ValueError("embedding rows without embeddings")
            values[rows] = embeddings.numpy()
            valid[rows] = True
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float16()), self.embedding_dim,
                                                 mask=pa.array(~valid))


@dataclass
class Internals:
    """What one forward pass revealed: lens statistics per layer, embeddings at requested positions."""

    layer_stats: dict[int, StepStats] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None  # [N, hidden] float16 on the host, in the order requested


def lens_stats(unembed: Unembed, reducer: LogitReducer, hidden: torch.Tensor,
               next_ids: torch.Tensor | None) -> StepStats:
    """The reducer's statistics for ``unembed(hidden)``: the final norm, then the output head applied
    and reduced by the same path as the output layer's (:meth:`LogitReducer.reduce_hidden`), out of
    sight of the trace's own hooks on the head."""
    head = OutputHead(unembed.head, call_hooks=False)
    return reducer.reduce_hidden(head, unembed.normed(hidden).to(head.device), next_ids)


@contextmanager
def probe_internals(model: torch.nn.Module, reducer: LogitReducer, layers: list[int],
                    next_ids: torch.Tensor | None = None,
                    embed_at: tuple[list[int], list[int]] | None = None) -> Iterator[Internals]:
    """Hook ``layers`` (logit lens) and, with ``embed_at`` = (batch rows, columns), the head's input.

    Meant to wrap exactly one forward pass; a second pass inside the block is an error.
    """
    found = Internals()
    if not layers and embed_at is None:
        yield found
        return
    decoder_layers, _ = decoder_parts(model)
    unembed = Unembed(model)

    def layer_output(layer: int):
        def see(output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if layer in found.layer_stats:
                raise RuntimeError("probe_internals saw a second forward pass")
            found.layer_stats[layer] = lens_stats(unembed, reducer, hidden, next_ids)
        return see

    def head_input(normed: torch.Tensor, embed_at: tuple[list[int], list[int]]) -> None:
        if found.embeddings is not None:
            raise RuntimeError("probe_internals saw a second forward pass")
        rows, cols = embed_at
        index = (torch.tensor(rows, device=normed.device), torch.tensor(cols, device=normed.device))
        found.embeddings = normed[index].to(torch.float16).cpu()

    with Hooks() as hooks:
        for layer in layers:
            hooks.add(on_output(decoder_layers[layer], layer_output(layer)))
        if embed_at is not None:
            hooks.add(on_input(unembed.head, functools.partial(head_input, embed_at=embed_at)))
        yield found
