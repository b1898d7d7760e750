"""Every file llmprobe writes goes through this module: checked first, built beside its target,
made durable, and moved into place only when complete — never over something it must not replace.

Invariants, the same for traces, fit tables, priors, figures, reports and Ray part directories:

* :func:`check_new_output` runs before any work, so a typo in ``-o`` fails in a second rather than
  after a model load or a fit; its messages are the same for every command. It refuses an output
  that is one of the command's inputs (same file by ``os.path.samefile``, or inside an input
  directory), a device, pipe or socket, an existing file without ``--force``, a directory where a
  file is meant (or the reverse), and a parent directory that is missing or not writable.
* :func:`atomic_file` writes into a uniquely named hidden temporary file in the target's directory
  (``.NAME.XXXXXXXX.partial``, created with ``O_EXCL``, so a planted symlink is never followed and two
  concurrent writers never share one), flushes and fsyncs it, gives it the permissions any new file
  gets under the user's umask, moves it to the target and fsyncs the directory. Without ``replace``
  (no ``--force``) the move is a *no-replace* rename (``renameat2(RENAME_NOREPLACE)``, else
  ``link`` + ``unlink``): if another run created the target meanwhile, that run's file stays and this
  one fails with one line. On any error, Ctrl-C included, the temporary file is removed and the target
  is left exactly as it was: a reader sees the old file or the complete new one, never a part.
* A full disk, a read-only file system or a permission error while writing becomes one
  :class:`~llmprobe.errors.UsageError` naming the output (see :func:`write_error`).
* :func:`atomic_dir` does the same for a directory of files (the Ray engine's part files, a wind-tunnel
  checkpoint, a conversion-cache entry).
* Leftovers: the writer holds an advisory lock (``flock``) on its temporary file or staging directory
  until it has moved it into place, and the kernel drops that lock when the writer dies, SIGKILL and power
  loss included. So the hidden ``.NAME.*.partial`` a killed writer leaves is recognisable: the next write
  of the same output deletes every such leftover nobody holds (:func:`remove_stale_partials`), and never
  one a live writer is still filling.

The trace runner's crash-safe work directory (:mod:`llmprobe.tracing.checkpoint`) commits its parts
with its own renames, documented there, because it must survive SIGKILL between parts. Everywhere else
a file is written only through this module: a library that writes files itself (``save_pretrained``,
Ray's ``write_parquet``) writes into a staging directory of :func:`atomic_dir`, a serializer
(``pq.write_table``, ``json.dump``, ``savefig``) into a stream of :func:`atomic_file` or memory, and
small files such as the fingerprint memos go through :func:`write_atomic`. ``tests/test_architecture.py``
checks every spelling of a write (``write_calls`` there) against the source.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from collections.abc import Callable, Iterable, Iterator

from llmprobe.errors import UsageError

PARTIAL_SUFFIX = ".partial"
# errno values that mean "this output cannot be written here", whichever step hits them.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def check_new_output(output: str | Path, force: bool, *, directory: bool = False,
                     inputs: Iterable[str | Path] = ()) -> Path:
    """Fail before any work when ``output`` cannot or must not be written (see the module docstring)."""
    path = Path(output)
    for source in inputs:
        if is_same_or_inside(path, source):
            raise UsageError(f"is also an input of this command ({source}); write the output elsewhere",
                             where=str(output))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise UsageError(f"cannot use as output ({exc.strerror})", where=str(output)) from None
    if mode is not None:
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise UsageError("is not a regular file or directory (a device, pipe or socket); refusing to replace"
                             " it (use -o - for stdout)", where=str(output))
        if stat.S_ISDIR(mode) and not directory:
            raise UsageError("is a directory", where=str(output))
        if not force:
            raise UsageError("already exists; pass --force to replace it", where=str(output))
        if stat.S_ISREG(mode) and directory:
            raise UsageError("is a file, not a directory", where=str(output))
    if not path.parent.is_dir():
        raise UsageError(f"directory {str(path.parent)!r} does not exist", where=str(output))
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"directory {str(path.parent)!r} is not writable", where=str(output))
    return path


def is_same_or_inside(output: Path, source: str | Path) -> bool:
    """``output`` is the file ``source`` (through any link or spelling), or lies inside directory ``source``."""
    if str(source) == "-":
        return False
    source = Path(source)
    try:
        if output.exists() and source.exists() and os.path.samefile(output, source):
            return True
        resolved_source = source.resolve()
        resolved_output = output.resolve()
    except OSError:
        return False
    return resolved_output == resolved_source or (source.is_dir() and resolved_source in resolved_output.parents)


def open_lock(path: Path) -> int:
    """A lock file for :func:`flock`, created if need be and never followed through a symbolic link."""
    return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)


def flock(fd: int, *, shared: bool = False, wait: bool = True) -> bool:
    """An advisory lock on ``fd`` (the kernel drops it when the holder exits or crashes, SIGKILL included);
    without ``wait``, False at once if another process holds a conflicting one. On a file system without
    advisory locks (some network mounts) it holds nothing and says True: the locks are then not enforced."""
    import fcntl

    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    return True


def unlock(fd: int) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


def write_error(output: str | Path, exc: OSError) -> UsageError:
    """The one line for an output that the system refused (full disk, read-only, no permission)."""
    reason = exc.strerror or str(exc)
    return UsageError(f"cannot write ({reason}); nothing was written", where=str(output))


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (where the platform lets directories be fsync'd)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2() -> Callable[..., int] | None:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


def rename_noreplace(source: Path, target: Path) -> None:
    """Move ``source`` to ``target`` atomically, failing with :class:`FileExistsError` if ``target`` exists.

    ``renameat2(RENAME_NOREPLACE)`` where the kernel and file system have it; else for a file a hard
    link (which never replaces) followed by removing the old name; else (a directory, or a file system
    without hard links) an existence check and a rename, which leaves only a tiny window.
    """
    renameat2 = _renameat2()
    if renameat2 is not None:
        result = renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(target))
    if source.is_dir() and not source.is_symlink():
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
        os.rename(source, target)
        return
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:  # a file system without hard links (FAT, some network mounts): check, then rename
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.rename(source, target)
        return
    os.unlink(source)


def created_meanwhile(output: str | Path) -> UsageError:
    """The one line for an output that another run created while this one worked (a no-replace commit lost)."""
    return UsageError("was created by another run while this one worked (is another llmprobe writing it?);"
                      " it was kept, nothing was replaced; pass --force to replace it", where=str(output))


def _commit(temp: Path, target: Path, replace: bool, output: str | Path) -> None:
    try:
        if replace:
            os.replace(temp, target)
        else:
            rename_noreplace(temp, target)
    except FileExistsError:
        raise created_meanwhile(output) from None
    except OSError as exc:
        raise write_error(output, exc) from None


STALE_AFTER_SECONDS = 10.0
"""A leftover must be this old too: a writer takes its lock a moment after creating its temporary file."""


def remove_stale_partials(output: str | Path, min_age: float = STALE_AFTER_SECONDS) -> list[Path]:
    """Delete the hidden ``.NAME.*.partial`` files and directories beside ``output`` that writers killed
    mid-write left: those no live writer holds (its lock) and older than ``min_age`` seconds (0 for a caller
    that already excludes other writers, as the trace work directory's lock does). Never follows a link;
    returns what it deleted."""
    import fcntl
    import glob
    import time

    target = Path(output)
    removed = []
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*{PARTIAL_SUFFIX}"):
        try:
            info = os.lstat(stale)
            if stat.S_ISLNK(info.st_mode) or time.time() - info.st_mtime < min_age:
                continue
            fd = os.open(stale, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live writer: not a leftover
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _hold(fd: int) -> int:
    """A lock on ``fd``'s file (a duplicate descriptor, kept until :func:`os.close`), so no sweeper of leftovers
    takes it for one while its writer lives."""
    held = os.dup(fd)
    flock(held)
    return held


@contextmanager
def atomic_file(output: str | Path, mode: str = "wb", *, replace: bool = False) -> Iterator[IO]:
    """A stream whose content appears at ``output`` only when the block completes (``mode`` "wb" or "w").

    ``replace`` (the command's ``--force``) lets it replace an existing ``output``; without it an
    ``output`` that appeared meanwhile is kept and the write fails with one line.
    """
    target = Path(output)
    remove_stale_partials(target)
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent)
    except OSError as exc:
        raise write_error(output, exc) from None
    temp = Path(temp_name)
    held = _hold(fd)
    try:
        os.chmod(temp, 0o666 & ~umask())  # mkstemp makes the file private; an output gets normal permissions
        encoding = None if "b" in mode else "utf-8"
        try:
            with os.fdopen(fd, mode, encoding=encoding) as stream:
                yield stream
                stream.flush()
                os.fsync(stream.fileno())
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                raise write_error(output, exc) from None
            raise
        _commit(temp, target, replace, output)
        fsync_dir(target.parent)
    finally:
        try:
            temp.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(held)


def write_atomic(output: str | Path, data: bytes | str, *, replace: bool = False) -> None:
    """``data`` at ``output``, complete or not at all (``replace``: see :func:`atomic_file`)."""
    with atomic_file(output, "wb" if isinstance(data, bytes) else "w", replace=replace) as stream:
        stream.write(data)


@contextmanager
def atomic_dir(output: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """A staging directory that becomes ``output`` when the block completes.

    An existing ``output`` directory is replaced, or with ``replace=False`` kept: then the staged
    copy is dropped and :class:`FileExistsError` raised (a cache entry another process made first).
    """
    target = Path(output)
    remove_stale_partials(target)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent))
    except OSError as exc:
        raise write_error(output, exc) from None
    directory_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    held = _hold(directory_fd)
    os.close(directory_fd)
    try:
        os.chmod(staging, 0o777 & ~umask())
        try:
            yield staging
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                raise write_error(output, exc) from None
            raise
        if os.path.lexists(target) and replace:  # moved aside first: a directory cannot be renamed over a non-empty one
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            rename_noreplace(staging, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(held)
