"""Atomic writes: a temp file in the destination folder, fsync, then `os.replace`.

A reader sees either the previous file or the complete new one, never a partial write, even if
the process is killed or the disk fills mid-write. Outputs get the permissions a plain
``open()`` / ``mkdir()`` would give (``0666 & ~umask`` / ``0777 & ~umask``), not the private
``0600`` / ``0700`` of `tempfile`, so colleagues on a shared server can read them. Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

_UMASK_LOCK = threading.Lock()
_BASE_MODE = {"file": 0o666, "dir": 0o777}


def current_umask() -> int:
    """The process umask, read without changing it where Linux exposes it in /proc.

    Elsewhere it is read by setting a strict ``077`` and restoring it under a lock: a file another
    thread creates in that instant is at worst more private, never more open.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def umask_mode(kind: Literal["file", "dir"]) -> int:
    """The permission bits a new `kind` ("file" or "dir") gets under the current umask."""
    if kind not in _BASE_MODE:
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    return _BASE_MODE[kind] & ~current_umask()


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """Create a fresh, uniquely named folder in `parent` with ``0777 & ~umask`` permissions.

    Like `tempfile.mkdtemp` (which gives ``0700``), but readable by whoever may read a plain
    ``mkdir``; a setgid bit inherited from `parent` (shared group folders) is kept.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    keep = path.stat().st_mode & stat.S_ISGID
    os.chmod(path, umask_mode("dir") | keep)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed.

    `suffix` defaults to the destination's suffixes so writers that infer format from the name
    (nibabel, SimpleITK, matplotlib) still work. The result has ``0666 & ~umask`` permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) if suffix is None else suffix
    mode = umask_mode("file")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fchmod(fh.fileno(), mode)  # after the writer: it may have recreated the file
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(path: str | Path) -> None:
    """Make renames inside `path` durable (best effort: not every OS can open a folder)."""
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


def swap_in_folder(tmp: Path, folder: Path) -> None:
    """Rename the finished folder `tmp` to `folder` (same parent). An existing `folder` is first
    renamed aside to ``.<name>.old-<hex>`` and removed after the swap, so `folder` is at every
    moment either the old or the new one; the parent is fsynced."""
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(folder, old)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    fsync_dir(folder.parent)
