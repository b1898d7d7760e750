"""Interventions made real on a model: what each edit hooks, and the numbers it needs.

:class:`Editor` resolves a run's :class:`~llmprobe.tracing.interventions.Intervention` list against one
model (:class:`~llmprobe.model.structure.DecoderBlocks` finds the modules; layers, heads and direction
widths are checked there, naming the option) and hands the engine, per batch, the :class:`Edit` list
to attach. Every edit is a hook from :mod:`llmprobe.tracing.hooks` that returns its replacement out of
place, attached inside the engine's per-batch hook block and so removed on every way out; the model's
parameters are never touched.

What each kind edits (docs/design.md; the tests compare each with weight surgery on a copy):

* head H of layer L: ``o_proj``'s input columns ``H*d .. (H+1)*d`` set to 0 (or their mean);
* ``L.attn`` / ``L.mlp``: the output of ``o_proj`` / the MLP, i.e. the block's attention or MLP
  contribution to the residual stream, set to 0 (or its mean);
* block L: the decoder layer's output replaced by its input (``mean``: input + the mean of output −
  input), so the residual stream passes through;
* a direction file at L: ``h - (h Q^T) Q`` on the decoder layer's output, Q the orthonormalized rows
  (computed in float32 at least);
* a patch at L: the decoder layer's output at the chosen positions replaced by the donor's, taken in
  the same batch layout (same padding) from a pass of the donor prompts on the unmodified model, so a
  prompt patched with itself is the plain trace bit for bit. It is attached for the prompt's pass only
  (a one-shot hook).

Means (``--ablation mean``) are measured by :meth:`Editor.measure_means` over the run's own prompts,
padding excluded, on the unmodified model, in float64, before anything is traced; they are part of
the trace metadata (:meth:`Editor.metadata`). The sweep (:mod:`llmprobe.tracing.sweep`) builds the
same edits for its components and measures every candidate mean in its baseline pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterator

import numpy as np
import torch

from llmprobe.errors import UsageError
from llmprobe.model.structure import DecoderBlocks, decoder_parts
from llmprobe.tracing.encoding import EncodedPrompt, PromptEncoder
from llmprobe.tracing.hooks import Hooks, edit_input, edit_output, on_input, on_output, stop_before
from llmprobe.tracing.interventions import Intervention, parse_positions
from llmprobe.tracing.prompts import read_prompts

ORTHONORMAL_TOLERANCE = 1e-6  # a row whose residual after the others is below this (relative) is dependent
# what a mean ablation replaces, per site: the activation measured by the first pass
MEASURED = {"head": "attention_input", "attn": "attention_output", "mlp": "mlp_output", "block": "block_update"}


def orthonormal_rows(vectors: np.ndarray, where: str) -> np.ndarray:
    """Orthonormal rows spanning ``vectors``' rows ([k, hidden], float64), in their order (Gram-Schmidt by QR);
    a zero row, a non-finite entry or a row that depends on the earlier ones is refused."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise UsageError(f"expected an array of shape [k, hidden], got shape {list(vectors.shape)}", where=where)
    if not np.all(np.isfinite(vectors)):
        raise UsageError("the directions hold NaN or infinite values", where=where)
    norms = np.linalg.norm(vectors, axis=1)
    if (norms == 0).any():
        raise UsageError(f"direction {int(np.flatnonzero(norms == 0)[0])} is zero: it cannot be made a unit vector",
                         where=where)
    if vectors.shape[0] > vectors.shape[1]:
        raise UsageError(f"{vectors.shape[0]} directions in {vectors.shape[1]} dimensions cannot be independent",
                         where=where)
    q, r = np.linalg.qr((vectors / norms[:, None]).T)
    dependent = np.flatnonzero(np.abs(np.diag(r)) < ORTHONORMAL_TOLERANCE)
    if dependent.size:
        raise UsageError(f"direction {int(dependent[0])} is a combination of the ones before it (rank-deficient);"
                         " give independent directions", where=where)
    return (q * np.sign(np.diag(r))).T  # signs kept: row i points along the input's row i


def load_directions(path: str, hidden: int, where: str) -> np.ndarray:
    """A ``.npy`` of directions for a model of width ``hidden``, orthonormalized."""
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0]})", where=where) from None
    if vectors.ndim not in (1, 2) or vectors.shape[-1] != hidden:
        raise UsageError(f"{path}: directions must have shape [k, {hidden}] (the model's hidden size), got"
                         f" {list(vectors.shape)}", where=where)
    return orthonormal_rows(vectors, f"{where} {path}")


