"""DICOM series written slice by slice with pydicom, for reader and scan tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ROWS, COLS = 5, 6  # in-plane size of `write_slices` slices
SLICES = 4  # number of `write_slices` slices
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


def ds_str(values: Sequence[float]) -> list[str]:
    """DICOM DS strings (at most 16 characters each)."""
    return [f"{float(v):.8g}" for v in values]


def base_dataset(sop_class: str, series_uid: str) -> Dataset:
    """A minimal MR dataset with file meta, 16-bit signed greyscale and a patient name."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "MR", "Doe^Jane", "SECRET-ID-42"
    ds.SeriesInstanceUID = series_uid
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def slice_geometry(affine: np.ndarray) -> tuple[list[str], list[str], np.ndarray]:
    """(ImageOrientationPatient, PixelSpacing, (Z, 3) slice positions) for a RAS affine."""
    lps = FLIP @ affine
    sx, sy = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    iop = ds_str(np.r_[lps[:3, 0] / sx, lps[:3, 1] / sy])
    return iop, ds_str([sy, sx]), lps[:3, 3]


def positions(affine: np.ndarray, n: int) -> np.ndarray:
    """(n, 3) LPS positions of slices k = 0..n-1."""
    lps = FLIP @ affine
    return np.array([lps[:3, 3] + k * lps[:3, 2] for k in range(n)])


def write_series(
    folder: Path,
    data: np.ndarray,
    affine: np.ndarray,
    seed: int = 0,
    pos: np.ndarray | None = None,
    series_uid: str | None = None,
    prefix: str = "IM",
) -> list[Path]:
    """One classic MR slice file per z of integer `data` (X, Y, Z), under shuffled file names."""
    folder.mkdir(parents=True, exist_ok=True)
    iop, spacing, _ = slice_geometry(affine)
    pos = positions(affine, data.shape[2]) if pos is None else pos
    uid = series_uid or generate_uid()
    names = np.random.default_rng(seed).permutation(len(pos))
    paths = []
    for k, p in enumerate(pos):
        ds = base_dataset(MRImageStorage, uid)
        ds.ImageOrientationPatient, ds.PixelSpacing = iop, spacing
        ds.ImagePositionPatient = ds_str(p)
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.PixelData = np.ascontiguousarray(
            data[:, :, min(k, data.shape[2] - 1)].T, "<i2"
        ).tobytes()
        paths.append(folder / f"{prefix}{names[k]:04d}")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def write_slices(folder: Path, uid: str, names: list[str] | None = None, number: int = 1,
                 preamble: bool = True, step: float = 2.0) -> list[Path]:
    """A classic MR series in `folder`: one file per name in `names` (default: SLICES files named
    by UIDs, as scanners do), rows x cols = ROWS x COLS, slice k at z = k * step, SeriesNumber
    `number`. Without `preamble` each is a raw dataset: no "DICM" preamble and no file meta."""
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [generate_uid() for _ in range(SLICES)]  # UID-named: "1.2.826.0..."
    paths = []
    for k, name in enumerate(names):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", uid, number
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, k * step]
        ds.PixelSpacing, ds.Rows, ds.Columns = [1, 1], ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = (np.arange(ROWS * COLS, dtype="<u2") + k).tobytes()
        path = folder / name
        if preamble:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(path, enforce_file_format=True)
        else:  # a raw dataset: no preamble, no "DICM"
            ds.save_as(path, implicit_vr=True, little_endian=True)
        paths.append(path)
    return paths
