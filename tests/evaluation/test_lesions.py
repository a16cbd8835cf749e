"""Lesion AUROC of the likelihood maps in `evaluate`: values, the baseline, figures, bad masks.

The VQ-VAE and prior runs record the digest of the manifest *before* its lesion masks were added
(as runs trained on the kit before the masks existed do); evaluate accepts the annotated one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from mri_vqvae.artifacts.checkpoint import load_checkpoint
from mri_vqvae.config import DataConfig
from mri_vqvae.data.manifest import load_manifest, write_manifest
from mri_vqvae.data.transforms import BRAIN, BRAIN_SHA256, LESION, build_transforms, with_masks
from mri_vqvae.evaluation import passes
from mri_vqvae.evaluation.evaluate import EvaluateSettings, evaluate_runs
from mri_vqvae.evaluation.healing import HEAL_P, Healer
from mri_vqvae.evaluation.passes import Scorer
from mri_vqvae.metrics.lesion import inner_head, lesion_auroc
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D
from mri_vqvae.tasks.likelihood import block_upsample
from tests.support.runs import (
    CFG,
    annotate_brains,
    annotate_lesions,
    make_manifest,
    make_smoke_prior_run,
    make_unigram_run,
    make_vqvae_run,
)

HEAD = (40, 44, 36)
SETTINGS = EvaluateSettings(split="test", num_samples=0, report_cases=1, num_resamples=100)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lesions")
    manifest, _ = make_manifest(root, shape=HEAD)  # big enough to keep a region one block in
    vq = make_vqvae_run(root / "runs", manifest.digest)
    prior = make_unigram_run(root / "uni", vq, manifest.digest)
    annotated = root / "annotated.json"
    write_manifest(annotate_lesions(manifest, ("te0", "te1")), annotated)
    return {"root": root, "manifest": annotated, "vqvae": vq, "prior": prior}


def _expected_auroc(world: dict[str, Path], case_id: str, region: np.ndarray | None = None
                    ) -> float:
    """The AUROC from first principles: the unigram run's table over the case's codes, against
    `region` (default: the head eroded by one block)."""
    manifest = load_manifest(world["manifest"])
    case = next(c for c in manifest.cases if c.case_id == case_id)
    item = {"image": str(manifest.data_root / case.path)}
    volume = build_transforms(CFG.data)(dict(item))["image"].as_tensor()
    mask_item = {**item, LESION: str(manifest.data_root / str(case.lesion_mask))}
    mask = with_masks(CFG.data)(mask_item)[LESION].as_tensor()[0].numpy() > 0.5
    model = load_checkpoint(world["vqvae"] / "checkpoints" / "best").model.eval()
    prior = load_checkpoint(world["prior"] / "checkpoints" / "best").model.eval()
    with torch.no_grad():
        codes = model.encode_indices(volume[None].float())[0]
        table = -torch.log_softmax(prior.logits.detach().double(), dim=1)[0] / math.log(2)
    bits = block_upsample(table[codes].numpy(), model.factor)
    if region is None:
        region = inner_head(volume[0].numpy(), model.factor)
    return lesion_auroc(bits, mask, region)


def test_a_brain_mask_is_the_region_a_lesion_is_scored_against(world: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """te0 also records a brain mask: its lesion is scored against the other voxels of the
    preprocessed mask (AUROC from first principles with that region), te1 keeps the head."""
    path = world["root"] / "brains.json"
    write_manifest(annotate_brains(load_manifest(world["manifest"]), ("te0",)), path)
    manifest = load_manifest(path, verify_checksums=True)
    result = evaluate_runs(world["vqvae"], manifest, tmp_path / "e", prior_run=world["prior"],
                           settings=SETTINGS)
    rows = {r["case_id"]: r for r in result.metrics["likelihood"]["lesions"]["cases"]}
    case = next(c for c in manifest.cases if c.case_id == "te0")
    item = {"image": str(manifest.data_root / case.path),
            BRAIN: str(manifest.data_root / str(case.brain_mask))}
    brain = with_masks(CFG.data, {BRAIN: BRAIN_SHA256})(item)[BRAIN].as_tensor()[0].numpy() > 0.5
    assert rows["te0"]["region"] == "brain mask"
    assert rows["te0"]["region_voxels"] == int(brain.sum()) > 0
    assert rows["te0"]["auroc_prior"] == pytest.approx(_expected_auroc(world, "te0", brain),
                                                       abs=1e-9)
    volume = build_transforms(CFG.data)({"image": item["image"]})["image"].as_tensor()[0]
    assert int(brain.sum()) != int(inner_head(volume.numpy(), 4).sum())  # not the head region
    assert rows["te1"]["region"] == "head eroded by one latent block"
    assert "brain mask: " in result.report_path.read_text()


def test_a_case_with_both_masks_is_preprocessed_once(world: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The lesion and the brain mask of te0 come out of one pass of the preprocessing chain;
    te1 (lesion only) takes one pass too."""
    path = world["root"] / "brains_once.json"
    write_manifest(annotate_brains(load_manifest(world["manifest"]), ("te0",)), path)
    calls: list[tuple[str, ...]] = []

    def counting(data: DataConfig, masks: Mapping[str, str] | None = None) -> Compose:
        calls.append(tuple(sorted(masks or {LESION: ""})))
        return with_masks(data, masks)

    monkeypatch.setattr(passes, "with_masks", counting)
    result = evaluate_runs(world["vqvae"], load_manifest(path), tmp_path / "e",
                           prior_run=world["prior"], settings=SETTINGS)
    assert [r["region"] for r in result.metrics["likelihood"]["lesions"]["cases"]] == [
        "brain mask", "head eroded by one latent block"]
    assert sorted(calls) == [(BRAIN, LESION), (LESION,)]


