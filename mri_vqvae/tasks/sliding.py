"""Volumes larger than the training size: sliding-window reconstruction and whole-volume codes.

A VQ-VAE is trained on volumes of ``data.spatial_size``, the window (roi). A volume of exactly
that size is reconstructed by one forward pass, bit for bit as before. A larger field of view
(``reconstruct --spatial-size``, ``Model.reconstruct(path, spatial_size=...)``: the same
preprocessing chain padded or cropped to a larger box) is reconstructed with MONAI's
`sliding_window_inference`: windows of the roi, each through the whole autoencoder (encode,
quantize, decode), overlapping by `SlidingWindow.overlap` of the roi and blended with a Gaussian
importance map (``mode="gaussian"``, sigma ``sigma_scale`` x roi), so each window's border, where
its zero padding differs from the whole volume's context, weighs little. The model's peak
memory is the roi's whatever the volume (plus the volume-sized output buffers).

Code grids of such a volume (`encode_grid`): the encoder is convolutional, so it runs over the
whole volume at once, after zero padding (the background value) at the end of each axis up to a
multiple of the downsampling factor ``model.factor``: latent ``(i, j, k)`` then covers voxels
``[i f, (i + 1) f)`` as it does at the training size, and the grid is ``ceil(shape / f)``.
``codes_used`` of a sliding-window reconstruction counts the codes of that grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import Tensor

from mri_vqvae.config import DataConfig
from mri_vqvae.core.errors import MriVqvaeError

BLEND_MODES = ("gaussian", "constant")


class SlidingWindowError(MriVqvaeError, ValueError):
    """Sliding-window settings or a field of view that cannot be used (says which and why)."""


@dataclass(frozen=True)
class SlidingWindow:
    """How a volume other than the training size is reconstructed (see the module doc).

    roi: the window (D, H, W), the training ``data.spatial_size``; overlap: the fraction of the
    roi neighbouring windows share, in [0, 1); mode: ``gaussian`` or ``constant`` blending;
    sigma_scale: the Gaussian's sigma as a fraction of the roi; batch_size: windows per forward.
    """

    roi: tuple[int, int, int]
    overlap: float = 0.5
    mode: str = "gaussian"
    sigma_scale: float = 0.125
    batch_size: int = 1

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem is not None:
            raise SlidingWindowError(f"sliding window: {problem}")

    def _problem(self) -> str | None:
        if len(self.roi) != 3 or min(self.roi) <= 0:
            return f"roi must be three positive sizes (D, H, W), got {tuple(self.roi)}"
        if not 0.0 <= self.overlap < 1.0:
            return (f"overlap must be a fraction of the window in [0, 1), got {self.overlap}; "
                    "0.5 is the default")
        if self.mode not in BLEND_MODES:
            return f"mode must be one of {BLEND_MODES}, got {self.mode!r}"
        if not self.sigma_scale > 0:
            return f"sigma_scale must be > 0 (a fraction of the roi), got {self.sigma_scale}"
        if self.batch_size < 1:
            return f"batch_size must be >= 1 window per forward pass, got {self.batch_size}"
        return None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "roi": list(self.roi)}


def field_of_view(data: DataConfig, spatial_size: Sequence[int] | None, overlap: float = 0.5
                  ) -> tuple[DataConfig, SlidingWindow | None]:
    """The data config preprocessing to `spatial_size` (None: the training size) and the window
    that reconstructs it (None at the training size, where one forward pass does)."""
    window = SlidingWindow(tuple(data.spatial_size), overlap)
    if spatial_size is None or tuple(spatial_size) == tuple(data.spatial_size):
        return data, None
    size = tuple(int(s) for s in spatial_size)
    smaller = len(size) != 3 or any(s < r for s, r in zip(size, data.spatial_size, strict=True))
    if smaller:
        raise SlidingWindowError(
            f"spatial size {size} must be (D, H, W) and at least the training size "
            f"{tuple(data.spatial_size)} on every axis (a larger field of view); leave it unset "
            "for the training size")
    if math.prod(size) > data.max_voxels:
        raise SlidingWindowError(
            f"spatial size {size} holds {math.prod(size)} voxels, over data.max_voxels="
            f"{data.max_voxels}; choose a smaller box")
    return data.model_copy(update={"spatial_size": size}), window


@torch.no_grad()
def encode_grid(model: torch.nn.Module, x: Tensor) -> Tensor:
    """x (B, 1, D, H, W) of any size -> indices (B, ceil(D/f), ceil(H/f), ceil(W/f)) int64:
    the encoder over the whole volume, zero-padded at the end of each axis to a multiple of f."""
    f = int(model.factor)
    pad = [(-s) % f for s in reversed(x.shape[2:])]
    padded = F.pad(x, [p for after in pad for p in (0, after)]) if any(pad) else x
    return model.encode_indices(padded)


@torch.no_grad()
def reconstruct_volume(model: torch.nn.Module, x: Tensor, window: SlidingWindow | None = None
                       ) -> tuple[Tensor, Tensor]:
    """x (B, 1, D, H, W) -> (reconstruction (B, 1, D, H, W) float32 clamped to [0, 1],
    indices (B, d, h, w)): one forward pass when `window` is None or the volume is its roi,
    else MONAI's sliding window over the whole autoencoder and `encode_grid`'s codes."""
    if window is None or tuple(x.shape[2:]) == window.roi:
        out = model(x)
        return out.reconstruction.float().clamp(0, 1), out.indices
    recon = sliding_window_inference(
        x, window.roi, window.batch_size, lambda patch: model(patch).reconstruction.float(),
        overlap=window.overlap, mode=window.mode, sigma_scale=window.sigma_scale)
    return torch.as_tensor(recon).float().clamp(0, 1), encode_grid(model, x)