class _Constant:
    """A host array as a tensor on the device and in the dtype of whatever it is combined with (made once each)."""

    def __init__(self, values: np.ndarray, at_least_float32: bool = False) -> None:
        self.values = values
        self.at_least_float32 = at_least_float32
        self._made: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32) if self.at_least_float32 else x.dtype
        key = (x.device, dtype)
        if key not in self._made:
            self._made[key] = torch.as_tensor(self.values).to(device=x.device, dtype=dtype)
        return self._made[key]


@dataclass
class Edit:
    """One resolved intervention: the module it hooks, on its input or output, the function that makes the
    replacement, and the decoder layer that module belongs to (a sweep reruns the blocks from there on)."""

    layer: int
    module: torch.nn.Module
    on: str  # "input" | "output"
    make: Callable[..., torch.Tensor | None]
    once: bool = False

    def attach(self, hooks: Hooks) -> None:
        attach = edit_input if self.on == "input" else edit_output
        hooks.add(attach(self.module, self.make, once=self.once))


def ablation_edit(blocks: DecoderBlocks, site: str, layer: int, head: int | None, value: np.ndarray | None) -> Edit:
    """Zero (``value`` None) or mean ablation of one site (see the module docstring)."""
    constant = None if value is None else _Constant(value)
    if site == "head":
        columns = blocks.head_columns(_head(head))

        def head_input(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[..., columns] = 0 if constant is None else constant.like(x)
            return x
        return Edit(layer, blocks.attention_output(layer), "input", head_input)
    if site in ("attn", "mlp"):
        def contribution(out: torch.Tensor, _: Any) -> torch.Tensor:
            return torch.zeros_like(out) if constant is None else constant.like(out).expand_as(out)
        module = blocks.attention_output(layer) if site == "attn" else blocks.mlp(layer)
        return Edit(layer, module, "output", contribution)

    def pass_through(out: torch.Tensor, stream_in: torch.Tensor) -> torch.Tensor:
        return stream_in if constant is None else stream_in + constant.like(stream_in)
    return Edit(layer, blocks.block(layer), "output", pass_through)


def projection_edit(blocks: DecoderBlocks, layer: int, directions: np.ndarray) -> Edit:
    """Project the orthonormal rows of ``directions`` out of the residual stream after block ``layer``."""
    basis = _Constant(directions, at_least_float32=True)

    def project_out(out: torch.Tensor, _: Any) -> torch.Tensor:
        q = basis.like(out)
        h = out.to(q.dtype)
        return (h - (h @ q.T) @ q).to(out.dtype)
    return Edit(layer, blocks.block(layer), "output", project_out)


def patch_edit(blocks: DecoderBlocks, layer: int, donor_stream: torch.Tensor, where: torch.Tensor) -> Edit:
    """The residual stream after block ``layer`` taken from ``donor_stream`` ([B, T, H], the batch's
    layout) where the boolean ``where`` [B, T] is set; for the prompt's pass only."""
    def patch(out: torch.Tensor, _: Any) -> torch.Tensor:
        return torch.where(where.to(out.device)[..., None], donor_stream.to(out.device, out.dtype), out)
    return Edit(layer, blocks.block(layer), "output", patch, once=True)


def residual_entering(model: torch.nn.Module, layer: int, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict]:
    """The residual stream entering decoder layer ``layer`` (``layer`` = the number of layers: the last
    layer's output, which the final norm reads) and the keyword arguments the layer is called with, from
    a forward call of ``model`` on ``inputs`` that stops there."""
    layers, norm = decoder_parts(model)
    with stop_before(layers[layer] if layer < len(layers) else norm) as found:
        model(**inputs, use_cache=False)
    if not found:
        raise RuntimeError(f"the forward call never reached decoder layer {layer}")
    (args, kwargs), = found
    return args[0], kwargs


class MeanMeter:
    """Sums, over live (non-padding) positions and in float64, of the activations a mean ablation replaces
    (:data:`MEASURED`) at chosen layers: ``attention_input`` (all heads' outputs before ``o_proj``),
    ``attention_output``, ``mlp_output`` and ``block_update`` (a decoder layer's output minus its input)."""

    def __init__(self, blocks: DecoderBlocks, wanted: set[tuple[str, int]]) -> None:
        self.blocks = blocks
        self.wanted = sorted(wanted, key=lambda w: (w[1], w[0]))
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.count = 0
        self._live = torch.zeros(0, dtype=torch.bool)  # the measured call's live positions (hooked)
        self._batch: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def deepest(self) -> int:
        return max(layer for _, layer in self.wanted)

    @contextmanager
    def hooked(self, live: torch.Tensor) -> Iterator[None]:
        """Measure one forward call whose live positions are ``live`` ([B, T] bool). Its sums count only if the
        block completes (a batch that runs out of memory and is retried in halves is not counted twice)."""
        self._live, self._batch = live, {}
        with Hooks() as hooks:
            for what, layer in self.wanted:
                key = (what, layer)
                if what == "attention_input":
                    hooks.add(on_input(self.blocks.attention_output(layer), self._adder(key)))
                elif what == "attention_output":
                    hooks.add(on_output(self.blocks.attention_output(layer), self._adder(key)))
                elif what == "mlp_output":
                    hooks.add(on_output(self.blocks.mlp(layer), self._adder(key)))
                else:
                    hooks.add(edit_output(self.blocks.block(layer), self._update_adder(key)))
            yield
        for key, total in self._batch.items():
            self.sums[key] = total if key not in self.sums else self.sums[key] + total
        self.count += int(live.sum())

    def _adder(self, key: tuple[str, int]) -> Callable[[Any], None]:
        def add(x: Any) -> None:
            x = x[0] if isinstance(x, tuple) else x
            self._add(key, x)
        return add

    def _update_adder(self, key: tuple[str, int]) -> Callable[[torch.Tensor, torch.Tensor | None], None]:
        def add(out: torch.Tensor, stream_in: torch.Tensor | None) -> None:
            if stream_in is None:
                raise RuntimeError("a decoder layer called without its input")
            self._add(key, out - stream_in)  # returns None: the output stays as it is
        return add

    def _add(self, key: tuple[str, int], x: torch.Tensor) -> None:
        live = x[self._live.to(x.device)]
        self._batch[key] = (live.cpu() if live.device.type == "mps" else live).double().sum(0)  # MPS: no float64

    def mean(self, what: str, layer: int) -> np.ndarray:
        return (self.sums[(what, layer)] / self.count).cpu().numpy()


def mean_value(meter: MeanMeter, blocks: DecoderBlocks, site: str, layer: int, head: int | None) -> np.ndarray:
    """The mean a mean ablation of ``site`` puts in place (a head's slice of the attention input)."""
    mean = meter.mean(MEASURED[site], layer)
    return mean[blocks.head_columns(_head(head))] if site == "head" else mean


def _head(head: int | None) -> int:
    if head is None:
        raise ValueError("a head ablation needs its head")
    return head


class Editor:
    """A run's interventions on one model (see the module docstring). Building it checks every layer,
    head, module and direction file against the model; :meth:`bind` (with the run's encoder) reads the
    donors; :meth:`measure_means` runs the first pass a mean ablation needs."""

    blocks: DecoderBlocks

    def __init__(self, model: torch.nn.Module, interventions: list[Intervention]) -> None:
        self.model = model
        self.interventions = list(interventions)
        if self.interventions:  # an editor of no interventions never needs the model's blocks
            self.blocks = DecoderBlocks.of(model)
        self.directions: dict[int, np.ndarray] = {}
        self.means: dict[int, np.ndarray] = {}
        self.donors: dict[int, dict[str, EncodedPrompt]] = {}
        for index, intervention in enumerate(self.interventions):
            self._check(intervention)
            if intervention.kind == "direction":
                self.directions[index] = load_directions(intervention.file, self.blocks.hidden, "--ablate-direction")

    def __bool__(self) -> bool:
        return bool(self.interventions)

    def _check(self, intervention: Intervention) -> None:
        where = {"ablate": "--ablate", "direction": "--ablate-direction", "patch": "--patch-at"}[intervention.kind]
        n_layers = len(self.blocks)
        if intervention.layer >= n_layers:
            raise UsageError(f"{intervention.label}: layer {intervention.layer} is out of range: the model has decoder"
                             f" layers 0..{n_layers - 1}", where=where)
        if intervention.kind != "ablate":
            return
        if intervention.site == "head":
            if _head(intervention.head) >= self.blocks.n_heads:
                raise UsageError(f"{intervention.label}: head {intervention.head} is out of range: layer"
                                 f" {intervention.layer} has heads 0..{self.blocks.n_heads - 1}", where=where)
            self.blocks.attention_output(intervention.layer)
        elif intervention.site == "attn":
            self.blocks.attention_output(intervention.layer)
        elif intervention.site == "mlp":
            self.blocks.mlp(intervention.layer)

    @property
    def has_patch(self) -> bool:
        return any(i.kind == "patch" for i in self.interventions)

    @property
    def needs_first_pass(self) -> bool:
        return any(i.needs_first_pass for i in self.interventions)

    # ----------------------------------------------------------------------------------- donors
    def bind(self, encoder: PromptEncoder, prompts: list[EncodedPrompt]) -> None:
        """Encode each patch's donor prompts (once) and check them against the run's ``prompts``: a donor
        with the same id and the same number of tokens for every prompt, and positions inside it."""
        for index, intervention in enumerate(self.interventions):
            if intervention.kind != "patch":
                continue
            records = read_prompts(intervention.file, "auto")
            donors: dict[str, EncodedPrompt] = {}
            for record in records:
                if record.id in donors:
                    raise UsageError(f"two donor prompts have the id {record.id!r}", where=intervention.path)
                donors[record.id] = encoder.encode(record)
            self.donors[index] = donors
            for prompt in prompts:
                self.donor_of(index, prompt)
                self._patched_positions(intervention, prompt)

    def donor_of(self, index: int, prompt: EncodedPrompt) -> EncodedPrompt:
        intervention = self.interventions[index]
        donor = self.donors[index].get(prompt.record.id)
        if donor is None:
            raise UsageError(f"no donor prompt with id {prompt.record.id!r} (the traced prompt's id)",
                             where=intervention.path)
        if len(donor.ids) != len(prompt.ids):
            raise UsageError(f"donor {prompt.record.id!r} has {len(donor.ids)} tokens, the traced prompt"
                             f" {len(prompt.ids)}; a patch needs prompts of the same length", where=intervention.path)
        return donor

    @staticmethod
    def _patched_positions(intervention: Intervention, prompt: EncodedPrompt) -> list[int]:
        chosen = parse_positions(intervention.patch_positions)
        n = len(prompt.ids)
        if isinstance(chosen, str):  # marks or all
            return prompt.mark_positions if chosen == "marks" else list(range(n))
        outside = [p for p in chosen if not -n <= p < n]
        if outside:
            raise UsageError(f"position {outside[0]} is outside prompt {prompt.record.id!r} ({n} tokens)",
                             where="--patch-at")
        return sorted(p % n for p in chosen)

    # ----------------------------------------------------------------------------------- means
    def measure_means(self, run_pass: Callable[[Callable[[dict[str, Any]], None]], None]) -> None:
        """The first pass of a mean ablation, on the unmodified model: ``run_pass(measure)`` calls ``measure`` with
        each batch's model inputs (``input_ids``, ``attention_mask``, ``position_ids``), every prompt of the run
        once; a batch that runs out of memory may be measured again in halves (it counts only once complete)."""
        wanted = {(MEASURED[i.site_name], i.layer) for i in self.interventions if i.needs_first_pass}
        meter = MeanMeter(self.blocks, wanted)

        def measure(inputs: dict[str, Any]) -> None:
            with meter.hooked(inputs["attention_mask"].bool()):
                residual_entering(self.model, meter.deepest + 1, inputs)

        run_pass(measure)
        if meter.count == 0:
            raise UsageError("no positions to take the mean over", where="--ablation")
        for index, intervention in enumerate(self.interventions):
            if intervention.needs_first_pass:
                self.means[index] = mean_value(meter, self.blocks, intervention.site_name, intervention.layer,
                                               intervention.head)

    # ----------------------------------------------------------------------------------- per batch
    def edits(self, batch: list[EncodedPrompt], inputs: dict[str, Any]) -> list[Edit]:
        """The edits of one batch; a patch first runs the batch's donors (same padding) to the patched layer."""
        found: list[Edit] = []
        for index, intervention in enumerate(self.interventions):
            if intervention.kind == "ablate":
                if intervention.needs_first_pass and index not in self.means:
                    raise RuntimeError("a mean ablation's first pass has not run (Editor.measure_means)")
                found.append(ablation_edit(self.blocks, intervention.site_name, intervention.layer, intervention.head,
                                           self.means.get(index)))
            elif intervention.kind == "direction":
                found.append(projection_edit(self.blocks, intervention.layer, self.directions[index]))
            else:
                found.append(self._patch(index, batch, inputs))
        return found

    def _patch(self, index: int, batch: list[EncodedPrompt], inputs: dict[str, Any]) -> Edit:
        intervention = self.interventions[index]
        width = inputs["input_ids"].shape[1]
        donor_ids = inputs["input_ids"].clone()
        where = torch.zeros(donor_ids.shape, dtype=torch.bool)
        for b, prompt in enumerate(batch):
            donor = self.donor_of(index, prompt)
            start = width - len(prompt.ids)
            donor_ids[b, start:] = torch.tensor(donor.ids, device=donor_ids.device)
            where[b, [start + p for p in self._patched_positions(intervention, prompt)]] = True
        stream, _ = residual_entering(self.model, intervention.layer + 1, {**inputs, "input_ids": donor_ids})
        return patch_edit(self.blocks, intervention.layer, stream, where)

    def metadata(self) -> list[dict[str, Any]]:
        """The resolved interventions for the trace metadata: each one's label and, for a mean ablation, its mean."""
        described = []
        for index, intervention in enumerate(self.interventions):
            entry: dict[str, Any] = {"intervention": intervention.label, "what": intervention.describe()}
            if index in self.means:
                entry["mean"] = self.means[index].tolist()
                entry["mean_over"] = "the run's prompt positions, padding excluded, on the unmodified model"
            if index in self.directions:
                entry["directions"] = int(self.directions[index].shape[0])
            described.append(entry)
        return described
