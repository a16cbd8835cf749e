"""Validation shared by every format: declared size, dimensionality, voxel size, affine, the size
after resampling, and voxel values.

Each check raises `InvalidImageError` naming the file, the received value and the fix. Every check
but `check_values` runs on the header alone, before any voxel buffer is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mri_vqvae.core.errors import InvalidImageError

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


def check_voxel_size(path: str | Path, sizes: Sequence[float], field: str) -> None:
    """Reject a header voxel size that is zero, negative, NaN or infinite on a spatial axis.

    `field` names the header field (``pixdim[1:4]``, ``spacing`` ...). Libraries quietly "fix"
    such values (nibabel turns pixdim 0 into 1 mm and -2 into 2 mm), so read them raw.
    """
    values = [float(v) for v in sizes]
    if all(math.isfinite(v) and v > 0 for v in values):
        return
    raise InvalidImageError(
        path,
        f"header voxel size {field} = {values} is not positive and finite on every axis",
        "fix the header geometry (the voxel size in mm: pixdim / spacing / PixelSpacing), e.g. "
        "with nibabel or SimpleITK, and save a new file",
    )


def check_min_size(path: str | Path, shape: Sequence[int], min_size: int) -> None:
    """Reject a volume with fewer than `min_size` voxels along any axis (data.min_size)."""
    if min(shape) >= min_size:
        return
    axis = int(np.argmin(shape))
    raise InvalidImageError(
        path,
        f"volume of shape {tuple(int(n) for n in shape)} has {int(shape[axis])} voxels along axis "
        f"{axis}, fewer than data.min_size={min_size}",
        "this looks like a thumbnail, localiser or failed export: remove it from the manifest, "
        "or lower data.min_size if volumes this small are intended",
    )


def resampled_shape(
    shape: Sequence[int], affine: np.ndarray, target: Sequence[float]
) -> tuple[int, ...]:
    """Approximate (R, A, S) shape after reorienting to RAS and resampling to `target` mm.

    Each array axis maps to the world axis its affine column points along most; its extent
    (voxels x voxel size) over the target spacing of that axis, rounded up, is the new length.
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    sizes = np.linalg.norm(a, axis=0)
    out = [1, 1, 1]
    used: set[int] = set()
    for j in np.argsort(-np.abs(a).max(axis=0)):  # most axis-aligned columns pick first
        order = [int(r) for r in np.argsort(-np.abs(a[:, j])) if int(r) not in used]
        r = order[0]
        used.add(r)
        out[r] = max(1, math.ceil(float(shape[j]) * float(sizes[j]) / float(target[r]) - 1e-6))
    return tuple(out)


def check_resampled_size(
    path: str | Path,
    shape: Sequence[int],
    affine: np.ndarray,
    target: Sequence[float],
    max_voxels: int,
) -> None:
    """Reject a volume whose grid after resampling to `target` mm would exceed `max_voxels`.

    From the header alone: a tiny file whose header declares huge voxels (8^3 at 150 mm) would
    otherwise make the resampling step allocate gigabytes.
    """
    new = resampled_shape(shape, affine, target)
    total = math.prod(new)
    if total <= max_voxels:
        return
    spacing = tuple(round(s, 4) for s in spacing_of(affine))
    raise InvalidImageError(
        path,
        f"header declares shape {tuple(int(n) for n in shape)} at voxel size {spacing} mm; "
        f"resampled to data.spacing={tuple(float(t) for t in target)} mm that is {new} = "
        f"{total:,} voxels, over the limit data.max_voxels={max_voxels:,}",
        "check the header's voxel size (pixdim / spacing: mm, not cm or m), or raise "
        "data.max_voxels if the volume is genuinely that large",
    )


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


def check_float32_range(path: str | Path, raw: np.ndarray, out: np.ndarray) -> None:
    """Reject finite `raw` values that became ±Inf in the float32 `out` (beyond ±3.4e38).

    Without this the cast's overflow would be misreported as NaN/Inf voxels.
    """
    if raw.dtype.kind != "f" or raw.dtype.itemsize <= 4 or np.isfinite(out).all():
        return
    raw = np.asarray(raw).reshape(out.shape)
    over = np.isinf(out) & np.isfinite(raw)
    count = int(np.count_nonzero(over))
    if not count:
        return
    peak = float(np.max(np.abs(raw[over])))
    limit = float(np.finfo(np.float32).max)
    raise InvalidImageError(
        path,
        f"voxel values up to {peak:.3g} exceed float32 range (±{limit:.3g}; {count:,} voxels)",
        "rescale the image (e.g. divide by a power of ten, or fix scl_slope / RescaleSlope) and "
        "save it as float32",
    )


def as_volume(path: str | Path, raw: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Numeric array with the header's dims -> (X, Y, Z) float32; rejects other voxel types and
    values beyond the float32 range."""
    if not np.issubdtype(raw.dtype, np.number) or np.issubdtype(raw.dtype, np.complexfloating):
        raise InvalidImageError(
            path, f"unsupported voxel type {raw.dtype}", "convert it to a real-valued scalar image"
        )
    if math.prod(raw.shape) != math.prod(shape):
        raise InvalidImageError(
            path, f"holds {raw.shape} voxels where the header declares {shape}", CORRUPT_FIX
        )
    with guard(path, "numeric voxels"), np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(raw, dtype=np.float32).reshape(shape)
    check_float32_range(path, raw, out)
    return out
