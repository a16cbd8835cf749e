"""Image-quality metrics on volumes scaled to [0, 1]: built on `monai.metrics`.

`METRICS` / `CASE_METRICS` name them once for every table, CSV and summary.

Every metric takes ``pred`` and ``target`` of shape (B, 1, D, H, W) (the masked ones also a
``mask`` of the same shape, 1 = inside) and returns one value per volume, shape (B,), float32 on
the input's device. ``pred`` (a decoder output, unbounded) is clamped to ``[0, data_range]``
first, the range the targets were scaled to.

* PSNR (MONAI; of identical volumes ``inf``, no cap: metrics.jsonl stores it as null);
  `masked_psnr` over the voxels of a mask; NMSE ``sum (pred - target)^2 / sum target^2``;
* SSIM (MONAI's 3D Gaussian window, `ssim_window`); `masked_ssim` is the SSIM map averaged over
  the windows whose centre voxel is in the mask;
* MS-SSIM (``monai.metrics.MultiScaleSSIMMetric``) with the settings of `ms_ssim_settings`: up
  to 3 scales (Wang et al.'s first weights renormalised: 0.0711, 0.4530, 0.4760) and the largest
  odd Gaussian window <= 7 (sigma 1.5) that MONAI accepts for the volume. 64 x 80 x 64 volumes get
  3 scales and a 7-voxel window (the coarsest scale is 16 voxels); 16^3 test volumes 3 scales and a
  3-voxel window. The five-scale, 11-voxel default needs >= 161 voxels per axis. In
  `masked_ms_ssim` each scale's map is averaged with the mask fraction (average-pooled with the
  images) as weights; with an all-ones mask it equals MONAI's value.
* ``hf_ratio`` (`high_frequency_ratio`): the sharpness of ``pred`` relative to ``target``, the
  energy of the 3D Laplacian of one over that of the other: 1 = as sharp, < 1 blurred.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric
from monai.metrics.regression import compute_ssim_and_cs
from monai.networks.layers import LaplaceFilter, apply_filter
from torch import Tensor

METRICS = ("psnr", "ssim", "ms_ssim", "nmse", "hf_ratio")
"""The reconstruction metrics, in the order every table, CSV and summary shows them."""
CASE_METRICS = METRICS + tuple(f"{m}_foreground" for m in METRICS)
"""Per-case metric names: each metric over the whole volume, then inside the foreground."""

SSIM_WINDOW = 11  # MONAI's default Gaussian window (sigma 1.5)
MS_SSIM_SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, 5 scales
MS_SSIM_MAX_SCALES = 3
MS_SSIM_KERNELS = (7, 5, 3)
SSIM_SIGMA = 1.5


def plain_float(x: Any) -> Tensor:
    """A detached float32 torch tensor (no MetaTensor) of `x` (a tensor, MetaTensor or array)."""
    t = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
    return t.detach().float()


def prepare_pair(pred: Tensor, target: Tensor, data_range: float = 1.0) -> tuple[Tensor, Tensor]:
    """Plain (B, 1, D, H, W) float32 tensors (`plain_float`), ``pred`` clamped to ``[0, range]``."""
    pred, target = plain_float(pred), plain_float(target)
    if pred.shape != target.shape or pred.ndim != 5 or pred.shape[1] != 1:
        raise ValueError(
            f"metrics need pred and target of the same (B, 1, D, H, W) shape, received "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return pred.clamp(0.0, data_range), target


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per volume: ``20 log10(range) - 10 log10(MSE)`` -> (B,).

    ``inf`` where a volume is reproduced exactly.
    """
    pred, target = prepare_pair(pred, target, data_range)
    return PSNRMetric(max_val=data_range, reduction="none")(pred, target).reshape(-1)


