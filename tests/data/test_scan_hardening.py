"""Folder scans and manifest parsing against hostile inputs: UID-named DICOM, mixed folders,
FIFOs, huge JSON numbers and ids with a trailing newline. Every fixture is made in tmp_path."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from mri_vqvae.core.errors import InvalidImageError, ManifestError
from mri_vqvae.data.case import Case
from mri_vqvae.data.manifest import (
    Manifest,
    content_digest,
    load_manifest,
    verify_manifest,
    write_manifest,
)
from mri_vqvae.data.readers import dicom
from mri_vqvae.data.readers.common import spacing_of
from mri_vqvae.data.scan import scan_folder
from tests.support.dicom import COLS, ROWS, SLICES, write_slices
from tests.support.volumes import make_head, write_nifti


def describe(path: Path, series_uid: str | None = None) -> dict:
    """Shape and spacing from the real readers (DICOM series: only `series_uid`'s files)."""
    if path.is_dir():
        header = dicom.probe_series(path, 10**8, series_uid=series_uid)
        return {"shape": header.shape, "spacing": spacing_of(header.affine)}
    if path.name.endswith(".nii.gz"):
        return {"shape": (24, 28, 20), "spacing": (1.5, 1.5, 1.5)}
    raise InvalidImageError(path, "not an image in this test", "none")


def scan_in_thread(root: Path, timeout: float = 10.0) -> tuple[list[Case], list]:
    """scan_folder(root) in a thread; fails (instead of hanging the suite) after `timeout`."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(scan_folder(root, describe, "src")),
                              daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"scan of {root} did not finish within {timeout} s"
    return out[0]


# --- (b1) DICOM without extension ------------------------------------------------------------


@pytest.mark.parametrize("preamble", [True, False], ids=["DICM-preamble", "raw-dataset"])
def test_extension_less_dicom_series_is_scanned(tmp_path: Path, preamble: bool) -> None:
    uid = generate_uid()
    files = write_slices(tmp_path / "pat1" / "series", uid, preamble=preamble)
    assert all(Path(f.name).suffix[1:].isdigit() for f in files)  # named by UID
    (tmp_path / "pat1" / "series" / "README").write_text("exported from PACS\n")
    cases, problems = scan_folder(tmp_path, describe, "src")
    assert [(c.path, c.subject_id, c.shape) for c in cases] == [
        ("pat1/series", "pat1", (COLS, ROWS, SLICES))]
    assert cases[0].spacing == (1.0, 1.0, 2.0)
    assert [p.path for p in problems] == ["pat1/series/README"]  # accounted for, not hashed
    assert cases[0].series_uid == uid  # the folder holds more than the series
    assert verify_manifest(Manifest("m", tuple(cases), data_root=tmp_path)) == []


def test_folder_holding_exactly_one_series_keeps_the_old_form(tmp_path: Path) -> None:
    write_slices(tmp_path / "s", generate_uid())
    (cases, problems) = scan_folder(tmp_path, describe, "src")
    assert problems == [] and cases[0].series_uid is None
    assert "series_uid" not in cases[0].to_dict()  # digests of older manifests are unchanged


# --- (b2) mixed flat folder ------------------------------------------------------------------


def test_mixed_flat_folder_accounts_for_every_file(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    write_nifti(flat / "subA_T1.nii.gz", make_head())
    write_nifti(flat / "subB_T1.nii.gz", make_head(seed=1))
    uid_a, uid_b = generate_uid(), generate_uid()
    write_slices(flat, uid_a, [f"a{k}.dcm" for k in range(SLICES)], number=3)
    write_slices(flat, uid_b, [f"b{k}.dcm" for k in range(SLICES)], number=7, step=3.0)
    orphan = write_slices(flat, uid_a, ["orphan.dcm"])[0]
    ds = dicom._read(orphan, pixels=True)
    del ds.SeriesInstanceUID
    ds.save_as(orphan)
    (flat / "notes.txt").write_text("scanned on a Tuesday\n")
    names = sorted(p.name for p in flat.iterdir())

    cases, problems = scan_folder(tmp_path, describe, "src")
    by_uid = {c.series_uid: c for c in cases if c.path == "flat"}
    assert set(by_uid) == {uid_a, uid_b}
    assert by_uid[uid_a].spacing[2] == 2.0 and by_uid[uid_b].spacing[2] == 3.0
    assert {c.path for c in cases} == {"flat", "flat/subA_T1.nii.gz", "flat/subB_T1.nii.gz"}
    reasons = {p.path: p.reason for p in problems}
    assert set(reasons) == {"flat/orphan.dcm", "flat/notes.txt"}
    assert "SeriesInstanceUID" in reasons["flat/orphan.dcm"]
    assert "not an image" in reasons["flat/notes.txt"]
    in_cases = {n for n in names if n.startswith(("a", "b"))} | {
        Path(c.path).name for c in cases if c.path != "flat"}
    assert in_cases | {Path(p).name for p in reasons} == set(names)  # every file accounted for

    ids = [c.case_id for c in cases]
    assert len(set(ids)) == len(ids) and {by_uid[uid_a].case_id, by_uid[uid_b].case_id} == {
        "src_flat_s3", "src_flat_s7"}
    assert [c.case_id for c in scan_folder(tmp_path, describe, "src")[0]] == ids  # stable

    m = Manifest("mixed", tuple(cases), data_root=tmp_path)
    assert verify_manifest(m) == []
    write_manifest(m, tmp_path / "m.json")
    loaded = load_manifest(tmp_path / "m.json", verify_checksums=True)
    assert {c.series_uid for c in loaded.cases} == {uid_a, uid_b, None}
    (flat / "b1.dcm").write_bytes((flat / "b1.dcm").read_bytes()[:-1] + b"\x01")
    assert [p.case_id for p in verify_manifest(loaded)] == [by_uid[uid_b].case_id]


def test_probe_series_reads_only_the_named_series(tmp_path: Path) -> None:
    uid_a, uid_b = generate_uid(), generate_uid()
    write_slices(tmp_path, uid_a, [f"a{k}" for k in range(SLICES)])
    write_slices(tmp_path, uid_b, [f"b{k}" for k in range(SLICES - 1)])
    with pytest.raises(InvalidImageError, match="mixes 2 series"):
        dicom.probe_series(tmp_path, 10**8)
    header = dicom.probe_series(tmp_path, 10**8, series_uid=uid_b)
    assert header.shape == (COLS, ROWS, SLICES - 1)
    assert all(p.name.startswith("b") for p in header.source)
    data = dicom.load_series(tmp_path, header, series_uid=uid_b)
    assert data.shape == header.shape
    with pytest.raises(InvalidImageError, match="no file of series 1.2.3"):
        dicom.probe_series(tmp_path, 10**8, series_uid="1.2.3")


def test_describe_without_series_uid_gets_a_problem_not_a_crash(tmp_path: Path) -> None:
    write_slices(tmp_path, generate_uid(), [f"a{k}.dcm" for k in range(SLICES)], number=1)
    write_slices(tmp_path, generate_uid(), [f"b{k}.dcm" for k in range(SLICES)], number=2)
    cases, problems = scan_folder(tmp_path, lambda p: describe(p), "src")
    assert cases == [] and len(problems) == 2
    assert all("several DICOM series" in p.reason for p in problems)


def test_multiframe_file_is_its_own_case_and_dicomdir_is_accounted(tmp_path: Path) -> None:
    uid = generate_uid()
    write_slices(tmp_path / "s", uid, [f"IM{k}" for k in range(SLICES)])
    volume = write_slices(tmp_path / "s", uid, ["ENHANCED"])[0]
    ds = dicom._read(volume, pixels=True)
    ds.NumberOfFrames = 2
    ds.save_as(volume)
    (tmp_path / "s" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")

    def stub(path: Path, series_uid: str | None = None) -> dict:
        return describe(path, series_uid) if path.is_dir() else {"shape": (6, 5, 2),
                                                                  "spacing": (1, 1, 1)}

    cases, problems = scan_folder(tmp_path, stub, "src")
    assert [(c.path, c.series_uid) for c in cases] == [("s", uid), ("s/ENHANCED", None)]
    assert cases[0].shape == (COLS, ROWS, SLICES)  # the multi-frame file is not a slice
    assert [(p.path, "DICOMDIR index" in p.reason) for p in problems] == [("s/DICOMDIR", True)]
    (tmp_path / "s" / "ENHANCED").unlink()
    cases, problems = scan_folder(tmp_path, stub, "src")
    assert problems == [] and [(c.path, c.series_uid) for c in cases] == [("s", None)]


# --- (b3) FIFOs and other non-regular files ---------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("name", ["pipe.nii.gz", "IM0001", "pipe.dcm"])
def test_fifo_is_skipped_without_hanging(tmp_path: Path, name: str) -> None:
    write_nifti(tmp_path / "subA_T1.nii.gz", make_head())
    os.mkfifo(tmp_path / name)
    cases, problems = scan_in_thread(tmp_path)
    assert [c.path for c in cases] == ["subA_T1.nii.gz"]
    assert [(p.path, p.reason.split(";")[0]) for p in problems] == [
        (name, "not a regular file (fifo)")]
    with pytest.raises(InvalidImageError, match=r"not a regular file \(fifo\)"):
        dicom.classify(tmp_path / name)


# --- (c) manifest parsing ---------------------------------------------------------------------


def _manifest_doc(tmp_path: Path, **case_fields: object) -> Path:
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    case = Case("a", "s1", "ixi", "a.nii.gz", "0" * 64, 1, "T1w", (1, 1, 1), (1.0, 1.0, 1.0))
    doc = {"schema_version": 1, "name": "m", "data_root": ".", "notes": "",
           "split": {"seed": None, "fractions": None, "frozen": False},
           "cases": [{**case.to_dict(), **case_fields}]}
    doc["digest"] = content_digest(doc)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("literal, shown", [
    ("1" * 5001, "integer of 5001 digits"),
    ("-" + "9" * 50, "integer of 50 digits"),
    (str(2**64), "18446744073709551616"),
    ("1e999", "inf"),
    ("1.5", "1.5"),
])
def test_huge_or_odd_json_number_names_the_field(tmp_path: Path, literal: str,
                                                 shown: str) -> None:
    path = _manifest_doc(tmp_path)
    path.write_text(path.read_text().replace('"bytes": 1', f'"bytes": {literal}'))
    with pytest.raises(ManifestError, match=r"cases\[0\] \(case 'a'\)\.bytes") as info:
        load_manifest(path, check_files=False)
    assert shown in str(info.value)


def test_huge_integer_in_split_seed(tmp_path: Path) -> None:
    path = _manifest_doc(tmp_path)
    path.write_text(path.read_text().replace('"seed": null', f'"seed": {"7" * 5001}'))
    with pytest.raises(ManifestError, match=r"split\.seed.*integer of 5001 digits"):
        load_manifest(path, check_files=False)


@pytest.mark.parametrize("field, value", [
    ("case_id", "a\n"), ("source_id", "ixi\n"), ("sha256", "0" * 64 + "\n"),
    ("series_uid", "1.2.3\n"), ("series_uid", "1.2.x"), ("series_uid", "1." + "2" * 70),
])
def test_trailing_newline_or_bad_pattern_is_refused(tmp_path: Path, field: str,
                                                    value: str) -> None:
    path = _manifest_doc(tmp_path, **{field: value})
    with pytest.raises(ManifestError, match=rf"\.{field}"):
        load_manifest(path, check_files=False)


def test_series_uid_round_trips_and_is_optional(tmp_path: Path) -> None:
    path = _manifest_doc(tmp_path, series_uid="1.2.840.10008.5")
    assert load_manifest(path, check_files=False).cases[0].series_uid == "1.2.840.10008.5"
    plain = Case("a", "s1", "ixi", "a.nii.gz", "0" * 64, 1, "T1w", (1, 1, 1), (1.0, 1.0, 1.0))
    assert "series_uid" not in plain.to_dict()
