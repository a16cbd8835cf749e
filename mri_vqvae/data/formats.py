"""Which file names are images, and in which format: the one list of file suffixes.

The reader (`mri_vqvae.data.io.detect_format`) and the manifest scan (`mri_vqvae.data.scan`)
both ask here, so every name the reader accepts is found by ``manifest build`` and the other way
round. Suffixes are matched case-insensitively.

- NIfTI: ``.nii``, ``.nii.gz``.
- ITK (SimpleITK): NRRD ``.nrrd`` and MetaImage ``.mha`` hold header and voxels in one file (or
  name a data file); their detached-header variants ``.nhdr`` / ``.mhd`` always name their data
  files (``.raw``, ``.zraw`` ...). A header is the image; its data files belong to it and are never
  images of their own (`mri_vqvae.data.sources.source_files` lists them).
- DICOM: ``.dcm``, ``.dicom``, ``.ima``; files of any other name are DICOM when their content is
  (see `mri_vqvae.data.sources.is_dicom`). A folder of 2D slices is one image.

Stdlib only.
"""

from __future__ import annotations

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
METAIMAGE_SUFFIXES = (".mha", ".mhd")
ITK_SUFFIXES = NRRD_SUFFIXES + METAIMAGE_SUFFIXES  # headers that may name detached data files
DETACHED_SUFFIXES = (".nhdr", ".mhd")  # headers whose voxels always lie in other files
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES  # one file (with its data files) = one image
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _suffix_in(name: str, suffixes: tuple[str, ...]) -> str | None:
    lower = name.lower()
    return next((s for s in suffixes if lower.endswith(s)), None)


def image_suffix(name: str) -> str | None:
    """The NIfTI / ITK suffix `name` ends with (lower-cased, e.g. ``.nii.gz``), or None."""
    return _suffix_in(name, IMAGE_SUFFIXES)


def is_nifti(name: str) -> bool:
    """True when `name` ends in a NIfTI suffix."""
    return _suffix_in(name, NIFTI_SUFFIXES) is not None


def is_itk(name: str) -> bool:
    """True when `name` ends in an NRRD or MetaImage suffix (attached or detached header)."""
    return _suffix_in(name, ITK_SUFFIXES) is not None


def is_metaimage(name: str) -> bool:
    """True for a MetaImage header (``.mha`` / ``.mhd``); other ITK headers are NRRD."""
    return _suffix_in(name, METAIMAGE_SUFFIXES) is not None


def is_detached(name: str) -> bool:
    """True for a header whose voxels always lie in data files it names (``.nhdr`` / ``.mhd``)."""
    return _suffix_in(name, DETACHED_SUFFIXES) is not None


def has_dicom_suffix(name: str) -> bool:
    """True when `name` ends in a DICOM suffix (DICOM files may also have none)."""
    return _suffix_in(name, DICOM_SUFFIXES) is not None


def known_suffix(name: str) -> bool:
    """True when `name` ends in any image suffix: NIfTI, ITK or DICOM."""
    return image_suffix(name) is not None or has_dicom_suffix(name)
