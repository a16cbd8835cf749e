"""Likelihood maps of a scan under a prior run (`mri_vqvae.tasks.likelihood`, `likelihood`)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mri_vqvae.artifacts.loading import PriorRun, open_prior_run
from mri_vqvae.data.transforms import build_transforms
from mri_vqvae.models.priors.unigram.model import UnigramPrior
from mri_vqvae.tasks.likelihood import (
    block_upsample,
    likelihood_map,
    resample_to_grid,
    write_likelihood,
)
from mri_vqvae.tasks.sample import SynthesisError, centred_affine
from pipelines.cli import cli
from tests.support.runs import TINY_DATA, TINY_LATENT_SHAPE, split_unigram
from tests.support.volumes import make_head, write_nifti


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A head on an LPS-ish 1.5 mm grid, not the training grid."""
    return write_nifti(tmp_path_factory.mktemp("scan") / "scan.nii.gz", make_head(seed=3))


def test_likelihood_map_on_the_preprocessed_grid(
    prior_run: PriorRun, scan: Path, tmp_path: Path
) -> None:
    result = likelihood_map(prior_run, scan)
    image = build_transforms(TINY_DATA)({"image": str(scan)})["image"]
    x = image[None].float()
    with torch.no_grad():
        indices = prior_run.vqvae.encode_indices(x)
        expected = float(prior_run.prior.grid_bits(indices)[0])
    assert result.bits.shape == TINY_LATENT_SHAPE
    assert result.bits_map.shape == TINY_DATA.spatial_size
    assert np.isclose(result.mean_bits, expected, rtol=1e-5, atol=1e-6)
    assert np.isclose(result.bits_map.mean(dtype=np.float64), expected, rtol=1e-5, atol=1e-6)
    assert (result.bits >= 0).all()
    np.testing.assert_array_equal(result.indices, indices[0].numpy())
    written = write_likelihood(prior_run, result, scan, tmp_path / "map.nii.gz")
    bits_img, input_img = nib.load(str(written.map)), nib.load(str(written.input))
    assert written.input.name == "map_input.nii.gz" and written.montage.is_file()
    assert bits_img.shape == input_img.shape == TINY_DATA.spatial_size
    np.testing.assert_allclose(bits_img.affine, np.asarray(image.affine), atol=1e-5)
    np.testing.assert_allclose(input_img.affine, np.asarray(image.affine), atol=1e-5)
    np.testing.assert_allclose(input_img.get_fdata(), image[0].numpy(), atol=1e-6)
    data = bits_img.get_fdata()
    assert data.min() >= 0
    np.testing.assert_allclose(data, block_upsample(result.bits, 4), rtol=1e-6)
    doc = json.loads(written.sidecar.read_text())
    assert doc["grid"] == "preprocessed" and np.isclose(doc["mean_bits_per_latent"], expected)
    assert doc["bits_are"] == "exact" and doc["label"] is None


def test_block_upsample_fills_each_block_with_its_latent() -> None:
    bits = np.arange(2 * 3 * 1, dtype=np.float32).reshape(2, 3, 1)
    up = block_upsample(bits, 2)
    assert up.shape == (4, 6, 2)
    for i, j, k in np.ndindex(*up.shape):
        assert up[i, j, k] == bits[i // 2, j // 2, k // 2]
    assert up.mean() == pytest.approx(bits.mean())


def test_likelihood_native_cli_matches_input_grid(
    run_dir: Path, scan: Path, tmp_path: Path
) -> None:
    out = tmp_path / "native.nii.gz"
    result = CliRunner().invoke(cli, ["likelihood", "--prior", str(run_dir), "--input", str(scan),
                                      "--out", str(out), "--native"])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "native.json").read_text())
    assert f"mean {doc['mean_bits_per_latent']:.4f} bits/latent" in result.output
    src, bits = nib.load(str(scan)), nib.load(str(out))
    assert bits.shape == src.shape
    np.testing.assert_allclose(bits.affine, src.affine, atol=1e-5)
    assert bits.get_fdata().min() >= 0 and bits.get_fdata().max() > 0
    copy = nib.load(str(tmp_path / "native_input.nii.gz"))
    np.testing.assert_allclose(copy.affine, src.affine, atol=1e-5)
    np.testing.assert_allclose(copy.get_fdata(), src.get_fdata(), atol=1e-4)
    assert doc["grid"] == "native"


