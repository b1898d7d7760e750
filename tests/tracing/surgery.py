"""Interventions done the independent way: weight surgery or a swapped module in a deep copy of the model.

Each builder returns a :class:`LoadedModel` whose plain trace is what the matching intervention must
give on the original: zeroed ``o_proj`` input columns (a head), a zeroed ``o_proj`` (attention) or
``down_proj`` (MLP), a block replaced by one that returns its input, a block whose output is projected.
The original model is never touched.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from llmprobe.model.loading import LoadedModel


def operated(loaded: LoadedModel, *operations: Callable[[torch.nn.Module], None]) -> LoadedModel:
    """``loaded`` with a deep copy of its model on which ``operations`` were done."""
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for operation in operations:
            operation(model)
    return dataclasses.replace(loaded, model=model)


def head_dim(model: torch.nn.Module) -> int:
    config = model.config
    return int(getattr(config, "head_dim", 0) or config.hidden_size // config.num_attention_heads)


def zero_head(layer: int, head: int) -> Callable[[torch.nn.Module], None]:
    def operation(model: torch.nn.Module) -> None:
        d = head_dim(model)
        model.model.layers[layer].self_attn.o_proj.weight[:, head * d : (head + 1) * d] = 0
    return operation


def zero_attention(layer: int) -> Callable[[torch.nn.Module], None]:
    def operation(model: torch.nn.Module) -> None:
        projection = model.model.layers[layer].self_attn.o_proj
        projection.weight.zero_()
        if projection.bias is not None:
            projection.bias.zero_()
    return operation


def zero_mlp(layer: int) -> Callable[[torch.nn.Module], None]:
    def operation(model: torch.nn.Module) -> None:
        projection = model.model.layers[layer].mlp.down_proj
        projection.weight.zero_()
        if projection.bias is not None:
            projection.bias.zero_()
    return operation


class SkipBlock(torch.nn.Module):
    """A decoder layer that hands its input on unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class ProjectedBlock(torch.nn.Module):
    """A decoder layer followed by ``h - (h Q^T) Q`` (float64 reference arithmetic)."""

    def __init__(self, block: torch.nn.Module, directions: np.ndarray) -> None:
        super().__init__()
        self.block = block
        self.q = torch.tensor(directions, dtype=torch.float64)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.block(hidden_states, *args, **kwargs)
        h = (out[0] if isinstance(out, tuple) else out).double()
        projected = (h - (h @ self.q.T) @ self.q).to(hidden_states.dtype)
        return (projected, *out[1:]) if isinstance(out, tuple) else projected


def skip_block(layer: int) -> Callable[[torch.nn.Module], None]:
    def operation(model: torch.nn.Module) -> None:
        model.model.layers[layer] = SkipBlock()
    return operation


def project_after(layer: int, directions: np.ndarray) -> Callable[[torch.nn.Module], None]:
    def operation(model: torch.nn.Module) -> None:
        model.model.layers[layer] = ProjectedBlock(model.model.layers[layer], directions)
    return operation


def parameters_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, copied (to compare bit for bit after a run)."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def attached_hooks(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks on every module of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
