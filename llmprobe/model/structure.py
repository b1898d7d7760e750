"""The parts of a Llama-style causal LM the tracer calls itself: decoder body, final norm, output head.

:func:`split_causal_lm` returns the final norm and an :class:`OutputHead` for the models whose logits
are exactly ``lm_head(norm(last decoder layer))`` — no soft-capping, scaling or other step between
them. The tracer then runs the model's own forward with ``logits_to_keep`` set so that the model
projects no position, captures the final norm's output with a forward hook (attached by
:mod:`llmprobe.tracing.hooks`, which owns every hook the tracer uses), and applies the head
itself, a vocabulary tile of a pass of positions at a time, so ``[B, T, V]`` logits never exist. The
model's forward and the head module keep accelerate's hooks (device maps, disk offload) in force: the
head runs wherever accelerate put it.

:class:`Unembed` is the model's final norm and output head as one small frozen module: hidden state -> logits.

The logit lens reads a decoder layer's residual output as if it were the last layer's, by sending it
through the same final norm and output head the model applies after its last layer (the "unembed"
of tuned-lens). Applied to the last decoder layer's output it reproduces the model's logits exactly.

The module shares the model's weights rather than copying them (an output head can be gigabytes), and
calls the norm's and head's ``forward`` directly. That skips torch forward hooks on those modules —
the trace's own logit hook sits on the head, and a lens pass must not look like an extra model
output to it — while keeping accelerate's device-placement wrappers, which replace ``forward``.

:class:`DecoderBlocks` is where interventions (issue 22) find what they edit, for Llama-style decoders:
decoder layer L is ``layers[L]``; its attention is ``layers[L].self_attn``, whose output projection
``self_attn.o_proj`` reads the heads' outputs side by side (head H is input columns ``H * head_dim ..
(H + 1) * head_dim``; with grouped-query attention the query heads are counted, not the key/value
heads); its MLP is ``layers[L].mlp``. A model laid out otherwise is refused by name of the attribute
that is missing, never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprobe.errors import UsageError

# model types whose ForCausalLM forward is exactly logits = lm_head(model(...).last_hidden_state)
SPLITTABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # config fields that break it


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """The decoder layer list and the final norm of a Llama-style causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    found = {"decoder": decoder is not None, ".layers": isinstance(layers, torch.nn.ModuleList),
             ".norm": norm is not None}
    missing = [name for name, present in found.items() if not present]
    if missing:
        raise UsageError(f"{type(model).__name__} has no {missing[0]} (a Llama-style decoder with .layers and a final"
                         " .norm); the logit lens, embeddings and interventions need a Llama-style model")
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


