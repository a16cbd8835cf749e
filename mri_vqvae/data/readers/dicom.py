"""DICOM through pydicom: classic series (a folder), enhanced multi-frame and Siemens mosaic files.

Every path builds its own geometry (see `dicom_geometry`) or, for mosaics, takes it from the
Siemens CSA header through nibabel.nicom; none relies on an automatic reader's axis guesses.
Volumes come out as (X, Y, Z) = (column, row, slice) with a voxel -> RAS affine.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from mri_vqvae.core.errors import InvalidImageError
from mri_vqvae.data import sources
from mri_vqvae.data.readers.common import (
    CORRUPT_FIX,
    Header,
    as_volume,
    check_dims,
    guard,
    lps_to_ras,
)
from mri_vqvae.data.readers.dicom_geometry import (
    Plane,
    make_plane,
    pixel_frames,
    require,
    rescale,
    stack,
)

with warnings.catch_warnings():  # nibabel.nicom warns on import that its readers are experimental
    warnings.simplefilter("ignore")
    from nibabel.nicom import csareader, dicomwrappers

_GEOMETRY = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
}


def _read(path: Path, pixels: bool) -> Any:
    kind = sources.irregular_kind(path)
    if kind is not None:  # never open a FIFO or a device: it could block forever
        raise InvalidImageError(path, f"not a regular file ({kind})",
                                "replace it with the DICOM file it stands for")
    with guard(path, "DICOM"):
        ds = pydicom.dcmread(str(path), stop_before_pixels=not pixels, force=True)
        for _ in ds.iterall():  # pydicom decodes elements lazily: decode now, inside the guard
            pass
        _note_transfer_syntax(ds)
    if "Rows" not in ds and "SOPClassUID" not in ds:
        raise InvalidImageError(
            path,
            "not a DICOM image (no image header found)",
            "despite its name it is not DICOM: remove it (a series folder holds DICOM files only)",
        )
    return ds


def _note_transfer_syntax(ds: Any) -> None:
    """A raw dataset (no preamble, no file meta) gets the transfer syntax it was parsed with, so
    its pixel data can be decoded like that of any other file."""
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = ds.original_encoding
    explicit = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else explicit


def _image_type(ds: Any) -> list[str]:
    value = ds.get("ImageType") or []
    return [str(value).upper()] if isinstance(value, str) else [str(v).upper() for v in value]


def classify(path: Path) -> str:
    """One DICOM file: "dicom_multiframe", "dicom_mosaic" or "dicom_slice" (one 2D slice).

    Works on extension-less files too (`mri_vqvae.data.sources.is_dicom` tells whether a file
    is DICOM).
    """
    return classify_header(path, _read(path, pixels=False))


def classify_header(path: Path, ds: Any) -> str:
    """Like `classify`, from an already read dataset."""
    with guard(path, "DICOM (NumberOfFrames)"):
        frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        return "dicom_multiframe"
    return "dicom_mosaic" if "MOSAIC" in _image_type(ds) else "dicom_slice"


# --- classic series: one 2D slice per file -----------------------------------------------------


def _series_files(folder: Path, series_uid: str | None = None) -> list[Path]:
    """The files `sources.source_files` assigns to the series (those a manifest hashes), less
    DICOMDIR; only `series_uid`'s when given."""
    with guard(folder, "a DICOM series folder"):
        files = [p for p in sources.source_files(folder, series_uid)
                 if p.name.upper() != "DICOMDIR"]
    if not files and series_uid is not None:
        raise InvalidImageError(
            folder,
            f"folder holds no file of series {series_uid} (SeriesInstanceUID)",
            "the series was moved or re-exported: rebuild the manifest (`mri-vqvae manifest "
            "build`)",
        )
    if not files:
        raise InvalidImageError(
            folder, "folder holds no files", "give the folder that holds the slices of one series"
        )
    return files


