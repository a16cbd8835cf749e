"""NIfTI-1/2 (.nii, .nii.gz) through nibabel.

nibabel is lazy: `nib.load` reads the header only. `probe` validates that header (declared size,
dims, voxel type, file length of an uncompressed .nii); `load` then forces the full voxel read so a
truncated file fails here, at load time, not later inside a transform.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np

from mri_vqvae.errors import InvalidImageError
from mri_vqvae.readers.common import CORRUPT_FIX, Header, as_volume, check_dims, guard

_NIFTI = (nib.Nifti1Image, nib.Nifti2Image)


def _open(path: Path) -> nib.Nifti1Image:
    with guard(path, "NIfTI"):
        img = nib.load(str(path), mmap=False)
    if not isinstance(img, _NIFTI):
        raise InvalidImageError(
            path, f"holds a {type(img).__name__}, not NIfTI", "convert it to NIfTI (.nii.gz)"
        )
    return img


def _check_length(path: Path, img: nib.Nifti1Image, dims: tuple[int, ...]) -> None:
    """An uncompressed .nii must hold offset + voxels * itemsize bytes (checked from the header)."""
    if not path.name.lower().endswith(".nii"):
        return
    with guard(path, "NIfTI header"):
        needed = int(img.dataobj.offset) + math.prod(dims) * img.get_data_dtype().itemsize
    size = path.stat().st_size
    if size < needed:
        raise InvalidImageError(
            path,
            f"truncated: the header declares {needed:,} bytes, the file has {size:,}",
            CORRUPT_FIX,
        )


def probe(path: Path, max_voxels: int) -> Header:
    """Header only: declared (X, Y, Z), RAS affine (nibabel's sform/qform choice), voxel type."""
    img = _open(path)
    with guard(path, "NIfTI header"):
        dims = tuple(int(d) for d in img.header.get_data_shape())
        dtype = img.get_data_dtype()
        affine = np.array(img.affine, dtype=np.float64)
    shape = check_dims(path, dims, max_voxels)
    if dtype.fields is not None or not np.issubdtype(dtype, np.number) or dtype.kind == "c":
        raise InvalidImageError(
            path, f"unsupported voxel type {dtype}", "convert it to a real-valued scalar image"
        )
    _check_length(path, img, dims)
    return Header(shape, affine, source=img)


def load(path: Path, header: Header) -> np.ndarray:
    """All voxels as (X, Y, Z) float32, scl_slope/scl_inter applied."""
    with guard(path, "NIfTI voxel data"):
        raw = np.asanyarray(header.source.dataobj)
    return as_volume(path, raw, header.shape)
