"""GGUF checkpoints: their header facts, their one-time de-quantization, and the conversion cache.

A ``.gguf`` file (the embedded default model is one, quantized Q4_1) is de-quantized once by
transformers to float32 and cached as safetensors + tokenizer.json in ``CACHE/converted``, so later
loads take about a second instead of ~30 s. Each entry holds a manifest (:data:`CONVERSION_MANIFEST`:
source path, sha256, size, quantization, when, how long); the trace metadata records
``gguf_quantization`` and ``weights_precision``, since the numbers are those of the quantized weights.

Invariants:

* the cache is keyed by the GGUF's *content* (its sha256, memoized in :mod:`llmprobe.model.sources`),
  so the same file reached from several virtual environments is converted once, and an entry made by
  an older llmprobe (keyed by path) is reused when its manifest names the same sha256;
* an entry is built in a staging directory by :func:`llmprobe.files.atomic_dir` and renamed into place
  complete, never replaced: an interrupted conversion leaves no entry, and of two concurrent
  conversions the first one's copy is kept;
* the cache is checked usable before the 30 s conversion, not after it (one line naming
  ``LLMPROBE_CACHE`` otherwise);
* :func:`prune_conversions` (``llmprobe models --prune``) removes second conversions of the same content,
  conversions whose GGUF is gone or changed, and leftovers of interrupted conversions; the installed
  default model keeps its conversion even when it was made from another environment's copy.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

from llmprobe.errors import UsageError, first_line
from llmprobe.files import atomic_dir, write_atomic
from llmprobe.model.sources import DEFAULT_MODEL_NAME, DEFAULT_MODEL_PIP, cache_dir, default_gguf, gguf_sha256

CONVERSION_MANIFEST = "llmprobe-conversion.json"
# llama.cpp's general.file_type codes (gguf.LlamaFileType) for the common quantizations
GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                   11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
                   17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


def quiet_transformers() -> None:
    """transformers' own progress bars and advice would break the one-line-error promise on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _conversion_dir(gguf: Path) -> Path:
    """The cache entry for this GGUF's content: an existing conversion of the same bytes (whatever path it
    was made from, including entries of older llmprobe versions keyed by path), else a new content key."""
    digest = gguf_sha256(gguf)
    for entry in cached_conversions():
        if entry.get("source_sha256") == digest:
            return Path(entry["path"])
    return cache_dir() / "converted" / f"{gguf.stem}-{digest[:16]}"


def gguf_facts(gguf: Path) -> dict[str, Any]:
    """What a trace records about a converted GGUF: its quantization, and that the weights were de-quantized."""
    return {"gguf_quantization": gguf_file_type(gguf), "weights_precision": "float32, de-quantized from the GGUF"}


