"""Tiny synthetic volumes and NIfTI files for tests in every folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np


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


def oblique_affine(spacing: Sequence[float] = (1.2, 0.9, 2.0)) -> np.ndarray:
    """An orthogonal but oblique (4, 4) RAS affine: rotations about z then x, mm spacing."""
    a, b = np.deg2rad(20.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rx @ rz @ np.diag(spacing)
    aff[:3, 3] = (-30.0, 12.5, 40.0)
    return aff


def int_volume(shape: tuple[int, int, int] = (12, 10, 6), seed: int = 0) -> np.ndarray:
    """A small int16 volume with distinct values (so any axis mix-up shows)."""
    return np.random.default_rng(seed).integers(-500, 3000, shape).astype(np.int16)
