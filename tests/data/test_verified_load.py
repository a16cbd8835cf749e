"""`LoadCased`: a manifest case is confined to its data root and verified against its sha256 while
it is read, and loads exactly what MONAI's ``LoadImaged(reader=MriReader(...))`` loads.

Cases: one changed byte (refused, naming the file; `preprocess` lists it as a failure and never
records its digest), a symlinked folder or a detached data file leading out of the root (refused),
good files of every format (identical tensors and metadata), gzip streams that decompress to far
more than their header declares (bounded), and a DICOM folder holding two series (`series_uid`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import Compose, LoadImaged
from pydicom.uid import generate_uid

from mri_vqvae.config import DataConfig, load_config
from mri_vqvae.core.errors import InvalidImageError, ManifestError
from mri_vqvae.data.case import Case
from mri_vqvae.data.datasets import case_items
from mri_vqvae.data.io import MriReader, read_volume
from mri_vqvae.data.manifest import Manifest
from mri_vqvae.data.sources import sha256_sources
from mri_vqvae.data.transforms import IMAGE, LoadCased, build_transforms, preprocessing_steps
from mri_vqvae.tasks.preprocess import preprocess_manifest
from tests.support.dicom import write_series
from tests.support.volumes import int_volume, make_head, oblique_affine, write_nifti

SMOKE = load_config("smoke")


def digest(path: Path, series_uid: str | None = None) -> str:
    """The manifest digest of an image (a file's sha256, or the multi-file digest)."""
    return sha256_sources(path, series_uid)[0]


def case_item(path: Path, root: Path, **extra: object) -> dict:
    """A dataset item as `case_items` makes it for a manifest case."""
    return {IMAGE: str(path), "root": str(root), "sha256": digest(path), "case_id": path.name,
            **extra}


def innermost(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None and not isinstance(exc, (ManifestError, InvalidImageError)):
        exc = exc.__cause__
    return exc


def flip_voxel_byte(path: Path) -> None:
    """Change one byte inside the voxel data of an uncompressed .nii (still a valid image)."""
    blob = bytearray(path.read_bytes())
    blob[-7] ^= 0x01
    path.write_bytes(bytes(blob))


def assert_same_load(path: Path, item: dict, **limits: object) -> None:
    """LoadCased on `item` equals LoadImaged + MriReader on the same file: tensor and meta."""
    old = LoadImaged(IMAGE, reader=MriReader())({IMAGE: str(path)})[IMAGE]
    new = LoadCased(**limits)(item)[IMAGE]
    assert type(new) is type(old) and new.dtype == old.dtype == torch.float32
    assert torch.equal(new.as_tensor(), old.as_tensor())
    assert set(new.meta) == set(old.meta)
    for key, value in old.meta.items():
        if isinstance(value, (np.ndarray, torch.Tensor)):
            np.testing.assert_array_equal(np.asarray(new.meta[key]), np.asarray(value), key)
        else:
            assert new.meta[key] == value, key
    np.testing.assert_array_equal(np.asarray(new.affine), np.asarray(old.affine))


# --- one changed byte --------------------------------------------------------------------------


def test_one_changed_byte_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "head.nii", make_head())
    item = case_item(path, tmp_path)
    flip_voxel_byte(path)
    read_volume(path)  # still a perfectly readable image: only the digest can tell
    with pytest.raises(ManifestError, match="sha256") as info:
        LoadCased()(item)
    assert str(path) in str(info.value)
    with pytest.raises(Exception) as chained:  # inside the MONAI chain: wrapped, then unwrapped
        build_transforms(SMOKE.data)(item)
    assert isinstance(innermost(chained.value), ManifestError)


def test_changed_byte_in_a_compressed_file_or_a_dicom_series(tmp_path: Path) -> None:
    gz = write_nifti(tmp_path / "head.nii.gz", make_head())
    item = case_item(gz, tmp_path)
    blob = bytearray(gz.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    gz.write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match=f"{gz}: sha256"):
        LoadCased()(item)
    files = write_series(tmp_path / "series", int_volume(), oblique_affine())
    item = case_item(tmp_path / "series", tmp_path)
    blob = bytearray(files[2].read_bytes())
    blob[-3] ^= 0x01  # a pixel value
    files[2].write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match="series.*sha256"):
        LoadCased(min_size=1)(item)


def _manifest(root: Path, names: list[str]) -> Manifest:
    cases = [
        Case(case_id=n.split(".")[0], subject_id=n.split(".")[0], source_id="synthetic", path=n,
             sha256=digest(root / n), bytes=(root / n).stat().st_size, modality="T1w",
             shape=(24, 28, 20), spacing=(1.5, 1.5, 1.5), split="train")
        for n in names
    ]
    return Manifest(name="t", cases=tuple(cases), data_root=root)


