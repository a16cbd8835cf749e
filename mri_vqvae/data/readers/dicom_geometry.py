"""Slice geometry for DICOM: order 2D planes along their normal and build the voxel affine.

Shared by classic series (one file per slice) and enhanced multi-frame files (one frame per
slice). Array convention of the volume built from planes: (X, Y, Z) = (column, row, slice), as ITK
and MONAI's PydicomReader use, so X steps along the first ImageOrientationPatient triplet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mri_vqvae.core.errors import InvalidImageError
from mri_vqvae.data.readers.common import CORRUPT_FIX, guard, lps_to_ras

SPACING_RTOL = 0.01  # slice steps may differ from their median by 1% before counting as uneven
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_FIX = (
    "the file is truncated or corrupt, or uses a compression pydicom cannot decode here: "
    "re-export it, or decompress it (e.g. `gdcmconv --raw` or `dcmdjpeg`)"
)


@dataclass(frozen=True)
class Plane:
    """One 2D slice or frame in LPS millimetres.

    orientation: (6,) ImageOrientationPatient: direction of increasing column, then of row.
    pixel_spacing: (between rows, between columns), DICOM's PixelSpacing order.
    """

    name: str
    rows: int
    cols: int
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]


def require(path: Path, ds: Any, keyword: str, where: str = "") -> Any:
    """The value of `keyword` in dataset/item `ds`, or a clear error when it is missing."""
    if keyword not in ds or ds[keyword].value in (None, "", b""):
        raise InvalidImageError(
            path,
            f"DICOM tag {keyword} is missing{where}",
            "this is not a usable image slice (or its header was stripped): re-export it",
        )
    return ds[keyword].value


def floats(path: Path, value: Any, count: int, keyword: str) -> np.ndarray:
    """A multi-valued DICOM number as a (count,) float array, finite, or a clear error."""
    with guard(path, f"DICOM ({keyword})"):
        arr = np.array([float(v) for v in value], dtype=np.float64)
    if arr.shape != (count,) or not np.isfinite(arr).all():
        raise InvalidImageError(
            path,
            f"DICOM tag {keyword} must hold {count} finite numbers, got {list(value)}",
            CORRUPT_FIX,
        )
    return arr


def make_plane(path: Path, name: str, rows: Any, cols: Any, geo: dict[str, Any]) -> Plane:
    """Plane from raw tag values; `geo` maps the three `dicom._GEOMETRY` keywords to values."""
    orient = floats(path, geo["ImageOrientationPatient"], 6, "ImageOrientationPatient")
    norms = np.linalg.norm(orient.reshape(2, 3), axis=1)
    if np.abs(norms - 1).max() > 1e-2 or abs(orient[:3] @ orient[3:]) > 1e-2:
        raise InvalidImageError(
            path,
            f"ImageOrientationPatient {orient.tolist()} is not two orthogonal unit vectors",
            "fix the header geometry or re-export the series",
        )
    spacing = floats(path, geo["PixelSpacing"], 2, "PixelSpacing")
    if spacing.min() <= 0:
        raise InvalidImageError(
            path, f"PixelSpacing {spacing.tolist()} is not positive", CORRUPT_FIX
        )
    position = floats(path, geo["ImagePositionPatient"], 3, "ImagePositionPatient")
    return Plane(name, int(rows), int(cols), position, orient, (spacing[0], spacing[1]))


def _check_same_grid(path: Path, planes: Sequence[Plane]) -> None:
    first = planes[0]
    for p in planes[1:]:
        same = (
            (p.rows, p.cols) == (first.rows, first.cols)
            and np.allclose(p.orientation, first.orientation, atol=1e-4)
            and np.allclose(p.pixel_spacing, first.pixel_spacing, rtol=1e-4)
        )
        if not same:
            raise InvalidImageError(
                path,
                f"slices differ in size, orientation or pixel spacing ({first.name}: "
                f"{first.rows}x{first.cols} {first.orientation.round(4).tolist()} "
                f"{first.pixel_spacing}; {p.name}: {p.rows}x{p.cols} "
                f"{p.orientation.round(4).tolist()} {p.pixel_spacing})",
                "the folder mixes several series or localizers: keep one series per folder",
            )


def _raise_duplicates(path: Path, planes: Sequence[Plane], gaps: np.ndarray, tol: float) -> None:
    """Several planes at one position: either whole interleaved volumes or stray duplicates."""
    counts = np.diff(np.flatnonzero(np.r_[True, gaps >= tol, True]))
    if counts.min() == counts.max():
        raise InvalidImageError(
            path,
            f"4D data: {len(planes)} slices at {len(counts)} positions, {counts[0]} per position "
            "(several volumes in one series: echoes, time points or diffusion directions)",
            "pick one volume: split the series (e.g. dcm2niix writes one file per volume), then "
            "use `fslroi` or nibabel.funcs.four_to_three, and list that one file",
        )
    k = int(np.flatnonzero(gaps < tol)[0])
    raise InvalidImageError(
        path,
        f"duplicated slice: {planes[k].name} and {planes[k + 1].name} lie at the same position "
        f"{planes[k].position.round(3).tolist()}",
        "remove the duplicate file (often a re-sent slice or a copy) and read the folder again",
    )


def _check_steps(path: Path, planes: Sequence[Plane], proj: np.ndarray) -> None:
    """`planes` and `proj` (their positions along the normal) are sorted ascending."""
    gaps = np.diff(proj)
    tol = 0.01 * min(planes[0].pixel_spacing)
    if (gaps < tol).any():
        _raise_duplicates(path, planes, gaps, tol)
    step = float(np.median(gaps))
    ratio = gaps / step
    bad = np.flatnonzero(np.abs(ratio - 1) > SPACING_RTOL)
    if bad.size == 0:
        return
    k = int(bad[0])
    near = np.round(ratio[bad])
    if (near >= 2).all() and (np.abs(ratio[bad] - near) < 0.1).all():
        raise InvalidImageError(
            path,
            f"missing slice: a gap of {gaps[k]:.4g} mm between {planes[k].name} and "
            f"{planes[k + 1].name} where the series steps {step:.4g} mm "
            f"({int(near.sum() - near.size)} slice(s) missing of {len(planes)} present)",
            "re-export or re-download the complete series",
        )
    raise InvalidImageError(
        path,
        f"uneven slice spacing: steps between slices range from {gaps.min():.4g} to "
        f"{gaps.max():.4g} mm (median {step:.4g})",
        "resample the series onto a regular grid (e.g. convert with dcm2niix and resample) "
        "or leave it out of the manifest",
    )


def stack(path: Path, planes: Sequence[Plane]) -> tuple[list[int], np.ndarray]:
    """Order >= 2 planes along their normal; returns (order, (4, 4) voxel -> RAS affine).

    The slice axis of the affine is the mean step between first and last position, so a tilted
    stack (gantry tilt) shows up as a sheared affine rather than being silently squared off.
    """
    _check_same_grid(path, planes)
    first = planes[0]
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    proj = np.array([p.position @ normal for p in planes])
    order = [int(i) for i in np.argsort(proj, kind="stable")]
    ordered = [planes[i] for i in order]
    _check_steps(path, ordered, proj[order])
    lps = np.eye(4)
    lps[:3, 0] = ordered[0].orientation[:3] * ordered[0].pixel_spacing[1]
    lps[:3, 1] = ordered[0].orientation[3:] * ordered[0].pixel_spacing[0]
    lps[:3, 2] = (ordered[-1].position - ordered[0].position) / (len(ordered) - 1)
    lps[:3, 3] = ordered[0].position
    return order, lps_to_ras(lps)


def pixel_frames(path: Path, ds: Any) -> np.ndarray:
    """Stored pixel values as (frames, rows, cols), before rescale; clear errors when unusable."""
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise InvalidImageError(
            path,
            "DICOM without pixel data",
            "this object holds no image (a report, or pixels stripped): remove it or re-export",
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise InvalidImageError(
            path, f"colour DICOM ({samples} samples per pixel)", "MRI must be greyscale"
        )
    with guard(path, "DICOM pixel data", _PIXEL_FIX):
        arr = np.asarray(ds.pixel_array)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (rows, cols):
        raise InvalidImageError(
            path,
            f"pixel data of shape {arr.shape} does not match Rows x Columns {rows}x{cols}",
            CORRUPT_FIX,
        )
    return arr


def rescale(path: Path, item: Any) -> tuple[float, float]:
    """(slope, intercept) of a dataset or functional-group item; (1, 0) when absent."""
    slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
    with guard(path, "DICOM (RescaleSlope/RescaleIntercept)"):
        slope = 1.0 if slope in (None, "") else float(slope)
        intercept = 0.0 if intercept in (None, "") else float(intercept)
    return slope, intercept
