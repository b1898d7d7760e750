"""Every file llmprobe writes goes through this module: checked first, built beside its target,
made durable, and renamed into place only when complete.

Invariants, the same for traces, fit tables, priors, figures, reports and Ray part directories:

* :func:`check_new_output` runs before any work, so a typo in ``-o`` fails in a second rather than
  after a model load or a fit; its messages are the same for every command.
* :func:`atomic_file` writes into a uniquely named hidden temporary file in the target's directory
  (``.NAME.XXXXXXXX.partial``; two concurrent writers never share one), flushes and fsyncs it, gives
  it the permissions any new file gets under the user's umask, renames it over the target and fsyncs
  the directory. On any error, Ctrl-C included, the temporary file is removed and the target is left
  exactly as it was: a reader sees the old file or the complete new one, never a part.
* :func:`atomic_dir` does the same for a directory of files (the Ray engine's part files).

The trace runner's crash-safe work directory (:mod:`llmprobe.tracing.checkpoint`) commits its parts
with its own renames, documented there, because it must survive SIGKILL between parts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from llmprobe.errors import UsageError

PARTIAL_SUFFIX = ".partial"


def check_new_output(output: str | Path, force: bool, *, directory: bool = False) -> Path:
    """Fail before any work when ``output`` cannot be written: an existing file without ``force``, a
    directory where a file is meant (or the reverse), or a parent directory that does not exist."""
    path = Path(output)
    if path.is_dir() and not directory:
        raise UsageError("is a directory", where=str(output))
    if path.exists() and not force:
        raise UsageError("already exists; pass --force to replace it", where=str(output))
    if path.exists() and not path.is_dir() and directory:
        raise UsageError("is a file, not a directory", where=str(output))
    if not path.parent.is_dir():
        raise UsageError(f"directory {str(path.parent)!r} does not exist", where=str(output))
    return path


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (where the platform lets directories be fsync'd)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(output: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A stream whose content appears at ``output`` only when the block completes (``mode`` "wb" or "w")."""
    target = Path(output)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent)
    temp = Path(temp_name)
    try:
        os.chmod(temp, 0o666 & ~umask())  # mkstemp makes the file private; an output gets normal permissions
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, target)
        fsync_dir(target.parent)
    finally:
        temp.unlink(missing_ok=True)


def write_atomic(output: str | Path, data: bytes | str) -> None:
    """``data`` at ``output``, complete or not at all."""
    with atomic_file(output, "wb" if isinstance(data, bytes) else "w") as stream:
        stream.write(data)


@contextmanager
def atomic_dir(output: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """A staging directory that becomes ``output`` when the block completes.

    An existing ``output`` directory is replaced, or with ``replace=False`` kept: then the staged
    copy is dropped and :class:`FileExistsError` raised (a cache entry another process made first).
    """
    target = Path(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~umask())
        yield staging
        if target.exists() and not replace:
            raise FileExistsError(str(target))
        if target.exists():  # moved aside first: a directory cannot be renamed over a non-empty one
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
