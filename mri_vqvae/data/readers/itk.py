"""NRRD (.nrrd/.nhdr) and MetaImage (.mha/.mhd) through SimpleITK, from paths only.

SimpleITK has no public in-memory reader: `mri_vqvae.data.io` verifies the files (confinement and
sha256, see `mri_vqvae.data.sources`) and then this module reads them again from their paths. A
``.nhdr`` / ``.mhd`` header names a separate data file; `mri_vqvae.data.sources.source_files` lists
it
so confinement and the digest cover it too.

ITK's world is LPS; the affine is converted to RAS. ITK arrays come out (Z, Y, X) from
`GetArrayFromImage`; they are transposed back to the (X, Y, Z) index order of the affine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mri_vqvae.core.errors import InvalidImageError
from mri_vqvae.data.readers.common import (
    Header,
    as_volume,
    check_dims,
    check_voxel_size,
    guard,
    lps_to_ras,
)


def _affine(reader: sitk.ImageFileReader) -> np.ndarray:
    """(4, 4) voxel -> LPS from the spatial part of spacing, origin and direction."""
    dim = reader.GetDimension()
    direction = np.array(reader.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(np.array(reader.GetSpacing(), dtype=np.float64)[:3])
    lps[:3, 3] = np.array(reader.GetOrigin(), dtype=np.float64)[:3]
    return lps


def probe(path: Path, max_voxels: int) -> Header:
    """ReadImageInformation only: size, components, spacing, origin, direction."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with guard(path, "NRRD/MetaImage header"):
        reader.ReadImageInformation()
        size = tuple(int(s) for s in reader.GetSize())
        components = int(reader.GetNumberOfComponents())
    shape = check_dims(path, size, max_voxels, components)
    if components != 1:
        raise InvalidImageError(
            path,
            f"{components} components per voxel (vector or colour image)",
            "save one scalar component per file (e.g. sitk.VectorIndexSelectionCast)",
        )
    with guard(path, "NRRD/MetaImage geometry"):
        spacing = tuple(float(v) for v in reader.GetSpacing())[:3]
    check_voxel_size(path, spacing, "spacing")
    with guard(path, "NRRD/MetaImage geometry"):
        affine = lps_to_ras(_affine(reader))
    return Header(shape, affine, source=reader)


def load(path: Path, header: Header) -> np.ndarray:
    """All voxels as (X, Y, Z) float32."""
    with guard(path, "NRRD/MetaImage voxel data"):
        image = header.source.Execute()
        raw = sitk.GetArrayFromImage(image)
    return as_volume(path, raw.transpose(tuple(range(raw.ndim))[::-1]), header.shape)
