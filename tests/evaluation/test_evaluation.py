"""Held-out reconstruction quality: per-case metrics agree with a direct computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mri_vqvae.artifacts.checkpoint import load_checkpoint, save_checkpoint
from mri_vqvae.config import load_config
from mri_vqvae.core.errors import CheckpointError
from mri_vqvae.data.manifest import Case, Manifest, sha256_file
from mri_vqvae.data.transforms import build_transforms
from mri_vqvae.evaluation.evaluate import evaluate_reconstruction
from mri_vqvae.evaluation.metrics import psnr, ssim
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from tests.support.volumes import make_head, write_nifti

CFG = load_config("smoke")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = VQVAE(CFG.autoencoder).eval()
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, model, "vqvae", CFG.autoencoder,
                    extra={"experiment": CFG.model_dump(mode="json")})
    return folder


def _manifest(root: Path) -> Manifest:
    root.mkdir()
    vols = {"a": make_head(seed=1), "b": make_head(seed=2), "flat": np.ones((9, 9, 9), np.float32)}
    cases = []
    for name, vol in vols.items():
        path = write_nifti(root / f"{name}.nii.gz", vol)
        cases.append(Case(case_id=name, subject_id=name, source_id="syn", path=path.name,
                          sha256=sha256_file(path), bytes=path.stat().st_size, modality="T1w",
                          shape=vol.shape, spacing=(1.5, 1.5, 1.5), split="test"))
    return Manifest(name="m", cases=tuple(cases), data_root=root)


def test_metrics_match_direct_computation(checkpoint: Path, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "data")
    report = evaluate_reconstruction(checkpoint, manifest, "test")
    assert [c.case_id for c in report.cases] == ["a", "b"]
    assert [f.case_id for f in report.failures] == ["flat"]
    model = load_checkpoint(checkpoint).model
    codebook = model.quantizer.codebook.clone()
    chain = build_transforms(CFG.data)
    codes: set[int] = set()
    for case in report.cases:
        image = chain({"image": str(tmp_path / "data" / f"{case.case_id}.nii.gz")})["image"]
        x = torch.as_tensor(image).unsqueeze(0)
        with torch.no_grad():
            out = model(x)
        assert case.psnr == pytest.approx(float(psnr(out.reconstruction, x)[0]), rel=1e-6)
        assert case.ssim == pytest.approx(float(ssim(out.reconstruction, x)[0]), rel=1e-6)
        codes.update(out.indices.unique().tolist())
    assert report.codes_used == len(codes) <= CFG.autoencoder.codebook_size
    summary = report.summary()
    assert summary["mean_psnr"] == pytest.approx(np.mean([c.psnr for c in report.cases]))
    assert summary["codebook_usage"] == pytest.approx(len(codes) / CFG.autoencoder.codebook_size)
    assert torch.equal(codebook, model.quantizer.codebook), "evaluation must not move the codebook"


def test_checkpoint_without_experiment_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    save_checkpoint(folder, VQVAE(CFG.autoencoder), "vqvae", CFG.autoencoder)
    with pytest.raises(CheckpointError, match="no experiment config"):
        evaluate_reconstruction(folder, _manifest(tmp_path / "data"), "test")