def _check_one_series(folder: Path, files: list[Path], headers: list[Any]) -> None:
    for f, ds in zip(files, headers, strict=True):
        kind = classify_header(f, ds)
        if kind != "dicom_slice":
            raise InvalidImageError(
                folder,
                f"folder holds {f.name}, a {kind} file (a whole volume on its own)",
                f"pass {f} itself, and keep it out of series folders",
            )
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in headers})
    if len(uids) > 1:
        raise InvalidImageError(
            folder,
            f"folder mixes {len(uids)} series (SeriesInstanceUID {uids[:3]}...)",
            "put each series in its own folder (sort by SeriesInstanceUID)",
        )


def _slice_plane(path: Path, ds: Any) -> Plane:
    geo = {key: require(path, ds, key) for key in _GEOMETRY}
    return make_plane(path, path.name, require(path, ds, "Rows"), require(path, ds, "Columns"), geo)


def _probe_slices(owner: Path, files: list[Path], headers: list[Any], max_voxels: int) -> Header:
    planes = [_slice_plane(f, ds) for f, ds in zip(files, headers, strict=True)]
    shape = check_dims(owner, (planes[0].cols, planes[0].rows, len(planes)), max_voxels)
    order, affine = stack(owner, planes)
    return Header(shape, affine, source=[files[i] for i in order])


def probe_series(folder: Path, max_voxels: int, series_uid: str | None = None) -> Header:
    """Headers of every file in `folder` (only those of `series_uid` when given): one series,
    evenly spaced, no gap, no duplicate. Image files (.nii.gz ...) in the folder are ignored.
    """
    files = _series_files(folder, series_uid)
    headers = [_read(f, pixels=False) for f in files]
    _check_one_series(folder, files, headers)
    return _probe_slices(folder, files, headers, max_voxels)


def probe_slice(path: Path, max_voxels: int) -> Header:
    """A single classic slice file: always fails as 2D data once its header is valid."""
    return _probe_slices(path, [path], [_read(path, pixels=False)], max_voxels)


def load_series(folder: Path, header: Header, series_uid: str | None = None) -> np.ndarray:
    """(X, Y, Z) float32, slices in the order `probe_series` sorted them, rescale applied.

    `header.source` already holds the series' files: `series_uid` is accepted so callers can
    pass the same arguments to probe and load.
    """
    data = np.empty(header.shape, dtype=np.float32)
    for k, f in enumerate(header.source):
        ds = _read(f, pixels=True)
        frames = pixel_frames(f, ds)
        if frames.shape != (1, header.shape[1], header.shape[0]):
            raise InvalidImageError(
                f, f"pixel data of shape {frames.shape} in a series of {header.shape}", CORRUPT_FIX
            )
        slope, intercept = rescale(f, ds)
        data[:, :, k] = frames[0].T * slope + intercept
    return data


# --- enhanced multi-frame: one file, one frame per slice ---------------------------------------


def _group_value(path: Path, items: tuple[Any, Any], keyword: str, where: str) -> Any:
    seq = _GEOMETRY[keyword]
    for item in items:
        if item is not None and item.get(seq) and keyword in item[seq].value[0]:
            return item[seq].value[0][keyword].value
    raise InvalidImageError(
        path,
        f"{keyword} is missing from {seq} of {where} (per-frame and shared groups)",
        "convert it with dcm2niix, which knows vendor-specific multi-frame layouts",
    )


def _frame_groups(path: Path, ds: Any) -> tuple[list[Any], Any]:
    with guard(path, "multi-frame DICOM"):
        n = int(ds.get("NumberOfFrames") or 1)
        per = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
        shared_seq = ds.get("SharedFunctionalGroupsSequence") or [None]
    if len(per) != n:
        raise InvalidImageError(
            path,
            f"multi-frame DICOM with {n} frames but {len(per)} PerFrameFunctionalGroupsSequence "
            "items: no per-frame geometry",
            "convert it with dcm2niix, which knows vendor-specific multi-frame layouts",
        )
    return per, shared_seq[0]


