"""Volumes larger than the training size: sliding-window reconstruction, whole-volume codes,
the settings' checks and `reconstruct --spatial-size` / `Model.reconstruct(spatial_size=...)`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from monai.inferers import sliding_window_inference

import mri_vqvae
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.tasks.reconstruct import ReconstructError
from mri_vqvae.tasks.sliding import (
    SlidingWindow,
    SlidingWindowError,
    encode_grid,
    field_of_view,
    reconstruct_volume,
)
from pipelines.cli import cli
from tests.support.runs import CFG, make_manifest, make_vqvae_run


@pytest.fixture(scope="module")
def model() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(CFG.autoencoder).eval()


def _smooth(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """(1, 1, *shape) smooth random intensities in [0, 1]."""
    x = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(seed))
    return F.avg_pool3d(x, 5, 1, 2)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sliding")
    manifest, path = make_manifest(root, {"a0": "test"})
    return {"root": root, "manifest": path, "vqvae": make_vqvae_run(root / "runs",
                                                                    manifest.digest)}


def test_a_volume_of_the_roi_is_one_forward_pass_bit_for_bit(model: VQVAE) -> None:
    x = _smooth((16, 16, 16))
    recon, indices = reconstruct_volume(model, x, SlidingWindow((16, 16, 16)))
    with torch.no_grad():
        out = model(x)
    assert torch.equal(recon, out.reconstruction.float().clamp(0, 1))
    assert torch.equal(indices, out.indices)


def test_a_larger_volume_is_monais_sliding_window_and_agrees_inside(model: VQVAE) -> None:
    x = _smooth((32, 32, 64))
    window = SlidingWindow((32, 32, 32), overlap=0.5)
    recon, indices = reconstruct_volume(model, x, window)
    assert recon.shape == x.shape and torch.isfinite(recon).all()
    with torch.no_grad():
        reference = sliding_window_inference(
            x, (32, 32, 32), 1, lambda p: model(p).reconstruction.float(), overlap=0.5,
            mode="gaussian", sigma_scale=0.125)
        full = model(x).reconstruction.float().clamp(0, 1)
    torch.testing.assert_close(recon, reference.clamp(0, 1), rtol=0, atol=1e-6)
    # windows start at multiples of the factor, so away from the outer faces (where MONAI's
    # truncated Gaussian weighs all windows alike) the blend equals the whole-volume pass
    inside = (recon - full)[..., 8:24, 8:24, 8:56].abs()
    assert inside.max() < 5e-3 and inside.mean() < 5e-4
    assert torch.equal(indices, model.encode_indices(x))


def test_codes_of_a_volume_off_the_factor_are_those_of_its_end_padded_volume(model: VQVAE
                                                                              ) -> None:
    x = _smooth((16, 20, 18))  # factor 4: H and W are padded to 20 and 20
    grid = encode_grid(model, x)
    assert grid.shape == (1, 4, 5, 5)
    assert torch.equal(grid, model.encode_indices(F.pad(x, (0, 2, 0, 0, 0, 0))))


@pytest.mark.parametrize(("settings", "named"), [
    ({"overlap": 1.0}, "overlap"), ({"overlap": -0.1}, "overlap"), ({"mode": "linear"}, "mode"),
    ({"sigma_scale": 0.0}, "sigma_scale"), ({"batch_size": 0}, "batch_size"),
    ({"roi": (16, 16)}, "roi"), ({"roi": (16, 0, 16)}, "roi"),
])
def test_bad_window_settings_are_refused_by_name(settings: dict, named: str) -> None:
    with pytest.raises(SlidingWindowError, match=named):
        SlidingWindow(**{"roi": (16, 16, 16), **settings})


def test_field_of_view_widens_only_a_larger_box() -> None:
    assert field_of_view(CFG.data, None) == (CFG.data, None)
    assert field_of_view(CFG.data, (16, 16, 16)) == (CFG.data, None)
    data, window = field_of_view(CFG.data, (16, 24, 32), overlap=0.25)
    assert data.spatial_size == (16, 24, 32) and data.spacing == CFG.data.spacing
    assert window == SlidingWindow((16, 16, 16), overlap=0.25)
    with pytest.raises(SlidingWindowError, match="at least the training size"):
        field_of_view(CFG.data, (16, 8, 32))
    with pytest.raises(SlidingWindowError, match="max_voxels"):
        field_of_view(CFG.data, (16, 16, 10**9))
    with pytest.raises(SlidingWindowError, match="overlap"):
        field_of_view(CFG.data, None, overlap=1.5)


def test_reconstruct_spatial_size_writes_the_larger_box_like_the_api(world: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    args = ["reconstruct", "--vqvae", str(world["vqvae"]), "--manifest", str(world["manifest"]),
            "--out", str(tmp_path / "r"), "--device", "cpu", "--threads", "1"]
    result = CliRunner().invoke(cli, [*args, "--spatial-size", "16,16,32"])
    assert result.exit_code == 0, result.output
    image = nib.load(str(tmp_path / "r" / "images" / "a0.nii.gz"))
    assert image.shape == (16, 16, 32)
    identity = json.loads((tmp_path / "r" / "reconstruct.json").read_text())
    assert identity["sliding_window"]["roi"] == [16, 16, 16]
    assert identity["data"]["spatial_size"] == [16, 16, 32]
    api = mri_vqvae.load(world["vqvae"]).reconstruct(world["root"] / "data" / "a0.nii.gz",
                                                       spatial_size=(16, 16, 32))
    np.testing.assert_array_equal(np.asarray(api.dataobj), np.asarray(image.dataobj))
    np.testing.assert_allclose(api.affine, image.affine, atol=1e-6)
    again = CliRunner().invoke(cli, [*args, "--spatial-size", "16,16,32", "--overlap", "0.25"])
    assert isinstance(again.exception, ReconstructError)
    assert "sliding_window" in str(again.exception)
    bad = CliRunner().invoke(cli, [*args, "--spatial-size", "16,16"])
    assert bad.exit_code == 2 and "D,H,W" in bad.output
