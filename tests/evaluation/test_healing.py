"""The healed-reconstruction anomaly map: what is redrawn, the map's value, when there is none."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import GaussianSmooth

from mri_vqvae.evaluation.healing import HEAL_BITS, HEAL_DRAWS, Healer
from mri_vqvae.evaluation.passes import Scorer
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.models.priors.absorbing.config import AbsorbingConfig
from mri_vqvae.models.priors.absorbing.model import AbsorbingPrior
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D
from tests.support.runs import CFG, split_unigram
from tests.support.volumes import make_head

SEED = 11


@pytest.fixture(scope="module")
def parts() -> tuple[VQVAE, GatedPixelCNN3D, np.ndarray, torch.Tensor]:
    torch.manual_seed(0)
    model = VQVAE(CFG.autoencoder).eval()
    prior = GatedPixelCNN3D(CFG.prior).eval()
    head = make_head((16, 16, 16))
    volume = (head / head.max()).astype(np.float32)
    with torch.no_grad():
        codes = model.encode_indices(torch.from_numpy(volume)[None, None])[0]
    return model, prior, volume, codes


def test_nothing_unlikely_nothing_redrawn_and_a_zero_map(parts) -> None:
    model, prior, volume, codes = parts
    healed = Healer(model, Scorer(prior), SEED).heal("a", volume, codes, np.zeros((4, 4, 4)))
    assert healed is not None and healed.redrawn == 0.0
    assert healed.residual.shape == volume.shape and not healed.residual.any()


def _absorbing() -> AbsorbingPrior:
    torch.manual_seed(1)
    return AbsorbingPrior(AbsorbingConfig(
        codebook_size=CFG.autoencoder.codebook_size, channels=8, coarse_channels=16,
        attention_heads=2, max_grid_size=8)).eval()


@pytest.mark.parametrize("kind", ["pixelcnn", "absorbing"])
def test_everything_unlikely_is_the_mean_error_of_decoded_samples(parts, kind: str) -> None:
    """With every latent above the threshold the healed grids are the prior's samples for the
    seed (complete == sample), so the map is computed here from `sample` and `decode_indices`."""
    model, prior, volume, codes = parts
    prior = prior if kind == "pixelcnn" else _absorbing()
    bits = np.full((4, 4, 4), HEAL_BITS + 0.01)
    healed = Healer(model, Scorer(prior), SEED).heal("a", volume, codes, bits)
    assert healed is not None and healed.redrawn == 1.0
    with torch.no_grad():
        grids = prior.sample((HEAL_DRAWS, 4, 4, 4), torch.Generator().manual_seed(SEED))
        decoded = model.decode_indices(grids)[:, 0].clamp(0, 1).numpy()
    weight = np.asarray(GaussianSmooth(sigma=4.0)(np.ones((1, 16, 16, 16), np.float32)))[0]
    expected = np.abs(decoded - volume[None]).mean(0) * weight
    np.testing.assert_allclose(healed.residual, expected, rtol=1e-5, atol=1e-6)


def test_the_share_redrawn_is_the_share_above_the_threshold(parts) -> None:
    model, prior, volume, codes = parts
    bits = np.zeros((4, 4, 4))
    bits[0, 1, 2] = bits[3, 3, 3] = bits[2, 0, 1] = HEAL_BITS + 1
    bits[1, 1, 1] = HEAL_BITS  # not above it
    healed = Healer(model, Scorer(prior), SEED).heal("a", volume, codes, bits)
    assert healed is not None and healed.redrawn == pytest.approx(3 / 64)
    # the map is weighted by the redraw mask: largest around the redrawn latents' blocks
    weight_far = healed.residual[4:8, 4:8, 4:8]  # block (1, 1, 1), not redrawn
    assert healed.residual.max() > 0 and weight_far.max() < healed.residual.max()


def test_no_map_when_the_prior_cannot_complete_or_the_class_is_unknown(parts) -> None:
    model, prior, volume, codes = parts
    bits = np.full((4, 4, 4), 20.0)
    unigram = split_unigram(CFG.autoencoder.codebook_size)
    assert not Healer(model, Scorer(unigram), SEED).available()
    assert Healer(model, Scorer(unigram), SEED).heal("a", volume, codes, bits) is None
    conditional = Healer(model, Scorer(prior, {"b": 0}), SEED)
    assert conditional.heal("a", volume, codes, bits) is None
