"""PSNR / SSIM wrappers: exact values on identical volumes, the PSNR of known Gaussian noise."""

from __future__ import annotations

import math

import pytest
import torch

from mri_vqvae.metrics.image import mean_of, psnr, ssim, ssim_window


def _smooth_volume(shape: tuple[int, int, int] = (16, 16, 16)) -> torch.Tensor:
    """A (1, 1, D, H, W) volume in [0.25, 0.75]: noise added below stays inside [0, 1]."""
    grids = torch.meshgrid(*[torch.linspace(0, math.pi, n) for n in shape], indexing="ij")
    return (0.5 + 0.25 * torch.sin(grids[0]) * torch.cos(grids[1]))[None, None]


def test_identical_volumes_give_infinite_psnr_and_unit_ssim() -> None:
    x = _smooth_volume().repeat(2, 1, 1, 1, 1)
    assert psnr(x, x).shape == (2,)
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(2), atol=1e-6, rtol=0)


def test_gaussian_noise_gives_the_expected_psnr() -> None:
    sigma = 0.05
    x = _smooth_volume((24, 24, 24))
    noisy = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    expected = -20 * math.log10(sigma)  # MSE = sigma**2 with data range 1: 26.02 dB
    assert float(psnr(noisy, x)[0]) == pytest.approx(expected, abs=0.15)
    assert float(ssim(noisy, x)[0]) < float(ssim(x + 0.5 * (noisy - x), x)[0]) < 1.0


def test_prediction_is_clamped_to_the_data_range() -> None:
    ones = torch.ones(1, 1, 12, 12, 12)
    assert torch.isinf(psnr(ones + 3.0, ones)).all()  # 4.0 clamps to 1.0: a perfect match
    assert float(psnr(torch.zeros_like(ones), ones)[0]) == pytest.approx(0.0, abs=1e-6)


def test_ssim_window_fits_small_volumes() -> None:
    assert ssim_window((64, 80, 64)) == 11
    assert ssim_window((8, 16, 16)) == 7
    x = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    assert float(ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-6)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="same"):
        psnr(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 4))


def test_mean_of() -> None:
    assert mean_of([1.0, 2.0]) == 1.5
    assert mean_of([1.0, math.inf]) == math.inf
    assert math.isnan(mean_of([]))
