"""`complete` of the autoregressive priors: redraw masked positions, keep the others.

The PixelCNN draws the grid in raster order with kept positions taking their codes; the two-level
prior redraws the clusters of blocks holding a masked position first. Properties: nothing masked
gives the input back, everything masked is `sample` bit for bit, the cached and naive samplers
agree, the codes under the mask do not matter, and a PixelCNN redraw depends on earlier codes only.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mri_vqvae.models.priors.base import CompletingPrior, PriorInputError
from tests.models import test_prior, test_twolevel

GRID = (2, 4, 6, 4)


def pixelcnn() -> torch.nn.Module:
    return test_prior.tiny(num_layers=4, num_classes=2, position_embedding=True)


def twolevel() -> torch.nn.Module:
    return test_twolevel.tiny(num_classes=2)


def twolevel_absorbing() -> torch.nn.Module:
    return test_twolevel.tiny_absorbing(num_classes=2)


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "pixelcnn": pixelcnn, "twolevel": twolevel, "twolevel_absorbing": twolevel_absorbing}
LABELS = torch.tensor([0, 1])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grids(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, test_prior.K, GRID, generator=gen(seed))


def scattered_mask(seed: int = 9, share: float = 0.3) -> torch.Tensor:
    return torch.rand(GRID, generator=gen(seed)) < share


@pytest.mark.parametrize("kind", MODELS)
def test_nothing_masked_gives_the_grids_back(kind: str) -> None:
    model, x = MODELS[kind](), grids()
    assert isinstance(model, CompletingPrior)
    done = model.complete(x, torch.zeros(GRID, dtype=torch.bool), gen(0), LABELS)
    assert torch.equal(done, x)


@pytest.mark.parametrize("kind", MODELS)
def test_everything_masked_is_sample_bit_for_bit(kind: str) -> None:
    model, x = MODELS[kind](), grids()
    everything = torch.ones(GRID, dtype=torch.bool)
    for options in ({}, {"temperature": 0.7, "top_k": 5}):
        done = model.complete(x, everything, gen(3), LABELS, **options)
        assert torch.equal(done, model.sample(GRID, gen(3), LABELS, **options))


@pytest.mark.parametrize("kind", MODELS)
def test_kept_codes_stay_and_redraws_are_seeded(kind: str) -> None:
    model, x, masked = MODELS[kind](), grids(), scattered_mask()
    done = model.complete(x, masked, gen(1), LABELS)
    assert torch.equal(done[~masked], x[~masked])
    assert torch.equal(done, model.complete(x, masked, gen(1), LABELS))
    assert not torch.equal(done[masked], x[masked])  # 30 % of 192 positions: some code changes
    assert done.min() >= 0 and done.max() < test_prior.K


@pytest.mark.parametrize("kind", MODELS)
def test_cached_and_naive_completion_agree(kind: str) -> None:
    model, x, masked = MODELS[kind](), grids(), scattered_mask(seed=2)
    fast = model.complete(x, masked, gen(4), LABELS, method="fast")
    assert torch.equal(fast, model.complete(x, masked, gen(4), LABELS, method="naive"))


@pytest.mark.parametrize("kind", MODELS)
def test_redraws_ignore_the_codes_under_the_mask(kind: str) -> None:
    model, x = MODELS[kind](), grids()
    masked = scattered_mask(seed=4)
    other = x.clone()
    other[masked] = (other[masked] + 3) % test_prior.K
    assert torch.equal(model.complete(other, masked, gen(6), LABELS),
                       model.complete(x, masked, gen(6), LABELS))


def test_pixelcnn_redraws_ignore_kept_codes_after_them() -> None:
    """The PixelCNN conditions a redrawn position on earlier codes only. (The two-level prior's
    fine stage also sees the whole coarse grid, later blocks included, by design.)"""
    model, x = pixelcnn(), grids()
    masked = torch.zeros(GRID, dtype=torch.bool)
    masked[:, 1, 2:4, :] = True
    later = x.clone()
    later[:, 2:, :, :] = (later[:, 2:, :, :] + 1) % test_prior.K
    assert torch.equal(model.complete(later, masked, gen(6), LABELS)[masked],
                       model.complete(x, masked, gen(6), LABELS)[masked])


@pytest.mark.parametrize("kind", ["twolevel", "twolevel_absorbing"])
def test_twolevel_keeps_the_clusters_of_untouched_blocks(kind: str) -> None:
    """Blocks without a masked position keep their cluster; so the coarse grid of the completed
    codes equals the input's there."""
    model, x = MODELS[kind](), grids()
    masked = torch.zeros(GRID, dtype=torch.bool)
    masked[:, :2, :2, :2] = True  # exactly the first 2x2x2 block (factor 2)
    done = model.complete(x, masked, gen(8), LABELS)
    kept_blocks = torch.ones(model.coarse_grid(x).shape, dtype=torch.bool)
    kept_blocks[:, 0, 0, 0] = False
    assert torch.equal(model.coarse_grid(done)[kept_blocks], model.coarse_grid(x)[kept_blocks])


def test_an_absorbing_coarse_stage_completes_grids_that_redraw_different_block_counts() -> None:
    """Grid 0 redraws one block, grid 1 two: completed one grid at a time, seeded, kept codes
    kept (the absorbing decoder alone needs equal counts in a batch)."""
    model, x = twolevel_absorbing(), grids()
    masked = torch.zeros(GRID, dtype=torch.bool)
    masked[0, :2, :2, :2] = True
    masked[1, :2, :2, :2] = True
    masked[1, 2:, 4:, 2:] = True
    done = model.complete(x, masked, gen(8), LABELS)
    assert torch.equal(done[~masked], x[~masked])
    assert torch.equal(done, model.complete(x, masked, gen(8), LABELS))


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("bad", ["dtype", "shape"])
def test_complete_refuses_a_bad_mask(kind: str, bad: str) -> None:
    mask = torch.zeros(GRID, dtype=torch.long) if bad == "dtype" else torch.zeros(GRID[1:]) > 0
    with pytest.raises(PriorInputError, match="bool tensor of the grids' shape"):
        MODELS[kind]().complete(grids(), mask, gen(0), LABELS)
