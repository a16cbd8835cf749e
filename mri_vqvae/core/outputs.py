"""Output folders: an up-front writability check, a one-run-at-a-time lock, stale temp cleanup.

Every stage that writes into a folder should, before its first case::

    with output_lock(out):                  # ensure_writable(out), then one run at a time
        remove_stale_temps([out / "images"])  # a killed run's temp files (we hold the lock)
        ...

`ensure_writable` alone suits a folder nobody else writes to (a fresh run folder). Mid-run,
an OSError for which `output_cause` finds a cause is a failure of the whole run (raise
`output_error`), not of one case; `mri_vqvae.tasks.cases.run_batch` applies that rule. Stdlib only.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import logging
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from mri_vqvae.core.errors import MriVqvaeError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
PROBE_PREFIX = ".write-probe."
TEMP_GLOB = ".*.tmp*"  # mri_vqvae.core.atomic's temp files, and our write probes
# Errors only a write can cause: whatever the path, the output side (disk, quota, mount) failed.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

_PROBLEMS = {
    errno.ENOSPC: ("the disk is full", "free some space or choose another --out"),
    errno.EDQUOT: ("your disk quota is exhausted", "free some space or choose another --out"),
    errno.EROFS: ("it is on a read-only file system", "choose an --out on a writable disk"),
    errno.EACCES: ("permission denied", "make it writable (chmod/chown) or choose another --out"),
    errno.EPERM: ("operation not permitted", "make it writable or choose another --out"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another --out"),
    errno.EEXIST: ("it exists and is not a folder", "choose another --out"),
}


class OutputError(MriVqvaeError):
    """An output folder that cannot be written to, or that another run is writing to."""


def output_error(folder: str | Path | None, exc: OSError) -> OutputError:
    """An `OutputError` naming `folder`, what went wrong (from `exc`'s errno) and the fix.

    With `folder` None, the folder of `exc.filename` (if any) is named.
    """
    name = _filename(exc.filename)
    if folder is None and name:
        folder = Path(name).parent
    problem, fix = _PROBLEMS.get(exc.errno or 0, (exc.strerror or str(exc), "choose another --out"))
    where = f" (at {name})" if name and name != str(folder) else ""
    target = f"output folder {folder}" if folder is not None else "the outputs"
    return OutputError(f"cannot write to {target}: {problem}{where}. {fix}")


def ensure_writable(folder: str | Path) -> Path:
    """Create `folder` and prove it takes a write (a probe file written, fsynced, deleted).

    Raises `OutputError` (read-only, full, permission denied, path through a file...) naming the
    folder and the fix; returns `folder` as a Path.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"mri-vqvae write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        name = _filename(exc.filename)
        if name and Path(name).name.startswith(PROBE_PREFIX):  # the probe's name says nothing
            exc = OSError(exc.errno, exc.strerror)
        raise output_error(folder, exc) from None
    return folder


def _filename(name: object) -> str | None:
    """An OSError's filename as text (None when absent or a file descriptor)."""
    if isinstance(name, (str, bytes, os.PathLike)):
        return os.fsdecode(name) or None
    return None


def _within(path: str, folder: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def output_cause(exc: BaseException, out_dir: str | Path | None = None) -> OSError | None:
    """The OSError in `exc`'s cause chain that means the output side failed, else None.

    Rule: an OSError whose errno only a write can cause (ENOSPC, EDQUOT, EROFS), or any OSError
    whose filename lies inside `out_dir` (EACCES, ENOENT... on an output path). Anything else
    (an unreadable input file, a bad image) is a failure of one case.
    """
    seen: BaseException | None = exc
    visited: set[int] = set()  # ``raise inner from outer`` can make the chain a cycle
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError):
            if seen.errno in WRITE_ERRNOS:
                return seen
            names = [n for n in map(_filename, (seen.filename, seen.filename2)) if n]
            if out_dir is not None and any(_within(n, Path(out_dir)) for n in names):
                return seen
        seen = seen.__cause__
    return None


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (a releasing holder unlinks it)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _acquire(folder: Path, path: Path) -> int | None:
    """An open fd of `path` holding its flock; None where the file system has no flock."""
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise output_error(folder, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _same_file(fd, path):
                holder = _holder(path)
                os.close(fd)
                raise OutputError(
                    f"output folder {folder} is in use by another run ({holder}; lock file "
                    f"{path}): wait for that run to finish or choose another --out"
                ) from None
            os.close(fd)  # the holder was just releasing: try the new file
            continue
        except OSError as exc:
            os.close(fd)
            log.warning("cannot lock %s (%s); going on without a lock", path, exc)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # locked a file its holder unlinked meanwhile: try again
    raise OutputError(f"cannot take the lock {path} of output folder {folder}: it keeps "
                      "changing; is another program deleting it? choose another --out")


@contextlib.contextmanager
def output_lock(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder/.lock`` (created, with the folder) for the block.

    A second holder (another process, or another open of the file in this one) gets an
    `OutputError` naming the folder and the holder (pid, host, start time). The lock is
    `fcntl.flock`: the kernel drops it when the holder exits, even by SIGKILL, so it never goes
    stale; a lock file a killed run left is simply taken over. On release the holder deletes the
    file while still holding the lock, and a new holder checks that the file it locked is still
    the one at the path, so the deletion cannot let two runs in. On a file system without flock
    support the run goes on unlocked, with a warning.
    """
    folder = ensure_writable(folder)
    path = folder / LOCK_NAME
    fd = _acquire(folder, path)
    if fd is None:
        yield folder
        return
    try:
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode(), 0)
        except OSError as exc:
            raise output_error(folder, exc) from None
        yield folder
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # still locked: nobody else holds this file
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def remove_stale_temps(folders: Iterable[str | Path]) -> list[Path]:
    """Delete the hidden temp files (``.*.tmp*``) a killed run left in `folders`; returns them.

    Only safe while holding the folder's `output_lock` (a live run's temp files look the same).
    """
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(TEMP_GLOB)):
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        log.info("removed %d temp file(s) left by an interrupted run", len(removed))
    return removed
