"""Reading MRI through `mri_vqvae.data.io`: every format against an independent reference, and one
test
per kind of bad input (error type, file named, no large allocation for a huge header).

DICOM inputs are written here with pydicom from real volumes (nibabel's anatomical.nii, pydicom's
MR_small.dcm) or built on real headers that ship with nibabel (a Philips enhanced multi-frame
file, a Siemens mosaic with its CSA header). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import tracemalloc
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.transforms import EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd
from nibabel.testing import data_path as NIB_DATA
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from mri_vqvae.core.errors import InvalidImageError
from mri_vqvae.data.io import (
    FORMATS,
    ImageInfo,
    MriReader,
    detect_format,
    inspect_image,
    read_volume,
)
from tests.support.dicom import (
    FLIP,
    base_dataset,
    ds_str,
    positions,
    slice_geometry,
    write_series,
)
from tests.support.volumes import int_volume, make_head, oblique_affine, write_nifti

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from nibabel.nicom import csareader, dicomwrappers

ANATOMICAL = Path(NIB_DATA) / "anatomical.nii"
NICOM_DATA = Path(dicomwrappers.__file__).parent / "tests" / "data"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


# --- helpers -------------------------------------------------------------------------------------




def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both reoriented to the closest RAS axes by nibabel (independent of the code under test)."""
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, np.float32), affine))
    return np.asarray(img.dataobj), img.affine