def test_unigram_map_is_minus_log2_of_its_table(conditional_dir: Path, scan: Path) -> None:
    run = open_prior_run(conditional_dir)
    assert isinstance(run.prior, UnigramPrior)
    table = torch.softmax(run.prior.logits.detach().double(), dim=1)  # (classes, K)
    for c, name in enumerate(("T1w", "T2w")):
        result = likelihood_map(run, scan, label=name)
        expected = -np.log2(table[c].numpy()[result.indices])
        np.testing.assert_allclose(result.bits, expected, rtol=1e-5)
        assert result.label == name
    t1, t2 = (likelihood_map(run, scan, label=n).bits for n in ("T1w", "T2w"))
    assert not np.allclose(t1, t2)  # the class changes the bits
    assert float(t1.max()) <= -math.log2(float(table[0].min())) + 1e-5


def test_conditional_prior_needs_a_known_label(conditional_dir: Path, run_dir: Path, scan: Path,
                                              tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["likelihood", "--input", str(scan), "--out", str(tmp_path / "m.nii.gz")]
    result = runner.invoke(cli, [*base, "--prior", str(conditional_dir)])
    assert isinstance(result.exception, SynthesisError)
    assert "--label" in str(result.exception) and "['T1w', 'T2w']" in str(result.exception)
    result = runner.invoke(cli, [*base, "--prior", str(conditional_dir), "--label", "PD"])
    assert isinstance(result.exception, SynthesisError) and "'PD'" in str(result.exception)
    result = runner.invoke(cli, [*base, "--prior", str(run_dir), "--label", "T1w"])
    assert isinstance(result.exception, SynthesisError)
    assert "unconditional" in str(result.exception)
    assert not (tmp_path / "m.nii.gz").exists()


class _NoMapPrior(UnigramPrior):
    """A prior whose `bits` has no per-latent map (as an ELBO-only prior would)."""

    likelihood = "bound"

    def bits(self, indices: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        return None

    def grid_bits(self, indices: torch.Tensor, labels: torch.Tensor | None = None
                  ) -> torch.Tensor:
        return torch.full((indices.shape[0],), 3.5)


def test_a_prior_without_a_map_is_refused_clearly(prior_run: PriorRun, scan: Path) -> None:
    run = replace(prior_run, prior=_NoMapPrior(split_unigram(16).config))
    with pytest.raises(SynthesisError, match=r"no per-latent -log2 p.*3\.5000 \(bound\)"):
        likelihood_map(run, scan)


def test_resample_to_grid_keeps_world_positions() -> None:
    """A map whose value is the world x of each voxel keeps it, within half a source voxel."""
    shape, dshape = (16, 20, 12), (24, 28, 20)
    src_affine = centred_affine((3.0, 2.5, 2.0), shape)
    dst_affine = np.diag([-1.5, -1.5, 1.5, 1.0])
    dst_affine[:3, 3] = [17.0, 20.0, -14.0]

    def world(affine: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), -1)
        return ijk @ affine[:3, :3].T + affine[:3, 3]

    out = resample_to_grid(world(src_affine, shape)[..., 0], src_affine, dshape, dst_affine)
    dst_world = world(dst_affine, dshape)
    vox = (dst_world - src_affine[:3, 3]) / np.diag(src_affine)[:3]
    inside = np.all((vox > 0.01) & (vox < np.array(shape) - 1.01), axis=-1)
    assert out.shape == dshape and inside.sum() > 1000
    assert np.abs(out - dst_world[..., 0])[inside].max() <= 1.5 + 1e-4
    assert (out[~np.all((vox > -0.5) & (vox < np.array(shape) - 0.5), axis=-1)] == 0).all()


def test_bad_out_path_is_refused(prior_run: PriorRun, scan: Path, tmp_path: Path) -> None:
    with pytest.raises(SynthesisError, match=r"\.nii\.gz"):
        write_likelihood(prior_run, likelihood_map(prior_run, scan), scan, tmp_path / "map.txt")
