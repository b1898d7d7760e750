"""Interventions (issue 22) as trace settings: what to change inside the model, written down.

An :class:`Intervention` is plain data: it is a field of :class:`~llmprobe.tracing.settings.TraceSettings`,
so every trace records its interventions in the metadata, the resume fingerprint compares them, and
``inspect`` and ``report`` name them (:func:`describe`). What they do to a model — the hooks, the
means of a mean ablation, the orthonormalized directions, the donor's residual stream — is
:mod:`llmprobe.tracing.editing`'s. This module imports no torch.

The kinds, with layer numbering as everywhere in llmprobe (0-based decoder layers, docs/analyses.md):

* ``ablate`` (``trace --ablate SPEC``, ``--ablation zero|mean``): ``L.H`` is attention head H of layer
  L, its slice of the attention output before ``o_proj``; ``L.attn`` the attention block's
  contribution to the residual stream (``o_proj``'s output); ``L.mlp`` the MLP's; ``L`` the whole
  block, so the residual stream passes block L unchanged. ``zero`` sets the activation to 0;
  ``mean`` to its mean over the run's own positions (padding excluded), measured on the unmodified
  model by a first pass and stored in the trace metadata.
* ``direction`` (``--ablate-direction FILE@L``): the unit directions in FILE (a ``.npy`` of shape
  [k, hidden], orthonormalized; rank-deficient or zero rows refused) are projected out of the
  residual stream after block L, at every position.
* ``patch`` (``--patch-from DONOR.jsonl --patch-at L[:POSITIONS]``): the residual stream after block
  L is replaced by the donor prompt's (the record with the same id, which must have the same number of
  tokens), computed on the unmodified model, at POSITIONS: ``marks`` (the default: the prompt's
  marks, else its last position), ``all``, or token positions ``3,5,-1`` (negative: from the end).
  Generated tokens have no donor counterpart: a patch acts on the prompt's pass (and, through the KV
  cache, on everything generated after it).

Every intervention of a trace applies to every forward pass of it: the prompt's, each generated
step's, the logit lens rows (``--layers``), and the passes that score multi-token targets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from llmprobe.errors import UsageError
from llmprobe.model.sources import sha256_file

ABLATION_MODES = ("zero", "mean")
SITES = ("head", "attn", "mlp", "block")
PATCH_POSITIONS_DEFAULT = "marks"


@dataclass(frozen=True)
class Intervention:
    """One change to the forward pass (see the module docstring). ``sha256``: of the file a direction
    or a donor comes from, so a resume notices a file that changed; ``positions``: a patch's."""

    kind: str  # "ablate" | "direction" | "patch"
    layer: int
    site: str | None = None  # ablate: one of SITES
    head: int | None = None  # ablate, site "head"
    mode: str = "zero"  # ablate: one of ABLATION_MODES
    path: str | None = None  # direction: the .npy; patch: the donor prompts
    sha256: str | None = None
    positions: str | None = None  # patch: "marks", "all" or "3,5,-1"

    @property
    def label(self) -> str:
        """The spec as the command line spells it: ``3.1``, ``3.attn``, ``3``, ``dirs.npy@3``, ``patch 3:marks``."""
        if self.kind == "ablate":
            return {"head": f"{self.layer}.{self.head}", "block": str(self.layer)}.get(str(self.site),
                                                                                      f"{self.layer}.{self.site}")
        if self.kind == "direction":
            return f"{self.path}@{self.layer}"
        return f"{self.path}@{self.layer}:{self.positions}"

    def describe(self) -> str:
        """One phrase for people: ``zero-ablated head 3.1``, ``directions of d.npy projected out after block 3``."""
        if self.kind == "ablate":
            what = {"head": f"head {self.label}", "attn": f"attention {self.label}", "mlp": f"MLP {self.label}",
                    "block": f"block {self.label}"}[str(self.site)]
            return f"{self.mode}-ablated {what}"
        if self.kind == "direction":
            return f"directions of {self.path} projected out after block {self.layer}"
        return f"residual stream after block {self.layer} patched from {self.path} at {self.positions}"

    # The fields a kind requires (validate() checks them), typed for the code that acts on that kind
    @property
    def site_name(self) -> str:
        """An ablation's site (one of :data:`SITES`)."""
        return _required(self.site, "site", self)

    @property
    def file(self) -> str:
        """A direction's .npy or a patch's donor prompts."""
        return _required(self.path, "path", self)

    @property
    def patch_positions(self) -> str:
        """A patch's positions: ``marks``, ``all`` or ``3,5,-1``."""
        return _required(self.positions, "positions", self)

    @property
    def needs_first_pass(self) -> bool:
        """A mean ablation measures its mean on the whole run before the run traces anything."""
        return self.kind == "ablate" and self.mode == "mean"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Intervention:
        return cls(**data)

    def validate(self) -> None:
        """The checks that need no model (layers and heads in range are checked against the model)."""
        where = {"ablate": "--ablate", "direction": "--ablate-direction", "patch": "--patch-at"}.get(self.kind)
        if where is None:
            raise UsageError(f"unknown intervention kind {self.kind!r}", where="interventions")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise UsageError(f"layer must be a whole number >= 0, got {self.layer!r}", where=where)
        if self.kind == "ablate":
            if self.site not in SITES:
                raise UsageError(f"unknown site {self.site!r} (expected {', '.join(SITES)})", where=where)
            if self.mode not in ABLATION_MODES:
                raise UsageError(f"expected {' or '.join(ABLATION_MODES)}, got {self.mode!r}", where="--ablation")
            if (self.site == "head") != (isinstance(self.head, int) and not isinstance(self.head, bool)):
                raise UsageError("a head ablation names one head (L.H), other sites none", where=where)
            if self.head is not None and self.head < 0:
                raise UsageError(f"head must be 0 or more, got {self.head}", where=where)
        elif self.kind == "patch":
            parse_positions(self.positions or "")


