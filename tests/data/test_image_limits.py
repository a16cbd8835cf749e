"""Header limits refused before any voxel buffer exists, and values the float32 cast would hide.

- a small header declaring huge voxels: the grid after resampling to ``data.spacing`` is bounded
  by ``data.max_voxels`` from the header alone (no large allocation, no time spent);
- float64 voxels beyond the float32 range are named as such, not as NaN/Inf;
- a zero, negative or NaN voxel size is refused by every reader (nibabel would read pixdim 0 as
  1 mm and -2 as 2 mm);
- a volume smaller than ``data.min_size`` along any axis is refused, with the fix.
"""

from __future__ import annotations

import hashlib
import math
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.transforms import Compose, EnsureChannelFirstd, Orientationd, Spacingd

from mri_vqvae.config import DataConfig
from mri_vqvae.core.errors import ConfigError, InvalidImageError
from mri_vqvae.data.io import DEFAULT_MIN_SIZE, inspect_image, read_volume
from mri_vqvae.data.readers.common import resampled_shape
from mri_vqvae.data.transforms import IMAGE, RAS_LABELS, LoadCased, build_transforms
from tests.support.dicom import write_series
from tests.support.volumes import int_volume, make_head, oblique_affine, write_nifti


def item_of(path: Path, verified: bool) -> dict:
    """A user's file, or a manifest case (root and sha256) of it."""
    if not verified:
        return {IMAGE: str(path)}
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return {IMAGE: str(path), "root": str(path.parent), "sha256": sha}


def innermost(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None and not isinstance(exc, InvalidImageError):
        exc = exc.__cause__
    return exc


def chain_error(data: DataConfig, item: dict) -> InvalidImageError:
    """The InvalidImageError the full preprocessing chain raises on `item`."""
    with pytest.raises(Exception) as info:
        build_transforms(data)(item)
    err = innermost(info.value)
    assert isinstance(err, InvalidImageError), repr(info.value)
    return err


def raw_nifti(path: Path, vol: np.ndarray, pixdim: tuple[float, float, float],
              sform: bool) -> Path:
    """An uncompressed NIfTI-1 whose pixdim is stored exactly as given (nibabel would fix it)."""
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    img = nib.Nifti1Image(vol, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1 if sform else 0)
    img.update_header()
    hdr = img.header.copy()
    hdr["pixdim"][1:4] = pixdim
    hdr["vox_offset"] = 352
    path.write_bytes(hdr.binaryblock + b"\0" * 4 + vol.astype("<f4").tobytes("F"))
    return path


# --- the grid after resampling -------------------------------------------------------------------


@pytest.mark.parametrize("verified", [False, True], ids=["user_file", "manifest_case"])
def test_huge_voxels_are_refused_before_resampling_allocates(
    tmp_path: Path, verified: bool
) -> None:
    """16^3 voxels of 150 mm: 960^3 = 885 million voxels once resampled to 2.5 mm."""
    path = write_nifti(tmp_path / "huge_voxels.nii.gz", make_head((16, 16, 16)),
                       np.diag([150.0, 150.0, 150.0, 1.0]))
    assert path.stat().st_size < 20_000
    item, chain = item_of(path, verified), build_transforms(DataConfig())
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            chain(dict(item))
        except Exception as exc:  # inspected below
            errors.append(exc)

    start = time.perf_counter()
    tracemalloc.start()
    try:
        attempt()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert peak < 8 << 20, f"{peak:,} bytes allocated"
    assert elapsed < 5.0, f"{elapsed:.1f} s"
    err = innermost(errors[0])
    assert isinstance(err, InvalidImageError) and err.path == str(path)
    for text in ("(16, 16, 16)", "(150.0, 150.0, 150.0)", "(960, 960, 960)", "884,736,000",
                 "data.max_voxels=268,435,456", "data.spacing=(2.5, 2.5, 2.5)"):
        assert text in err.problem, (text, err.problem)
    assert "voxel size" in err.fix and "raise data.max_voxels" in err.fix


def test_tiny_file_of_huge_voxels_against_a_lower_limit(tmp_path: Path) -> None:
    """The issue's example, 8^3 at 150 mm -> 480^3, refused by a limit of 10^7 voxels."""
    path = write_nifti(tmp_path / "tiny.nii.gz", make_head((8, 8, 8)),
                       np.diag([150.0, 150.0, 150.0, 1.0]))
    data = DataConfig(max_voxels=10**7, min_size=8)
    err = chain_error(data, item_of(path, verified=True))
    assert "(480, 480, 480)" in err.problem
    with pytest.raises(InvalidImageError, match="resampled"):
        read_volume(path, max_voxels=10**7, spacing=(2.5, 2.5, 2.5))
    assert read_volume(path, max_voxels=10**7)[0].shape == (8, 8, 8)  # no target: no bound


def test_resampled_shape_matches_monai_spacing(tmp_path: Path) -> None:
    """The header estimate is within 2 voxels per axis of what Orientationd + Spacingd make."""
    rng = np.random.default_rng(0)
    for i in range(6):
        shape = tuple(int(n) for n in rng.integers(12, 30, 3))
        spacing = rng.uniform(0.6, 3.0, 3)
        if i % 3 == 0:
            affine = oblique_affine(spacing)
        else:
            affine = np.diag([*(spacing * rng.choice([-1, 1], 3)), 1.0])
            affine[:3, :3] = affine[:3, :3][:, rng.permutation(3)]
        target = tuple(float(t) for t in rng.uniform(1.0, 3.0, 3))
        path = write_nifti(tmp_path / f"v{i}.nii.gz", make_head(shape), affine)
        chain = Compose([
            LoadCased(min_size=1),
            EnsureChannelFirstd(IMAGE, channel_dim="no_channel"),
            Orientationd(IMAGE, axcodes="RAS", labels=RAS_LABELS),
            Spacingd(IMAGE, pixdim=target),
        ])
        actual = chain({IMAGE: str(path)})[IMAGE].shape[1:]
        estimate = resampled_shape(shape, affine, target)
        assert all(abs(e - a) <= 2 for e, a in zip(estimate, actual, strict=True)), (
            estimate, tuple(actual))


# --- float64 beyond float32 ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [1e300, -1e300, 4e38])
def test_float64_beyond_float32_range_is_named(tmp_path: Path, value: float) -> None:
    vol = make_head().astype(np.float64)
    vol[3, 4, 5] = value
    path = tmp_path / "wide.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    with pytest.raises(InvalidImageError, match="exceed float32 range") as info:
        read_volume(path)
    assert f"up to {abs(value):.3g}" in info.value.problem and "NaN" not in info.value.problem
    assert "rescale the image" in info.value.fix
    err = chain_error(DataConfig(), item_of(path, verified=True))
    assert "exceed float32 range" in err.problem


def test_float64_itk_beyond_float32_and_real_nan_still_reported(tmp_path: Path) -> None:
    vol = int_volume((14, 14, 14)).astype(np.float64)
    vol[1, 2, 3] = 1e300
    sitk.WriteImage(sitk.GetImageFromArray(vol.transpose(2, 1, 0)), str(tmp_path / "wide.mha"))
    with pytest.raises(InvalidImageError, match=r"voxel values up to 1e\+300 exceed float32"):
        read_volume(tmp_path / "wide.mha")
    vol[1, 2, 3] = np.nan  # a genuine NaN in float64 is still a NaN
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    with pytest.raises(InvalidImageError, match="1 of 2,744 voxels are NaN or Inf"):
        read_volume(path)


# --- voxel size ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pixdim", [(1.5, 0.0, 1.5), (1.5, -2.0, 1.5), (np.nan, 1.5, 1.5)],
                         ids=["zero", "negative", "nan"])
