"""The model's final norm and output head as one small frozen module: hidden state -> logits.

The logit lens reads a decoder layer's residual output as if it were the last layer's, by sending it
through the same final norm and output head the model applies after its last layer (the "unembed"
of tuned-lens). Applied to the last decoder layer's output it reproduces the model's logits exactly.

The module shares the model's weights rather than copying them (an output head can be gigabytes), and
calls the norm's and head's ``forward`` directly. That skips torch forward hooks on those modules —
the trace's own logit hook sits on the head, and a lens pass must not look like an extra model
output to it — while keeping accelerate's device-placement wrappers, which replace ``forward``.
"""

from __future__ import annotations

import torch

from llmprobe.errors import UsageError


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """The decoder layer list and the final norm of a Llama-style causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if not isinstance(layers, torch.nn.ModuleList) or norm is None:
        raise UsageError(f"{type(model).__name__} has no decoder .layers and final .norm; the logit lens and"
                         " embeddings need a Llama-style model")
    return layers, norm


class Unembed(torch.nn.Module):
    """logits = head(final_norm(h)), with the model's own modules; never trained, never hooked."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        _, self.norm = decoder_parts(model)
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise UsageError(f"{type(model).__name__} has no output head")

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm of ``hidden``: what the output head reads (the stored prompt embedding)."""
        return self.norm.forward(hidden.to(self.norm.weight.device))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.forward(self.normed(hidden).to(self.device))

    @torch.inference_mode()
    def tv_lipschitz_bound(self) -> float:
        """A constant L with TV(softmax(W a), softmax(W b)) <= L * ||a - b||_2 for normed states a, b.

        With z = W a, d(softmax)/dz has ℓ1 norm at most half the spread of the logit change, so TV is at
        most a quarter of max_i Δz_i - min_i Δz_i <= 2 max_i ||w_i|| ||Δa||; hence L = max_i ||w_i|| / 2.
        A bias cancels in Δz.
        """
        return float(self.head.weight.float().norm(dim=1).max()) / 2
