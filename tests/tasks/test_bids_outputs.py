"""The BIDS-Derivatives view of preprocess, reconstruct, sample and likelihood (one scan and
--manifest): valid names and dataset_description.json, provenance in the sidecars, the id mapping,
files identical to today's outputs, and --part / merge."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from mri_vqvae.artifacts.loading import open_prior_run
from mri_vqvae.data.bids import BidsError
from mri_vqvae.data.manifest import load_manifest
from mri_vqvae.tasks.likelihood_batch import likelihood_manifest
from mri_vqvae.tasks.parts import parse_part
from mri_vqvae.tasks.preprocess import preprocess_manifest
from mri_vqvae.tasks.reconstruct import reconstruct_manifest
from mri_vqvae.tasks.sample import SampleSettings, sample_volumes
from pipelines.cli import cli
from tests.support.bids import bids_files, view_problems
from tests.support.runs import CFG, make_manifest, make_vqvae_run, write_cases

CASES = {"a": "train", "b": "train", "c": "train", "d": "val", "e": "test"}


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five heads (subject sub-<case>), case c unreadable."""
    return write_cases(tmp_path_factory.mktemp("heads"), CASES, bad=("c",))


def _same_files(out: Path, folder: str) -> dict[str, Path]:
    """The view's NIfTI by case, each checked to be the command's own file (one inode)."""
    found = bids_files(out)
    for cid, path in found.items():
        assert os.path.samefile(path, out / folder / f"{cid}.nii.gz"), cid
    return found


