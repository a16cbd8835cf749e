"""Output folders: writability up front, output-side errors stop a batch, one run at a time.

Tests run as root, where permission bits do not stop writes: a read-only or full disk is
simulated by making `os.open` / `os.fsync` raise EROFS / ENOSPC for paths in the output folder.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mri_vqvae.artifacts.runs import new_run_dir, unique_dir
from mri_vqvae.core.outputs import (
    OutputError,
    ensure_writable,
    output_cause,
    output_lock,
    remove_stale_temps,
)
from mri_vqvae.tasks.cases import run_batch
from tests.support.checks import fail_opens_under

ROOT = Path(__file__).resolve().parents[2]




def test_ensure_writable_makes_the_folder_and_leaves_no_probe(tmp_path: Path) -> None:
    out = ensure_writable(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []


def test_output_path_under_a_file_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder") as info:
        ensure_writable(tmp_path / "file" / "out")
    assert str(tmp_path / "file" / "out") in str(info.value)


@pytest.mark.parametrize(("code", "words"), [(errno.EROFS, "read-only"),
                                             (errno.ENOSPC, "disk is full"),
                                             (errno.EACCES, "permission denied")])
def test_simulated_unwritable_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                code: int, words: str) -> None:
    out = tmp_path / "out"
    fail_opens_under(monkeypatch, out, code)
    with pytest.raises(OutputError, match=words) as info:
        ensure_writable(out)
    assert f"output folder {out}" in str(info.value) and "--out" in str(info.value)


def test_simulated_full_disk_at_fsync_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="disk is full"):
        ensure_writable(tmp_path / "out")
    monkeypatch.undo()
    assert list((tmp_path / "out").iterdir()) == []  # the probe is gone


def _os_error(code: int, name: str | None) -> OSError:
    return OSError(code, os.strerror(code), name) if name else OSError(code, os.strerror(code))


@pytest.mark.parametrize(
    ("make", "is_output"),
    [
        (lambda out, src: _os_error(errno.ENOSPC, None), True),
        (lambda out, src: _os_error(errno.EDQUOT, str(src)), True),
        (lambda out, src: _os_error(errno.EROFS, str(out / "images" / ".x.tmp")), True),
        (lambda out, src: _os_error(errno.EACCES, str(out / "images" / "a.nii.gz")), True),
        (lambda out, src: _os_error(errno.EACCES, str(src)), False),
        (lambda out, src: _os_error(errno.ENOENT, str(src)), False),
        (lambda out, src: ValueError("bad image"), False),
    ],
    ids=["enospc", "edquot-anywhere", "erofs", "eacces-output", "eacces-input", "missing-input",
         "not-oserror"],
)
def test_output_cause_rule(tmp_path: Path, make: Callable[[Path, Path], Exception],
                           is_output: bool) -> None:
    exc = make(tmp_path / "out", tmp_path / "data" / "a.nii.gz")
    assert (output_cause(exc, tmp_path / "out") is not None) == is_output
    wrapped = RuntimeError("applying transform")  # how MONAI wraps an inner error
    wrapped.__cause__ = exc
    assert (output_cause(wrapped, tmp_path / "out") is not None) == is_output


def test_output_cause_ends_on_a_cyclic_cause_chain(tmp_path: Path) -> None:
    """``raise inner from outer`` where `outer` was caused by `inner` (as latents.py does)."""
    inner, outer = ValueError("bad image"), RuntimeError("applying transform")
    outer.__cause__ = inner
    inner.__cause__ = outer
    assert output_cause(inner, tmp_path) is None


def test_batch_skips_unreadable_input_but_stops_on_output_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    items = [{"case_id": c, "image": str(tmp_path / f"{c}.nii.gz")} for c in "abc"]

    def unreadable_b(item: dict[str, Any]) -> str:
        if item["case_id"] == "b":
            raise PermissionError(errno.EACCES, "Permission denied", item["image"])
        return item["case_id"]

    done, failures = run_batch(items, unreadable_b, out_dir=out)
    assert done == ["a", "c"] and [f.case_id for f in failures] == ["b"]
    seen: list[str] = []

    def full_at_b(item: dict[str, Any]) -> str:
        seen.append(item["case_id"])
        if item["case_id"] == "b":
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "b.nii.gz"))
        return item["case_id"]

    for strict in (False, True):
        seen.clear()
        with pytest.raises(OutputError, match="disk is full") as info:
            run_batch(items, full_at_b, strict=strict, out_dir=out)
        assert seen == ["a", "b"] and str(out) in str(info.value)


def test_second_lock_in_this_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_lock(out):
        assert f"pid {os.getpid()}" in (out / ".lock").read_text()
        holder = f"in use by another run \\(pid {os.getpid()} "
        with pytest.raises(OutputError, match=holder) as info, output_lock(out):
            pass
        assert str(out) in str(info.value)
    assert not (out / ".lock").exists()  # released and removed at the end of the block
    with output_lock(out):
        pass


HOLD = """
import sys, time
from mri_vqvae.core.outputs import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_lock_of_a_killed_process_is_not_stale(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"pid {proc.pid} "), output_lock(out):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert f"pid {proc.pid} " in (out / ".lock").read_text()  # the file stays, unlocked
    with output_lock(out):  # the kernel released the dead holder's flock
        assert f"pid {os.getpid()} " in (out / ".lock").read_text()


def test_remove_stale_temps_only_touches_hidden_temp_files(tmp_path: Path) -> None:
    keep = [tmp_path / "a.nii.gz", tmp_path / ".lock", tmp_path / "tmp.txt"]
    stale = [tmp_path / ".a.nii.gz.k3j2.tmp.nii.gz", tmp_path / ".write-probe.x1.tmp"]
    for p in keep + stale:
        p.write_text("x")
    assert sorted(remove_stale_temps([tmp_path, tmp_path / "missing"])) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(keep)


def test_run_folders_are_checked_up_front(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        new_run_dir(tmp_path / "file", "vqvae", "smoke", 0)
    fail_opens_under(monkeypatch, tmp_path / "ro", errno.EROFS)
    with pytest.raises(OutputError, match="read-only") as info:
        unique_dir(tmp_path / "ro" / "samples", "run")
    assert str(tmp_path / "ro" / "samples") in str(info.value)
    assert not (tmp_path / "ro" / "samples" / "run").exists()


def test_reconstruct_refuses_a_locked_or_unwritable_folder_before_loading(
    tmp_path: Path,
) -> None:
    from mri_vqvae.data.manifest import Manifest
    from mri_vqvae.tasks.reconstruct import reconstruct_manifest

    manifest = Manifest(name="empty", cases=(), data_root=tmp_path)
    out = tmp_path / "out"
    with output_lock(out), pytest.raises(OutputError, match=f"pid {os.getpid()} "):
        reconstruct_manifest(tmp_path / "no-such-run", manifest, out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        reconstruct_manifest(tmp_path / "no-such-run", manifest, tmp_path / "file" / "out")

