"""Image-quality metrics on volumes scaled to [0, 1]: thin wrappers around `monai.metrics`.

Every function takes ``pred`` and ``target`` of shape (B, 1, D, H, W) and returns one value per
volume, shape (B,), float32 on the input's device. ``pred`` (a decoder output, unbounded) is
clamped to ``[0, data_range]`` first, the range the targets were scaled to.

PSNR of identical volumes is ``inf`` (MONAI's value, no cap); metrics.jsonl stores it as null.
"""

from __future__ import annotations

import math

import torch
from monai.metrics import PSNRMetric, SSIMMetric
from torch import Tensor

SSIM_WINDOW = 11  # MONAI's default Gaussian window (sigma 1.5)


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape or pred.ndim != 5 or pred.shape[1] != 1:
        raise ValueError(
            f"metrics need pred and target of the same (B, 1, D, H, W) shape, received "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )


def _prepare(pred: Tensor, target: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    """Plain float32 tensors (no MetaTensor), ``pred`` clamped to ``[0, data_range]``."""
    _check_pair(pred, target)
    pred = torch.as_tensor(pred).detach().float().clamp(0.0, data_range)
    return pred, torch.as_tensor(target).detach().float()


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per volume: ``20 log10(range) - 10 log10(MSE)`` -> (B,).

    ``inf`` where a volume is reproduced exactly.
    """
    pred, target = _prepare(pred, target, data_range)
    return PSNRMetric(max_val=data_range, reduction="none")(pred, target).reshape(-1)


def ssim_window(spatial_shape: tuple[int, ...], window: int = SSIM_WINDOW) -> int:
    """The SSIM window size: `window`, shrunk (to an odd size) to fit the smallest axis."""
    fit = min(window, *spatial_shape)
    return fit if fit % 2 else max(1, fit - 1)


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity per volume (3D Gaussian window, sigma 1.5) -> (B,); 1 = identical."""
    pred, target = _prepare(pred, target, data_range)
    window = ssim_window(tuple(pred.shape[2:]))
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=window, reduction="none")
    return metric(pred, target).reshape(-1)


def mean_of(values: list[float]) -> float:
    """Mean of per-volume values (``inf`` stays ``inf``; nan for an empty list)."""
    return math.fsum(values) / len(values) if values else math.nan
