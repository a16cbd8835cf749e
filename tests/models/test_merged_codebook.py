"""benchmarks/merged_codebook.py: a VQ-VAE copy whose codebook is merged into fewer codes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mri_vqvae.artifacts.checkpoint import load_checkpoint, save_checkpoint
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from tests.support.paths import REPO
from tests.support.runs import TINY_VQ

_SPEC = importlib.util.spec_from_file_location("merged_codebook",
                                               REPO / "benchmarks/merged_codebook.py")
assert _SPEC is not None and _SPEC.loader is not None
merged_codebook = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(merged_codebook)


def _vqvae(tmp_path: Path) -> tuple[Path, VQVAE]:
    torch.manual_seed(0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    model = VQVAE(TINY_VQ)
    model.quantizer.ema_count.copy_(torch.arange(1.0, TINY_VQ.codebook_size + 1))
    (tmp_path / "manifest.json").write_text(json.dumps({"cases": []}))
    return save_checkpoint(tmp_path / "vqvae", model, "vqvae", TINY_VQ, {"note": "kept"}), model


def test_weighted_kmeans_with_as_many_centres_as_points_returns_the_points() -> None:
    points = torch.randn(6, 3)
    centres, assign = merged_codebook.weighted_kmeans(points, torch.ones(6), 6)
    assert torch.allclose(centres[assign], points.double())
    assert sorted(assign.tolist()) == list(range(6))


def test_weighted_kmeans_centre_is_the_weighted_mean_of_its_points() -> None:
    points = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    centres, assign = merged_codebook.weighted_kmeans(points, torch.tensor([1.0, 3, 1, 1]), 2)
    means = sorted(float(c) for c in centres[:, 0])
    assert means == pytest.approx([0.75, 10.5])
    assert assign[0] == assign[1] != assign[2] == assign[3]


def test_merged_model_keeps_encoder_and_decoder_and_uses_at_most_the_merged_codes(
        tmp_path: Path) -> None:
    folder, original = _vqvae(tmp_path / "src")
    report = merged_codebook.merge(folder, 4, tmp_path / "out")
    merged = load_checkpoint(tmp_path / "out/vqvae")
    assert merged.config["codebook_size"] == 4 and report["codes"] == 4
    assert merged.extra["note"] == "kept" and merged.extra["merged_codebook"]["from_codes"] == 16
    copied = (tmp_path / "out/manifest.json").read_text()
    assert copied == (tmp_path / "src/manifest.json").read_text()
    x = torch.rand(2, 1, 16, 20, 12)
    codes = merged.model.encode_indices(x)
    assert int(codes.max()) < 4
    with torch.no_grad():
        assert torch.equal(merged.model.encode(x), original.encode(x))
        z_q = merged.model.quantizer.embed(codes)
        assert torch.equal(merged.model.decode_indices(codes), original.decode(z_q))
