"""The MONAI chain: RAS output of the configured shape and spacing, [0, 1] scaling, replayable."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mri_vqvae.config import AugmentConfig, DataConfig, load_config
from mri_vqvae.core.errors import InvalidImageError
from mri_vqvae.data.transforms import augmentation_steps, build_transforms
from tests.support.volumes import make_head, write_nifti

SMOKE = load_config("smoke")


def run_chain(path: Path, data: DataConfig = SMOKE.data, **kw: object) -> torch.Tensor:
    return build_transforms(data, **kw)({"image": str(path)})["image"]


def test_output_shape_spacing_and_ras(head_nifti: Path) -> None:
    image = run_chain(head_nifti)
    assert tuple(image.shape) == (1, *SMOKE.data.spatial_size)
    assert image.dtype == torch.float32
    affine = np.asarray(image.affine)
    # RAS: a diagonal with positive entries equal to the target spacing (input was axis-aligned)
    np.testing.assert_allclose(np.diag(affine)[:3], SMOKE.data.spacing, atol=1e-5)
    np.testing.assert_allclose(affine[:3, :3] - np.diag(np.diag(affine)[:3]), 0, atol=1e-6)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")


def test_intensity_scaled_to_unit_range_with_zero_padding(tmp_path: Path) -> None:
    big_pad = DataConfig(spacing=(3.0, 3.0, 3.0), spatial_size=(32, 32, 32))
    image = run_chain(write_nifti(tmp_path / "h.nii.gz", make_head()), big_pad)
    assert float(image.min()) == 0.0 and float(image.max()) == pytest.approx(1.0)
    assert torch.all(image[:, :2] == 0), "padded border must be exactly the background value"


def test_orientation_flip_matches_reference(tmp_path: Path) -> None:
    """An LPS-stored volume comes out as the RAS-stored copy of the same anatomy."""
    vol = make_head((20, 22, 18))
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    lps = ras.copy()
    lps[0, 0], lps[1, 1] = -2.0, -2.0
    lps[:3, 3] = [2.0 * 19, 2.0 * 21, 0.0]  # same world box
    cfg = DataConfig(spacing=(2.0, 2.0, 2.0), spatial_size=(20, 22, 18), crop_foreground=False,
                     percentiles=(0.0, 100.0))
    a = run_chain(write_nifti(tmp_path / "ras.nii.gz", vol, ras), cfg)
    b = run_chain(write_nifti(tmp_path / "lps.nii.gz", vol[::-1, ::-1].copy(), lps), cfg)
    torch.testing.assert_close(a.as_tensor(), b.as_tensor(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(a.affine), np.asarray(b.affine), atol=1e-5)


def test_training_steps_are_named_and_replayable(head_nifti: Path) -> None:
    names = [n for n, _ in augmentation_steps(AugmentConfig())]
    assert names == ["affine", "elastic", "bias_field", "contrast", "noise"]
    aug = AugmentConfig(elastic={"prob": 0.0}, affine={"prob": 1.0}, noise={"prob": 1.0})
    a = run_chain(head_nifti, augment=aug, train=True, seed=5)
    b = run_chain(head_nifti, augment=aug, train=True, seed=5)
    c = run_chain(head_nifti, augment=aug, train=True, seed=6)
    assert torch.equal(a.as_tensor(), b.as_tensor())
    assert not torch.equal(a.as_tensor(), c.as_tensor())
    assert tuple(a.shape) == (1, *SMOKE.data.spatial_size)


def test_disabled_augmentation_equals_eval_chain(head_nifti: Path) -> None:
    off = AugmentConfig(enabled=False)
    a = run_chain(head_nifti, augment=off, train=True)
    b = run_chain(head_nifti)
    assert torch.equal(a.as_tensor(), b.as_tensor())


def test_bad_input_surfaces_project_error(tmp_path: Path) -> None:
    bad = tmp_path / "constant.nii.gz"
    write_nifti(bad, np.ones((10, 10, 10), np.float32))
    with pytest.raises(Exception) as info:
        run_chain(bad)
    cause = info.value
    while not isinstance(cause, InvalidImageError) and cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, InvalidImageError)
    assert "constant.nii.gz" in str(cause)
