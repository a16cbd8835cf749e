"""Shared fixtures: tiny synthetic volumes written as real NIfTI files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def make_head(shape: tuple[int, int, int] = (24, 28, 20), seed: int = 0) -> np.ndarray:
    """A head-like float32 volume: bright 'brain' ellipsoid in a dimmer 'skull', noisy."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    vol = np.where(r < 0.55, 100.0, np.where(r < 0.75, 40.0, 0.0))
    vol = vol + 10 * np.sin(6 * grid[0]) * (r < 0.55)
    vol = vol + rng.normal(0, 2, shape)
    return np.clip(vol, 0, None).astype(np.float32)


def write_nifti(
    path: Path, data: np.ndarray, affine: np.ndarray | None = None, **header: object
) -> Path:
    """Write `data` with `affine` (default 1.5 mm LPS-ish diagonal) to `path`; returns the path."""
    if affine is None:
        affine = np.diag([-1.5, -1.5, 1.5, 1.0])
    img = nib.Nifti1Image(data, affine)
    for key, value in header.items():
        img.header[key] = value
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


@pytest.fixture
def head_nifti(tmp_path: Path) -> Path:
    """One tiny head volume on disk as .nii.gz."""
    return write_nifti(tmp_path / "head.nii.gz", make_head())


@pytest.fixture
def head_folder(tmp_path: Path) -> Path:
    """A flat folder of four tiny heads from two subjects."""
    root = tmp_path / "heads"
    root.mkdir()
    for i, name in enumerate(["subA_T1", "subA_T2", "subB_T1", "subC_T1"]):
        write_nifti(root / f"{name}.nii.gz", make_head(seed=i))
    return root
