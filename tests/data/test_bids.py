"""BIDS-Derivatives naming (`mri_vqvae.data.bids`): labels, names against the BIDS schema,
dataset_description.json, hard-linked files that follow their image, and refusals."""

from __future__ import annotations

import errno
import json
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest

from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.data import bids
from mri_vqvae.data.case import Case
from tests.support.bids import NAME_RE, _schema, schema_valid, view_problems


def _case(cid: str, subject: str, modality: str = "T1w", session: str | None = None) -> Case:
    return Case(case_id=cid, subject_id=subject, source_id="syn", path=f"{cid}.nii.gz",
                sha256="0" * 64, bytes=1, modality=modality, shape=(4, 4, 4),
                spacing=(1.0, 1.0, 1.0), split="train", session=session)


def test_labels_strip_prefix_and_non_alphanumerics() -> None:
    assert bids.labels(["sub-01", "IXI002", "pat_7.b"]) == {
        "sub-01": "01", "IXI002": "IXI002", "pat_7.b": "pat7b"}
    assert bids.labels(["ses-study1"], "ses-") == {"ses-study1": "study1"}


def test_colliding_ids_get_distinct_hashed_labels_and_others_keep_theirs() -> None:
    got = bids.labels(["a_1", "a-1", "A1", "b2", "___"])
    assert got["b2"] == "b2"
    colliding = [got[i] for i in ("a_1", "a-1", "A1")]
    assert len({g.lower() for g in colliding}) == 3
    assert all(g.lower().startswith("a1") and len(g) == 10 for g in colliding)
    assert len(got["___"]) == 8  # nothing alphanumeric: the hash alone
    assert all(bids.LABEL_RE.fullmatch(v) for v in got.values())
    assert bids.labels(["A1", "a-1", "a_1"]) == {k: got[k] for k in ("A1", "a-1", "a_1")}


def test_case_names_pass_the_bids_schema_and_the_entity_rules() -> None:
    cases = [_case("c1", "sub-01", "T1w", "ses-a"), _case("c2", "sub-01", "FLAIR", "ses-a"),
             _case("c3", "p_2", "T1"), _case("c4", "p_2", "T1"), _case("c5", "q", "T1ce"),
             _case("c6", "r", "DWI"), _case("c7", "s", "pd")]
    names = bids.case_names(cases, "preproc")
    paths = {c: n.path(".nii.gz").as_posix() for c, n in names.items()}
    assert paths["c1"] == "sub-01/ses-a/anat/sub-01_ses-a_desc-preproc_T1w.nii.gz"
    assert paths["c3"] == "sub-p2/anat/sub-p2_run-1_desc-preproc_T1w.nii.gz"
    assert paths["c4"] == "sub-p2/anat/sub-p2_run-2_desc-preproc_T1w.nii.gz"
    assert paths["c5"] == "sub-q/anat/sub-q_ce-gadolinium_desc-preproc_T1w.nii.gz"
    assert paths["c6"].endswith("_desc-preproc_T1w.nii.gz")  # the documented fallback
    assert paths["c7"].endswith("_desc-preproc_PDw.nii.gz")
    assert bids.suffix_of("DWI") == ("T1w", None, True)
    assert len(set(paths.values())) == len(cases)
    for path in paths.values():
        assert schema_valid(path) and NAME_RE.fullmatch(path.rsplit("/", 1)[1]), path
        assert schema_valid(path.replace(".nii.gz", ".json"))
    shuffled = random.Random(0).sample(cases, len(cases))
    assert bids.case_names(shuffled, "preproc") == names  # order-free: parts agree


def test_synthetic_names_pass_the_schema() -> None:
    for i, modality in enumerate((None, "T2w", "FLAIR")):
        path = bids.synthetic_name(i, modality).path(".nii.gz").as_posix()
        assert schema_valid(path) and f"sub-synth{i:04d}_desc-synthetic_" in path


