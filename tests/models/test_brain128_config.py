"""The shipped 1.5 mm config (configs/brain128.yaml): what its comments claim, and one training
step of its VQ-VAE (at a reduced size, and once at full size: slow)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mri_vqvae.config import ExperimentConfig, load_config
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE


def _one_step(config: ExperimentConfig) -> VQVAE:
    """One forward/backward/AdamW step of the config's VQ-VAE on a batch of 1 random volume."""
    torch.manual_seed(0)
    model = VQVAE(config.autoencoder).train()
    x = torch.rand(1, 1, *config.data.spatial_size)
    out = model(x)
    assert out.reconstruction.shape == x.shape
    loss = F.l1_loss(out.reconstruction.float(), x) + out.commitment_loss
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=1e-4).step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()
               if p.requires_grad)
    return model


def test_brain128_is_1p5_mm_on_brain64s_grid_with_its_prior() -> None:
    config, brain64 = load_config("brain128"), load_config("brain64")
    assert config.data.spacing == (1.5, 1.5, 1.5)
    model = VQVAE(config.autoencoder)
    assert model.latent_shape(config.data.spatial_size) == (16, 20, 16)
    assert model.latent_shape(config.data.spatial_size) == VQVAE(brain64.autoencoder).latent_shape(
        brain64.data.spatial_size)
    assert config.prior == brain64.prior  # the same grids, so the same prior
    assert config.prior.codebook_size == config.autoencoder.codebook_size


def test_brain128_trains_one_step_at_a_reduced_size() -> None:
    config = load_config("brain128", ["data.spatial_size=[32, 40, 32]",
                                      "autoencoder.gradient_checkpointing=true"])
    model = _one_step(config)
    assert model.config.gradient_checkpointing


@pytest.mark.slow
def test_brain128_trains_one_step_at_full_size() -> None:
    _one_step(load_config("brain128"))
