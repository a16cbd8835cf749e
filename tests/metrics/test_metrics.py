"""PSNR / SSIM wrappers: exact values on identical volumes, the PSNR of known Gaussian noise; the
high-frequency ratio: 1 for identical volumes, below 1 and falling with blur, above 1 with noise."""

from __future__ import annotations

import math

import pytest
import torch
from monai.transforms import GaussianSmooth

from mri_vqvae.metrics.image import high_frequency_ratio, mean_of, psnr, ssim, ssim_window
from tests.support.volumes import make_head


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


def _head() -> torch.Tensor:
    """A (1, 1, 24, 28, 20) head-like volume in [0.25, 0.75] (noise added below stays inside)."""
    head = torch.from_numpy(make_head())
    return (0.25 + 0.5 * head / head.max())[None, None]


def test_high_frequency_ratio_of_identical_volumes_is_exactly_one() -> None:
    x = _head().repeat(2, 1, 1, 1, 1)
    assert high_frequency_ratio(x, x).tolist() == [1.0, 1.0]
    mask = (x > 0.3).float()
    assert high_frequency_ratio(x, x, mask).tolist() == [1.0, 1.0]
    ones = torch.ones_like(x)
    y = GaussianSmooth(1.0)(x[0])[None]
    assert float(high_frequency_ratio(y, x[:1], ones[:1])[0]) == float(
        high_frequency_ratio(y, x[:1])[0])


def test_high_frequency_ratio_falls_with_blur_and_rises_with_noise() -> None:
    x = _head()
    ratios = [float(high_frequency_ratio(GaussianSmooth(s)(x[0])[None], x)[0])
              for s in (0.5, 1.0, 2.0)]
    assert 1.0 > ratios[0] > ratios[1] > ratios[2] > 0.0
    noisy = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert float(high_frequency_ratio(noisy, x)[0]) > 1.0


def test_high_frequency_ratio_of_a_flat_target_is_nan() -> None:
    flat = torch.full((1, 1, 8, 8, 8), 0.5)
    assert math.isnan(float(high_frequency_ratio(_head()[..., :8, :8, :8], flat)[0]))
