"""Writing volumes: a fresh NIfTI header every time, so no input header text ever leaks out."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from mri_vqvae.atomic import atomic_path


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Save `data` (X, Y, Z) float32 with sform = qform = `affine` (RAS mm), atomically.

    The header is built from the array and affine alone: `descrip`, `aux_file`, extensions and
    any other text of an input file are never carried over.
    """
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm: the norms of the affine's first three columns."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))