def column_norms(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size along each array axis of a (4, 4) affine."""
    return tuple(np.linalg.norm(affine[:3, :3], axis=0))












def write_multiframe(
    path: Path, data: np.ndarray, affine: np.ndarray, order: Sequence[int], slopes: Sequence[float]
) -> Path:
    """Enhanced MR file: frame i holds slice order[i] of `data`, stored with slope slopes[i]."""
    iop, spacing, _ = slice_geometry(affine)
    pos = positions(affine, data.shape[2])
    ds = base_dataset(ENHANCED_MR, generate_uid())
    ds.Rows, ds.Columns, ds.NumberOfFrames = data.shape[1], data.shape[0], len(order)
    shared, measures, orient = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = spacing, "2"
    orient.ImageOrientationPatient = iop
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orient]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k, slope in zip(order, slopes, strict=True):
        item, plane, scale = Dataset(), Dataset(), Dataset()
        plane.ImagePositionPatient = ds_str(pos[k])
        scale.RescaleSlope, scale.RescaleIntercept = f"{slope:g}", "0"
        item.PlanePositionSequence, item.PixelValueTransformationSequence = [plane], [scale]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    pixels = np.stack([data[:, :, k].T for k in order]).astype("<i2")
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path




def assert_invalid(path: Path, match: str, **kwargs: float) -> InvalidImageError:
    """read_volume(path) raises InvalidImageError naming `path`, whose problem matches `match`."""
    with pytest.raises(InvalidImageError, match=match) as info:
        read_volume(path, **kwargs)
    err = info.value
    assert err.path == str(path) and str(path) in str(err)
    assert err.fix and err.problem
    return err


# --- NIfTI -------------------------------------------------------------------------------------


def test_nifti_matches_nibabel() -> None:
    img = nib.load(ANATOMICAL)
    data, affine = read_volume(ANATOMICAL)
    assert detect_format(ANATOMICAL) == "nifti"
    assert data.dtype == np.float32 and data.shape == img.shape
    np.testing.assert_array_equal(data, img.get_fdata())
    np.testing.assert_array_equal(affine, img.affine)
    info = inspect_image(ANATOMICAL)
    assert info == ImageInfo("nifti", (33, 41, 25), (2.0, 2.0, 2.0))


def test_nifti_single_volume_4d_is_squeezed(tmp_path: Path) -> None:
    vol = make_head()
    path = write_nifti(tmp_path / "one.nii.gz", vol[..., None])
    data, _ = read_volume(path)
    assert data.shape == vol.shape
    np.testing.assert_array_equal(data, vol)


def test_nifti_oblique_orthogonal_affine_is_accepted(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "oblique.nii.gz", make_head(), oblique_affine())
    data, affine = read_volume(path)
    np.testing.assert_allclose(affine, oblique_affine(), atol=1e-5)
    assert inspect_image(path).spacing == pytest.approx((1.2, 0.9, 2.0), abs=1e-5)


# --- DICOM series --------------------------------------------------------------------------------


def test_mr_small_slices_read_as_a_series(tmp_path: Path) -> None:
    """pydicom's real MR_small.dcm, restacked at 5 positions with distinct pixels per slice."""
    src = Path(get_testdata_file("MR_small.dcm"))
    assert src.is_file()  # ships with pydicom: no download
    ref = pydicom.dcmread(src)
    step = np.cross(ref.ImageOrientationPatient[:3], ref.ImageOrientationPatient[3:]) * 0.8
    folder = tmp_path / "mr_small"
    folder.mkdir()
    expected = []
    for k in np.random.default_rng(1).permutation(5):
        ds = pydicom.dcmread(src)
        ds.ImagePositionPatient = ds_str(np.array(ref.ImagePositionPatient, float) + k * step)
        pixels = (ds.pixel_array // (k + 1)).astype(ds.pixel_array.dtype)
        ds.PixelData = pixels.tobytes()
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(folder / f"slice{k}.dcm")
        expected.append((k, pixels))
    data, affine = read_volume(folder)
    assert data.shape == (64, 64, 5)
    for k, pixels in expected:
        np.testing.assert_array_equal(data[:, :, k], pixels.T)  # (X, Y) = (column, row)
    lps = FLIP @ affine
    np.testing.assert_allclose(lps[:3, 3], np.array(ref.ImagePositionPatient, float), atol=1e-4)
    np.testing.assert_allclose(lps[:3, 0], [0.3125, 0, 0], atol=1e-6)
    np.testing.assert_allclose(lps[:3, 2], step, atol=1e-4)


def test_single_dicom_slice_is_refused_as_2d() -> None:
    src = Path(get_testdata_file("MR_small.dcm"))
    assert detect_format(src) == "dicom_slice"
    err = assert_invalid(src, "2D data")
    assert "folder" in err.fix


@pytest.mark.parametrize("geometry", ["anatomical", "oblique"])
def test_dicom_series_round_trip_of_a_real_volume(tmp_path: Path, geometry: str) -> None:
    img = nib.load(ANATOMICAL)
    vol = np.asarray(img.dataobj).astype(np.int16)
    affine = img.affine if geometry == "anatomical" else oblique_affine()
    write_series(tmp_path / "series", vol, affine)
    data, got = read_volume(tmp_path / "series")
    assert detect_format(tmp_path / "series") == "dicom_series"
    if geometry == "oblique":  # slice normal agrees with the z axis: no reordering at all
        np.testing.assert_array_equal(data, vol)
        np.testing.assert_allclose(got, affine, atol=1e-4)
    else:  # LAS: the DICOM slice normal points inferior, so slices are read back reversed
        np.testing.assert_array_equal(data, vol[:, :, ::-1])
    want_data, want_affine = canonical(vol, affine)
    got_data, got_affine = canonical(data, got)
    np.testing.assert_array_equal(got_data, want_data)
    np.testing.assert_allclose(got_affine, want_affine, atol=1e-4)
    info = inspect_image(tmp_path / "series")
    assert info.shape == vol.shape and info.spacing == pytest.approx(column_norms(affine), abs=1e-5)


# --- NRRD / MetaImage ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_formats_agree_with_simpleitk_nifti_and_nibabel(tmp_path: Path, suffix: str) -> None:
    vol = int_volume()
    lps = FLIP @ oblique_affine()
    image = sitk.GetImageFromArray(vol.transpose(2, 1, 0))  # sitk takes (Z, Y, X)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    sitk.WriteImage(image, str(tmp_path / f"vol{suffix}"))
    sitk.WriteImage(image, str(tmp_path / "ref.nii.gz"))  # SimpleITK's own LPS -> RAS
    ref = nib.load(tmp_path / "ref.nii.gz")
    data, affine = read_volume(tmp_path / f"vol{suffix}")
    assert detect_format(tmp_path / f"vol{suffix}") == "itk"
    np.testing.assert_array_equal(data, vol)
    np.testing.assert_array_equal(data, ref.get_fdata())
    np.testing.assert_allclose(affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(affine, oblique_affine(), atol=1e-6)


# --- enhanced multi-frame ------------------------------------------------------------------------


def test_multiframe_reads_with_correct_axes(tmp_path: Path) -> None:
    vol = int_volume((12, 10, 7))
    sagittal = np.array(
        [[0, 0, -1.1, 20.0], [0.8, 0, 0, -40.0], [0, -0.9, 0, 60.0], [0, 0, 0, 1]]
    )  # X -> anterior, Y -> inferior, Z -> left
    order = [3, 0, 6, 1, 5, 2, 4]
    slopes = [1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 2.0]
    path = write_multiframe(tmp_path / "enhanced.dcm", vol, sagittal, order, slopes)
    assert detect_format(path) == "dicom_multiframe"
    data, affine = read_volume(path)
    expected = vol.astype(np.float32).copy()
    for k, slope in zip(order, slopes, strict=True):
        expected[:, :, k] *= slope
    np.testing.assert_array_equal(data, expected)
    np.testing.assert_allclose(affine, sagittal, atol=1e-5)
    write_series(tmp_path / "series", vol, sagittal)  # same geometry as classic slices
    np.testing.assert_allclose(read_volume(tmp_path / "series")[1], affine, atol=1e-5)


def test_real_philips_multiframe_agrees_with_nibabel(tmp_path: Path) -> None:
    """nibabel's anonymised Philips MPRAGE (pixels zeroed): real per-frame geometry, 176 frames,
    given new 16x16 pixels so the read is fast and checkable against nibabel's MultiframeWrapper."""
    with gzip.open(NICOM_DATA / "philips_mprage.dcm.gz") as fh:
        ds = pydicom.dcmread(fh)
    n = int(ds.NumberOfFrames)
    ds.Rows = ds.Columns = 16
    raw = np.random.default_rng(0).integers(1, 4096, (n, 16, 16)).astype(np.uint16)
    ds.PixelData = raw.tobytes()
    path = tmp_path / "mprage.dcm"
    ds.save_as(path)
    data, affine = read_volume(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
        nib_data = wrapper.get_data()  # (row, column, frame), unscaled for this Philips file
    nib_affine = FLIP @ wrapper.affine[:, [1, 0, 2, 3]]
    slope = float(
        ds.PerFrameFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope
    )
    got_data, got_affine = canonical(data / slope, affine)
    want_data, want_affine = canonical(nib_data.transpose(1, 0, 2), nib_affine)
    np.testing.assert_allclose(got_data, want_data, rtol=1e-5)
    np.testing.assert_allclose(got_affine, want_affine, atol=5e-3)


# --- Siemens mosaic ------------------------------------------------------------------------------


@pytest.fixture
def mosaic(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """nibabel's real Siemens header (CSA, oblique, 32 slices of 64x64 in a 6x6 mosaic) given
    pixels: tile k holds slice k of a known (rows, cols, slices) volume."""
    ds = pydicom.dcmread(NICOM_DATA / "csa_slice_norm.dcm")
    slices = np.random.default_rng(2).integers(0, 4000, (64, 64, 32)).astype(np.uint16)
    tiles = np.zeros((36, 64, 64), np.uint16)
    tiles[:32] = slices.transpose(2, 0, 1)
    mosaic = tiles.reshape(6, 6, 64, 64).transpose(0, 2, 1, 3).reshape(384, 384)
    ds.add_new(0x7FE00010, "OW", mosaic.tobytes())  # PixelData
    path = tmp_path / "mosaic.dcm"
    ds.save_as(path)
    return path, slices


def test_mosaic_tiles_become_slices_along_the_csa_normal(mosaic: tuple[Path, np.ndarray]) -> None:
    path, slices = mosaic
    assert detect_format(path) == "dicom_mosaic"
    data, affine = read_volume(path)
    np.testing.assert_array_equal(data, slices.transpose(1, 0, 2))  # (column, row, slice)
    ds = pydicom.dcmread(path)
    normal = csareader.get_slice_normal(csareader.get_csa_header(ds))
    iop = np.array(ds.ImageOrientationPatient, float)
    lps = FLIP @ affine
    np.testing.assert_allclose(lps[:3, 0], iop[:3] * 1.5, atol=1e-6)
    np.testing.assert_allclose(lps[:3, 1], iop[3:] * 1.5, atol=1e-6)
    cos = lps[:3, 2] @ normal / np.linalg.norm(lps[:3, 2])
    assert cos == pytest.approx(1.0, abs=1e-6)


def test_mosaic_without_csa_header(mosaic: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = mosaic
    ds = pydicom.dcmread(path)
    for tag in [e.tag for e in ds if e.tag.group == 0x0029]:
        del ds[tag]
    stripped = tmp_path / "anonymised_mosaic.dcm"
    ds.save_as(stripped)
    assert detect_format(stripped) == "dicom_mosaic"
    assert_invalid(stripped, "mosaic without its CSA header")


def test_mosaic_whose_tiles_do_not_fit() -> None:
    """nibabel's 0.dcm: real CSA says 48 tiles of 36x36, but its pixels are 256x256."""
    assert_invalid(NICOM_DATA / "0.dcm", "cannot hold 7x7 tiles")


# --- MONAI ---------------------------------------------------------------------------------------


def monai_load(path: Path, spacing: tuple[float, float, float] | None = None) -> dict:
    chain = [
        LoadImaged("image", reader=MriReader(max_voxels=10**7, max_shear=1e-3), image_only=False),
        EnsureChannelFirstd("image"),
        Orientationd("image", axcodes="RAS", labels=None),  # labels from meta "space"
    ]
    if spacing:
        chain.append(Spacingd("image", pixdim=spacing))
    item = {"image": str(path)}
    for t in chain:
        item = t(item)
    return item


@pytest.mark.parametrize("flips", [(True, False), (True, True)], ids=["LAS", "LPS"])
def test_monai_chain_reorients_to_ras(tmp_path: Path, flips: tuple[bool, bool]) -> None:
    vol = make_head()
    affine = np.diag([-1.5 if flips[0] else 1.5, -1.5 if flips[1] else 1.5, 2.0, 1.0])
    affine[:3, 3] = (10.0, -20.0, 5.0)
    path = write_nifti(tmp_path / "in.nii.gz", vol, affine)
    item = monai_load(path)
    image = item["image"]
    expected = vol[::-1] if flips[0] else vol
    expected = expected[:, ::-1] if flips[1] else expected
    assert tuple(image.shape) == (1, *vol.shape)
    np.testing.assert_array_equal(image[0].numpy(), expected)
    ras = image.affine.numpy()
    np.testing.assert_allclose(np.diag(ras)[:3], (1.5, 1.5, 2.0))
    corner = affine @ np.array([*(np.array(vol.shape) - 1) * np.array([*flips, 0]), 1.0])
    np.testing.assert_allclose(ras[:3, 3], corner[:3])  # RAS voxel 0 is the old far corner
    meta = item["image_meta_dict"]
    assert meta["original_channel_dim"] == "no_channel" and meta["space"] == "RAS"
    np.testing.assert_array_equal(meta["spatial_shape"], vol.shape)
    np.testing.assert_allclose(meta["original_affine"], affine)
    assert meta["filename_or_obj"] == str(path)
    spaced = monai_load(path, spacing=(3.0, 3.0, 4.0))["image"]
    assert tuple(spaced.shape[1:]) == tuple(math.ceil(n / 2) for n in vol.shape)


def test_monai_chain_on_a_dicom_series(tmp_path: Path) -> None:
    vol = int_volume()
    write_series(tmp_path / "s", vol, oblique_affine())
    image = monai_load(tmp_path / "s")["image"]
    want_data, want_affine = canonical(vol, oblique_affine())
    np.testing.assert_array_equal(image[0].numpy(), want_data)
    np.testing.assert_allclose(image.affine.numpy(), want_affine, atol=1e-4)


def test_monai_meta_holds_geometry_only(tmp_path: Path) -> None:
    img = nib.Nifti1Image(make_head(), np.diag([1.0, 1.0, 1.0, 1.0]))
    img.header["descrip"] = b"Doe^Jane DOB 1970"
    img.header["aux_file"] = b"SECRET-ID-42"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"Doe^Jane comment"))
    nib.save(img, tmp_path / "tagged.nii")
    write_series(tmp_path / "series", int_volume(), oblique_affine())
    for path in (tmp_path / "tagged.nii", tmp_path / "series"):
        meta = monai_load(path)["image_meta_dict"]
        text = " ".join(f"{k}={v!r}" for k, v in meta.items())
        assert "Doe" not in text and "SECRET" not in text and "1970" not in text
        assert not {"descrip", "aux_file", "extensions", "PatientName"} & set(meta)


def test_monai_surfaces_our_error_instead_of_falling_back(tmp_path: Path) -> None:
    """LoadImage retries other readers when `read` fails; our errors come from `get_data`."""
    vol = make_head()
    vol[1, 2, 3] = np.nan
    path = write_nifti(tmp_path / "nan.nii.gz", vol)
    with pytest.raises(InvalidImageError, match="NaN") as info:
        monai_load(path)
    assert info.value.path == str(path)


def test_monai_stacks_several_paths_as_channels(tmp_path: Path) -> None:
    a = write_nifti(tmp_path / "a.nii.gz", make_head(seed=1))
    b = write_nifti(tmp_path / "b.nii.gz", make_head(seed=2))
    item = LoadImaged("image", reader=MriReader(), image_only=True)({"image": [str(a), str(b)]})
    assert tuple(item["image"].shape) == (2, *make_head().shape)
    np.testing.assert_array_equal(item["image"][1].numpy(), make_head(seed=2))
    c = write_nifti(tmp_path / "c.nii.gz", make_head((10, 10, 10)))
    with pytest.raises(InvalidImageError, match="grid"):
        LoadImaged("image", reader=MriReader())({"image": [str(a), str(c)]})


# --- bad inputs: one test each -------------------------------------------------------------------


def test_huge_declared_volume_is_refused_before_allocation(tmp_path: Path) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 2000))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    path = tmp_path / "huge.nii"
    path.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\1\2" * 16)
    assert path.stat().st_size < 1000
    tracemalloc.start()
    try:
        err = assert_invalid(path, r"header declares shape \(2000, 2000, 2000\)")
        inspect_err = pytest.raises(InvalidImageError, inspect_image, path).value
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20, f"{peak} bytes allocated"
    assert "8,000,000,000" in err.problem and "max_voxels" in inspect_err.problem


def test_2d_data(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "flat.nii.gz", make_head()[:, :, 0])
    assert_invalid(path, r"2D data, shape \(24, 28\)")


def test_5d_data(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "vec.nii.gz", np.stack([make_head()] * 3, -1)[:, :, :, None])
    assert_invalid(path, r"5D data, shape \(24, 28, 20, 1, 3\)")


def test_4d_with_several_volumes(tmp_path: Path) -> None:
    path = write_nifti(
        tmp_path / "bold.nii.gz", np.stack([make_head(seed=i) for i in range(3)], -1)
    )
    err = assert_invalid(path, "4D data with 3 volumes")
    assert "fslroi" in err.fix and "four_to_three" in err.fix


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_voxels(tmp_path: Path, value: float) -> None:
    vol = make_head()
    vol[3, 4, 5] = vol[6, 7, 8] = value
    path = write_nifti(tmp_path / "bad.nii.gz", vol)
    assert_invalid(path, "2 of 13,440 voxels are NaN or Inf")


def test_constant_volume(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "blank.nii.gz", np.full((8, 8, 8), 7, np.float32))
    assert_invalid(path, "constant volume: every voxel is 7")


def test_sheared_affine(tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[0, 1] = 0.2  # column 1 leans along x
    path = write_nifti(tmp_path / "sheared.nii.gz", make_head(), affine)
    assert_invalid(path, r"sheared \(non-orthogonal\) affine: \|cos\| between voxel axes 0 and 1")
    read_volume(path, max_shear=0.5)  # the limit is the config's data.max_shear


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz"])
def test_truncated_nifti(tmp_path: Path, name: str) -> None:
    full = write_nifti(tmp_path / f"full_{name}", make_head())
    blob = full.read_bytes()
    path = tmp_path / name
    path.write_bytes(blob[: len(blob) * 2 // 3])
    assert_invalid(path, "truncated" if name.endswith(".nii") else "Compressed file ended")


def test_truncated_dicom(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", int_volume(), np.eye(4))
    blob = files[2].read_bytes()
    files[2].write_bytes(blob[:-50])
    with pytest.raises(InvalidImageError, match="less than expected") as info:
        read_volume(tmp_path / "s")
    assert info.value.path == str(files[2])


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", int_volume(), np.eye(4))
    ds = pydicom.dcmread(files[1])
    del ds.PixelData
    ds.save_as(files[1])
    with pytest.raises(InvalidImageError, match="DICOM without pixel data") as info:
        read_volume(tmp_path / "s")
    assert info.value.path == str(files[1])


@pytest.mark.parametrize("name", ["notes.nii", "notes.nii.gz", "notes.dcm", "notes.mha", "x.nrrd"])
def test_non_image_file_with_image_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("subject,age\nsub-01,34\n" * 20)
    assert_invalid(path, "cannot be read as|not a DICOM image")


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    err = assert_invalid(path, "unknown image type")
    assert ".nii.gz" in err.fix


def test_missing_path(tmp_path: Path) -> None:
    assert_invalid(tmp_path / "nowhere.nii.gz", "path does not exist")


def test_dicom_series_with_a_missing_slice(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", int_volume(), oblique_affine())
    pos = [pydicom.dcmread(f).ImagePositionPatient for f in files]
    files[3].unlink()
    err = assert_invalid(tmp_path / "s", "missing slice")
    assert "1 slice(s) missing of 5 present" in err.problem and pos[3] is not None


def test_dicom_series_with_a_duplicated_slice(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", int_volume(), oblique_affine())
    shutil.copy(files[2], tmp_path / "s" / "copy_of_slice")
    err = assert_invalid(tmp_path / "s", "duplicated slice")
    assert "copy_of_slice" in err.problem and files[2].name in err.problem


def test_dicom_series_with_uneven_spacing(tmp_path: Path) -> None:
    pos = positions(oblique_affine(), 6)
    pos[4:] += (FLIP @ oblique_affine())[:3, 2] * 0.3  # the last two steps lengthen by 30%
    write_series(tmp_path / "s", int_volume(), oblique_affine(), pos=pos)
    assert_invalid(tmp_path / "s", "uneven slice spacing")


def test_dicom_series_with_gantry_tilt_is_sheared(tmp_path: Path) -> None:
    pos = positions(np.eye(4), 6)
    pos[:, 1] += np.arange(6) * 0.3  # each slice shifts 0.3 mm along y: a tilted stack
    write_series(tmp_path / "s", int_volume(), np.eye(4), pos=pos)
    err = assert_invalid(tmp_path / "s", r"sheared .* axes 1 and 2")
    assert "tilt" in err.fix


def test_dicom_series_with_interleaved_volumes(tmp_path: Path) -> None:
    pos = np.repeat(positions(np.eye(4), 6), 2, axis=0)
    write_series(tmp_path / "s", int_volume(), np.eye(4), pos=pos)
    assert_invalid(tmp_path / "s", r"4D data: 12 slices at 6 positions, 2 per position")


def test_dicom_folder_mixing_series_or_junk(tmp_path: Path) -> None:
    write_series(tmp_path / "s", int_volume(), np.eye(4))
    write_series(tmp_path / "s", int_volume(), np.eye(4), series_uid=generate_uid(), prefix="B")
    assert_invalid(tmp_path / "s", "folder mixes 2 series")
    write_series(tmp_path / "t", int_volume(), np.eye(4))
    (tmp_path / "t" / "readme.txt").write_text("acquired on a Tuesday\n" * 10)
    with pytest.raises(InvalidImageError, match="not a DICOM image"):
        read_volume(tmp_path / "t")
    (tmp_path / "empty").mkdir()
    assert_invalid(tmp_path / "empty", "folder holds no files")


def test_multiframe_without_per_frame_geometry(tmp_path: Path) -> None:
    path = write_multiframe(tmp_path / "mf.dcm", int_volume(), np.eye(4), range(6), [1.0] * 6)
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence
    ds.save_as(path)
    assert_invalid(path, "6 frames but 0 PerFrameFunctionalGroupsSequence items")


def test_itk_2d_and_vector_images(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(int_volume()[:, :, 0]), str(tmp_path / "flat.mha"))
    assert_invalid(tmp_path / "flat.mha", "2D data")
    vec = sitk.GetImageFromArray(np.stack([int_volume()] * 3, -1), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "rgb.nrrd"))
    assert_invalid(tmp_path / "rgb.nrrd", "over the limit|3 components", max_voxels=100)
    assert_invalid(tmp_path / "rgb.nrrd", "3 components per voxel")


def test_formats_are_documented() -> None:
    assert set(FORMATS) == {
        "nifti",
        "dicom_series",
        "dicom_multiframe",
        "dicom_mosaic",
        "dicom_slice",
        "itk",
    }


# --- fuzz ----------------------------------------------------------------------------------------

_SMALL = nib.Nifti1Image(make_head((6, 5, 4)).astype(np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
_SMALL_BYTES = _SMALL.header.binaryblock + b"\0" * 4 + np.asarray(_SMALL.dataobj).tobytes("F")


@pytest.mark.filterwarnings("ignore")  # malformed headers make the libraries warn
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.floats(0.0, 1.0),
    compressed=st.booleans(),
)
def test_fuzzed_nifti_ends_in_a_volume_or_invalid_image(
    tmp_path: Path, edits: list[tuple[int, int]], cut: float | None, compressed: bool
) -> None:
    blob = bytearray(_SMALL_BYTES)
    for offset, value in edits:
        blob[offset] = value
    data = gzip.compress(bytes(blob), mtime=0) if compressed else bytes(blob)
    if cut is not None:
        data = data[: int(len(data) * cut)]
    path = tmp_path / ("fuzz.nii.gz" if compressed else "fuzz.nii")
    path.write_bytes(data)
    try:
        volume, affine = read_volume(path, max_voxels=10**6)
    except InvalidImageError as err:
        assert err.path == str(path)
    else:
        assert volume.dtype == np.float32 and volume.ndim == 3 and np.isfinite(volume).all()
        assert affine.shape == (4, 4) and np.isfinite(affine).all()
    finally:
        os.remove(path)


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Valid small files of the other single-file formats, as bytes."""
    root = tmp_path_factory.mktemp("seeds")
    write_multiframe(root / "mf.dcm", int_volume(), oblique_affine(), range(6), [1.0] * 6)
    image = sitk.GetImageFromArray(int_volume().transpose(2, 1, 0))
    sitk.WriteImage(image, str(root / "vol.nrrd"))
    sitk.WriteImage(image, str(root / "vol.mha"))
    return {name: (root / name).read_bytes() for name in ("mf.dcm", "vol.nrrd", "vol.mha")}


@pytest.mark.filterwarnings("ignore")  # malformed headers make the libraries warn
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(["mf.dcm", "vol.nrrd", "vol.mha"]),
    edits=st.lists(st.tuples(st.integers(0, 1499), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.floats(0.0, 1.0),
)
def test_fuzzed_dicom_and_itk_end_in_a_volume_or_invalid_image(
    tmp_path: Path,
    seed_files: dict[str, bytes],
    name: str,
    edits: list[tuple[int, int]],
    cut: float | None,
) -> None:
    blob = bytearray(seed_files[name])
    for offset, value in edits:
        blob[offset % len(blob)] = value
    data = bytes(blob) if cut is None else bytes(blob[: int(len(blob) * cut)])
    path = tmp_path / f"fuzz_{name}"
    path.write_bytes(data)
    try:
        volume, _ = read_volume(path, max_voxels=10**6)
    except InvalidImageError as err:
        assert err.path.startswith(str(path))
    else:
        assert volume.dtype == np.float32 and volume.ndim == 3 and np.isfinite(volume).all()
    finally:
        os.remove(path)