def ssim_window(spatial_shape: tuple[int, ...], window: int = SSIM_WINDOW) -> int:
    """The SSIM window size: `window`, shrunk (to an odd size) to fit the smallest axis."""
    fit = min(window, *spatial_shape)
    return fit if fit % 2 else max(1, fit - 1)


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity per volume (3D Gaussian window, sigma 1.5) -> (B,); 1 = identical."""
    pred, target = prepare_pair(pred, target, data_range)
    window = ssim_window(tuple(pred.shape[2:]))
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=window, reduction="none")
    return metric(pred, target).reshape(-1)


@dataclass(frozen=True)
class MsSsimSettings:
    """MS-SSIM window (odd, voxels), per-scale weights (sum 1) and Gaussian sigma."""

    kernel_size: int
    weights: tuple[float, ...]
    sigma: float = SSIM_SIGMA

    def as_dict(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel_size, "sigma": self.sigma,
                "weights": list(self.weights), "scales": len(self.weights)}


def ms_ssim_settings(spatial_shape: Sequence[int]) -> MsSsimSettings:
    """The most scales (<= 3), then the largest window (7, 5, 3) that fit `spatial_shape` (D, H, W).

    A setting fits when MONAI accepts it (``min(shape) // (scales - 1)**2 > kernel - 1``) and the
    coarsest scale is still at least one window wide.
    """
    smallest = min(int(s) for s in spatial_shape)
    for scales in range(MS_SSIM_MAX_SCALES, 0, -1):
        divisor = max(1, scales - 1) ** 2
        coarsest = smallest // 2 ** (scales - 1)
        for kernel in MS_SSIM_KERNELS:
            if smallest // divisor > kernel - 1 and coarsest >= kernel:
                raw = MS_SSIM_SCALE_WEIGHTS[:scales]
                total = math.fsum(raw)
                return MsSsimSettings(kernel, tuple(w / total for w in raw))
    raise ValueError(f"MS-SSIM needs every axis >= 3 voxels, received shape {tuple(spatial_shape)}")


def ms_ssim(pred: Tensor, target: Tensor, data_range: float = 1.0,
            settings: MsSsimSettings | None = None) -> Tensor:
    """Multi-scale SSIM per volume with MONAI's metric: (B, 1, D, H, W) x 2 -> (B,); 1 = equal."""
    pred, target = prepare_pair(pred, target, data_range)
    s = settings or ms_ssim_settings(tuple(pred.shape[2:]))
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=s.kernel_size,
                                  kernel_sigma=s.sigma, weights=s.weights, reduction="none")
    return metric(pred, target).reshape(-1)


def _weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """(B, 1, ...) values and weights -> (B,) weighted means (nan where the weights sum to 0)."""
    w = weights.flatten(1)
    return (values.flatten(1) * w).sum(1) / w.sum(1)


def _window_centres(weights: Tensor, kernel: int) -> Tensor:
    """Crop (B, 1, D, H, W) weights to the centres of the valid windows of size `kernel`."""
    c = (kernel - 1) // 2
    d, h, w = weights.shape[2:]
    return weights[:, :, c:d - c, c:h - c, c:w - c]


def multiscale_per_mask(pred: Tensor, target: Tensor, masks: Sequence[Tensor | None],
                        s: MsSsimSettings, relu: bool = True) -> list[Tensor]:
    """(MS-)SSIM of prepared pred/target (B, 1, D, H, W) averaged over each mask -> [(B,), ...].

    MONAI's formula (`compute_ssim_and_cs` per scale; contrast sensitivity at the finer scales,
    SSIM at the coarsest; relu; product of the values to the scale weights), with each scale's
    map averaged over the windows centred in a mask; None averages every window, which is
    exactly MONAI's value. The maps are computed once for all masks; a mask is average-pooled
    with the images and used as weights. ``relu=False`` with one scale is plain (masked) SSIM.
    """
    weights = [None if m is None else plain_float(m).to(pred.dtype) for m in masks]
    values: list[list[Tensor]] = [[] for _ in masks]
    k = (s.kernel_size,) * 3
    for i in range(len(s.weights)):
        ssim_map, cs_map = compute_ssim_and_cs(pred, target, 3, k, (s.sigma,) * 3)
        last = i == len(s.weights) - 1
        chosen = ssim_map if last else cs_map
        for j, w in enumerate(weights):
            v = (chosen.flatten(1).mean(1) if w is None
                 else _weighted_mean(chosen, _window_centres(w, s.kernel_size)))
            values[j].append(torch.relu(v) if relu else v)
        if not last:
            pred, target = F.avg_pool3d(pred, 2), F.avg_pool3d(target, 2)
            weights = [None if w is None else F.avg_pool3d(w, 2) for w in weights]
    exponents = torch.tensor(s.weights, dtype=pred.dtype, device=pred.device).view(-1, 1)
    return [torch.prod(torch.stack(v) ** exponents, dim=0) for v in values]


