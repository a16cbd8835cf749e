"""The two floors every prior result is shown beside: uniform codes and the fitted unigram."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mri_vqvae.models.priors.unigram.config import UnigramConfig
from mri_vqvae.models.priors.unigram.model import UnigramPrior


def uniform_bits(codebook_size: int) -> float:
    """Bits per latent of the uniform code distribution: log2 K."""
    return math.log2(codebook_size)


def fitted_unigram(train: Tensor, codebook_size: int) -> UnigramPrior:
    """The add-one smoothed unigram of the train grids (N, d, h, w), unconditional, in eval mode."""
    model = UnigramPrior(UnigramConfig(codebook_size=codebook_size))
    model.prepare(torch.as_tensor(train), None)
    return model.eval()


@torch.no_grad()
def unigram_bits(train: Tensor, grids: Tensor, codebook_size: int) -> float:
    """Mean bits per latent of `grids` (N, d, h, w), N > 0, under the unigram fitted on `train`."""
    grids = torch.as_tensor(grids)
    if grids.numel() == 0:
        raise ValueError("unigram_bits needs at least one grid to evaluate")
    return float(fitted_unigram(train, codebook_size).bits(grids).double().mean())
