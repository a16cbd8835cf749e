"""`mri_vqvae.data.sources`: which files make an image, confinement to the data root, digests and
verified reads. Fixtures are tiny files made in tmp_path."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from mri_vqvae.core.errors import ManifestError
from mri_vqvae.data.case import Case
from mri_vqvae.data.manifest import Manifest, load_manifest, verify_manifest, write_manifest
from mri_vqvae.data.sources import (
    check_confined,
    read_verified,
    sha256_sources,
    source_files,
)
from tests.support.dicom import write_slices

MHD = "ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"


def lines_digest(base: Path, files: list[Path]) -> str:
    """The documented multi-file scheme: sha256 of ``name NUL sha256(file) LF``."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{os.path.relpath(f, base)}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n"
                 .encode())
    return h.hexdigest()


def mhd(root: Path, data_file: str = "img.raw", name: str = "img.mhd") -> Path:
    (root / name).write_text(f"{MHD}ElementDataFile = {data_file}\n")
    return root / name


# --- which files ------------------------------------------------------------------------------


def test_plain_file_digest_is_the_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "head.nii.gz"
    path.write_bytes(b"\x1f\x8b pretend gzip")
    assert source_files(path) == [path]
    assert sha256_sources(path) == (hashlib.sha256(path.read_bytes()).hexdigest(), 15)


def test_header_and_data_files(tmp_path: Path) -> None:
    header = mhd(tmp_path)
    (tmp_path / "img.raw").write_bytes(bytes(8))
    assert source_files(header) == [header, tmp_path / "img.raw"]
    (tmp_path / "local.mhd").write_text(f"{MHD}ElementDataFile = LOCAL\n")
    assert source_files(tmp_path / "local.mhd") == [tmp_path / "local.mhd"]
    (tmp_path / "list.mhd").write_text(f"{MHD}ElementDataFile = LIST 2D\ns0.raw\ns1.raw\n")
    assert [p.name for p in source_files(tmp_path / "list.mhd")] == ["list.mhd", "s0.raw",
                                                                     "s1.raw"]
    (tmp_path / "pat.mhd").write_text(f"{MHD}ElementDataFile = s%d.raw 0 1 1\n")
    assert [p.name for p in source_files(tmp_path / "pat.mhd")] == ["pat.mhd", "s0.raw", "s1.raw"]
    nhdr = tmp_path / "img.nhdr"
    nhdr.write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                    "data file: img.raw\n")
    assert source_files(nhdr) == [nhdr, tmp_path / "img.raw"]


def test_detached_header_without_data_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.mhd").write_text(MHD)
    with pytest.raises(ManifestError, match=r"x\.mhd: detached header without .*ElementDataFile"):
        source_files(tmp_path / "x.mhd")


def test_mhd_digest_changes_when_only_the_raw_changes(tmp_path: Path) -> None:
    header = mhd(tmp_path)
    raw = tmp_path / "img.raw"
    raw.write_bytes(bytes(8))
    before = sha256_sources(header)
    assert before == (lines_digest(tmp_path, [header, raw]), header.stat().st_size + 8)
    raw.write_bytes(bytes(7) + b"\x01")
    assert sha256_sources(header)[0] != before[0]


def test_series_folder_digest_keeps_the_folder_scheme(tmp_path: Path) -> None:
    uid_a, uid_b = generate_uid(), generate_uid()
    a = write_slices(tmp_path, uid_a, ["a1", "a0"])
    b = write_slices(tmp_path, uid_b, ["b0"])
    (tmp_path / "brain.nii.gz").write_bytes(b"not part of the series")
    every = sorted(a + b)
    assert source_files(tmp_path) == every
    assert sha256_sources(tmp_path)[0] == lines_digest(tmp_path, every)  # as manifests record
    assert source_files(tmp_path, uid_a) == sorted(a)
    assert sha256_sources(tmp_path, uid_b) == (lines_digest(tmp_path, b), b[0].stat().st_size)


# --- confinement ------------------------------------------------------------------------------


