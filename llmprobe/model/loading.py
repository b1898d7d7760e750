"""From a ``--model`` value to a model in memory, on the device and in the dtype asked for.

:func:`load_model` (and :class:`ModelOptions`, the options every command that loads a model takes)
resolves ``--model`` offline (:func:`resolve_model`: the embedded default, a ``.gguf`` file converted
once by :mod:`llmprobe.model.gguf`, a model directory, or a hub id already in the local cache; see
:mod:`llmprobe.model.sources`), applies the refusals (pickle weights, remote code) before reading any
weights, then loads config, fast tokenizer and weights with ``local_files_only``.

Placement: ``--device auto`` is the first CUDA GPU when there is one, else the CPU; ``--dtype auto``
is bfloat16 on CUDA and float32 elsewhere, and an explicit dtype is tried on the device first (a
matmul and a softmax), so an unsupported pair is one line, not a kernel error mid-trace. With
``--device-map`` accelerate places the modules (``--max-memory``, ``--offload-folder`` apply only
then), and inputs go to the device of the input embeddings. :func:`load_skeleton` builds weightless
(meta-device) modules: enough to check settings and prompts on a machine that will not run the model.

Invariants: nothing is downloaded (``HF_HUB_OFFLINE`` is set unless the user set it); every loaded
model carries a provenance record (source, revision or weights fingerprint, dtype, device, attention
kernel, GGUF facts) that goes into the trace metadata; the tokenizer is fast (character offsets),
pads on the left, and has a pad token; any failure to load is one :class:`~llmprobe.errors.UsageError`
naming the model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmprobe.errors import UsageError, first_line
from llmprobe.model.gguf import CONVERSION_MANIFEST, convert_gguf, gguf_facts, quiet_transformers
from llmprobe.model.sources import (DEFAULT_MODEL_NAME, ModelSource, check_remote_code, check_weight_format,
                                    default_gguf, looks_like_path, resolve_hub_id, weights_fingerprint)

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def resolve_model(spec: str | None, log=lambda msg: None) -> ModelSource:
    """Turn a ``--model`` value into a loadable directory, converting GGUF files on first use."""
    if spec is None or spec == "default":
        gguf = default_gguf()
        path = convert_gguf(gguf, log)
        manifest = json.loads((path / CONVERSION_MANIFEST).read_text())
        return ModelSource(DEFAULT_MODEL_NAME, path, "default", weights_sha256=manifest["source_sha256"],
                           extra={"gguf": gguf.name, **gguf_facts(gguf)})
    candidate = Path(spec).expanduser()
    if candidate.is_file():
        if candidate.suffix != ".gguf":
            raise UsageError("expected a model directory or a .gguf file", where=spec)
        path = convert_gguf(candidate, log)
        manifest = json.loads((path / CONVERSION_MANIFEST).read_text())
        return ModelSource(spec, path, "gguf", weights_sha256=manifest["source_sha256"], extra=gguf_facts(candidate))
    if candidate.is_dir():
        if not (candidate / "config.json").is_file():
            raise UsageError("directory has no config.json (not a Hugging Face model directory)", where=spec)
        return ModelSource(spec, candidate, "directory", weights_sha256=weights_fingerprint(candidate))
    if candidate.exists() or looks_like_path(spec):
        raise UsageError("no such model file or directory", where=spec)
    return resolve_hub_id(spec)


def resolve_device(device: str):
    """``auto`` is the first CUDA GPU when there is one, else the CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {device!r} (expected {DEVICE_HELP})", where="--device") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{device!r} requested but CUDA is not available here", where="--device")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(
                f"{device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist", where="--device"
            )
        return resolved
    if resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError("'mps' requested but MPS is not available here", where="--device")
        return resolved
    raise UsageError(f"unknown device {device!r} (expected {DEVICE_HELP})", where="--device")


