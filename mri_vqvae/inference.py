"""Inference on volumes larger than the training shape: sliding-window reconstruction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor

from mri_vqvae.models.autoencoders.vqvae.model import VQVAE


@torch.no_grad()
def reconstruct(
    model: VQVAE,
    volume: Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
) -> Tensor:
    """Reconstruct ``volume`` (B, 1, D, H, W) window by window -> (B, 1, D, H, W) float32.

    Windows of `roi_size` (each axis a multiple of ``2**levels``; check with
    ``model.latent_shape``) overlap by the fraction `overlap` and are blended with `mode`
    (``gaussian`` or ``constant``); a volume smaller than a window is zero-padded and cropped
    back. The model runs in eval mode (the codebook never moves) and is restored to its previous
    mode afterwards.
    """
    model.latent_shape(roi_size)  # raises SpatialShapeError for a window the model cannot take
    if volume.ndim != 5 or volume.shape[1] != 1:
        raise ValueError(
            f"reconstruct expects a (B, 1, D, H, W) volume, received shape {tuple(volume.shape)}"
        )
    was_training = model.training
    model.eval()
    try:
        out = sliding_window_inference(
            torch.as_tensor(volume).float(),
            roi_size=tuple(int(s) for s in roi_size),
            sw_batch_size=sw_batch_size,
            predictor=lambda x: model(x).reconstruction.float(),
            overlap=overlap,
            mode=mode,
        )
    finally:
        model.train(was_training)
    assert isinstance(out, Tensor)
    return torch.as_tensor(out)
