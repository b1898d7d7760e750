"""Crash-safe trace runs: committed part files and a manifest in a hidden work directory.

A run that writes ``OUTPUT`` keeps its progress in ``.OUTPUT.parts/`` beside it:

* ``manifest.jsonl`` — line 1 is the run header (the fingerprint that a resume must match, and the
  trace metadata of the first run); every further line records one committed part and the prompt
  indices it holds.
* ``part-00000.parquet``, ... — one per batch of prompts, in processing order.

Committing a batch: the part is written under a temporary name, fsync'd, renamed to its final name
and the directory fsync'd; then its manifest line is appended and fsync'd. Only then is the batch
reported done. A crash (SIGKILL, power loss) at any point leaves at most one uncommitted part — a
temporary file, a part the manifest does not list, or a torn last manifest line — which
:meth:`WorkDir.open` discards. The manifest is append-only, so a run of any length costs one short
write per batch.

Every part is written with Parquet page checksums (CRC32 per data page). Before any work a resume
reads every committed part whole, verifying those checksums, and compares its row count with its
manifest line: a part that is missing, truncated, unreadable or rotted (a flipped byte in a data page
with the footer intact, which without the checksums would mostly read back as wrong numbers) is
dropped from the manifest (rewritten atomically) and only its prompts are traced again; the merge
restores the uninterrupted run's row order. A part that rots between that check and the merge fails
the merge with one line whose resume command retraces it. A resume also
removes the hidden ``.OUTPUT.*.partial`` file a merge killed by SIGKILL left beside the output.

Nothing here follows a symbolic link: the work directory is checked with ``lstat`` (a planted link
at its name is refused), and the lock, the manifest and the part files are opened with
``O_NOFOLLOW`` (new files also with ``O_EXCL``), so a run never writes through a link into another
place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmprobe.errors import UsageError, first_line
from llmprobe.tracing.prompts import PromptRecord
from llmprobe.files import fsync_dir, remove_stale_partials

MANIFEST = "manifest.jsonl"
LOCK = "lock"
PART_COMPRESSION = "zstd"
# Trace-metadata keys whose values must not change between an interrupted run and its resume: a
# trace records them once, so every row must come from the same model, numerics and settings.
FINGERPRINT_KEYS = ("model", "weights_sha256", "model_revision", "dtype", "device", "device_map", "settings",
                    "attn_implementation", "llmprobe_version", "torch_version", "transformers_version")


class DamagedPart(UsageError):
    """A committed part that no longer reads back (found by the merge): a resume drops and retraces it."""


def work_dir_for(output: str) -> Path:
    path = Path(output)
    return path.parent / f".{path.name}.parts"


def prompts_digest(records: list[PromptRecord]) -> str:
    """sha256 over what a trace is computed from (id, text, marks, extra fields), in input order."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.id, r.text, r.marks, r.meta], sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def run_fingerprint(metadata: dict[str, Any], records: list[PromptRecord], fmt: str) -> dict[str, Any]:
    return {**{k: metadata.get(k) for k in FINGERPRINT_KEYS}, "format": fmt, "n_prompts": len(records),
            "prompts_sha256": prompts_digest(records)}


@dataclass
class _Part:
    name: str
    prompts: list[int]
    rows: int


