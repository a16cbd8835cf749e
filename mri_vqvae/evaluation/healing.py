"""Healed reconstructions: a voxel-level anomaly map from the prior (after Pinaya et al., 2022).

The latents the prior finds unlikely, ``p < HEAL_P`` (more than ``HEAL_BITS`` bits), are
redrawn by the prior from the kept ones (`CompletingPrior.complete`, `HEAL_DRAWS` seeded draws),
each healed grid is decoded, and the map is the mean absolute difference between the scan and
those healed reconstructions, weighted by the redraw mask (block-upsampled and smoothed with
MONAI's `GaussianSmooth`, sigma one latent block): where no latent was redrawn the VQ-VAE's own
reconstruction error is not the prior's doing. Where the likelihood map scores a whole 4^3 block,
this one points at the voxels the prior would change. The threshold and the number of draws are
fixed here, not fitted to any lesion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from monai.transforms import GaussianSmooth

from mri_vqvae.evaluation.passes import Scorer
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.models.priors.base import CompletingPrior
from mri_vqvae.tasks.likelihood import block_upsample

HEAL_P = 0.005
HEAL_BITS = -math.log2(HEAL_P)  # 7.64 bits
HEAL_DRAWS = 4


@dataclass(frozen=True)
class HealedMap:
    """The healed-residual map (X, Y, Z) float32 and the share of latents redrawn."""

    residual: np.ndarray
    redrawn: float


@dataclass(frozen=True)
class Healer:
    """What healing a case needs: the VQ-VAE, the scorer (prior and class labels), a seed."""

    model: VQVAE
    scorer: Scorer
    seed: int

    def available(self) -> bool:
        """Whether the prior can redraw part of a grid."""
        return isinstance(self.scorer.prior, CompletingPrior)

    @torch.no_grad()
    def heal(self, case_id: str, volume: np.ndarray, indices: torch.Tensor,
             latent_bits: np.ndarray) -> HealedMap | None:
        """The map of one case: scan (X, Y, Z), its codes (d, h, w), the prior's bits per latent
        (d, h, w). None when the prior cannot complete grids or does not know the case's class."""
        if not self.available() or not self.scorer.knows(case_id):
            return None
        device = next(self.model.parameters()).device
        flagged = torch.from_numpy(np.asarray(latent_bits) > HEAL_BITS).to(device)
        grids = indices.to(device)[None].expand(HEAL_DRAWS, *indices.shape)
        labels = self.scorer.labels(case_id, device)
        labels = None if labels is None else labels.expand(HEAL_DRAWS)
        generator = torch.Generator(device).manual_seed(self.seed)
        prior = cast(CompletingPrior, self.scorer.prior)
        healed = prior.complete(grids, flagged[None].expand_as(grids), generator, labels)
        volumes = self.model.decode_indices(healed).float()[:, 0].clamp(0, 1).cpu().numpy()
        residual = np.abs(volumes - np.asarray(volume, np.float32)[None]).mean(axis=0)
        factor = self.model.factor
        weight = block_upsample(flagged.cpu().numpy().astype(np.float32), factor)
        weight = np.asarray(GaussianSmooth(sigma=float(factor))(weight[None]))[0]
        return HealedMap((residual * weight).astype(np.float32), float(flagged.float().mean()))