def gguf_file_type(gguf: Path) -> str | None:
    """The quantization the GGUF header declares (``general.file_type``), e.g. "Q4_1"; None if absent.

    Reads the key-value header only up to that key (the tokenizer arrays come later), in about a millisecond."""
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
    string, array = 8, 9

    def read(fmt: str):
        return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))

    def skip(value_type: int) -> None:
        if value_type == string:
            f.seek(read("Q")[0], 1)
        elif value_type == array:
            element, count = read("I")[0], read("Q")[0]
            if element in scalar:
                f.seek(scalar[element] * count, 1)
            else:
                for _ in range(count):
                    skip(element)
        else:
            f.seek(scalar[value_type], 1)

    try:
        with open(gguf, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
            read("I")  # version
            _, n_keys = read("QQ")
            for _ in range(n_keys):
                key = f.read(read("Q")[0]).decode("utf-8", "replace")
                value_type = read("I")[0]
                if key == "general.file_type" and value_type in (4, 5):
                    code = read("I")[0]
                    return GGUF_FILE_TYPES.get(code, f"file type {code}")
                skip(value_type)
    except (OSError, struct.error, KeyError):
        return None
    return None


def convert_gguf(gguf: Path, log=lambda msg: None) -> Path:
    """Dequantize a GGUF file once into a cached safetensors directory; return that directory.

    The copy is built in a temporary directory and renamed into place, so an interrupted conversion
    never leaves a half-written cache entry.
    """
    target = _conversion_dir(gguf)
    if (target / CONVERSION_MANIFEST).exists():
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
        raise UsageError(f"cannot load GGUF file: {first_line(exc)}", where=str(gguf)) from None
    # The weights are dequantized float32 now; drop the GGUF quantizer so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        _save_conversion(model, tokenizer, gguf, target, started)
    except FileExistsError:  # another process converted it meanwhile
        if not (target / CONVERSION_MANIFEST).exists():
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


def _save_conversion(model, tokenizer, gguf: Path, target: Path, started: float) -> None:
    """Weights, tokenizer and manifest, staged by :func:`~llmprobe.files.atomic_dir` and renamed to ``target``
    (``FileExistsError`` if another process made it first; its copy is kept)."""
    with atomic_dir(target, replace=False) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        manifest = {
            "source": str(gguf.resolve()),
            "source_sha256": gguf_sha256(gguf),
            "source_bytes": gguf.stat().st_size,
            "quantization": gguf_file_type(gguf),
            "dequantized_to": "float32",
            "converted_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - started, 1),
        }
        write_atomic(staging / CONVERSION_MANIFEST, json.dumps(manifest, indent=1))


def _check_gguf_header(gguf: Path) -> None:
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UsageError("not a GGUF file (bad magic bytes)", where=str(gguf))


def cached_conversions() -> list[dict[str, Any]]:
    """The GGUF conversions in the cache, for ``llmprobe models``."""
    root = cache_dir() / "converted"
    entries = []
    for directory in sorted(root.glob("*")) if root.exists() else []:
        manifest_path = directory / CONVERSION_MANIFEST
        if not manifest_path.exists():
            continue
        manifest = json.loads(manifest_path.read_text())
        size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
        entries.append({"path": str(directory), "bytes": size, **manifest})
    return entries


def prune_conversions() -> list[dict[str, Any]]:
    """Remove what ``models --prune`` removes; returns the removed entries (path, bytes, reason).

    * a second conversion of the same GGUF content (older llmprobe versions keyed the cache by path);
    * a conversion whose source GGUF no longer exists or has changed;
    * the leftovers of interrupted conversions (hidden staging directories).
    """
    root = cache_dir() / "converted"
    removed: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:  # the installed default model's conversion stays even if it was first made from another venv's copy
        in_use = {gguf_sha256(default_gguf())}
    except UsageError:
        in_use = set()
    for entry in sorted(cached_conversions(), key=lambda e: e.get("converted_utc", "")):
        source = Path(entry.get("source", ""))
        reason = None
        if entry.get("source_sha256") in seen:
            reason = "duplicate of another conversion of the same GGUF"
        elif entry.get("source_sha256") in in_use:
            reason = None
        elif not source.is_file():
            reason = "source GGUF no longer exists"
        elif gguf_sha256(source) != entry.get("source_sha256"):
            reason = "source GGUF has changed"
        seen.add(entry.get("source_sha256"))
        if reason:
            removed.append({"path": entry["path"], "bytes": entry["bytes"], "reason": reason})
    for staging in sorted(root.glob(".*")) if root.exists() else []:
        if staging.is_dir():
            size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
            removed.append({"path": str(staging), "bytes": size, "reason": "left by an interrupted conversion"})
    for entry in removed:
        shutil.rmtree(entry["path"], ignore_errors=True)
    return removed


def inventory() -> dict[str, Any]:
    """The default model (where its GGUF is, or how to install it) and the cached conversions."""
    try:
        gguf: str | None = str(default_gguf())
    except UsageError:
        gguf = None
    return {"default": {"name": DEFAULT_MODEL_NAME, "gguf": gguf, "install": DEFAULT_MODEL_PIP,
                        "quantization": gguf_file_type(Path(gguf)) if gguf else None, "loaded_as": "float32"},
            "cache_dir": str(cache_dir()), "cached": cached_conversions()}