def parse_ablation(spec: str, mode: str = "zero") -> Intervention:
    """``--ablate SPEC``: ``L.H``, ``L.attn``, ``L.mlp`` or ``L``."""
    text = spec.strip()
    layer_text, _, site_text = text.partition(".")
    layer = _whole(layer_text, f"expected L.H, L.attn, L.mlp or L (0-based layer and head), got {spec!r}", "--ablate")
    if not site_text:
        site, head = "block", None
    elif site_text in ("attn", "mlp"):
        site, head = site_text, None
    else:
        site = "head"
        head = _whole(site_text, f"expected L.H, L.attn, L.mlp or L (0-based layer and head), got {spec!r}",
                      "--ablate")
    found = Intervention("ablate", layer, site=site, head=head, mode=mode)
    found.validate()
    return found


def parse_direction(spec: str) -> Intervention:
    """``--ablate-direction FILE@L``: the file must exist (its contents are checked with the model)."""
    path, at, layer_text = spec.rpartition("@")
    if not at or not path:
        raise UsageError(f"expected FILE@L (a .npy of unit directions and a 0-based layer), got {spec!r}",
                         where="--ablate-direction")
    layer = _whole(layer_text, f"expected FILE@L with a 0-based layer after @, got {spec!r}", "--ablate-direction")
    return Intervention("direction", layer, path=path, sha256=file_sha256(path, "--ablate-direction"))


def parse_patch(donor: str, spec: str) -> Intervention:
    """``--patch-from DONOR --patch-at L[:POSITIONS]``."""
    layer_text, _, positions = spec.partition(":")
    layer = _whole(layer_text, f"expected L or L:POSITIONS (marks, all or 3,5,-1), got {spec!r}", "--patch-at")
    found = Intervention("patch", layer, path=donor, sha256=file_sha256(donor, "--patch-from"),
                         positions=positions.strip() or PATCH_POSITIONS_DEFAULT)
    found.validate()
    return found


def from_options(ablate: list[str] | None, ablation: str, directions: list[str] | None, patch_from: str | None,
                 patch_at: str | None) -> list[Intervention]:
    """The interventions of ``trace``'s options, in the order ablations, directions, patch."""
    if ablation not in ABLATION_MODES:
        raise UsageError(f"expected {' or '.join(ABLATION_MODES)}, got {ablation!r}", where="--ablation")
    if ablation != "zero" and not ablate:
        raise UsageError("only applies with --ablate", where="--ablation")
    if (patch_from is None) != (patch_at is None):
        raise UsageError("give --patch-from DONOR and --patch-at L[:POSITIONS] together",
                         where="--patch-from" if patch_at is None else "--patch-at")
    found = [parse_ablation(spec, ablation) for spec in ablate or []]
    found += [parse_direction(spec) for spec in directions or []]
    if patch_from is not None and patch_at is not None:
        found.append(parse_patch(patch_from, patch_at))
    repeated = sorted({i.label for i in found if sum(j == i for j in found) > 1})
    if repeated:
        raise UsageError(f"{repeated[0]} is given twice", where="--ablate")
    return found


def _required(value: Any, name: str, intervention: Intervention) -> Any:
    if value is None:
        raise ValueError(f"a {intervention.kind} intervention needs its {name}: {intervention}")
    return value


def parse_positions(text: str) -> str | list[int]:
    """A patch's positions: ``marks``, ``all`` or a list of token positions (negative: from the end)."""
    if text in ("marks", "all"):
        return text
    try:
        positions = [int(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"positions must be marks, all or comma-separated token positions, got {text!r}",
                         where="--patch-at") from None
    if len(set(positions)) != len(positions):
        raise UsageError(f"a position is given twice in {text!r}", where="--patch-at")
    return positions


def describe(interventions: Iterable[Intervention | dict[str, Any]]) -> str | None:
    """The line ``inspect``, ``report`` and the sweep print under a title (None: no intervention)."""
    found = [i if isinstance(i, Intervention) else Intervention.from_dict(i) for i in interventions]
    if not found:
        return None
    return "interventions: " + "; ".join(i.describe() for i in found)


def file_sha256(path: str, option: str) -> str:
    """The sha256 of a file an intervention reads, refusing a missing or unreadable one."""
    try:
        return "sha256:" + sha256_file(Path(path))
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        reason = "no such file" if isinstance(exc, FileNotFoundError) else f"cannot read it ({exc})"
        raise UsageError(f"{path}: {reason}", where=option) from None


def _whole(text: str, message: str, option: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise UsageError(message, where=option) from None
    if value < 0:
        raise UsageError(f"layers and heads are 0-based, got {value}", where=option)
    return value
