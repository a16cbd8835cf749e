"""Reconstruction quality of one case: every metric of `CASE_METRICS`, whole volume and foreground.

Values are on the [0, 1] scale (the decoder output is clamped to it first); the foreground is
``target > FOREGROUND``. See `mri_vqvae.metrics.image` for the MS-SSIM settings and the
masked forms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from mri_vqvae.metrics.image import (
    MsSsimSettings,
    high_frequency_ratio,
    masked_psnr,
    ms_ssim_settings,
    multiscale_per_mask,
    nmse,
    prepare_pair,
    psnr,
    ssim_window,
)

FOREGROUND = 0.05  # intensity on the [0, 1] scale above which a voxel counts as foreground


@dataclass(frozen=True)
class CaseQuality:
    """Reconstruction metrics of one case; its metric fields are exactly `CASE_METRICS`."""

    case_id: str
    subject_id: str
    split: str
    psnr: float
    ssim: float
    ms_ssim: float
    nmse: float
    hf_ratio: float
    psnr_foreground: float
    ssim_foreground: float
    ms_ssim_foreground: float
    nmse_foreground: float
    hf_ratio_foreground: float
    codes_used: int


def quality_of(pred: Tensor, target: Tensor, item: Mapping[str, Any], indices: Tensor
               ) -> CaseQuality:
    """Every metric of one reconstruction: pred, target (1, 1, D, H, W), indices (1, d, h, w).

    SSIM and MS-SSIM maps are computed once for the whole volume and the foreground together.
    """
    pred, target = prepare_pair(pred, target, 1.0)
    mask = (target > FOREGROUND).float()
    shape = tuple(target.shape[2:])
    ssim_all, ssim_fg = multiscale_per_mask(pred, target, [None, mask],
                                            MsSsimSettings(ssim_window(shape), (1.0,)),
                                            relu=False)
    ms_all, ms_fg = multiscale_per_mask(pred, target, [None, mask], ms_ssim_settings(shape))
    return CaseQuality(
        case_id=str(item["case_id"]),
        subject_id=str(item.get("subject_id", "")),
        split=str(item.get("split", "")),
        psnr=float(psnr(pred, target)[0]),
        ssim=float(ssim_all[0]),
        ms_ssim=float(ms_all[0]),
        nmse=float(nmse(pred, target)[0]),
        hf_ratio=float(high_frequency_ratio(pred, target)[0]),
        psnr_foreground=float(masked_psnr(pred, target, mask)[0]),
        ssim_foreground=float(ssim_fg[0]),
        ms_ssim_foreground=float(ms_fg[0]),
        nmse_foreground=float(nmse(pred, target, mask)[0]),
        hf_ratio_foreground=float(high_frequency_ratio(pred, target, mask)[0]),
        codes_used=int(indices.unique().numel()),
    )