def test_preprocess_view_is_valid_and_leaves_todays_files_unchanged(heads: Path,
                                                                     tmp_path: Path) -> None:
    manifest = load_manifest(heads)
    preprocess_manifest(manifest, CFG, tmp_path / "plain")
    preprocess_manifest(manifest, CFG, tmp_path / "bids", bids=True)
    out = tmp_path / "bids"
    assert view_problems(out) == []
    for name in ("index.json", "failures.csv", "images/a.nii.gz", "montages/a.png"):
        assert (out / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    sidecars = [json.loads((d / "cases" / "a.json").read_text()) for d in (out, tmp_path / "plain")]
    assert [{k: v for k, v in s.items() if k != "session"} for s in sidecars] == [
        {k: v for k, v in sidecars[1].items() if k != "session"}] * 2
    found = _same_files(out, "images")
    assert sorted(found) == ["a", "b", "d", "e"]
    assert found["a"].relative_to(out).as_posix() == "sub-a/anat/sub-a_desc-preproc_T1w.nii.gz"
    meta = json.loads(found["a"].with_name("sub-a_desc-preproc_T1w.json").read_text())
    assert (meta["CaseID"], meta["SubjectID"], meta["Modality"]) == ("a", "sub-a", "T1w")
    assert meta["ConfigDigest"] == json.loads((out / "index.json").read_text())["config_digest"]
    assert meta["mri_vqvae"]["source_sha256"] == manifest.cases[0].sha256
    assert (out / "participants.tsv").read_text().splitlines()[1] == "sub-a\tsub-a"
    again, _ = preprocess_manifest(manifest, CFG, out, bids=True)  # reused, view unchanged
    assert len(again) == 4 and view_problems(out) == []
    (out / "images" / "a.nii.gz").unlink()  # recomputed by a run without --bids:
    preprocess_manifest(manifest, CFG, out)  # the view there is kept in step
    assert view_problems(out) == [] and len(_same_files(out, "images")) == 4


def test_colliding_subject_ids_are_disambiguated_and_mapped(tmp_path: Path) -> None:
    manifest, _ = make_manifest(tmp_path, {"x": "train", "y": "train"},
                                subjects={"x": "p_1", "y": "p-1"})
    preprocess_manifest(manifest, CFG, tmp_path / "out", bids=True)
    out = tmp_path / "out"
    assert view_problems(out) == []
    rows = dict(line.split("\t") for line in (out / "participants.tsv").read_text().splitlines())
    assert sorted(rows.values())[:2] == ["p-1", "p_1"] and len(rows) == 3
    assert all(k.startswith("sub-p1") and len(k) == 14 for k in rows if k != "participant_id")


def test_preprocess_parts_write_the_view_and_merge_writes_participants(heads: Path,
                                                                      tmp_path: Path) -> None:
    manifest = load_manifest(heads)
    preprocess_manifest(manifest, CFG, tmp_path / "one", bids=True)
    out = tmp_path / "parts"
    for i in (2, 1):
        preprocess_manifest(manifest, CFG, out, part=parse_part(f"{i}/2"), bids=True)
    assert (out / "dataset_description.json").is_file() and not (out / "participants.tsv").exists()
    result = CliRunner().invoke(cli, ["merge", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert view_problems(out) == []
    for name in ("participants.tsv", "dataset_description.json", ".bidsignore",
                 "sub-a/anat/sub-a_desc-preproc_T1w.json"):
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_reconstruct_view_and_parts(tmp_path: Path) -> None:
    manifest, _ = make_manifest(tmp_path, {"a0": "test", "a1": "test", "a2": "test"},
                                bad=("a1",))
    vq = make_vqvae_run(tmp_path / "runs", manifest.digest)
    reconstruct_manifest(vq, manifest, tmp_path / "one", threads=1, bids=True)
    assert view_problems(tmp_path / "one") == []
    found = _same_files(tmp_path / "one", "images")
    meta = json.loads(found["a0"].with_suffix("").with_suffix(".json").read_text())
    assert meta["mri_vqvae"]["vqvae_sha256"] and set(meta["mri_vqvae"]["metrics"])
    out = tmp_path / "parts"
    for i in (1, 2):
        reconstruct_manifest(vq, manifest, out, threads=1, part=parse_part(f"{i}/2"), bids=True)
    assert CliRunner().invoke(cli, ["merge", str(out)]).exit_code == 0
    assert view_problems(out) == [] and sorted(bids_files(out)) == ["a0", "a2"]


def test_likelihood_manifest_view_and_parts(heads: Path, run_dir: Path, tmp_path: Path) -> None:
    run = open_prior_run(run_dir)
    manifest = load_manifest(heads)
    likelihood_manifest(run, manifest, tmp_path / "one", bids=True)
    assert view_problems(tmp_path / "one") == []
    found = _same_files(tmp_path / "one", "maps")
    assert found["e"].name == "sub-e_desc-bitsmap_T1w.nii.gz"
    out = tmp_path / "parts"
    for i in (1, 2):
        likelihood_manifest(run, manifest, out, part=parse_part(f"{i}/2"), bids=True)
    assert CliRunner().invoke(cli, ["merge", str(out)]).exit_code == 0
    assert (out / "participants.tsv").read_bytes() == (
        tmp_path / "one" / "participants.tsv").read_bytes()


def test_likelihood_one_scan_cli_writes_a_view_by_default(heads: Path, run_dir: Path,
                                                          tmp_path: Path) -> None:
    scan = tmp_path / "sub-07_ses-2_T1w.nii.gz"
    scan.write_bytes((heads.parent / "a.nii.gz").read_bytes())
    out = tmp_path / "maps"
    args = ["likelihood", "--prior", str(run_dir), "--input", str(scan)]
    result = CliRunner().invoke(cli, [*args, "--out", str(out / "m.nii.gz")])
    assert result.exit_code == 0, result.output
    assert view_problems(out) == []
    path = out / "sub-07/ses-2/anat/sub-07_ses-2_desc-bitsmap_T1w.nii.gz"
    assert os.path.samefile(path, out / "m.nii.gz")
    meta = json.loads(path.with_name("sub-07_ses-2_desc-bitsmap_T1w.json").read_text())
    assert (meta["SubjectID"], meta["SessionID"]) == ("sub-07", "2")
    assert meta["mri_vqvae"]["prior_sha256"]
    again = CliRunner().invoke(cli, [*args, "--out", str(out / "n.nii.gz"), "--no-bids"])
    assert again.exit_code == 0, again.output  # the view there is kept in step
    assert os.path.samefile(path, out / "n.nii.gz") and view_problems(out) == []
    other = tmp_path / "sub-07_ses-2_T1w" / "sub-07_ses-2_T1w.nii.gz"  # same name, other scan
    other.parent.mkdir()
    other.write_bytes(scan.read_bytes())
    refused = CliRunner().invoke(cli, [*args[:-1], str(other), "--out", str(out / "o.nii.gz")])
    assert isinstance(refused.exception, BidsError) and "already holds" in str(refused.exception)
    assert not (out / "o.nii.gz").exists()


def test_sample_view_names_synthetic_subjects_by_class(conditional_dir: Path,
                                                       tmp_path: Path) -> None:
    run = open_prior_run(conditional_dir)
    sample_volumes(run, SampleSettings(num_samples=3, seed=0), tmp_path / "s", bids=True)
    out = tmp_path / "s"
    assert view_problems(out) == []
    found = bids_files(out)
    assert [p.name for p in found.values()] == [
        "sub-synth0000_desc-synthetic_T1w.nii.gz", "sub-synth0001_desc-synthetic_T2w.nii.gz",
        "sub-synth0002_desc-synthetic_T1w.nii.gz"]
    for cid, path in found.items():
        assert os.path.samefile(path, out / cid)
    doc = json.loads((out / "dataset_description.json").read_text())
    assert doc["SourceDatasets"] == [{"Version": run.extra["manifest_digest"]}]
    assert "n/a" in (out / "participants.tsv").read_text()
