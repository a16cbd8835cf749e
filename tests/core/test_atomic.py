"""Atomic writes: the previous file survives any failure mid-write, no temp file is left, and
outputs get the umask's permissions (not tempfile's private 0600 / 0700)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mri_vqvae.core.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    current_umask,
    make_temp_dir,
    umask_mode,
)


def test_write_replaces_and_cleans(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_error_mid_write_keeps_previous(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_disk_full_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def full(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_temp_keeps_suffix_for_format_sniffing(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "x.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        assert tmp.parent == tmp_path
        tmp.write_bytes(b"")


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test; the previous one is restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_umask(tmp_path: Path, umask: Callable[[int], None], mask: int,
                                    mode: int) -> None:
    umask(mask)
    assert current_umask() == mask
    atomic_write_text(tmp_path / "a.json", "{}")
    with atomic_path(tmp_path / "b.nii.gz") as tmp:
        tmp.unlink()  # a writer that recreates the file still ends with the umask's mode
        tmp.write_bytes(b"x")
    for name in ("a.json", "b.nii.gz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o755), (0o077, 0o700)])
def test_make_temp_dir_honours_umask(tmp_path: Path, umask: Callable[[int], None], mask: int,
                                     mode: int) -> None:
    umask(mask)
    made = make_temp_dir(tmp_path, ".ckpt.tmp-")
    assert made.parent == tmp_path and made.name.startswith(".ckpt.tmp-") and made.is_dir()
    assert stat.S_IMODE(made.stat().st_mode) & 0o777 == mode
    assert make_temp_dir(tmp_path, ".ckpt.tmp-") != made
    assert umask_mode("file") == 0o666 & ~mask and umask_mode("dir") == 0o777 & ~mask
    with pytest.raises(ValueError, match="kind"):
        umask_mode("link")  # type: ignore[arg-type]


def test_umask_read_without_procfs_leaves_it_unchanged(umask: Callable[[int], None],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_proc(self: Path, *args: object, **kwargs: object) -> str:
        raise OSError("no /proc here")

    umask(0o027)
    monkeypatch.setattr(Path, "read_text", no_proc)
    assert current_umask() == 0o027 and current_umask() == 0o027
    monkeypatch.undo()
    assert current_umask() == 0o027