class WorkDir:
    """The work directory of one output; use :meth:`open`, which also takes the run's lock."""

    def __init__(self, path: Path, header: dict[str, Any], parts: list[_Part], lock_fd: int,
                 repaired: list[str]) -> None:
        self.path = path
        self.header = header
        self.parts = parts
        self.repaired = repaired  # damaged parts dropped on open: their prompts must be traced again
        self._lock_fd = lock_fd
        self._next = 1 + max((_part_number(p.name) for p in parts), default=-1)
        self._manifest = os.fdopen(_open_nofollow(path / MANIFEST, os.O_WRONLY | os.O_APPEND), "ab")

    @property
    def metadata(self) -> dict[str, Any]:
        return self.header["metadata"]

    def done_prompts(self) -> set[int]:
        return {i for part in self.parts for i in part.prompts}

    # ------------------------------------------------------------------------------ open / create
    @classmethod
    def open(cls, output: str, fingerprint: dict[str, Any], metadata: dict[str, Any]) -> WorkDir:
        """Continue the work directory of ``output``, or create it; refuse one from different settings."""
        path = work_dir_for(output)
        _remove_leftovers(path)
        check_not_a_link(path, output)
        if not os.path.lexists(path):
            _create(path, {"fingerprint": fingerprint, "metadata": metadata})
        lock_fd = _lock(path, output)
        try:
            check_not_a_link(path, output)
            header, parts = _read_manifest(path)
            _check_fingerprint(header["fingerprint"], fingerprint, path)
            parts, repaired = _drop_damaged(path, header, parts)
            _discard_uncommitted(path, parts)
            remove_stale_partials(output, min_age=0)  # a merge killed by SIGKILL left its temporary output
            return cls(path, header, parts, lock_fd, repaired)
        except BaseException:
            os.close(lock_fd)
            raise

    # ------------------------------------------------------------------------------ commit
    def commit(self, batch: pa.RecordBatch, prompts: list[int]) -> None:
        """Make one batch durable: part file first, then its manifest line (see the module docstring)."""
        name = f"part-{self._next:05d}.parquet"
        temp = self.path / f".{name}.tmp"
        with os.fdopen(_open_nofollow(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            pq.write_table(pa.Table.from_batches([batch]), f, compression=PART_COMPRESSION, write_page_checksum=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.path / name)
        fsync_dir(self.path)
        part = _Part(name, prompts, batch.num_rows)
        self._manifest.write((json.dumps({"part": name, "prompts": prompts, "rows": part.rows}) + "\n").encode())
        self._manifest.flush()
        os.fsync(self._manifest.fileno())
        self.parts.append(part)
        self._next += 1

    def tables(self, schema: pa.Schema, order: Mapping[int, int] | None = None) -> Iterator[pa.Table]:
        """The committed parts in processing order, one table each, checked against the manifest.

        ``order`` (each prompt's rank in an uninterrupted run's processing order) sorts the parts,
        needed when a repaired part was traced again after later ones."""
        parts = self.parts if order is None else sorted(self.parts, key=lambda p: min(order[i] for i in p.prompts))
        for part in parts:
            try:
                table = _read_part(self.path / part.name).cast(schema)
            except (pa.ArrowException, OSError) as exc:  # rotted since open() checked it: a resume drops it
                raise DamagedPart(f"committed part {part.name} became unreadable ({first_line(exc)}), so the"
                                  " resume traces its prompts again", where=str(self.path)) from None
            if table.num_rows != part.rows:
                raise DamagedPart(f"{part.name} holds {table.num_rows} rows, the manifest says {part.rows}, so the"
                                  " resume traces its prompts again", where=str(self.path))
            yield table

    def close(self) -> None:
        if not self._manifest.closed:
            self._manifest.close()
            os.close(self._lock_fd)

    def remove(self) -> None:
        """Delete the directory after a successful merge (renamed first, so it vanishes atomically)."""
        self.close()
        trash = Path(tempfile.mkdtemp(prefix=f"{self.path.name}.done-", dir=self.path.parent))
        os.replace(self.path, trash)
        shutil.rmtree(trash, ignore_errors=True)


@dataclass
class OutputPlan:
    """How a checkpointed run treats ``OUTPUT`` (:func:`plan_output`): ``interrupted``, an interrupted run's
    work directory is there (discarded at the start unless resumed); ``replace``, the final merge may
    replace an existing output; ``complete``, a ``--resume`` of a run that finished: nothing to do."""

    interrupted: bool
    replace: bool
    complete: bool


def plan_output(output: str, force: bool, resume: bool, check_output: Callable[[bool], None],
                what: str = "trace") -> OutputPlan:
    """The checks before a checkpointed run writing ``output`` (``-``: stdout) does any work: an interrupted
    run's work must be resumed (``--resume``) or thrown away (``--force``), never silently; a run holding
    the lock is refused; ``check_output(replace)`` checks the output itself (it must not exist unless
    ``replace``). ``what``: the kind of run, as the messages name it."""
    if resume and output == "-":
        raise UsageError(f"a {what} written to stdout cannot be resumed; write it to a file with -o", where="--resume")
    if output != "-":
        check_not_a_link(work_dir_for(output), output)
    interrupted = output != "-" and os.path.lexists(work_dir_for(output))
    if interrupted and is_locked(output):
        raise UsageError(f"another llmprobe {what} is writing it right now (its work is in {work_dir_for(output)});"
                         " wait for it to finish or choose another -o", where=output)
    if interrupted and not (resume or force):
        raise UsageError(f"an interrupted run left its work in {work_dir_for(output)}; pass --resume to continue"
                         " it or --force to start over", where=output)
    if resume and not interrupted and not force and os.path.isfile(output):
        check_output(True)
        return OutputPlan(False, False, True)
    check_output(force or (resume and interrupted))
    return OutputPlan(interrupted, force or (resume and os.path.lexists(output)), False)  # a crash after the rename


def discard(output: str) -> None:
    """Throw away the work directory of ``output`` (``--force`` over an interrupted run)."""
    path = work_dir_for(output)
    check_not_a_link(path, output)
    if path.exists():
        lock_fd = _lock(path, output)
        os.close(lock_fd)
        shutil.rmtree(path)


def _create(path: Path, header: dict[str, Any]) -> None:
    """Create the directory with its header atomically, so no work directory ever lacks one."""
    staging = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    with open(staging / MANIFEST, "wb") as f:
        f.write((json.dumps(header) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    try:
        os.rename(staging, path)
    except OSError:  # another run created it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
        if not path.exists():
            raise
    fsync_dir(path.parent)


def check_not_a_link(path: Path, output: str) -> None:
    """Refuse a work directory name that is a symbolic link or not a directory (never followed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a directory"
        raise UsageError(f"the work directory {path} is {what}; llmprobe never follows links there — remove it",
                         where=output)


def is_locked(output: str) -> bool:
    """Whether a running llmprobe holds the lock of ``output``'s work directory."""
    try:
        fd = _open_nofollow(work_dir_for(output) / LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _open_nofollow(path: Path, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o644)


def _part_number(name: str) -> int:
    return int(name.removeprefix("part-").removesuffix(".parquet"))


def _lock(path: Path, output: str) -> int:
    try:
        fd = _open_nofollow(path / LOCK, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise UsageError(f"cannot open the work directory's lock ({exc.strerror})", where=str(path)) from None
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no advisory locks on this platform
        pass
    except OSError:
        os.close(fd)
        raise UsageError(f"another llmprobe trace is writing it right now (lock held on {path}); wait for it to"
                         " finish or choose another -o", where=output) from None
    return fd


def _read_manifest(path: Path) -> tuple[dict[str, Any], list[_Part]]:
    try:
        fd = _open_nofollow(path / MANIFEST, os.O_RDONLY)
    except FileNotFoundError:
        raise UsageError("the work directory has no manifest (was it deleted?), so its parts cannot be trusted;"
                         " rerun with --force to start over", where=str(path)) from None
    except OSError as exc:
        raise UsageError(f"cannot read the work directory's manifest ({exc.strerror}); rerun with --force to"
                         " start over", where=str(path)) from None
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    complete, torn = lines[:-1], lines[-1]  # a crash mid-append leaves a last line without its newline
    if torn:
        with open(path / MANIFEST, "r+b") as f:
            f.truncate(len(data) - len(torn))
            f.flush()
            os.fsync(f.fileno())
    try:
        header = json.loads(complete[0])
        parts = [_Part(entry["part"], entry["prompts"], entry["rows"]) for entry in map(json.loads, complete[1:])]
        if not isinstance(header, dict) or not {"fingerprint", "metadata"} <= header.keys():
            raise ValueError("no header")
    except (IndexError, KeyError, ValueError, TypeError, RecursionError):
        raise UsageError("the work directory's manifest is damaged; rerun with --force to start over",
                         where=str(path)) from None
    return header, parts


def _drop_damaged(path: Path, header: dict[str, Any], parts: list[_Part]) -> tuple[list[_Part], list[str]]:
    """Parts whose file is missing, truncated or holds another row count than listed are dropped (file and
    manifest line), so a resume traces just their prompts again instead of failing at the merge."""
    damaged = [p.name for p in parts if not _intact(path / p.name, p.rows)]
    if not damaged:
        return parts, []
    kept = [p for p in parts if p.name not in damaged]
    lines = [json.dumps(header)] + [json.dumps({"part": p.name, "prompts": p.prompts, "rows": p.rows}) for p in kept]
    temp = path / f".{MANIFEST}.tmp"
    temp.unlink(missing_ok=True)
    with os.fdopen(_open_nofollow(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
        f.write(("\n".join(lines) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path / MANIFEST)
    fsync_dir(path)
    for name in damaged:
        (path / name).unlink(missing_ok=True)
    return kept, damaged


def _intact(part: Path, rows: int) -> bool:
    """The part is a regular file that reads whole, every page checksum verified, and holds ``rows`` rows."""
    try:
        if not stat.S_ISREG(os.lstat(part).st_mode):
            return False
        return _read_part(part).num_rows == rows
    except (OSError, pa.ArrowException):
        return False


def _read_part(part: Path) -> pa.Table:
    """A committed part, read whole with its page checksums verified (parts of older runs have none:
    then only decoding can fail)."""
    fd = _open_nofollow(part, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        return pq.ParquetFile(f, page_checksum_verification=True).read()




def _check_fingerprint(then: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    now = json.loads(json.dumps(now))  # compare as stored: JSON has no tuples or non-string keys
    for key in sorted(set(then) | set(now)):
        a, b = then.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            key, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
        what = "the prompts differ" if key == "prompts_sha256" else f"{key} was {a!r}, now {b!r}"
        raise UsageError(f"cannot resume: {what} (the interrupted run's work is in {path});"
                         " rerun with the same prompts and options, or pass --force to start over", where="--resume")


def _discard_uncommitted(path: Path, parts: list[_Part]) -> None:
    keep = {MANIFEST, LOCK, *(p.name for p in parts)}
    for entry in path.iterdir():
        if entry.name not in keep:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _remove_leftovers(path: Path) -> None:
    """Directories a crash left while being created or deleted."""
    for pattern in (f"{path.name}.tmp-*", f"{path.name}.done-*"):
        for stale in path.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
