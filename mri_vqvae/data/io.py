"""Reading MRI volumes in the formats radiology research uses, validated before they are trusted.

Formats (`detect_format` names; which file suffixes mean which: `mri_vqvae.data.formats`, the
list the manifest scan uses too):

- ``"nifti"``: .nii / .nii.gz (nibabel; NIfTI-1 and NIfTI-2)
- ``"dicom_series"``: a folder of classic 2D DICOM slices of one series
- ``"dicom_multiframe"``: one enhanced multi-frame DICOM file (PerFrameFunctionalGroupsSequence)
- ``"dicom_mosaic"``: one Siemens mosaic DICOM file (geometry from its CSA header)
- ``"dicom_slice"``: one classic 2D DICOM slice; detected so it can be refused as 2D data
- ``"itk"``: .nrrd / .nhdr / .mha / .mhd (SimpleITK)

Every volume comes out as a (X, Y, Z) float32 array with a (4, 4) voxel -> RAS affine. Anything
wrong with a file (missing, unknown type, truncated, too large, too small, too large once
resampled, 2D/4D/5D, zero/negative/NaN voxel size, NaN/Inf, values beyond float32, constant,
sheared, broken DICOM series) raises `InvalidImageError`; so does any exception a library raises
on malformed input. Only geometry goes into MONAI metadata, never header free text.
`MriReader.volume` is the one implementation of reading and checking a volume: `read_volume`
and MONAI's ``LoadImage`` (through `MriReader.get_data`) both call it.

Verified reads (a manifest case: ``root`` and ``sha256`` given to `read_volume` / `MriReader`):
`mri_vqvae.data.sources.read_verified` first refuses any source file that resolves (links followed)
outside the data root, then reads each file once, hashing as it reads, and raises `ManifestError`
naming the file when the digest differs from the manifest's. What is parsed then depends on what
the library can read from memory:

- NIfTI (.nii, .nii.gz): parsed from those very bytes (nibabel; gunzip in memory, bounded by the
  header's declared size): what was hashed is exactly what is read, in one pass.
- DICOM (pydicom) and NRRD/MetaImage (SimpleITK): the existing readers take paths, so the files
  are verified and then read again from their paths. Limitation: a second read, and a file
  swapped on disk between the check and the read (a race, not an accident) would go unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from mri_vqvae.config import DataConfig
from mri_vqvae.core.errors import InvalidImageError
from mri_vqvae.data import formats, sources
from mri_vqvae.data.readers import dicom, itk, nifti
from mri_vqvae.data.readers.common import (
    Header,
    check_affine,
    check_min_size,
    check_resampled_size,
    check_values,
    guard,
    spacing_of,
)

__all__ = [
    "FORMATS",
    "ImageInfo",
    "MriReader",
    "detect_format",
    "geometry_meta",
    "inspect_image",
    "read_volume",
]

DEFAULT_MAX_VOXELS: int = DataConfig.model_fields["max_voxels"].default
DEFAULT_MAX_SHEAR: float = DataConfig.model_fields["max_shear"].default
DEFAULT_MIN_SIZE: int = DataConfig.model_fields["min_size"].default  # what pipelines pass

Probe = Callable[[Path, int], Header]
Load = Callable[[Path, Header], np.ndarray]
_HANDLERS: dict[str, tuple[Probe, Load | None]] = {
    "nifti": (nifti.probe, nifti.load),
    "dicom_series": (dicom.probe_series, dicom.load_series),
    "dicom_multiframe": (dicom.probe_multiframe, dicom.load_multiframe),
    "dicom_mosaic": (dicom.probe_mosaic, dicom.load_mosaic),
    "dicom_slice": (dicom.probe_slice, None),  # probe always refuses it as 2D data
    "itk": (itk.probe, itk.load),
}
FORMATS: tuple[str, ...] = tuple(_HANDLERS)


@dataclass(frozen=True)
class ImageInfo:
    """What the header declares: format (one of `FORMATS`), (X, Y, Z) shape, voxel size in mm."""

    format: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


def _has_dicom_magic(path: Path) -> bool:
    with guard(path, "a file"), path.open("rb") as fh:
        return fh.read(132)[128:132] == b"DICM"


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise InvalidImageError(
            path, "path does not exist", "check the path (and the root it is relative to)"
        )


def detect_format(path: str | Path) -> str:
    """Name of the reader for `path` (see `FORMATS`); reads at most one DICOM header.

    A folder is a DICOM series. Suffixes are those of `mri_vqvae.data.formats`; DICOM files are
    also recognised by their "DICM" preamble, whatever their name (scanners often write names
    without extension).
    """
    p = Path(path)
    _require_exists(p)
    if p.is_dir():
        return "dicom_series"
    if formats.is_nifti(p.name):
        return "nifti"
    if formats.is_itk(p.name):
        return "itk"
    if formats.has_dicom_suffix(p.name) or _has_dicom_magic(p):
        return dicom.classify(p)
    raise InvalidImageError(
        p,
        f"unknown image type (extension {''.join(p.suffixes)!r}, no DICOM preamble)",
        "give a NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd) or DICOM file, "
        "or a folder holding one DICOM series; decompress .gz archives other than .nii.gz",
    )


@dataclass(frozen=True)
class _Limits:
    max_voxels: int = DEFAULT_MAX_VOXELS
    max_shear: float = DEFAULT_MAX_SHEAR
    min_size: int = 1
    spacing: tuple[float, float, float] | None = None


def _probe(
    path: Path, limits: _Limits, series_uid: str | None = None, blob: bytes | None = None
) -> tuple[str, Header]:
    fmt = detect_format(path)
    with guard(path, f"{fmt} header"):  # last resort: the readers guard every library call
        if fmt == "nifti" and blob is not None:
            header = nifti.probe_bytes(path, blob, limits.max_voxels)
        elif fmt == "dicom_series" and series_uid is not None:
            header = dicom.probe_series(path, limits.max_voxels, series_uid=series_uid)
        else:
            header = _HANDLERS[fmt][0](path, limits.max_voxels)
    check_affine(path, header.affine, limits.max_shear)
    if limits.spacing is not None:
        check_resampled_size(path, header.shape, header.affine, limits.spacing, limits.max_voxels)
    return fmt, header


def inspect_image(
    path: str | Path,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    max_shear: float = DEFAULT_MAX_SHEAR,
    *,
    min_size: int = 1,
    series_uid: str | None = None,
) -> ImageInfo:
    """Format, (X, Y, Z) shape and voxel size from headers only; validates them, reads no voxel.

    A DICOM series reads every slice header (geometry: gaps, duplicates, spacing); `series_uid`
    picks one series of a folder holding several. `min_size` (pipelines pass
    ``data.min_size``) refuses volumes with fewer voxels along any axis; the default 1 accepts any
    3D volume.
    """
    limits = _Limits(int(max_voxels), float(max_shear), int(min_size))
    fmt, header = _probe(Path(path), limits, series_uid)
    check_min_size(path, header.shape, limits.min_size)
    return ImageInfo(fmt, header.shape, spacing_of(header.affine))


def _triple(spacing: Sequence[float] | None) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    t = tuple(float(s) for s in spacing)
    if len(t) != 3:
        raise ValueError(f"spacing must hold 3 values (mm, RAS order), got {spacing}")
    return (t[0], t[1], t[2])


def geometry_meta(path: str | Path, fmt: str, affine: np.ndarray, shape: Sequence[int]) -> dict:
    """MONAI metadata of one (X, Y, Z) volume: geometry only, never header free text."""
    spacing = np.array(spacing_of(affine))
    return {
        MetaKeys.AFFINE.value: np.array(affine, dtype=np.float64),
        MetaKeys.ORIGINAL_AFFINE.value: np.array(affine, dtype=np.float64),
        MetaKeys.SPATIAL_SHAPE.value: np.array(shape, dtype=np.int64),
        MetaKeys.SPACE.value: SpaceKeys.RAS.value,
        MetaKeys.ORIGINAL_CHANNEL_DIM.value: "no_channel",
        MetaKeys.PIXDIM.value: np.r_[1.0, spacing, 1.0, 1.0, 1.0, 1.0],
        "spacing": spacing,
        "format": fmt,
        "filename_or_obj": str(path),
    }


class MriReader(ImageReader):
    """The one reader of volumes: `volume` reads and validates one; `read_volume` calls it, and
    so does MONAI: ``LoadImaged("image", reader=MriReader(...))``.

    `read` only records the paths; all reading and validation happen in `get_data`. This is on
    purpose: `LoadImage` catches exceptions from `read` and silently retries with its default
    readers (which would load a file this reader refused), but lets `get_data` errors through,
    so an `InvalidImageError` reaches the caller.

    Output of `get_data`: (X, Y, Z) float32 with ``original_channel_dim = "no_channel"`` for one
    path; several paths are stacked as channels (C, X, Y, Z) and must share shape and affine.

    The keyword arguments are those of `read_volume`. `root`, `sha256` and `series_uid` belong to
    one case: `mri_vqvae.data.transforms.LoadCased` makes one reader per item with them.
    """

    def __init__(
        self,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        max_shear: float = DEFAULT_MAX_SHEAR,
        *,
        min_size: int = 1,
        spacing: Sequence[float] | None = None,
        root: str | Path | None = None,
        sha256: str | None = None,
        series_uid: str | None = None,
    ) -> None:
        super().__init__()
        self.limits = _Limits(int(max_voxels), float(max_shear), int(min_size), _triple(spacing))
        self.max_voxels = self.limits.max_voxels
        self.max_shear = self.limits.max_shear
        self.root = root
        self.sha256 = sha256
        self.series_uid = series_uid

    def _verified_blob(self, path: Path) -> bytes | None:
        """Check confinement (and the digest when sha256 is set); the NIfTI bytes read, if any."""
        if self.sha256 is None and self.root is None:
            return None
        _require_exists(path)
        if self.sha256 is None:
            sources.check_confined(path, Path(self.root), self.series_uid)
            return None
        if self.root is None:
            raise ValueError(f"{path}: a sha256 to verify needs the data root the case must "
                             "stay in")
        blobs = sources.read_verified(path, Path(self.root), self.sha256, self.series_uid)
        if path.is_file() and formats.is_nifti(path.name) and len(blobs) == 1:
            return next(iter(blobs.values()))
        return None  # DICOM / ITK: verified, then parsed from their paths (see the module doc)

    def volume(self, path: str | Path) -> tuple[str, np.ndarray, np.ndarray]:
        """Read and validate one volume: (format, (X, Y, Z) float32, (4, 4) voxel -> RAS)."""
        path = Path(path)
        blob = self._verified_blob(path)
        fmt, header = _probe(path, self.limits, self.series_uid, blob)
        del blob  # the header holds what the NIfTI loader needs
        load = _HANDLERS[fmt][1]
        assert load is not None, f"{fmt} has no loader but its probe accepted {path}"
        with guard(path, f"{fmt} voxel data"):
            data = load(path, header)
        assert data.shape == header.shape and data.dtype == np.float32, (data.shape, header.shape)
        check_values(path, data)
        # the header's shape, checked after the voxels so a small blank or broken export is named
        # for what it is (constant, NaN ...); a small volume costs nothing to read
        check_min_size(path, header.shape, self.limits.min_size)
        return fmt, data, np.array(header.affine, dtype=np.float64)

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        """True when every name is a folder or ends in a suffix this reader knows."""
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return bool(names) and all(Path(n).is_dir() or formats.known_suffix(str(n)) for n in names)

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: Any) -> list[Path]:
        """The paths to read later in `get_data` (no I/O here, see the class docstring)."""
        names = [data] if isinstance(data, (str, Path)) else list(data)
        return [Path(n) for n in names]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """Read and validate: ((X, Y, Z) or (C, X, Y, Z) float32, geometry-only meta dict)."""
        paths = [img] if isinstance(img, (str, Path)) else list(img)
        if len(paths) > 1 and any(v is not None for v in (self.root, self.sha256, self.series_uid)):
            raise InvalidImageError(
                paths[0],
                f"a case to verify holds one image, got {len(paths)} paths",
                "list each channel as its own manifest case, or read them without root/sha256",
            )
        volumes = [self.volume(p) for p in paths]
        fmt, data, affine = volumes[0]
        meta = geometry_meta(paths[0], fmt, affine, data.shape)
        if len(volumes) == 1:
            return data, meta
        for p, (_, other, other_affine) in zip(paths[1:], volumes[1:], strict=True):
            if other.shape != data.shape or not np.allclose(other_affine, affine, atol=1e-4):
                raise InvalidImageError(
                    p,
                    f"grid {other.shape} differs from {paths[0]} {data.shape}",
                    "channels stacked in one item must share shape and affine: resample first",
                )
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM.value] = 0
        return np.stack([v for _, v, _ in volumes]), meta


def read_volume(
    path: str | Path,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    max_shear: float = DEFAULT_MAX_SHEAR,
    *,
    min_size: int = 1,
    spacing: Sequence[float] | None = None,
    root: str | Path | None = None,
    sha256: str | None = None,
    series_uid: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one volume: ((X, Y, Z) float32 voxels, (4, 4) voxel -> RAS affine).

    Header limits, checked before any voxel is read: `max_voxels`, `max_shear` and, with `spacing`
    (the target voxel size in mm, RAS order), the size after resampling must stay within
    `max_voxels`. `min_size` (the default 1 accepts any 3D volume; pipelines pass
    ``data.min_size``) bounds the header's shape from below, checked after the voxel checks so a
    small blank or broken export is named for what it is.
    With `root` every source file must resolve inside it; with `root` and `sha256` (a manifest
    case) the content is verified too (see the module docstring). `series_uid` picks one series
    of a DICOM folder holding several. ``MriReader(...).volume(path)`` without the format.
    """
    reader = MriReader(max_voxels, max_shear, min_size=min_size, spacing=spacing, root=root,
                       sha256=sha256, series_uid=series_uid)
    _, data, affine = reader.volume(path)
    return data, affine