@pytest.mark.parametrize("sform", [False, True], ids=["qform", "sform"])
@pytest.mark.parametrize("verified", [False, True], ids=["path", "bytes"])
def test_nifti_bad_pixdim_is_refused(
    tmp_path: Path, pixdim: tuple[float, float, float], sform: bool, verified: bool
) -> None:
    path = raw_nifti(tmp_path / "bad.nii", make_head(), pixdim, sform)
    with pytest.raises(InvalidImageError, match=r"voxel size pixdim\[1:4\]") as info:
        if verified:
            LoadCased()(item_of(path, verified=True))
        else:
            read_volume(path)
    assert info.value.path == str(path) and "pixdim" in info.value.fix
    with pytest.raises(InvalidImageError, match="voxel size"):
        inspect_image(path)


@pytest.mark.parametrize("spacing", ["1 0 1", "1 -2 1"])
def test_itk_bad_spacing_is_refused(tmp_path: Path, spacing: str) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(int_volume((14, 14, 14))), str(tmp_path / "a.mha"))
    blob = (tmp_path / "a.mha").read_bytes()
    assert b"ElementSpacing = 1 1 1" in blob
    path = tmp_path / "bad.mha"
    path.write_bytes(blob.replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = " +
                                  spacing.encode()))
    with pytest.raises(InvalidImageError, match="voxel size"):
        read_volume(path)


def test_dicom_zero_pixel_spacing_is_refused(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", int_volume(), np.eye(4))
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PixelSpacing = ["0", "1"]
        ds.save_as(f)
    with pytest.raises(InvalidImageError, match="PixelSpacing .* is not positive"):
        read_volume(tmp_path / "s")


# --- smallest volume -----------------------------------------------------------------------------


def test_volume_smaller_than_min_size_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "thumb.nii.gz", make_head((8, 8, 8)))
    assert DataConfig().min_size == DEFAULT_MIN_SIZE == 12
    for verified in (False, True):
        err = chain_error(DataConfig(), item_of(path, verified))
        assert err.path == str(path)
        assert "(8, 8, 8)" in err.problem and "data.min_size=12" in err.problem
        assert "remove it from the manifest" in err.fix and "lower data.min_size" in err.fix
    small = build_transforms(DataConfig(min_size=8, spatial_size=(8, 8, 8)))({IMAGE: str(path)})
    assert tuple(small[IMAGE].shape) == (1, 8, 8, 8)
    assert read_volume(path)[0].shape == (8, 8, 8)  # the library default accepts any 3D volume
    blank = write_nifti(tmp_path / "blank.nii.gz", np.full((8, 8, 8), 7.0, np.float32))
    err = chain_error(DataConfig(), item_of(blank, verified=True))
    assert "constant volume" in err.problem  # the more specific reason comes first
    with pytest.raises(InvalidImageError, match="fewer than data.min_size=12"):
        inspect_image(path, min_size=12)
    with pytest.raises(InvalidImageError, match=r"axis 2, fewer than data.min_size=12"):
        read_volume(write_nifti(tmp_path / "slab.nii.gz", make_head((40, 40, 6))), min_size=12)


def test_min_size_is_validated() -> None:
    from mri_vqvae.config import load_config

    with pytest.raises(ConfigError, match="min_size"):
        load_config("smoke", ["data.min_size=0"])
    assert load_config("smoke", ["data.min_size=4"]).data.min_size == 4
    assert math.prod((DataConfig().min_size,) * 3) < DataConfig().max_voxels
