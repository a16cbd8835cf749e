"""Writing volumes: a fresh NIfTI header every time, so no input header text ever leaks out."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from mri_vqvae.core.atomic import atomic_path
from mri_vqvae.core.finite import NonFiniteError, describe_nonfinite


def nifti_image(data: np.ndarray, affine: np.ndarray, action: str = "build the image"
                ) -> nib.Nifti1Image:
    """`data` (X, Y, Z) as float32 NIfTI with sform = qform = `affine` (RAS mm), in memory.

    The header is built from the array and affine alone: `descrip`, `aux_file`, extensions and
    any other text of an input file are never carried over. Raises `NonFiniteError` ("refusing
    to <action>") when a voxel is NaN or ±Inf, also after the float32 cast (|value| > 3.4e38).
    """
    affine = np.asarray(affine, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        volume = np.asarray(data, dtype=np.float32)
    problem = describe_nonfinite(volume)
    if problem is not None:
        raise NonFiniteError(
            f"refusing to {action}: the volume holds {problem} (float32), so no reader could "
            "trust it. The model or input that produced it diverged or overflowed: check the "
            "input scan and the checkpoint (use checkpoints/best), or run on float32 without bf16"
        )
    bad_affine = describe_nonfinite(affine)
    if bad_affine is not None:
        raise NonFiniteError(
            f"refusing to {action}: its affine holds {bad_affine}; pass a finite "
            "voxel-to-world matrix"
        )
    img = nib.Nifti1Image(volume, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Save `data` (X, Y, Z) as `nifti_image` builds it, atomically (nothing written when a
    voxel or the affine is not finite: `NonFiniteError`)."""
    img = nifti_image(data, affine, f"write {path}")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm: the norms of the affine's first three columns."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))