def test_preprocess_lists_a_changed_case_and_never_records_its_digest(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    write_nifti(root / "good.nii", make_head(seed=1))
    altered = write_nifti(root / "altered.nii", make_head(seed=2))
    manifest = _manifest(root, ["good.nii", "altered.nii"])
    flip_voxel_byte(altered)
    actual = hashlib.sha256(altered.read_bytes()).hexdigest()
    out = tmp_path / "out"
    done, failures = preprocess_manifest(manifest, SMOKE, out)
    assert [c.case_id for c in done] == ["good"]
    assert done[0].source_sha256 == digest(root / "good.nii")
    assert [f.case_id for f in failures] == ["altered"]
    assert str(altered) in failures[0].reason and "sha256" in failures[0].reason
    assert not (out / "images" / "altered.nii.gz").exists()
    index_text = (out / "index.json").read_text()
    index = json.loads(index_text)
    assert [c["case_id"] for c in index["cases"]] == ["good"]
    assert actual not in index_text and actual not in (out / "failures.csv").read_text()


# --- confinement ---------------------------------------------------------------------------------


def test_symlinked_folder_leading_outside_the_root_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    path = write_nifti(outside / "head.nii.gz", make_head())
    (root / "linked").symlink_to(outside, target_is_directory=True)
    inside = root / "linked" / "head.nii.gz"
    item = case_item(inside, root)  # the right digest: only confinement refuses it
    with pytest.raises(ManifestError, match="outside the data root"):
        LoadCased()(item)
    with pytest.raises(ManifestError, match="outside the data root"):  # root alone: confined too
        LoadCased()({IMAGE: str(inside), "root": str(root)})
    LoadCased()({IMAGE: str(path)})  # the same file given by a user (no manifest) is read


@pytest.mark.parametrize("kind", ["mhd", "nhdr"])
@pytest.mark.parametrize("where", ["relative", "absolute", "symlink"])
def test_detached_data_file_outside_the_root_is_refused(
    tmp_path: Path, kind: str, where: str
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    image = sitk.GetImageFromArray(int_volume((12, 12, 12)).transpose(2, 1, 0))
    header = root / f"vol.{kind}"
    sitk.WriteImage(image, str(header))  # header + vol.raw (mhd) / vol.raw.gz or .raw (nhdr)
    data = next(p for p in root.iterdir() if p != header)
    assert_same_load(header, case_item(header, root), min_size=1)  # inside: verified and equal
    moved = outside / data.name
    data.rename(moved)
    text = header.read_text(errors="surrogateescape")
    if where == "symlink":
        data.symlink_to(moved)
    else:
        target = os.path.relpath(moved, root) if where == "relative" else str(moved)
        header.write_text(text.replace(data.name, target), errors="surrogateescape")
    assert read_volume(header)[0].shape == (12, 12, 12)  # SimpleITK itself follows it happily
    with pytest.raises(ManifestError, match="outside the data root"):
        LoadCased(min_size=1)(case_item(header, root))


# --- good files: identical to LoadImaged + MriReader ---------------------------------------------


def _nifti_variants(folder: Path) -> dict[str, Path]:
    vol = make_head()
    out = {
        "float32.nii": write_nifti(folder / "a.nii", vol),
        "float32.nii.gz": write_nifti(folder / "a.nii.gz", vol),
        "oblique.nii.gz": write_nifti(folder / "o.nii.gz", vol, oblique_affine()),
    }
    scaled = nib.Nifti1Image((vol * 10).astype(np.int16), np.diag([1.2, -1.5, 2.0, 1.0]))
    scaled.header.set_slope_inter(0.37, -4.0)
    nib.save(scaled, folder / "scaled.nii.gz")
    nib.save(nib.Nifti2Image(vol.astype(np.float64), oblique_affine()), folder / "n2.nii")
    nib.save(nib.Nifti1Image(vol.astype(">f4"), np.eye(4)), folder / "big_endian.nii.gz")
    with_ext = nib.Nifti1Image(vol, np.eye(4))
    with_ext.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment " * 40))
    nib.save(with_ext, folder / "extension.nii.gz")
    qform_only = nib.Nifti1Image(vol.astype(np.uint8), None)
    qform_only.set_qform(np.diag([2.0, 2.0, 3.0, 1.0]), code=1)
    nib.save(qform_only, folder / "qform.nii")
    for name in ("scaled.nii.gz", "n2.nii", "big_endian.nii.gz", "extension.nii.gz", "qform.nii"):
        out[name] = folder / name
    return out


def test_verified_nifti_equals_monai_loadimaged(tmp_path: Path) -> None:
    for path in _nifti_variants(tmp_path).values():
        assert_same_load(path, case_item(path, tmp_path))


def test_multi_member_gzip_reads_like_gzip_open(tmp_path: Path) -> None:
    ref = write_nifti(tmp_path / "ref.nii", make_head())
    raw = ref.read_bytes()
    path = tmp_path / "members.nii.gz"
    path.write_bytes(b"".join(gzip.compress(raw[i : i + 5000]) for i in range(0, len(raw), 5000)))
    assert_same_load(path, case_item(path, tmp_path))


def test_verified_itk_and_dicom_equal_monai_loadimaged(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(int_volume((14, 13, 12)).transpose(2, 1, 0))
    image.SetSpacing((1.2, 0.9, 2.0))
    for suffix in (".mha", ".nrrd", ".mhd", ".nhdr"):
        sitk.WriteImage(image, str(tmp_path / f"vol{suffix}"))
        path = tmp_path / f"vol{suffix}"
        assert_same_load(path, case_item(path, tmp_path))
    write_series(tmp_path / "series", int_volume((14, 13, 12)), oblique_affine())
    assert_same_load(tmp_path / "series", case_item(tmp_path / "series", tmp_path))


def _old_chain(data: DataConfig) -> Compose:
    """Today's chain with MONAI's LoadImaged + MriReader as its first step."""
    steps = preprocessing_steps(data)
    first = LoadImaged(IMAGE, reader=MriReader(data.max_voxels, data.max_shear))
    return Compose([first] + [t for _, t in steps[1:]])


def test_preprocessed_output_is_identical_to_the_loadimaged_chain(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for i, name in enumerate(["a.nii.gz", "b.nii"]):
        write_nifti(root / name, make_head(seed=i), np.diag([1.2, -1.5, 1.8, 1.0]))
    write_series(root / "c", (make_head((20, 22, 16), seed=3) * 10).astype(np.int16),
                 oblique_affine())
    manifest = Manifest(
        name="t", data_root=root,
        cases=tuple(Case(case_id=n[0], subject_id=n[0], source_id="s", path=n,
                         sha256=digest(root / n), bytes=1, modality="T1w", shape=(1, 1, 1),
                         spacing=(1.0, 1.0, 1.0), split="train")
                    for n in ["a.nii.gz", "b.nii", "c"]),
    )
    new_chain, old_chain = build_transforms(SMOKE.data), _old_chain(SMOKE.data)
    for item in case_items(manifest, SMOKE.data):
        new, old = new_chain(dict(item)), old_chain(dict(item))
        assert torch.equal(new[IMAGE].as_tensor(), old[IMAGE].as_tensor()), item["case_id"]
        np.testing.assert_array_equal(np.asarray(new[IMAGE].affine), np.asarray(old[IMAGE].affine))
        assert new["sha256"] == item["sha256"]  # the verified digest travels on as provenance


# --- bounded gunzip ------------------------------------------------------------------------------


def _gzip_with_padding(head: bytes, pad: int, tail: bytes = b"") -> bytes:
    """gzip of head + `pad` zero bytes + tail, compressed without ever holding the zeros."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts, zeros = [z.compress(head)], bytes(1 << 20)
    for _ in range(pad // len(zeros)):
        parts.append(z.compress(zeros))
    parts += [z.compress(bytes(pad % len(zeros))), z.compress(tail), z.flush()]
    return b"".join(parts)


def _nifti_bytes(vol: np.ndarray, offset: int = 352) -> tuple[bytes, bytes]:
    """(header + extension flag bytes, voxel bytes) of a float32 NIfTI-1 at `offset`."""
    hdr = nib.Nifti1Image(vol, np.diag([1.5, 1.5, 1.5, 1.0])).header
    hdr.set_data_offset(offset)
    return hdr.binaryblock + b"\0" * 4, vol.astype("<f4").tobytes("F")


def _traced(fn: object) -> int:
    tracemalloc.start()
    try:
        fn()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_gzip_bomb_after_the_declared_voxels_is_never_decompressed(tmp_path: Path) -> None:
    vol = make_head((20, 20, 20))
    head, voxels = _nifti_bytes(vol)
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(_gzip_with_padding(head + voxels, 400 << 20))  # then 400 MiB of zeros
    assert path.stat().st_size < 1 << 20
    item, load, out = case_item(path, tmp_path), LoadCased(), {}
    peak = _traced(lambda: out.update(load(item)))
    assert peak < 16 << 20, f"{peak:,} bytes allocated"
    np.testing.assert_array_equal(out[IMAGE].numpy(), vol)


def test_gzip_bomb_before_the_voxels_is_skipped_in_bounded_steps(tmp_path: Path) -> None:
    vol = make_head((20, 20, 20))
    pad = 200 << 20
    head, voxels = _nifti_bytes(vol, offset=352 + pad)  # 200 MiB of zeros before the voxels
    path = tmp_path / "far.nii.gz"
    path.write_bytes(_gzip_with_padding(head, pad, voxels))
    item, load, out = case_item(path, tmp_path), LoadCased(), {}
    peak = _traced(lambda: out.update(load(item)))
    assert peak < 16 << 20, f"{peak:,} bytes allocated"
    np.testing.assert_array_equal(out[IMAGE].numpy(), vol)


def test_huge_declared_gzip_volume_is_refused_from_its_first_bytes(tmp_path: Path) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 2000))
    hdr.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(_gzip_with_padding(hdr.binaryblock + b"\0" * 4, 50 << 20))
    item, load = case_item(path, tmp_path), LoadCased()

    def attempt() -> None:
        with pytest.raises(InvalidImageError, match="over the limit data.max_voxels"):
            load(item)

    peak = _traced(attempt)
    assert peak < 8 << 20, f"{peak:,} bytes allocated"


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz"])
def test_truncated_verified_nifti(tmp_path: Path, name: str) -> None:
    full = write_nifti(tmp_path / f"full_{name}", make_head()).read_bytes()
    path = tmp_path / name
    path.write_bytes(full[: len(full) * 2 // 3])
    with pytest.raises(InvalidImageError, match="truncated") as info:
        LoadCased()(case_item(path, tmp_path))
    assert info.value.path == str(path)


@pytest.mark.filterwarnings("ignore")
def test_non_nifti_bytes_with_a_nifti_name(tmp_path: Path) -> None:
    for name in ("notes.nii", "notes.nii.gz"):
        path = tmp_path / name
        text = b"subject,age\nsub-01,34\n" * 40
        path.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
        with pytest.raises(InvalidImageError, match="cannot be read as"):
            LoadCased()(case_item(path, tmp_path))


# --- DICOM: one series of a folder -------------------------------------------------------------


def test_series_uid_picks_one_series_of_a_folder(tmp_path: Path) -> None:
    first, second = generate_uid(), generate_uid()
    vol_a, vol_b = int_volume(seed=1), int_volume(seed=2)
    write_series(tmp_path / "s", vol_a, np.eye(4), series_uid=first, prefix="A")
    write_series(tmp_path / "s", vol_b, np.eye(4), series_uid=second, prefix="B")
    folder = tmp_path / "s"
    with pytest.raises(InvalidImageError, match="mixes 2 series"):
        LoadCased(min_size=1)({IMAGE: str(folder)})
    for uid, vol in ((first, vol_a), (second, vol_b)):
        item = {IMAGE: str(folder), "root": str(tmp_path), "sha256": digest(folder, uid),
                "series_uid": uid}
        got = LoadCased(min_size=1)(item)[IMAGE]
        np.testing.assert_array_equal(got.numpy(), vol.astype(np.float32))
        np.testing.assert_array_equal(read_volume(folder, series_uid=uid)[0], vol)
    wrong = {IMAGE: str(folder), "root": str(tmp_path), "sha256": digest(folder, first),
             "series_uid": second}
    with pytest.raises(ManifestError, match="sha256"):
        LoadCased(min_size=1)(wrong)


@pytest.mark.parametrize("name", ["one.nii", "one.nii.gz"])
def test_verified_nifti_is_read_once_and_parsed_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    path = write_nifti(tmp_path / name, make_head())
    item, load = case_item(path, tmp_path), LoadCased()
    opened: list[str] = []
    real_os_open, real_open = os.open, open

    def os_open(file: object, *args: object, **kwargs: object) -> int:
        opened.append(str(file))
        return real_os_open(file, *args, **kwargs)  # type: ignore[arg-type]

    def builtin_open(file: object, *args: object, **kwargs: object) -> object:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr("builtins.open", builtin_open)
    monkeypatch.setattr(nib, "load", lambda *a, **k: pytest.fail("parsed from the path"))
    image = load(item)[IMAGE]
    monkeypatch.undo()
    assert opened.count(str(path)) == 1, opened
    np.testing.assert_array_equal(image.numpy(), make_head())
