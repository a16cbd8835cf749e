"""One list of file suffixes: every name the reader accepts, `manifest build` finds, and back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from mri_vqvae.core.errors import InvalidImageError
from mri_vqvae.data import formats
from mri_vqvae.data.io import MriReader, detect_format, inspect_image, read_volume
from mri_vqvae.data.scan import scan_folder
from mri_vqvae.data.sources import is_dicom, source_files
from tests.support.dicom import COLS, ROWS, SLICES, write_slices
from tests.support.volumes import int_volume, write_nifti

ALL_SUFFIXES = formats.IMAGE_SUFFIXES + formats.DICOM_SUFFIXES
NOT_IMAGES = ("", ".raw", ".zraw", ".gz", ".json", ".txt", ".nii.bak", ".dcm.txt")


def _write_image(folder: Path, suffix: str) -> tuple[tuple[int, int, int], int]:
    """One image named ``img<suffix>`` (a DICOM suffix: a series folder ``img/`` of slices named
    ``s<k><suffix>`` without the DICM preamble, so only the suffix tells they are DICOM); returns
    its (X, Y, Z) shape and how many files make it."""
    folder.mkdir(parents=True, exist_ok=True)
    if suffix in formats.DICOM_SUFFIXES:
        names = [f"s{k}{suffix}" for k in range(SLICES)]
        write_slices(folder / "img", generate_uid(), names, preamble=False)
        return (COLS, ROWS, SLICES), SLICES
    volume = int_volume()
    if suffix in formats.NIFTI_SUFFIXES:
        write_nifti(folder / f"img{suffix}", volume.astype(np.float32), np.eye(4))
    else:
        image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))  # sitk takes (Z, Y, X)
        sitk.WriteImage(image, str(folder / f"img{suffix}"))
    return volume.shape, 2 if formats.is_detached(suffix) else 1


@pytest.mark.parametrize("suffix", ALL_SUFFIXES)
def test_every_suffix_the_reader_accepts_is_found_by_the_scan_and_read_back(
    tmp_path: Path, suffix: str
) -> None:
    root = tmp_path / "data"
    shape, n_files = _write_image(root / "sub-01", suffix)
    cases, problems = scan_folder(root, inspect_image, "src")
    assert problems == []
    name = "img" if suffix in formats.DICOM_SUFFIXES else f"img{suffix}"  # a series: its folder
    assert [c.path for c in cases] == [f"sub-01/{name}"]
    case = cases[0]
    full = root / case.path
    assert len(source_files(full)) == n_files  # a detached header's data file is part of it
    assert case.shape == shape == inspect_image(full).shape
    data, _ = read_volume(full, root=root, sha256=case.sha256)  # verified against the scan
    assert data.shape == shape


@pytest.mark.parametrize("suffix", ALL_SUFFIXES)
def test_suffixes_are_matched_case_insensitively(tmp_path: Path, suffix: str) -> None:
    upper = tmp_path / f"IMG{suffix.upper()}"
    if suffix in formats.DICOM_SUFFIXES:
        write_slices(tmp_path, generate_uid(), [upper.name], preamble=False)
        assert is_dicom(upper)  # no "DICM" preamble: known by its suffix alone
        assert detect_format(upper) == "dicom_slice"
    else:
        _write_image(tmp_path, suffix)
        (tmp_path / f"img{suffix}").rename(upper)
        assert detect_format(upper) == ("nifti" if formats.is_nifti(suffix) else "itk")
    assert MriReader().verify_suffix(upper)


@pytest.mark.parametrize("suffix", NOT_IMAGES)
def test_names_the_scan_leaves_out_the_reader_refuses(tmp_path: Path, suffix: str) -> None:
    name = f"img{suffix}"
    assert not MriReader().verify_suffix(name)
    assert formats.image_suffix(name) is None and not formats.has_dicom_suffix(name)
    root = tmp_path / "data"
    root.mkdir()
    (root / name).write_bytes(bytes(256))  # no DICOM preamble, no image header
    assert scan_folder(root, inspect_image, "src") == ([], [])
    with pytest.raises(InvalidImageError, match="unknown image type"):
        detect_format(root / name)


def test_reader_and_scan_know_the_same_names() -> None:
    names = [f"a{s}" for s in ALL_SUFFIXES + NOT_IMAGES] + [f"A{s.upper()}" for s in ALL_SUFFIXES]
    by_reader = {n for n in names if MriReader().verify_suffix(n)}
    by_scan = {n for n in names if formats.image_suffix(n) or formats.has_dicom_suffix(n)}
    assert by_reader == by_scan == {n for n in names if n.lower()[1:] in ALL_SUFFIXES}