def resolve_dtype(dtype: str, device):
    """``auto`` is bfloat16 on CUDA and float32 elsewhere; an explicit dtype is checked on the device."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (expected {', '.join(DTYPES)})", where="--dtype")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype)
    try:  # a matmul and a softmax are what a decoder needs; some devices lack kernels for some dtypes
        probe = torch.ones(2, 2, dtype=resolved, device=device)
        (probe @ probe).softmax(-1)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"{dtype} does not run on {device}: {first_line(exc)}", where="--dtype") from None
    return resolved


@dataclass
class LoadedModel:
    """A model ready for tracing, with everything a trace records about where it came from."""

    model: Any
    tokenizer: Any
    source: ModelSource
    device: Any  # torch.device of the input embeddings (first layer)
    dtype: Any
    device_map: dict[str, Any] | None
    load_seconds: float
    attn_implementation: str | None = None  # the attention kernel in use ("sdpa", "eager", ...)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def provenance(self) -> dict[str, Any]:
        return {
            "model": self.source.label,
            "model_kind": self.source.kind,
            "model_path": str(self.source.path),
            "model_revision": self.source.revision,
            "weights_sha256": self.source.weights_sha256,
            "architecture": type(self.model).__name__,
            "num_layers": getattr(self.model.config, "num_hidden_layers", None),
            "vocab_size": self.vocab_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "device_map": self.device_map,
            "attn_implementation": self.attn_implementation,
            **self.source.extra,
        }


@dataclass
class ModelOptions:
    """How to find and place a model: the options every command that loads one takes."""

    model: str | None = None  # None: the embedded default
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    max_memory: dict[int | str, int | str] | None = None
    offload_folder: str | None = None
    attn_implementation: str | None = None  # None: transformers' default (sdpa where available)

    def load(self, log=lambda msg: None) -> LoadedModel:
        return load_model(self.model, device=self.device, dtype=self.dtype, device_map=self.device_map,
                          max_memory=self.max_memory, offload_folder=self.offload_folder,
                          trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle,
                          attn_implementation=self.attn_implementation, log=log)

    def skeleton(self, log=lambda msg: None) -> LoadedModel:
        return load_skeleton(self.model, trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle,
                             log=log)


def load_model(
    spec: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    attn_implementation: str | None = None,
    log=lambda msg: None,
) -> LoadedModel:
    """Load weights onto ``device``, or place them with accelerate when ``device_map`` is given
    ("auto", "balanced", "sequential" or an explicit module -> device/"cpu"/"disk" dict).
    ``attn_implementation`` picks the attention kernel (:data:`ATTN_IMPLEMENTATIONS`; None: the default)."""
    import torch
    from transformers import AutoModelForCausalLM

    check_placement(device_map, max_memory, offload_folder)
    attn_implementation = check_attn_implementation(attn_implementation)
    torch_device = resolve_device(device) if device_map is None else None
    torch_dtype = resolve_dtype(dtype, torch_device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    source = _checked_source(spec, trust_remote_code, allow_pickle, log)
    started = time.perf_counter()
    try:
        config, tokenizer = _config_and_tokenizer(source, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            config=config,
            dtype=torch_dtype,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
            trust_remote_code=trust_remote_code,
            use_safetensors=not allow_pickle or None,
            local_files_only=True,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
    except UsageError:
        raise
    except Exception as exc:  # corrupt files and unknown architectures surface as many exception types
        raise UsageError(f"cannot load model: {first_line(exc)}", where=source.label) from None
    if device_map is None:
        model.to(torch_device)
    model.eval()
    _prepare_tokenizer(tokenizer, source.label)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        device=_input_device(model),
        dtype=torch_dtype,
        device_map=getattr(model, "hf_device_map", None) if device_map else None,
        load_seconds=time.perf_counter() - started,
        attn_implementation=getattr(model.config, "_attn_implementation", attn_implementation),
    )


def check_attn_implementation(value: str | None) -> str | None:
    """``--attn-implementation``: None (the default kernel) or one of :data:`ATTN_IMPLEMENTATIONS`."""
    if value is not None and value not in ATTN_IMPLEMENTATIONS:
        raise UsageError(f"expected {' or '.join(ATTN_IMPLEMENTATIONS)}, got {value!r}", where="--attn-implementation")
    return value


def _checked_source(spec: str | None, trust_remote_code: bool, allow_pickle: bool, log) -> ModelSource:
    """Resolve ``--model`` offline and apply the refusals (pickle weights, remote code) before loading."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_transformers()
    source = resolve_model(spec, log)
    check_weight_format(source.path, allow_pickle)
    check_remote_code(source.path, trust_remote_code)
    return source


def _config_and_tokenizer(source: ModelSource, trust_remote_code: bool):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, local_files_only=True)
    return config, tokenizer


def _prepare_tokenizer(tokenizer, label: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError("llmprobe needs a fast (Rust) tokenizer for character offsets", where=label)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def _input_device(model):
    """Where input ids go: the embeddings' device, or accelerate's execution device when they are offloaded."""
    weight = model.get_input_embeddings().weight
    if weight.device.type != "meta":
        return weight.device
    hook = getattr(model.get_input_embeddings(), "_hf_hook", None)
    import torch

    return torch.device(getattr(hook, "execution_device", None) or "cpu")


def check_placement(device_map, max_memory, offload_folder) -> None:
    if device_map is None and (max_memory or offload_folder):
        raise UsageError("only applies with --device-map", where="--max-memory" if max_memory else "--offload-folder")


def parse_max_memory(text: str) -> dict[int | str, int | str]:
    """``0=20GiB,1=20GiB,cpu=64GiB`` -> accelerate's max_memory dict (GPU indices as ints)."""
    from accelerate.utils import convert_file_size_to_int

    limits: dict[int | str, int | str] = {}
    for item in text.split(","):
        key, sep, size = (part.strip() for part in item.partition("="))
        if not sep or not key or not size:
            raise UsageError(f"expected DEVICE=SIZE items like 0=20GiB,cpu=64GiB, got {item.strip()!r}",
                             where="--max-memory")
        if not (key.isdigit() or key in ("cpu", "disk", "mps", "xpu", "npu")):
            raise UsageError(f"unknown device {key!r} (expected a GPU index, cpu or disk)", where="--max-memory")
        try:
            convert_file_size_to_int(int(size) if size.isdigit() else size)
        except ValueError:
            raise UsageError(f"bad size {size!r} for {key} (expected e.g. 20GiB, 500MB or a byte count)",
                             where="--max-memory") from None
        limits[int(key) if key.isdigit() else key] = int(size) if size.isdigit() else size
    return limits


def load_skeleton(spec: str | None = None, *, trust_remote_code: bool = False, allow_pickle: bool = False,
                  log=lambda msg: None) -> LoadedModel:
    """Config, tokenizer and weightless (meta-device) modules: enough to check settings and prompts and
    describe the model on a machine that will not run it (a Ray driver), in about a second."""
    import torch
    from transformers import AutoModelForCausalLM

    source = _checked_source(spec, trust_remote_code, allow_pickle, log)
    started = time.perf_counter()
    try:
        config, tokenizer = _config_and_tokenizer(source, trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # corrupt files and unknown architectures surface as many exception types
        raise UsageError(f"cannot load model: {first_line(exc)}", where=source.label) from None
    _prepare_tokenizer(tokenizer, source.label)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, device=torch.device("meta"),
                       dtype=model.dtype, device_map=None, load_seconds=time.perf_counter() - started)