def test_lesion_auroc_of_each_case_equals_the_direct_computation(world: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    result = evaluate_runs(world["vqvae"], load_manifest(world["manifest"]), tmp_path / "e",
                           prior_run=world["prior"], settings=SETTINGS)
    block = result.metrics["likelihood"]["lesions"]
    assert [r["case_id"] for r in block["cases"]] == ["te0", "te1"]
    for row in block["cases"]:
        assert row["auroc_prior"] == pytest.approx(_expected_auroc(world, row["case_id"]),
                                                   abs=1e-9)
        assert 0.0 <= row["auroc_unigram"] <= 1.0 and row["lesion_voxels"] > 0
        assert (tmp_path / "e" / row["figure"]).is_file()
    assert block["mean_auroc_prior"] == pytest.approx(
        np.mean([r["auroc_prior"] for r in block["cases"]]))
    assert block["healed"] is None  # a unigram cannot redraw part of a grid
    assert all(r["auroc_healed"] is None for r in block["cases"])  # NaN is written as null
    page = result.report_path.read_text()
    assert "AUROC prior" in page and "lesion outlined in cyan" in page
    assert "no healed map" in page


def _peaked_pixelcnn_run(world: dict[str, Path]) -> Path:
    """A PixelCNN prior run that puts almost all mass on code 0, so every other code costs more
    than the healing threshold and is redrawn."""
    torch.manual_seed(2)
    prior = GatedPixelCNN3D(CFG.prior).eval()
    with torch.no_grad():
        prior.head_out.bias[0] = 12.0
    digest = load_manifest(world["root"] / "manifest.json").digest
    return make_smoke_prior_run(world["root"] / "pix", world["vqvae"], digest, prior)


def test_healed_map_auroc_of_a_completing_prior(world: dict[str, Path], tmp_path: Path) -> None:
    """With a PixelCNN the block holds the healed map's AUROC per case: the AUROC of the map
    `Healer` gives for that scan, its codes and the prior's bits, with evaluate's seed."""
    run = _peaked_pixelcnn_run(world)
    result = evaluate_runs(world["vqvae"], load_manifest(world["manifest"]), tmp_path / "e",
                           prior_run=run, settings=SETTINGS)
    block = result.metrics["likelihood"]["lesions"]
    assert block["healed"]["redraw_below_p"] == HEAL_P and block["healed"]["seed"] == 0
    model = load_checkpoint(world["vqvae"] / "checkpoints" / "best").model.eval()
    prior = load_checkpoint(run / "checkpoints" / "best").model.eval()
    manifest = load_manifest(world["manifest"])
    for row in block["cases"]:
        case = next(c for c in manifest.cases if c.case_id == row["case_id"])
        item = {"image": str(manifest.data_root / case.path)}
        volume = build_transforms(CFG.data)(dict(item))["image"].as_tensor()[0].numpy()
        mask_item = {**item, LESION: str(manifest.data_root / str(case.lesion_mask))}
        mask = with_masks(CFG.data)(mask_item)[LESION].as_tensor()[0].numpy() > 0.5
        with torch.no_grad():
            codes = model.encode_indices(torch.from_numpy(volume)[None, None])
            bits = prior.bits(codes)[0].numpy()
        healed = Healer(model, Scorer(prior), 0).heal(row["case_id"], volume, codes[0], bits)
        assert healed is not None and 0 < healed.redrawn == row["redrawn_share"]
        expected = lesion_auroc(healed.residual, mask, inner_head(volume, model.factor))
        assert row["auroc_healed"] == pytest.approx(expected, abs=1e-9)
    assert block["mean_auroc_healed"] == pytest.approx(
        np.mean([r["auroc_healed"] for r in block["cases"]]))
    assert "AUROC healed" in result.report_path.read_text()


def test_a_corrupted_mask_is_left_out_and_the_case_still_evaluated(
        world: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = load_manifest(world["manifest"])
    copy = tmp_path / "data"
    copy.mkdir()
    for f in manifest.data_root.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    mask = copy / "te1_lesion.nii.gz"
    data = bytearray(mask.read_bytes())
    data[40] ^= 0xFF
    mask.write_bytes(bytes(data))
    moved = load_manifest(world["manifest"], data_root=copy, check_files=False)
    with caplog.at_level(logging.WARNING):
        result = evaluate_runs(world["vqvae"], moved, tmp_path / "e", prior_run=world["prior"],
                               settings=SETTINGS)
    assert result.metrics["reconstruction"]["num_cases"] == 3
    assert [r["case_id"] for r in result.metrics["likelihood"]["lesions"]["cases"]] == ["te0"]
    assert any("lesion mask of te1" in r.message and "te1_lesion" in r.message
               for r in caplog.records)


def test_a_brain_mask_failing_its_checksum_falls_back_to_the_head_region(
        world: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = world["root"] / "brains_altered.json"
    write_manifest(annotate_brains(load_manifest(world["manifest"]), ("te1",)), path)
    manifest = load_manifest(path)
    case = next(c for c in manifest.cases if c.case_id == "te1")
    manifest = dataclasses.replace(manifest, cases=tuple(
        dataclasses.replace(c, brain_mask_sha256="0" * 64) if c is case else c
        for c in manifest.cases))
    with caplog.at_level(logging.WARNING):
        result = evaluate_runs(world["vqvae"], manifest, tmp_path / "e", prior_run=world["prior"],
                               settings=SETTINGS)
    rows = {r["case_id"]: r for r in result.metrics["likelihood"]["lesions"]["cases"]}
    assert rows["te1"]["region"] == "head eroded by one latent block"
    assert rows["te1"]["auroc_prior"] == pytest.approx(_expected_auroc(world, "te1"), abs=1e-9)
    assert any("brain mask of te1" in r.message for r in caplog.records)


def test_without_masks_there_is_no_lesion_block(world: dict[str, Path], tmp_path: Path) -> None:
    manifest = load_manifest(world["root"] / "manifest.json")  # the same cases, no masks
    result = evaluate_runs(world["vqvae"], manifest, tmp_path / "e", prior_run=world["prior"],
                           settings=SETTINGS)
    assert result.metrics["likelihood"]["lesions"] is None