def test_dataset_description_has_the_schema_fields_and_the_digests() -> None:
    doc = bids.dataset_description("preprocess", "abc123", "tiny", "d" * 16, {"VQ-VAE": "e" * 8})
    rules = _schema()[0].rules.json.dataset  # type: ignore[attr-defined]
    required = [f for r in ("dataset_description", "derivative_description")
                for f, level in rules[r].fields.items() if level == "required"]
    assert set(required) <= set(doc)
    assert (doc["BIDSVersion"], doc["DatasetType"]) == ("1.9.0", "derivative")
    generated = doc["GeneratedBy"][0]
    assert generated["Name"] == "mri-vqvae" and generated["Version"]
    assert "abc123" in generated["Description"] and "d" * 16 in generated["Description"]
    assert "CodeURL" not in generated  # pyproject names no project URL
    assert doc["SourceDatasets"] == [{"Name": "tiny", "Version": "d" * 16}]
    assert doc == bids.dataset_description("preprocess", "abc123", "tiny", "d" * 16,
                                           {"VQ-VAE": "e" * 8})  # no time stamp


def _view(tmp_path: Path) -> tuple[Path, bids.BidsName, Path]:
    out = tmp_path / "out"
    bids.start_view(out, True, bids.dataset_description("preprocess", "x", "m", "y"))
    image = out / "images" / "c1.nii.gz"
    atomic_write_text(image, "voxels one")
    return out, bids.case_names([_case("c1", "sub-01")], "preproc")["c1"], image


def test_published_file_is_a_link_that_follows_a_rewritten_image(tmp_path: Path) -> None:
    out, name, image = _view(tmp_path)
    target = bids.publish(out, name, image, {"CaseID": "c1", "SubjectID": "sub-01"})
    assert os.path.samefile(target, image)
    assert bids.publish(out, name, image, {"CaseID": "c1", "SubjectID": "sub-01"}) == target
    atomic_write_text(image, "voxels two")  # the command rewrites the case (a new inode)
    bids.publish(out, name, image, {"CaseID": "c1", "SubjectID": "sub-01"})
    assert target.read_text() == "voxels two" and os.path.samefile(target, image)
    bids.write_participants(out)
    assert (out / "participants.tsv").read_text() == "participant_id\tsubject_id\nsub-01\tsub-01\n"
    assert view_problems(out, official=False) == []  # the "images" are text, not NIfTI


def test_without_hard_links_the_bytes_are_copied(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out, name, image = _view(tmp_path)

    def refuse(src: str, dst: str) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    target = bids.publish(out, name, image, {"CaseID": "c1"})
    assert not os.path.samefile(target, image) and target.read_bytes() == image.read_bytes()
    atomic_write_text(image, "voxels two")
    bids.publish(out, name, image, {"CaseID": "c1"})
    assert target.read_text() == "voxels two"


def test_another_cases_bids_file_is_never_replaced(tmp_path: Path) -> None:
    out, name, image = _view(tmp_path)
    bids.publish(out, name, image, {"CaseID": "c1"})
    with pytest.raises(bids.BidsError, match=r"holds 'c1', not 'other'"):
        bids.publish(out, name, image, {"CaseID": "other"})


def test_a_view_once_started_is_kept_without_bids(tmp_path: Path) -> None:
    out, _, _ = _view(tmp_path)
    description = (out / "dataset_description.json").read_bytes()
    assert bids.start_view(out, False, json.loads(description)) is True
    assert (out / "dataset_description.json").read_bytes() == description
    assert bids.start_view(tmp_path / "plain", False, {}) is False
    assert not (tmp_path / "plain").exists()


def test_description_and_bidsignore_are_rewritten_only_when_they_change(tmp_path: Path) -> None:
    out, _, _ = _view(tmp_path)
    before = {p: p.stat().st_ino for p in (out / "dataset_description.json", out / ".bidsignore")}
    bids.start_view(out, True, bids.dataset_description("preprocess", "x", "m", "y"))
    assert {p: p.stat().st_ino for p in before} == before
    assert "images" in (out / ".bidsignore").read_text().split()


def test_scan_name_reads_subject_session_and_contrast(tmp_path: Path) -> None:
    name, ids = bids.scan_name(tmp_path / "sub-07_ses-2_FLAIR.nii.gz", "bitsmap")
    assert name.path(".nii.gz").as_posix() == (
        "sub-07/ses-2/anat/sub-07_ses-2_desc-bitsmap_FLAIR.nii.gz")
    assert (ids["SubjectID"], ids["SessionID"], ids["Modality"]) == ("sub-07", "2", "FLAIR")
    name, _ = bids.scan_name(tmp_path / "IXI002-Guys-0828-T2.nii.gz", "bitsmap")
    assert replace(name, desc="x").stem == "sub-IXI002_desc-x_T2w"
    assert json.dumps(ids)  # plain JSON