def _frame_planes(path: Path, ds: Any) -> list[Plane]:
    per, shared = _frame_groups(path, ds)
    rows, cols = require(path, ds, "Rows"), require(path, ds, "Columns")
    planes = []
    for i, frame in enumerate(per):
        where = f"frame {i + 1}"
        geo = {key: _group_value(path, (frame, shared), key, where) for key in _GEOMETRY}
        planes.append(make_plane(path, where, rows, cols, geo))
    return planes


def probe_multiframe(path: Path, max_voxels: int) -> Header:
    """Header of an enhanced multi-frame file: frames sorted along the slice normal."""
    ds = _read(path, pixels=False)
    planes = _frame_planes(path, ds)
    shape = check_dims(path, (planes[0].cols, planes[0].rows, len(planes)), max_voxels)
    order, affine = stack(path, planes)
    return Header(shape, affine, source=order)


def _frame_rescale(path: Path, ds: Any, frame: Any, shared: Any) -> tuple[float, float]:
    for item in (frame, shared):
        if item is not None and item.get("PixelValueTransformationSequence"):
            return rescale(path, item.PixelValueTransformationSequence[0])
    return rescale(path, ds)


def load_multiframe(path: Path, header: Header) -> np.ndarray:
    """(X, Y, Z) float32: frame `header.source[k]` becomes slice k, per-frame rescale applied."""
    ds = _read(path, pixels=True)
    per, shared = _frame_groups(path, ds)
    frames = pixel_frames(path, ds)
    if frames.shape != (len(per), header.shape[1], header.shape[0]):
        raise InvalidImageError(
            path, f"pixel data of shape {frames.shape} for a volume of {header.shape}", CORRUPT_FIX
        )
    data = np.empty(header.shape, dtype=np.float32)
    for k, i in enumerate(header.source):
        slope, intercept = _frame_rescale(path, ds, per[i], shared)
        data[:, :, k] = frames[i].T * slope + intercept
    return data


# --- Siemens mosaic: one file, slices tiled in one 2D image -----------------------------------


def _mosaic(path: Path, ds: Any) -> Any:
    with guard(path, "Siemens CSA header"):
        csa = csareader.get_csa_header(ds)
        ok = csareader.is_mosaic(csa)
    if not ok:
        raise InvalidImageError(
            path,
            "Siemens mosaic without its CSA header (private tags 0029,1010/1020 missing or "
            "unreadable), so its slice count and geometry are unknown",
            "use the original scanner export (anonymise with a tool that keeps the CSA header) "
            "or convert the original with dcm2niix",
        )
    with guard(path, "Siemens mosaic"):
        return dicomwrappers.MosaicWrapper(ds, csa)


def probe_mosaic(path: Path, max_voxels: int) -> Header:
    """Geometry from the CSA header (nibabel): (X, Y, Z) = (column, row, tile)."""
    ds = _read(path, pixels=False)
    wrapper = _mosaic(path, ds)
    with guard(path, "Siemens mosaic geometry"):
        rows, cols, n = wrapper.image_shape
        lps = np.array(wrapper.affine, dtype=np.float64)  # axes (row, column, slice)
    shape = check_dims(path, (cols, rows, n), max_voxels)
    tiles = wrapper.mosaic_size
    if ds.Rows != rows * tiles or ds.Columns != cols * tiles:
        raise InvalidImageError(
            path,
            f"a {ds.Rows}x{ds.Columns} mosaic cannot hold {tiles}x{tiles} tiles of "
            f"{rows}x{cols} (NumberOfImagesInMosaic={n})",
            "the pixel data or the CSA header was altered: use the original scanner export",
        )
    return Header(shape, lps_to_ras(lps[:, [1, 0, 2, 3]]))


def load_mosaic(path: Path, header: Header) -> np.ndarray:
    """Tiles unpacked by nibabel's MosaicWrapper, rescaled, transposed to (X, Y, Z)."""
    ds = _read(path, pixels=True)
    pixel_frames(path, ds)  # clear errors for missing / truncated / compressed pixel data
    wrapper = _mosaic(path, ds)
    with guard(path, "Siemens mosaic pixel data"):
        vol = np.asarray(wrapper.get_data())
    return as_volume(path, vol.transpose(1, 0, 2), header.shape)
