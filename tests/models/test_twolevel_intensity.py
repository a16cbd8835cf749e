"""The two-level prior's intensity coarse map (``coarse_features: intensity``): each code's
decoded sub-cell intensities, block features that keep each code in place, clusters of tissue."""

from __future__ import annotations

import pytest
import torch

from mri_vqvae.models import registry
from mri_vqvae.models.priors.base import PriorInputError
from mri_vqvae.models.priors.pixelcnn.config import PixelCNNConfig
from mri_vqvae.models.priors.twolevel import coarse_map
from mri_vqvae.models.priors.twolevel.config import TwoLevelConfig
from mri_vqvae.models.priors.twolevel.model import TwoLevelPrior, state_numel

K = 16
SMALL = {"embedding_dim": 6, "hidden_channels": 8, "num_layers": 3, "head_channels": 12}


def intensity_prior(coarse_codes: int = 4) -> TwoLevelPrior:
    torch.manual_seed(5)
    cfg = TwoLevelConfig(codebook_size=K, coarse_codes=coarse_codes, context_dim=5,
                         coarse_features="intensity", coarse=PixelCNNConfig(**SMALL),
                         fine=PixelCNNConfig(**SMALL))
    return TwoLevelPrior(cfg).eval()


def decoded_from_cells(cells: torch.Tensor, voxels: int) -> torch.Tensor:
    """A volume (N, 1, D, H, W) holding constant sub-cells ``cells`` (N, 2d, 2h, 2w), each
    ``voxels // 2`` voxels wide: what a decoder with ``voxels`` per latent would give."""
    half = voxels // 2
    out = cells
    for axis in (1, 2, 3):
        out = out.repeat_interleave(half, dim=axis)
    return out[:, None].double()


def test_code_intensity_is_the_mean_of_each_codes_sub_cells() -> None:
    """Code 1 sits twice with different cells: its row is their mean; code 3 is absent: zeros."""
    indices = torch.tensor([[[[1, 2], [1, 0]], [[0, 2], [2, 0]]]])  # (1, 2, 2, 2)
    cells = torch.rand(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    table = coarse_map.code_intensity(decoded_from_cells(cells, 4), indices, 4)
    per_position = cells.reshape(1, 2, 2, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(8, 8)
    for code in range(3):
        rows = per_position[indices.flatten() == code]
        assert torch.allclose(table[code], rows.mean(0))
    assert torch.equal(table[3], torch.zeros(8, dtype=torch.float64))


def test_code_cell_sums_over_batches_add_up_to_one_pass() -> None:
    g = torch.Generator().manual_seed(1)
    indices = torch.randint(0, K, (4, 2, 4, 2), generator=g)
    decoded = torch.rand(4, 1, 8, 16, 8, generator=g)
    whole = coarse_map.code_intensity(decoded, indices, K)
    parts = [coarse_map.code_cell_sums(decoded[i:i + 1], indices[i:i + 1], K) for i in range(4)]
    sums = sum(p[0] for p in parts)
    counts = sum(p[1] for p in parts)
    assert torch.allclose(whole, sums / counts.clamp_min(1).double()[:, None])


def test_one_voxel_per_latent_repeats_it_into_eight_cells() -> None:
    indices = torch.tensor([[[[0, 1]]]])  # (1, 1, 1, 2)
    decoded = torch.tensor([[[[[0.25, 0.75]]]]])  # one voxel per latent
    table = coarse_map.code_intensity(decoded, indices, 2)
    assert torch.equal(table, torch.tensor([[0.25] * 8, [0.75] * 8], dtype=torch.float64))


def test_decoded_volumes_that_do_not_fit_the_grid_are_refused() -> None:
    with pytest.raises(PriorInputError, match="whole number of voxels per latent"):
        coarse_map.code_intensity(torch.zeros(1, 1, 7, 8, 8), torch.zeros(1, 2, 2, 2).long(), 4)


def test_layout_block_features_keep_each_code_in_place() -> None:
    """With one feature per code equal to the code, a block's layout feature lists its codes in
    (z, y, x) order; without layout it is their mean."""
    indices = torch.arange(8).reshape(1, 2, 2, 2)
    features = torch.arange(8, dtype=torch.float64)[:, None]
    layout = coarse_map.block_features(indices, features, 2, layout=True)
    assert layout.shape == (1, 1, 1, 1, 8)
    assert torch.equal(layout.flatten(), torch.arange(8, dtype=torch.float64))
    assert float(coarse_map.block_features(indices, features, 2).flatten()) == 3.5


def test_intensity_clusters_follow_tissue_even_between_codes_that_never_meet() -> None:
    """Codes 0-3 and 4-7 both decode dark but never neighbour each other (two heads), codes 8-11
    decode bright: no cluster mixes dark and bright blocks, and the features are the table."""
    torch.manual_seed(3)
    grids = torch.randint(0, 4, (6, 4, 6, 4))
    grids[3:] += 4  # the second head uses other dark codes
    grids[..., 2:] = torch.randint(8, 12, (6, 4, 6, 2))
    table = torch.zeros(K, 8, dtype=torch.float64)
    table[:8] = 0.1
    table[8:12] = 0.9
    prior = intensity_prior(coarse_codes=2)
    prior.prepare(grids, None, code_intensity=table)
    coarse = prior.coarse_grid(grids)  # (6, 2, 3, 2): x = 0 dark, x = 1 bright
    dark, bright = set(coarse[..., 0].unique().tolist()), set(coarse[..., 1].unique().tolist())
    assert dark and bright and not dark & bright
    assert torch.equal(prior.code_features, table.float())


@pytest.mark.parametrize("table", [None, torch.zeros(K, 4), torch.zeros(K - 1, 8)])
def test_an_intensity_prior_refuses_a_missing_or_misshapen_table(table: object) -> None:
    with pytest.raises(PriorInputError, match=r"coarse_features=intensity needs .* \(16, 8\)"):
        intensity_prior().prepare(torch.zeros(2, 4, 4, 4).long(), None, code_intensity=table)


def test_size_formula_and_buffers_of_an_intensity_prior() -> None:
    cfg = TwoLevelConfig(codebook_size=K, coarse_codes=6, context_dim=4,
                         coarse_features="intensity", code_features=40)  # unused: no error
    model = registry.build_model(cfg)
    assert isinstance(model, TwoLevelPrior) and model.needs_code_intensity
    assert model.code_features.shape == (K, 8) and model.centres.shape == (6, 64)
    assert state_numel(cfg) == sum(t.numel() for t in model.state_dict().values())
