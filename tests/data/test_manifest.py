"""Manifests: splits by subject, validation that names the case, verify, merge, folder scans."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mri_vqvae.core.errors import ManifestError
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data.case import Case, Problem
from mri_vqvae.data.catalog import load_catalog
from mri_vqvae.data.manifest import (
    Manifest,
    content_digest,
    load_manifest,
    to_document,
    verify_manifest,
    write_manifest,
)
from mri_vqvae.data.merge import merge_manifests
from mri_vqvae.data.scan import scan_folder
from mri_vqvae.data.splits import assign_splits, split_manifest

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
KIT_SOURCES = ("nilearn-mni152", "pydeface-mean", "pyradiomics-brain", "mricron-ch2",
               "itk-kmeans-t1", "nibabel-anatomical")


def describe(path: Path) -> dict:
    """A stand-in for io.inspect_image: every file is a small 3D volume."""
    return {"shape": (4, 5, 6), "spacing": (1.0, 1.0, 1.2)}


def make_case(root: Path, case_id: str, subject: str, split: str | None = None,
              data: bytes | None = None, **kw) -> Case:
    data = case_id.encode() if data is None else data
    (root / f"{case_id}.nii.gz").write_bytes(data)
    return Case(case_id, subject, "ixi", f"{case_id}.nii.gz", hashlib.sha256(data).hexdigest(),
                len(data), "T1w", (4, 5, 6), (1.0, 1.0, 1.2), split, **kw)


def cohort(root: Path, subjects: int = 10, per_subject: int = 2) -> list[Case]:
    root.mkdir(parents=True, exist_ok=True)
    return [make_case(root, f"s{s:02d}-c{c}", f"s{s:02d}")
            for s in range(subjects) for c in range(per_subject)]


def subject_splits(cases: list[Case]) -> dict[str, set[str | None]]:
    out: dict[str, set[str | None]] = {}
    for c in cases:
        out.setdefault(c.subject_id, set()).add(c.split)
    return out


def write_doc(path: Path, doc: dict) -> Path:
    """Write a hand-made document with a correct digest (so only the intended fault remains)."""
    doc = dict(doc, digest=content_digest(doc))
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def split_manifest_file(tmp_path: Path) -> tuple[Path, Manifest]:
    data = tmp_path / "data"
    m = Manifest("demo", assign_splits(cohort(data), seed=1), 1, None, data)
    path = tmp_path / "m.json"
    write_manifest(m, path)
    return path, m


# --- splits -----------------------------------------------------------------------------------


def test_splits_deterministic_by_subject(tmp_path: Path) -> None:
    cases = cohort(tmp_path, subjects=20)
    a, b = assign_splits(cases, seed=7), assign_splits(list(reversed(cases)), seed=7)
    assert {c.case_id: c.split for c in a} == {c.case_id: c.split for c in b}
    assert all(len(s) == 1 for s in subject_splits(a).values())
    others = [{c.case_id: c.split for c in assign_splits(cases, seed=s)} for s in range(8, 13)]
    assert any(o != {c.case_id: c.split for c in a} for o in others)
    counts = {s: len({c.subject_id for c in a if c.split == s}) for s in ("train", "val", "test")}
    assert counts == {"train": 16, "val": 2, "test": 2}


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 25), per=st.integers(1, 3), seed=st.integers(0, 2**32),
       fractions=st.sampled_from([{"train": 0.8, "val": 0.1, "test": 0.1},
                                  {"train": 0.6, "val": 0.2, "test": 0.2},
                                  {"train": 1.0}]))
def test_split_properties(n: int, per: int, seed: int, fractions: dict) -> None:
    cases = [Case(f"c{s}-{k}", f"sub{s}", "ixi", f"c{s}-{k}.nii", "0" * 64, 1, "T1w",
                  (1, 1, 1), (1.0, 1.0, 1.0)) for s in range(n) for k in range(per)]
    out = assign_splits(cases, fractions, seed)
    assert out == assign_splits(cases, fractions, seed)
    by_subject = subject_splits(out)
    assert all(len(s) == 1 and None not in s for s in by_subject.values())
    used = {next(iter(s)) for s in by_subject.values()}
    if n >= 3 and fractions.get("val"):
        assert {"train", "val", "test"} <= used
    if fractions == {"train": 1.0}:
        assert used == {"train"}


def test_fixed_assignments_win(tmp_path: Path) -> None:
    cases = cohort(tmp_path, subjects=12)
    fixed = {"s00": "test", "s01": "val", "s02": "train", "s03": "test"}
    for seed in range(5):
        out = assign_splits(cases, seed=seed, fixed=fixed)
        got = {c.subject_id: c.split for c in out}
        assert {k: got[k] for k in fixed} == fixed
        assert all(len(s) == 1 for s in subject_splits(out).values())
    with pytest.raises(ManifestError, match="s00"):
        assign_splits(cases, fixed={"s00": "holdout"})


def test_small_cohort_gets_val_and_test(tmp_path: Path) -> None:
    out = assign_splits(cohort(tmp_path, subjects=3), seed=0)
    assert {c.split for c in out} == {"train", "val", "test"}


def test_derived_cases_follow_their_source(tmp_path: Path) -> None:
    cases = cohort(tmp_path, subjects=10, per_subject=1)
    augmented = [dataclasses.replace(c, case_id=f"{c.case_id}-aug", subject_id=f"aug-{c.case_id}",
                                     origin="augmented", derived_from=c.case_id) for c in cases]
    out = {c.case_id: c for c in assign_splits(cases + augmented, seed=3)}
    for a in augmented:
        assert out[a.case_id].split == out[a.derived_from].split


def test_frozen_splits_need_force(split_manifest_file: tuple[Path, Manifest]) -> None:
    path, _ = split_manifest_file
    m = load_manifest(path)
    assert m.frozen
    with pytest.raises(ManifestError, match="frozen"):
        split_manifest(m, seed=2)
    again = split_manifest(m, seed=2, force=True)
    assert again.split_seed == 2 and again.frozen


def test_partial_split_keeps_existing(tmp_path: Path) -> None:
    cases = assign_splits(cohort(tmp_path, subjects=10), seed=0)
    new = cohort(tmp_path, subjects=14)[20:]
    m = Manifest("grow", cases + new, 0, None, tmp_path)
    assert not m.frozen
    out = split_manifest(m, seed=5)
    before = {c.case_id: c.split for c in cases}
    assert all(before[c.case_id] == c.split for c in out.cases if c.case_id in before)
    assert out.frozen


def test_bad_fractions_raise(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="sum to 1"):
        assign_splits(cohort(tmp_path, 3), {"train": 0.5, "val": 0.1, "test": 0.1})
    with pytest.raises(ManifestError, match="holdout"):
        assign_splits(cohort(tmp_path, 3), {"train": 0.5, "holdout": 0.5})


# --- load: each fault raises ManifestError naming the case ----------------------------------


def _doc(tmp_path: Path, cases: list[Case]) -> dict:
    return to_document(Manifest("t", cases, 0, None, tmp_path / "data"), tmp_path)


def test_write_load_round_trip(split_manifest_file: tuple[Path, Manifest]) -> None:
    path, m = split_manifest_file
    loaded = load_manifest(path, verify_checksums=True)
    assert loaded == m and loaded.digest == m.digest
    assert json.loads(path.read_text())["data_root"] == "data"


def test_leakage_raises(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    cases = [make_case(data, "a1", "subA", "train"), make_case(data, "a2", "subA", "test")]
    path = write_doc(tmp_path / "m.json", _doc(tmp_path, cases))
    with pytest.raises(ManifestError, match="subA.*a2|a2.*subA"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="refusing"):
        write_manifest(Manifest("t", cases, 0, None, data), tmp_path / "x.json")


def test_duplicate_case_id_raises(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    c = make_case(data, "dup", "s1")
    twin = dataclasses.replace(c, subject_id="s2")
    path = write_doc(tmp_path / "m.json", _doc(tmp_path, [c, twin]))
    with pytest.raises(ManifestError, match="'dup'.*duplicate"):
        load_manifest(path)


@pytest.mark.parametrize("bad", ["../outside.nii.gz", "/etc/passwd", "a/../../x.nii", "C:/x.nii",
                                 "a\\b.nii", "./a.nii"])
def test_unsafe_paths_raise(tmp_path: Path, bad: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    c = dataclasses.replace(make_case(data, "evil", "s1"), path=bad)
    path = write_doc(tmp_path / "m.json", _doc(tmp_path, [c]))
    with pytest.raises(ManifestError, match="'evil'"):
        load_manifest(path, check_files=False)


def test_symlink_out_of_root_raises(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    secret = tmp_path / "secret.nii.gz"
    secret.write_bytes(b"outside")
    (data / "link.nii.gz").symlink_to(secret)
    c = Case("linked", "s1", "ixi", "link.nii.gz", sha256_file(secret), 7, "T1w", (1, 1, 1),
             (1.0, 1.0, 1.0))
    path = write_doc(tmp_path / "m.json", _doc(tmp_path, [c]))
    with pytest.raises(ManifestError, match="'linked'.*outside the data root"):
        load_manifest(path)


def test_missing_file_and_changed_file_raise(split_manifest_file: tuple[Path, Manifest]) -> None:
    path, m = split_manifest_file
    victim = m.cases[3]
    target = m.data_root / victim.path
    target.write_bytes(target.read_bytes()[::-1])  # same size, other content
    load_manifest(path)  # size-only check passes
    with pytest.raises(ManifestError, match=f"'{victim.case_id}'.*sha256"):
        load_manifest(path, verify_checksums=True)
    target.write_bytes(b"longer content than before")
    with pytest.raises(ManifestError, match=f"'{victim.case_id}'.*size"):
        load_manifest(path)
    target.unlink()
    with pytest.raises(ManifestError, match=f"'{victim.case_id}'.*missing"):
        load_manifest(path)
    assert load_manifest(path, check_files=False) == m


def test_tampered_digest_raises(split_manifest_file: tuple[Path, Manifest]) -> None:
    path, _ = split_manifest_file
    doc = json.loads(path.read_text())
    doc["cases"][0]["split"] = "test" if doc["cases"][0]["split"] != "test" else "val"
    doc["cases"][1]["split"] = doc["cases"][0]["split"]  # same subject: no leakage
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="digest.*edited"):
        load_manifest(path)


def test_data_root_override(split_manifest_file: tuple[Path, Manifest], tmp_path: Path) -> None:
    path, m = split_manifest_file
    moved = tmp_path / "moved"
    (m.data_root).rename(moved)
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(path)
    loaded = load_manifest(path, data_root=moved, verify_checksums=True)
    assert loaded.digest == m.digest and loaded.data_root == moved.resolve()


def test_schema_errors_name_the_field(split_manifest_file: tuple[Path, Manifest]) -> None:
    path, _ = split_manifest_file
    doc = json.loads(path.read_text())
    del doc["cases"][2]["sha256"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"cases\[2\].*'sha256'"):
        load_manifest(path)
    doc["cases"][2]["sha256"] = "0" * 64
    doc["cases"][2]["spacing"] = [1.0, -1.0, 1.0]
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"spacing\[1\]"):
        load_manifest(path)


# --- verify -----------------------------------------------------------------------------------


def test_verify_reports_duplicate_content_and_bad_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    cases = [make_case(data, "one", "s1", data=b"same"), make_case(data, "two", "s2", data=b"same"),
             make_case(data, "three", "s3"), make_case(data, "four", "s4")]
    (data / "four.nii.gz").unlink()
    (data / "three.nii.gz").write_bytes(b"THREE")
    problems = verify_manifest(Manifest("v", cases, None, None, data))
    by_case = {p.case_id: p.reason for p in problems}
    assert "same image content" in by_case["two"] and "'one'" in by_case["two"]
    assert "sha256" in by_case["three"] and "missing" in by_case["four"]
    assert "one" not in by_case
    assert all(isinstance(p, Problem) for p in problems)


def test_verify_clean_manifest(split_manifest_file: tuple[Path, Manifest]) -> None:
    _, m = split_manifest_file
    assert verify_manifest(m, catalog=load_catalog()) == []


# --- merge ------------------------------------------------------------------------------------


def test_merge_rewrites_paths_and_keeps_provenance(tmp_path: Path) -> None:
    a_root, b_root = tmp_path / "a" / "data", tmp_path / "b"
    a = Manifest("a", assign_splits(cohort(a_root, 4), seed=0), 0, None, a_root)
    b_root.mkdir()
    b_cases = [dataclasses.replace(make_case(b_root, f"b-{i}", f"b-sub{i}"), source_id="nfbs",
                                   origin="augmented", derived_from="x") for i in range(3)]
    b = Manifest("b", b_cases, None, None, b_root)
    merged = merge_manifests([a, b], "ab")
    assert merged.data_root == tmp_path.resolve()
    assert verify_manifest(merged) == []
    got = {c.case_id: c for c in merged.cases}
    assert got["s00-c0"].path == "a/data/s00-c0.nii.gz"
    assert (got["b-1"].source_id, got["b-1"].origin, got["b-1"].derived_from) == (
        "nfbs", "augmented", "x")
    assert got["b-1"].path == "b/b-1.nii.gz"
    out = tmp_path / "merged.json"
    write_manifest(merged, out)
    assert load_manifest(out, verify_checksums=True) == merged


def test_merge_refuses_clashes(tmp_path: Path) -> None:
    a = Manifest("a", assign_splits(cohort(tmp_path / "a", 4), seed=0), 0, None, tmp_path / "a")
    with pytest.raises(ManifestError, match="s00-c0.*'a'.*'a2'"):
        merge_manifests([a, dataclasses.replace(a, name="a2")], "x")
    b_cases = [dataclasses.replace(c, case_id="b" + c.case_id) for c in a.cases]
    flipped = [dataclasses.replace(c, split="test" if c.split != "test" else "train")
               for c in b_cases]
    with pytest.raises(ManifestError, match="subject 's0"):
        merge_manifests([a, Manifest("b", flipped, 0, None, tmp_path / "a")], "x")


# --- scanning folders -------------------------------------------------------------------------


def touch(root: Path, rel: str, data: bytes = b"x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data + rel.encode())
    return path


def scan(root: Path, source: str = "src") -> dict[str, Case]:
    cases, problems = scan_folder(root, describe, source)
    assert problems == []
    ids = [c.case_id for c in cases]
    assert len(set(ids)) == len(ids) and all(SAFE_ID.match(i) for i in ids)
    assert [c.case_id for c in scan_folder(root, describe, source)[0]] == ids  # stable
    return {c.path: c for c in cases}


@pytest.mark.parametrize(("source", "files", "expected"), [
    ("openneuro-ds000030",
     ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/ses-2/anat/sub-01_ses-2_T2w.nii.gz",
      "sub-02/anat/sub-02_FLAIR.nii", "sub-02/func/sub-02_task-rest_bold.nii.gz",
      "derivatives/fmriprep/sub-01/anat/sub-01_desc-preproc_T1w.nii.gz",
      "sub-01/anat/sub-01_T1w.json", "participants.tsv"],
     {"sub-01/anat/sub-01_T1w.nii.gz": ("sub-01", "T1w"),
      "sub-01/ses-2/anat/sub-01_ses-2_T2w.nii.gz": ("sub-01", "T2w"),
      "sub-02/anat/sub-02_FLAIR.nii": ("sub-02", "FLAIR")}),
    ("ixi",
     ["IXI002-Guys-0828-T1.nii.gz", "IXI002-Guys-0828-T2.nii.gz", "IXI012-HH-1211-T1.nii.gz",
      "IXI013-IOP-0873-PD.nii.gz"],
     {"IXI002-Guys-0828-T1.nii.gz": ("IXI002", "T1"),
      "IXI002-Guys-0828-T2.nii.gz": ("IXI002", "T2"),
      "IXI012-HH-1211-T1.nii.gz": ("IXI012", "T1"),
      "IXI013-IOP-0873-PD.nii.gz": ("IXI013", "PD")}),
], ids=["bids", "ixi"])
def test_scan_names_subject_and_modality(
    tmp_path: Path, source: str, files: list[str], expected: dict[str, tuple[str, str]]
) -> None:
    """BIDS and IXI names give subject and modality; other files (json, func, derivatives) are
    not images of the dataset."""
    for rel in files:
        touch(tmp_path, rel)
    got = scan(tmp_path, source)
    assert {p: (c.subject_id, c.modality) for p, c in got.items()} == expected
    assert {c.source_id for c in got.values()} == {source}


def test_scan_flat_and_nested(tmp_path: Path) -> None:
    for rel in ["subA_T1.nii.gz", "subA_T2.nii.gz", "subB-scan.nii", "brain1_image.nrrd",
                "head.mha", "patient7/visit1/scan.nii.gz", "notes.txt"]:
        touch(tmp_path, rel)
    got = scan(tmp_path)
    assert {p: (c.subject_id, c.modality) for p, c in got.items()} == {
        "subA_T1.nii.gz": ("subA", "T1"), "subA_T2.nii.gz": ("subA", "T2"),
        "subB-scan.nii": ("subB", "T1w"), "brain1_image.nrrd": ("brain1", "T1w"),
        "head.mha": ("head", "T1w"), "patient7/visit1/scan.nii.gz": ("patient7", "T1w"),
    }
    c = got["subA_T1.nii.gz"]
    assert (c.shape, c.spacing, c.split, c.origin) == ((4, 5, 6), (1.0, 1.0, 1.2), None, "real")
    assert c.sha256 == sha256_file(tmp_path / c.path)
    assert c.bytes == (tmp_path / c.path).stat().st_size


def test_scan_dicom_series_folders(tmp_path: Path) -> None:
    preamble = b"\0" * 128 + b"DICM"
    for i in range(3):
        touch(tmp_path, f"patA/IM{i:04d}.dcm", preamble)
        touch(tmp_path, f"patB/series1/IM{i:04d}", preamble)
        touch(tmp_path, f"patB/series2/{i}.DCM", preamble)
    touch(tmp_path, "patC/README", b"not dicom")
    got = scan(tmp_path)
    assert {p: c.subject_id for p, c in got.items()} == {
        "patA": "patA", "patB/series1": "patB", "patB/series2": "patB"}
    assert got["patA"].bytes == 3 * (len(preamble) + len("patA/IM0000.dcm"))
    manifest = Manifest("dicom", assign_splits(list(got.values())), 0, None, tmp_path)
    assert verify_manifest(manifest) == []
    (tmp_path / "patA" / "IM0001.dcm").write_bytes(preamble + b"patA/IM0001.DCM")
    assert [p.case_id for p in verify_manifest(manifest)] == [got["patA"].case_id]


def test_scan_bad_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    for rel in ["good_T1.nii.gz", "broken.nii.gz", "four_d.nii.gz"]:
        touch(tmp_path, rel)

    def picky(path: Path) -> object:
        if path.name == "broken.nii.gz":
            raise OSError("not a gzip file")
        if path.name == "four_d.nii.gz":
            return {"shape": (4, 5, 6, 3), "spacing": (1, 1, 1, 2)}
        return type("Info", (), {"shape": (4, 5, 6, 1), "spacing": (1.0, 1.0, 1.0, 1.0)})()

    cases, problems = scan_folder(tmp_path, picky, "src")
    assert [c.path for c in cases] == ["good_T1.nii.gz"] and cases[0].shape == (4, 5, 6)
    reasons = {p.path: p.reason for p in problems}
    assert "not a gzip file" in reasons["broken.nii.gz"]
    assert "3D" in reasons["four_d.nii.gz"]


def test_case_ids_are_safe_and_unique(tmp_path: Path) -> None:
    for rel in ["a b.nii.gz", "a_b.nii.gz", "x/y_z.nii", "x_y/z.nii", "é.nii", "dup.nii",
                "dup.nii.gz"]:
        touch(tmp_path, rel)
    assert len(scan(tmp_path)) == 7


def test_scan_rejects_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a folder"):
        scan_folder(tmp_path / "nope", describe, "src")
    with pytest.raises(ManifestError, match="source_id"):
        scan_folder(tmp_path, describe, "../evil")


def test_scan_symlink_out_is_a_problem(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = touch(tmp_path, "outside.nii.gz")
    (root / "link.nii.gz").symlink_to(outside)
    cases, problems = scan_folder(root, describe, "src")
    assert cases == [] and "outside the data root" in problems[0].reason


# --- catalog ----------------------------------------------------------------------------------


def test_catalog_lists_sources_and_is_checked(split_manifest_file, tmp_path: Path) -> None:
    catalog = load_catalog()
    for sid in ("ixi", "nfbs", "oasis-1", "cc-359", "msd-task01-braintumour", "brats", "adni",
                *KIT_SOURCES):
        assert sid in catalog and catalog[sid]["access"] in ("open", "registration",
                                                            "data-use agreement")
    assert any(k.startswith("openneuro-") for k in catalog)
    path, _ = split_manifest_file
    assert load_manifest(path, catalog=catalog).name == "demo"
    with pytest.raises(ManifestError, match="'ixi' is not in the sources catalog"):
        load_manifest(path, catalog={"nfbs": {}})
    bad = tmp_path / "cat.json"
    record = dict(catalog["ixi"], access="free")
    bad.write_text(json.dumps({"schema_version": 1, "sources": [record]}))
    with pytest.raises(ManifestError, match="access"):
        load_catalog(bad)


def test_kit_style_manifest_with_fixed_splits(tmp_path: Path) -> None:
    """The kit passes zero fractions and fixes every subject: that must write and load."""
    cases = cohort(tmp_path / "data", subjects=3, per_subject=1)
    fixed = {"s00": "train", "s01": "val", "s02": "test"}
    m = Manifest("kit", assign_splits(cases, seed=0, fixed=fixed), 0,
                 {"train": 0.0, "val": 0.0, "test": 0.0}, tmp_path / "data", "notes")
    digest = write_manifest(m, tmp_path / "kit.json")
    assert load_manifest(tmp_path / "kit.json").digest == digest == m.digest


# --- property tests: round trip and garbage in ------------------------------------------------

_ident = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True)
_segment = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,8}", fullmatch=True).filter(
    lambda s: s not in (".", ".."))


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    ids = draw(st.lists(_ident, min_size=0, max_size=8, unique=True))
    subjects = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4))
    split_of = {s: draw(st.sampled_from(["train", "val", "test", None])) for s in subjects}
    cases = []
    for cid in ids:
        subject = draw(st.sampled_from(subjects))
        cases.append(Case(
            case_id=cid, subject_id=subject, source_id=draw(_ident),
            path="/".join(draw(st.lists(_segment, min_size=1, max_size=3))),
            sha256=draw(st.from_regex(r"[0-9a-f]{64}", fullmatch=True)),
            bytes=draw(st.integers(0, 2**40)), modality=draw(st.sampled_from(["T1w", "T2", "é"])),
            shape=tuple(draw(st.lists(st.integers(1, 512), min_size=3, max_size=3))),
            spacing=tuple(draw(st.lists(st.floats(1e-3, 10, allow_nan=False), min_size=3,
                                        max_size=3))),
            split=split_of[subject], origin=draw(st.sampled_from(["real", "augmented"])),
            derived_from=draw(st.none() | _ident),
        ))
    fractions = draw(st.none() | st.fixed_dictionaries(
        {"train": st.floats(0, 1), "val": st.floats(0, 1), "test": st.floats(0, 1)}))
    return Manifest(draw(st.text(min_size=1, max_size=10)), cases,
                    draw(st.none() | st.integers(-(2**63), 2**63)), fractions,
                    Path("/tmp/data-root"), draw(st.text(max_size=20)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=manifests())
def test_round_trip_property(m: Manifest, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.getbasetemp() / "roundtrip" / "m.json"
    try:
        digest = write_manifest(m, path)
    except ManifestError:  # derived_from can make a generated manifest leak: refused, fine
        return
    loaded = load_manifest(path, check_files=False)
    assert loaded == m and loaded.digest == digest == m.digest
    assert write_manifest(loaded, path) == digest


def _garble(doc: object, rnd: random.Random, junk: object) -> object:
    """Replace or delete one randomly chosen node of a JSON tree."""
    if isinstance(doc, dict) and doc and rnd.random() < 0.8:
        key = rnd.choice(sorted(doc))
        out = dict(doc)
        if rnd.random() < 0.2:
            del out[key]
        else:
            out[key] = _garble(doc[key], rnd, junk)
        return out
    if isinstance(doc, list) and doc and rnd.random() < 0.8:
        i = rnd.randrange(len(doc))
        return doc[:i] + [_garble(doc[i], rnd, junk)] + doc[i + 1:]
    return junk


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=3)
    | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=_json, seed=st.integers(0, 10**6), raw=st.binary(max_size=40),
       mode=st.sampled_from(["garble", "json", "bytes", "truncate"]))
def test_garbage_always_manifest_error(junk: object, seed: int, raw: bytes, mode: str,
                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.getbasetemp() / "garbage"
    data = base / "data"
    data.mkdir(parents=True, exist_ok=True)
    cases = [make_case(data, "c1", "s1", "train"), make_case(data, "c2", "s2", "test")]
    good = Manifest("g", cases, 0, {"train": 0.5, "val": 0.0, "test": 0.5}, data)
    text = json.dumps(to_document(good, base))
    if mode == "garble":
        text = json.dumps(_garble(json.loads(text), random.Random(seed), junk))
    elif mode == "json":
        text = json.dumps(junk)
    elif mode == "truncate":
        text = text[: seed % len(text)]
    path = base / "m.json"
    path.write_bytes(raw if mode == "bytes" else text.encode())
    try:
        loaded = load_manifest(path, verify_checksums=True)
    except ManifestError:
        return
    assert loaded.digest == good.digest  # only an edit that changed nothing may load


def test_deeply_nested_json_is_a_manifest_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError):
        load_manifest(path)
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "absent.json")