def masked_ms_ssim(pred: Tensor, target: Tensor, mask: Tensor, data_range: float = 1.0,
                   settings: MsSsimSettings | None = None) -> Tensor:
    """MS-SSIM with each scale's map averaged over `mask` (B, 1, D, H, W) -> (B,).

    Computed by `multiscale_per_mask`: per scale the mask is average-pooled with the images and
    used as weights; with an all-ones mask this equals MONAI's MS-SSIM.
    """
    pred, target = prepare_pair(pred, target, data_range)
    pred, target = pred / data_range, target / data_range
    s = settings or ms_ssim_settings(tuple(pred.shape[2:]))
    return multiscale_per_mask(pred, target, [mask], s)[0]


def masked_ssim(pred: Tensor, target: Tensor, mask: Tensor, data_range: float = 1.0) -> Tensor:
    """SSIM (the window of `ssim`) averaged over windows centred in `mask` -> (B,)."""
    pred, target = prepare_pair(pred, target, data_range)
    pred, target = pred / data_range, target / data_range
    window = ssim_window(tuple(pred.shape[2:]))
    return multiscale_per_mask(pred, target, [mask], MsSsimSettings(window, (1.0,)), relu=False)[0]


def nmse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Normalised squared error ``sum (pred - target)^2 / sum target^2`` over `mask` -> (B,)."""
    pred, target = prepare_pair(pred, target, 1.0)
    w = torch.ones_like(target) if mask is None else plain_float(mask)
    err = ((pred - target) ** 2 * w).flatten(1).sum(1)
    return err / (target**2 * w).flatten(1).sum(1)


def masked_psnr(pred: Tensor, target: Tensor, mask: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR in dB over the voxels of `mask` -> (B,); inf where they are reproduced exactly."""
    pred, target = prepare_pair(pred, target, data_range)
    w = plain_float(mask)
    mse = ((pred - target) ** 2 * w).flatten(1).sum(1) / w.flatten(1).sum(1)
    return 20 * math.log10(data_range) - 10 * torch.log10(mse)


def laplacian_energy(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum of the squared 3D Laplacian (MONAI's 3x3x3 `LaplaceFilter`) of (B, 1, D, H, W) `x`
    over the interior voxels (no padding), weighted by `mask` there when given -> (B,)."""
    lap = apply_filter(x, LaplaceFilter(3, 3).filter, padding="valid")
    w = torch.ones_like(lap) if mask is None else _window_centres(plain_float(mask), 3)
    return (lap**2 * w).flatten(1).sum(1)


def high_frequency_ratio(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sharpness of a reconstruction relative to its input -> (B,).

    ``sum (L pred)^2 / sum (L target)^2`` with L the 3D Laplacian (MONAI's 3x3x3 `LaplaceFilter`,
    a high-pass), summed over the interior voxels of (B, 1, D, H, W) volumes, or over those in
    `mask` (same shape, 1 = inside). 1.0 exactly for identical volumes; < 1 where ``pred`` is
    blurred (smoothing removes Laplacian energy); > 1 where it adds noise or ringing. ``pred`` is
    clamped to [0, 1] first. nan (undefined) where ``target`` has no Laplacian energy there (a
    constant volume, an empty mask).
    """
    pred, target = prepare_pair(pred, target, 1.0)
    reference = laplacian_energy(target, mask)
    ratio = laplacian_energy(pred, mask) / reference
    return torch.where(reference > 0, ratio, torch.full_like(ratio, math.nan))


def mean_of(values: list[float]) -> float:
    """Mean of per-volume values (``inf`` stays ``inf``; nan for an empty list)."""
    return math.fsum(values) / len(values) if values else math.nan
