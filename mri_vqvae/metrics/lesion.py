"""How well a voxel score (a likelihood map) separates lesion voxels from the rest of the head.

Volumes are (X, Y, Z) numpy arrays on one preprocessed grid. There is no brain extraction here,
so the region the negatives come from is the head mask (``> FOREGROUND``) eroded by a ball of
``margin`` voxels: scalp and the field-of-view edge, where a prior's surprise is highest for
reasons that have nothing to do with pathology, are left out. Lesion voxels are the positives.
The AUROC is MONAI's (`monai.metrics.compute_roc_auc`, ties counted as half): 0.5 is chance, 1.0
ranks every lesion voxel above every other voxel of the region.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_roc_auc

from mri_vqvae.metrics.quality import FOREGROUND


def inner_head(volume: np.ndarray, margin: int, foreground: float = FOREGROUND) -> np.ndarray:
    """The voxels of the head mask (``volume > foreground``) at least `margin` voxels (Euclidean)
    from anything outside it, the field-of-view edge counting as outside: (X, Y, Z) bool."""
    head = np.asarray(volume) > foreground
    if margin <= 0:
        return head
    axis = np.arange(-margin, margin + 1)
    ball = (axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
            <= margin**2)
    outside = F.pad(torch.from_numpy(~head).float()[None, None], (margin,) * 6, value=1.0)
    hits = F.conv3d(outside, torch.from_numpy(ball).float()[None, None])
    return hits[0, 0].numpy() < 0.5


def lesion_auroc(score: np.ndarray, lesion: np.ndarray, region: np.ndarray) -> float:
    """AUROC of `score` for lesion voxels against the other voxels of `region`.

    `score`, `lesion` (bool) and `region` (bool) are (X, Y, Z); lesion voxels count as positives
    wherever they are inside ``region | lesion``. NaN when there is no positive or no negative.
    """
    score, lesion = np.asarray(score, np.float64), np.asarray(lesion, bool)
    if score.shape != lesion.shape or score.shape != np.shape(region):
        raise ValueError(f"score {score.shape}, lesion {lesion.shape} and region "
                         f"{np.shape(region)} must be on one grid")
    keep = np.asarray(region, bool) | lesion
    positives = int(lesion[keep].sum())
    if positives == 0 or positives == int(keep.sum()):
        return math.nan
    auc = compute_roc_auc(torch.from_numpy(score[keep]), torch.from_numpy(lesion[keep]).long())
    return float(auc)