class OutputHead:
    """The output head as a function of final-normed hidden rows ``[n, H] -> [n, V]``.

    A plain in-memory ``nn.Linear`` without bias is ``tileable``: :meth:`logits` makes any vocabulary
    slice of the logits as one matrix product into a buffer the caller reuses (no fresh allocation, so
    no page faults, per tile), and :meth:`token_logits` one entry per row directly. A head under an
    accelerate hook (offloaded, or on another device), or one with torch hooks while ``call_hooks``, is
    called as a module on ``[1, n, H]``, so the hooks place it or see its input. ``call_hooks=False``
    (the logit lens) calls the module's ``forward`` instead: accelerate's placement, which replaces
    ``forward``, still applies, but the trace's own hooks on the head do not see a lens pass.
    """

    def __init__(self, head: torch.nn.Linear, call_hooks: bool = True) -> None:
        self.module = head
        self.call_hooks = call_hooks
        self.vocab_size = int(head.weight.shape[0])
        self._plain = (getattr(head, "_hf_hook", None) is None and getattr(head, "bias", None) is None
                       and head.weight.device.type != "meta")

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    @property
    def tileable(self) -> bool:
        hooked = self.call_hooks and bool(self.module._forward_pre_hooks or self.module._forward_hooks)
        return self._plain and not hooked

    def logits(self, rows: torch.Tensor, first: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of vocabulary entries ``first .. stop`` for ``[n, H]`` rows (``tileable`` heads only)."""
        weight = self.module.weight
        return torch.mm(rows.to(weight.device, weight.dtype), weight[first:stop].t(), out=out)

    def token_logits(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Row i's logit of token ``ids[i]``, computed in float64 and rounded to the head's dtype, as float32."""
        weight = self.module.weight
        exact = (rows.to(weight.device).double() * weight[ids.to(weight.device)].double()).sum(-1)
        return exact.to(weight.dtype).float()

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        if self.tileable:
            return self.logits(rows, 0, self.vocab_size)
        call = self.module if self.call_hooks else self.module.forward
        return call(rows[None]).squeeze(0)  # as the model calls it, [1, n, H], so its hooks see that


class CausalLMParts:
    """What the tracer needs to apply the head itself: the final norm, whose output it captures while
    the model's own forward runs with ``logits_to_keep`` empty (so the model projects no position),
    and the output head it then applies to the captured final-normed hidden states. The capture's
    hook is attached by :mod:`llmprobe.tracing.hooks`; this module names the parts, it hooks nothing."""

    def __init__(self, norm: torch.nn.Module, head: torch.nn.Linear) -> None:
        self.norm = norm
        self.head = OutputHead(head)


def split_causal_lm(model: torch.nn.Module) -> tuple[CausalLMParts | None, str]:
    """The model's final norm and head, or None and the reason it cannot be split that way."""
    import inspect

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SPLITTABLE_MODEL_TYPES:
        return None, f"model type {model_type!r} is not one whose logits are lm_head(final norm(...))"
    scaled = [name for name in LOGIT_POSTPROCESSING if getattr(config, name, None)]
    if scaled:
        return None, f"the model post-processes its logits ({', '.join(scaled)})"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None, "its forward has no logits_to_keep argument"
    try:
        _, norm = decoder_parts(model)
    except UsageError:
        return None, "no decoder with .layers and a final .norm"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return None, f"the output head is a {type(head).__name__}, not a linear layer"
    return CausalLMParts(norm, head), ""


INTERVENTION_NEEDS = "interventions need a Llama-style decoder (layers[L].self_attn.o_proj, layers[L].mlp)"


@dataclass(frozen=True)
class DecoderBlocks:
    """The decoder layers of a Llama-style model and the sizes of their attention heads (see the module
    docstring). Each accessor checks the attribute it reads and names it when it is missing."""

    layers: torch.nn.ModuleList
    n_heads: int
    head_dim: int
    hidden: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> DecoderBlocks:
        layers, _ = decoder_parts(model)
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None)
        heads = getattr(config, "num_attention_heads", None)
        for name, value in (("hidden_size", hidden), ("num_attention_heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"{type(model).__name__}'s config has no {name}; {INTERVENTION_NEEDS}")
        head_dim = int(getattr(config, "head_dim", 0) or hidden // heads)
        return cls(layers, heads, head_dim, hidden)

    def __len__(self) -> int:
        return len(self.layers)

    def block(self, layer: int) -> torch.nn.Module:
        return self.layers[layer]

    def attention(self, layer: int) -> torch.nn.Module:
        return self._part(layer, "self_attn")

    def attention_output(self, layer: int) -> torch.nn.Linear:
        """The projection that reads every head's output (``o_proj``); its input columns are the heads."""
        projection = getattr(self.attention(layer), "o_proj", None)
        if not isinstance(projection, torch.nn.Linear):
            raise UsageError(f"decoder layer {layer} ({type(self.block(layer)).__name__}) has no linear"
                             f" .self_attn.o_proj; {INTERVENTION_NEEDS}")
        if projection.in_features != self.n_heads * self.head_dim:
            raise UsageError(f"decoder layer {layer}: .self_attn.o_proj reads {projection.in_features} features,"
                             f" not {self.n_heads} heads x {self.head_dim}; {INTERVENTION_NEEDS}")
        return projection

    def mlp(self, layer: int) -> torch.nn.Module:
        return self._part(layer, "mlp")

    def head_columns(self, head: int) -> slice:
        """Head ``head``'s columns of the attention output projection's input."""
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def _part(self, layer: int, name: str) -> torch.nn.Module:
        part = getattr(self.block(layer), name, None)
        if not isinstance(part, torch.nn.Module):
            raise UsageError(f"decoder layer {layer} ({type(self.block(layer)).__name__}) has no .{name};"
                             f" {INTERVENTION_NEEDS}")
        return part
