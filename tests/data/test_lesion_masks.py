"""Lesion masks as case annotations: the manifest field, verification, digests, preprocessing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mri_vqvae.config import load_config
from mri_vqvae.core.errors import ManifestError, innermost_error
from mri_vqvae.data.case import parse_case
from mri_vqvae.data.datasets import case_items
from mri_vqvae.data.manifest import (
    load_manifest,
    verify_manifest,
    with_annotations,
    write_manifest,
)
from mri_vqvae.data.transforms import (
    BRAIN,
    BRAIN_SHA256,
    LESION,
    LESION_SHA256,
    build_transforms,
    with_masks,
)
from pipelines.cli import cli
from tests.support.runs import annotate_brains, annotate_lesions, make_manifest
from tests.support.volumes import make_head, oblique_affine, write_nifti

CFG = load_config("smoke")


@pytest.fixture()
def annotated(tmp_path: Path) -> tuple[Path, str]:
    """An annotated manifest (te0, te1 with masks) written out, and the unannotated digest."""
    manifest, _ = make_manifest(tmp_path)
    path = tmp_path / "annotated.json"
    write_manifest(annotate_lesions(manifest, ("te0", "te1")), path)
    return path, manifest.digest


def test_a_case_with_a_mask_round_trips_and_both_fields_are_required(
        annotated: tuple[Path, str]) -> None:
    manifest = load_manifest(annotated[0], verify_checksums=True)
    case = next(c for c in manifest.cases if c.case_id == "te0")
    assert case.lesion_mask == "te0_lesion.nii.gz" and len(str(case.lesion_mask_sha256)) == 64
    assert parse_case(case.to_dict(), "here") == case
    assert "lesion_mask" not in next(c for c in manifest.cases if c.case_id == "tr0").to_dict()
    half = {k: v for k, v in case.to_dict().items() if k != "lesion_mask_sha256"}
    with pytest.raises(ManifestError, match="lesion_mask.*both"):
        parse_case(half, "m.json")


def test_annotations_leave_the_unannotated_digest_matching(annotated: tuple[Path, str]) -> None:
    manifest = load_manifest(annotated[0])
    assert manifest.digest != annotated[1]
    assert manifest.unannotated_digest == annotated[1]
    assert manifest.matches(annotated[1]) and manifest.matches(manifest.digest)
    other = dataclasses.replace(manifest, cases=manifest.cases[1:])
    assert not other.matches(annotated[1])


def test_a_brain_mask_is_an_annotation_like_the_lesion_mask(annotated: tuple[Path, str],
                                                            tmp_path: Path) -> None:
    """It round-trips, needs its sha256, is verified by name, reaches the items, and a run that
    recorded the digest before it (or before both masks) still matches."""
    with_lesions = load_manifest(annotated[0])
    path = tmp_path / "brains.json"
    write_manifest(annotate_brains(with_lesions, ("te0",)), path)
    manifest = load_manifest(path, verify_checksums=True)
    case = next(c for c in manifest.cases if c.case_id == "te0")
    assert case.brain_mask == "te0_brain.nii.gz" and parse_case(case.to_dict(), "m") == case
    half = {k: v for k, v in case.to_dict().items() if k != "brain_mask_sha256"}
    with pytest.raises(ManifestError, match="brain_mask.*both"):
        parse_case(half, "m.json")
    assert manifest.matches(with_lesions.digest) and manifest.matches(annotated[1])
    item = next(i for i in case_items(manifest, CFG.data) if i["case_id"] == "te0")
    assert item[BRAIN].endswith("te0_brain.nii.gz") and item[BRAIN_SHA256] == case.brain_mask_sha256
    (manifest.data_root / "te0_brain.nii.gz").unlink()
    (problem,) = verify_manifest(manifest, checksums=False)
    assert (problem.case_id, problem.path) == ("te0", "te0_brain.nii.gz")
    assert "missing brain mask" in problem.reason


def test_annotations_join_the_same_cases_of_another_manifest(annotated: tuple[Path, str],
                                                              tmp_path: Path) -> None:
    """with_annotations copies the brain mask of te0 from a manifest that has it; te1, whose
    image differs there (another sha256), gets nothing; lesion masks already there are kept."""
    with_lesions = load_manifest(annotated[0])
    source = annotate_brains(with_lesions, ("te0", "te1"))
    source = dataclasses.replace(source, cases=tuple(
        dataclasses.replace(c, sha256="0" * 64) if c.case_id == "te1" else c
        for c in source.cases))
    joined = with_annotations(with_lesions, source)
    by_id = {c.case_id: c for c in joined.cases}
    assert by_id["te0"].brain_mask == "te0_brain.nii.gz" and by_id["te1"].brain_mask is None
    assert by_id["te0"].lesion_mask == "te0_lesion.nii.gz"
    assert joined.unannotated_digest == with_lesions.unannotated_digest
    assert joined.matches(with_lesions.digest)


def test_an_altered_mask_byte_is_caught_by_name(annotated: tuple[Path, str]) -> None:
    manifest = load_manifest(annotated[0])
    mask = manifest.data_root / "te1_lesion.nii.gz"
    data = bytearray(mask.read_bytes())
    data[40] ^= 0xFF
    mask.write_bytes(bytes(data))
    problems = verify_manifest(manifest)
    assert [(p.case_id, p.path) for p in problems] == [("te1", "te1_lesion.nii.gz")]
    assert "lesion mask sha256" in problems[0].reason
    result = CliRunner().invoke(cli, ["manifest", "verify", str(annotated[0])])
    assert result.exit_code != 0 and "te1_lesion.nii.gz" in result.output


def test_a_missing_or_escaping_mask_is_a_problem(annotated: tuple[Path, str],
                                                 tmp_path: Path) -> None:
    manifest = load_manifest(annotated[0])
    (manifest.data_root / "te0_lesion.nii.gz").unlink()
    (problem,) = verify_manifest(manifest, checksums=False)
    assert problem.case_id == "te0" and "missing lesion mask" in problem.reason
    doc = json.loads(annotated[0].read_text())
    case = next(c for c in doc["cases"] if c["case_id"] == "te1")
    bad = parse_case({**case, "lesion_mask": "../outside.nii.gz"}, "m.json")
    moved = dataclasses.replace(manifest, cases=(bad,))
    (problem,) = [p for p in verify_manifest(moved, checksums=False) if "lesion" in p.reason]
    assert "'..'" in problem.reason


def test_items_carry_the_mask_only_for_annotated_cases(annotated: tuple[Path, str]) -> None:
    manifest = load_manifest(annotated[0])
    items = {i["case_id"]: i for i in case_items(manifest, CFG.data)}
    assert items["te0"][LESION].endswith("te0_lesion.nii.gz")
    te0 = next(c for c in manifest.cases if c.case_id == "te0")
    assert items["te0"][LESION_SHA256] == te0.lesion_mask_sha256
    assert LESION not in items["tr0"]


def _oblique_case(root: Path) -> dict[str, object]:
    """An oblique head with a mask on a bright cube, as a verified dataset item."""
    from mri_vqvae.core.provenance import sha256_file

    head = make_head((30, 34, 24), seed=3)
    mask = np.zeros(head.shape, np.uint8)
    mask[16:22, 14:20, 10:15] = 1
    head[mask > 0] = 160.0  # the lesion is the brightest tissue
    image = write_nifti(root / "head.nii.gz", head, oblique_affine((1.2, 0.9, 2.0)))
    label = write_nifti(root / "label.nii.gz", mask, oblique_affine((1.2, 0.9, 2.0)))
    return {"image": str(image), "root": str(root), "sha256": sha256_file(image),
            LESION: str(label), LESION_SHA256: sha256_file(label)}


def test_the_mask_follows_the_image_through_the_chain(tmp_path: Path) -> None:
    data = CFG.data.model_copy(update={"spacing": (1.5, 1.5, 1.5), "spatial_size": (32, 32, 32)})
    item = _oblique_case(tmp_path)
    alone = build_transforms(data)(dict(item))["image"]
    both = with_masks(data)(dict(item))
    assert torch.equal(alone.as_tensor(), both["image"].as_tensor())  # the image is unchanged
    assert np.allclose(np.asarray(both[LESION].affine), np.asarray(alone.affine))
    mask = both[LESION].as_tensor()[0]
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0}  # nearest neighbour: still a label
    volume_mm3 = float(mask.sum()) * 1.5**3
    assert volume_mm3 == pytest.approx(6 * 6 * 5 * 1.2 * 0.9 * 2.0, rel=0.3)  # a small oblique cube
    image = both["image"].as_tensor()[0]
    assert float(image[mask > 0].mean()) > 0.9  # it sits on the bright cube


def test_a_mask_with_the_wrong_checksum_is_refused_by_name(tmp_path: Path) -> None:
    item = _oblique_case(tmp_path)
    item[LESION_SHA256] = "0" * 64
    with pytest.raises(RuntimeError) as err:  # MONAI wraps what the loader raised
        with_masks(CFG.data)(dict(item))
    inner = innermost_error(err.value)
    assert isinstance(inner, ManifestError)
    assert "label.nii.gz" in str(inner) and "sha256" in str(inner)
