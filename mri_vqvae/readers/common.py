"""Validation shared by every format: declared size, dimensionality, affine and voxel values.

Each check raises `InvalidImageError` naming the file, the received value and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mri_vqvae.errors import InvalidImageError

CORRUPT_FIX = "the file is truncated or corrupt: re-download or re-export it"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Header:
    """What a format's header declares, checked before reading voxels.

    shape: (X, Y, Z) spatial shape of the single 3D volume the file holds.
    affine: (4, 4) voxel index -> RAS world millimetres.
    source: format-specific handle `load` reuses (open image, sorted files ...).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    source: Any = None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[:limit] + "..."


@contextmanager
def guard(path: str | Path, what: str, fix: str = CORRUPT_FIX) -> Iterator[None]:
    """Turn any library exception raised inside the block into `InvalidImageError`."""
    try:
        yield
    except InvalidImageError:
        raise
    except Exception as exc:
        problem = f"cannot be read as {what} ({type(exc).__name__}: {_first_line(exc)})"
        raise InvalidImageError(path, problem, fix) from exc


def check_dims(
    path: str | Path, dims: Sequence[int], max_voxels: int, components: int = 1
) -> tuple[int, int, int]:
    """Validate header-declared dims; returns the 3D spatial shape (trailing 1s squeezed).

    Runs before any voxel is read, so a header that declares a huge volume costs nothing.
    """
    dims = tuple(int(d) for d in dims)
    if not dims or min(dims) < 1:
        raise InvalidImageError(
            path, f"header declares an empty or negative shape {dims}", CORRUPT_FIX
        )
    total = math.prod(dims) * int(components)
    if total > max_voxels:
        raise InvalidImageError(
            path,
            f"header declares shape {dims} = {total:,} voxels, over the limit "
            f"data.max_voxels={max_voxels:,}",
            "crop or downsample the image before use, or raise data.max_voxels if it is genuine",
        )
    shape = list(dims)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) >= 5:
        raise InvalidImageError(
            path,
            f"5D data, shape {dims}",
            "each file must hold one 3D volume: split the extra dimensions (vector or tensor "
            "components, echoes) into separate 3D files and list the one you want",
        )
    if len(shape) == 4:
        raise InvalidImageError(
            path,
            f"4D data with {shape[3]} volumes, shape {dims}",
            "pick one volume, e.g. `fslroi in.nii.gz out.nii.gz 0 1` or "
            "nibabel.funcs.four_to_three, and list that file instead",
        )
    if len(shape) < 3 or min(shape) < 2:
        raise InvalidImageError(
            path,
            f"2D data, shape {dims}",
            "this project needs 3D volumes: for DICOM give the folder holding the whole series",
        )
    return (shape[0], shape[1], shape[2])


def check_affine(path: str | Path, affine: np.ndarray, max_shear: float) -> None:
    """Reject non-finite, degenerate or sheared (non-orthogonal) (4, 4) affines."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise InvalidImageError(
            path, f"affine is not a finite 4x4 matrix: {a.tolist()}", "fix the header geometry"
        )
    norms = np.linalg.norm(a[:3, :3], axis=0)
    if norms.min() <= 1e-6:
        raise InvalidImageError(
            path,
            f"affine has a zero voxel size (column norms {norms.round(6).tolist()})",
            "fix the header geometry (pixdim / PixelSpacing / spacing)",
        )
    unit = a[:3, :3] / norms
    cos = np.abs(unit.T @ unit)
    np.fill_diagonal(cos, 0.0)
    i, j = np.unravel_index(np.argmax(cos), cos.shape)
    if cos[i, j] > max_shear:
        raise InvalidImageError(
            path,
            f"sheared (non-orthogonal) affine: |cos| between voxel axes {i} and {j} is "
            f"{cos[i, j]:.4g} (limit data.max_shear={max_shear:g})",
            "resample it onto an orthogonal grid (e.g. nibabel.processing.resample_from_to; for "
            "gantry-tilted DICOM use dcm2niix's tilt correction) or raise data.max_shear",
        )


def check_values(path: str | Path, data: np.ndarray) -> None:
    """Reject NaN/Inf voxels and constant volumes; `data` is (X, Y, Z)."""
    lo, hi = float(np.min(data)), float(np.max(data))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InvalidImageError(
            path,
            f"{bad:,} of {data.size:,} voxels are NaN or Inf",
            "fix the export, or replace them (np.nan_to_num) and save a new file",
        )
    if lo == hi:
        raise InvalidImageError(
            path,
            f"constant volume: every voxel is {lo:g}",
            "the file holds no image (blank or failed export): remove it from the manifest",
        )


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis: the norms of the affine's first 3 columns."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """(4, 4) voxel -> LPS (DICOM/ITK world) affine to voxel -> RAS (NIfTI world)."""
    return LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)


def as_volume(path: str | Path, raw: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Numeric array with the header's dims -> (X, Y, Z) float32; rejects other voxel types."""
    if not np.issubdtype(raw.dtype, np.number) or np.issubdtype(raw.dtype, np.complexfloating):
        raise InvalidImageError(
            path, f"unsupported voxel type {raw.dtype}", "convert it to a real-valued scalar image"
        )
    if math.prod(raw.shape) != math.prod(shape):
        raise InvalidImageError(
            path, f"holds {raw.shape} voxels where the header declares {shape}", CORRUPT_FIX
        )
    with guard(path, "numeric voxels"):
        return np.asarray(raw, dtype=np.float32).reshape(shape)