def test_symlinked_folder_leading_outside_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "img.nii.gz").write_bytes(b"secret")
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ManifestError, match=r"link/img\.nii\.gz resolves to .*outside/img\.nii"
                                            r"\.gz, outside the data root") as info:
        check_confined(root / "link" / "img.nii.gz", root)
    assert "copy the data inside the data root" in str(info.value)
    case = Case("c", "s", "src", "link/img.nii.gz", hashlib.sha256(b"secret").hexdigest(), 6,
                "T1w", (1, 1, 1), (1.0, 1.0, 1.0))
    problems = verify_manifest(Manifest("m", (case,), data_root=root))
    assert [p.case_id for p in problems] == ["c"] and "outside the data root" in problems[0].reason


def test_symlinked_file_inside_the_root_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "real.nii.gz").write_bytes(b"image")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "link.nii.gz").symlink_to(tmp_path / "real.nii.gz")
    check_confined(tmp_path / "sub" / "link.nii.gz", tmp_path)
    digest = hashlib.sha256(b"image").hexdigest()
    got = read_verified(tmp_path / "sub" / "link.nii.gz", tmp_path, digest)
    assert got == {tmp_path / "sub" / "link.nii.gz": b"image"}


def test_mhd_data_file_outside_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.raw").write_bytes(bytes(8))
    header = mhd(root, "../outside.raw")
    with pytest.raises(ManifestError, match=r"outside\.raw, outside the data root"):
        check_confined(header, root)
    digest, size = sha256_sources(header)
    case = Case("c", "s", "src", "img.mhd", digest, size, "T1w", (2, 2, 2), (1.0, 1.0, 1.0))
    problems = verify_manifest(Manifest("m", (case,), data_root=root))
    assert "outside the data root" in problems[0].reason
    with pytest.raises(ManifestError, match="outside the data root"):
        read_verified(header, root, digest)


def test_symlink_loop_is_refused(tmp_path: Path) -> None:
    (tmp_path / "loop.nii.gz").symlink_to(tmp_path / "loop.nii.gz")
    with pytest.raises(ManifestError, match="loop"):
        check_confined(tmp_path / "loop.nii.gz", tmp_path)


# --- verified reads ---------------------------------------------------------------------------


def test_read_verified_catches_one_flipped_byte_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "head.nii.gz"
    blob = bytes(range(256)) * 4
    path.write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    assert read_verified(path, tmp_path, digest) == {path: blob}
    path.write_bytes(blob[:100] + bytes([blob[100] ^ 1]) + blob[101:])
    with pytest.raises(ManifestError) as info:
        read_verified(path, tmp_path, digest)
    msg = str(info.value)
    assert str(path) in msg and digest[:12] in msg and "manifest verify" in msg


def test_read_verified_returns_every_file_of_a_series_once(tmp_path: Path) -> None:
    uid = generate_uid()
    files = write_slices(tmp_path / "s", uid, ["x0", "x1"])
    write_slices(tmp_path / "s", generate_uid(), ["y0"])
    digest, _ = sha256_sources(tmp_path / "s", uid)
    got = read_verified(tmp_path / "s", tmp_path, digest, uid)
    assert got == {f: f.read_bytes() for f in files}
    with pytest.raises(ManifestError, match=r"s \(2 files\): sha256"):
        read_verified(tmp_path / "s", tmp_path, "0" * 64, uid)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.nii.gz")
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            read_verified(tmp_path / "pipe.nii.gz", tmp_path, "0" * 64)
        except ManifestError as exc:
            errors.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and "not a regular file (fifo)" in str(errors[0])


def test_manifest_load_reports_a_missing_data_file(tmp_path: Path) -> None:
    header = mhd(tmp_path)
    (tmp_path / "img.raw").write_bytes(bytes(8))
    digest, size = sha256_sources(header)
    case = Case("c", "s", "src", "img.mhd", digest, size, "T1w", (2, 2, 2), (1.0, 1.0, 1.0))
    write_manifest(Manifest("m", (case,), data_root=tmp_path), tmp_path / "m.json")
    load_manifest(tmp_path / "m.json", verify_checksums=True)
    (tmp_path / "img.raw").unlink()
    with pytest.raises(ManifestError, match=r"'c'.*missing file .*img\.raw"):
        load_manifest(tmp_path / "m.json")
