"""Tests of the two-level prior: coarse map, likelihood, context causality, sampling, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from mri_vqvae.models import registry
from mri_vqvae.models.priors.absorbing.config import AbsorbingConfig
from mri_vqvae.models.priors.absorbing.model import AbsorbingPrior
from mri_vqvae.models.priors.base import PriorInputError
from mri_vqvae.models.priors.pixelcnn.config import PixelCNNConfig
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D
from mri_vqvae.models.priors.pixelcnn.sampling import teacher_forced_logits
from mri_vqvae.models.priors.twolevel import coarse_map
from mri_vqvae.models.priors.twolevel.config import TwoLevelConfig
from mri_vqvae.models.priors.twolevel.model import TwoLevelPrior, state_numel

K = 16
SMALL = {"embedding_dim": 6, "hidden_channels": 8, "num_layers": 3, "head_channels": 12}
ABSORBING = AbsorbingConfig(channels=8, coarse_channels=16, attention_heads=2, sample_steps=3,
                            bound_levels=2)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def two_tissue_grids(n: int = 6, shape: tuple[int, int, int] = (4, 6, 4)) -> torch.Tensor:
    """Grids (n, d, h, w) whose left half draws codes 0-3 and right half codes 8-11."""
    torch.manual_seed(3)
    grids = torch.randint(0, 4, (n, *shape))
    grids[..., shape[2] // 2 :] += 8
    return grids


def tiny(num_classes: int = 0, prepared: bool = True, **options: object) -> TwoLevelPrior:
    """A seeded CPU-tiny two-level prior (K=16, 4 clusters), prepared on `two_tissue_grids`."""
    torch.manual_seed(99)
    settings = {"coarse": PixelCNNConfig(**SMALL, position_embedding=True), **options}
    cfg = TwoLevelConfig(
        codebook_size=K, num_classes=num_classes, coarse_codes=4, code_features=4,
        context_dim=5, fine=PixelCNNConfig(**SMALL, position_embedding=True), **settings,
    )
    model = TwoLevelPrior(cfg).eval()
    if prepared:
        model.prepare(two_tissue_grids(), None)
    return model


def tiny_absorbing(num_classes: int = 0) -> TwoLevelPrior:
    """`tiny` with a masked-token diffusion coarse stage trained on two masks per grid."""
    return tiny(num_classes, coarse=ABSORBING, coarse_masks=2)


# ---- the coarse map ------------------------------------------------------------------------------


def test_no_cluster_mixes_two_tissues() -> None:
    """Codes 0-3 and 8-11 never neighbour each other: no cluster holds blocks of both."""
    model = tiny()
    coarse = model.coarse_grid(two_tissue_grids())  # (6, 2, 3, 2): x = 0 left, x = 1 right
    assert coarse.shape == (6, 2, 3, 2)
    left, right = set(coarse[..., 0].unique().tolist()), set(coarse[..., 1].unique().tolist())
    assert left and right and not left & right


def test_the_coarse_map_is_deterministic_and_travels_with_the_state_dict() -> None:
    a, b = tiny(), tiny(prepared=False)
    b.load_state_dict(a.state_dict())
    grids = torch.randint(0, K, (3, 4, 6, 4), generator=gen(1))
    assert torch.equal(a.coarse_grid(grids), b.coarse_grid(grids))
    c = tiny()
    assert torch.equal(a.code_features, c.code_features) and torch.equal(a.centres, c.centres)


def test_kmeans_recovers_separated_clusters() -> None:
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    points = centres.repeat_interleave(20, 0) + 0.1 * torch.randn(60, 2, generator=gen(0),
                                                                   dtype=torch.float64)
    found = coarse_map.kmeans(points, 3)
    nearest = torch.cdist(centres, found).min(1).values
    assert float(nearest.max()) < 0.2


def test_kmeans_with_fewer_distinct_points_than_clusters() -> None:
    points = torch.zeros(10, 3, dtype=torch.float64)
    assert torch.equal(coarse_map.kmeans(points, 4), torch.zeros(4, 3, dtype=torch.float64))


# ---- likelihood ---------------------------------------------------------------------------------


def test_bits_are_coarse_plus_fine_bits_per_fine_latent() -> None:
    """grid_bits = (sum of fine bits given the map's context + sum of coarse bits) / latents."""
    model = tiny(num_classes=2)
    grids = torch.randint(0, K, (3, 4, 6, 4), generator=gen(2))
    labels = torch.tensor([0, 1, 1])
    coarse = model.coarse_grid(grids)
    fine = model.fine.bits(grids, labels, model.context(coarse)).flatten(1).sum(1)
    rough = model.coarse.bits(coarse, labels).flatten(1).sum(1)
    expected = (fine + rough) / grids[0].numel()
    with torch.no_grad():
        assert torch.allclose(model.grid_bits(grids, labels), expected, atol=1e-5)
        stages = model.stage_bits(grids, labels)
        assert torch.allclose(stages["coarse"], rough / grids[0].numel(), atol=1e-6)
        assert torch.allclose(stages["coarse"] + stages["fine"], expected, atol=1e-5)
        assert float(model.loss(grids, labels)) == pytest.approx(
            float(expected.mean()) * math.log(2.0), rel=1e-5)
    assert model.likelihood == "bound"


def test_an_absorbing_coarse_stage_adds_its_bound_to_the_fine_bits() -> None:
    """grid_bits = (fine bits + the coarse stage's ELBO map summed) / latents, as for a PixelCNN;
    the ELBO estimate is deterministic, so the same grids get the same bits."""
    model = tiny_absorbing(num_classes=2)
    assert isinstance(model.coarse, AbsorbingPrior) and model.likelihood == "bound"
    grids = torch.randint(0, K, (3, 4, 6, 4), generator=gen(2))
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        coarse = model.coarse_grid(grids)
        fine = model.fine.bits(grids, labels, model.context(coarse)).flatten(1).sum(1)
        rough = model.coarse.bits(coarse, labels).flatten(1).sum(1)
        total = model.grid_bits(grids, labels)
        assert torch.allclose(total, (fine + rough) / grids[0].numel(), atol=1e-5)
        assert torch.equal(total, model.grid_bits(grids, labels))


def test_an_absorbing_coarse_stage_trains_on_coarse_masks_draws_per_grid() -> None:
    """loss = fine NLL (nats per fine latent) + the coarse stage's masked loss on each grid
    repeated ``coarse_masks`` times, weighted by coarse / fine latents; it has a gradient in
    both stages."""
    model = tiny_absorbing(num_classes=2)
    grids = torch.randint(0, K, (3, 4, 6, 4), generator=gen(2))
    labels = torch.tensor([0, 1, 1])
    torch.manual_seed(5)
    loss = model.loss(grids, labels)
    coarse = model.coarse_grid(grids)
    with torch.no_grad():
        fine = model.fine.bits(grids, labels, model.context(coarse)).mean() * math.log(2.0)
        torch.manual_seed(5)
        rough = model.coarse.loss(coarse.repeat(2, 1, 1, 1), labels.repeat(2))
    assert float(loss.detach()) == pytest.approx(float(fine + rough / 8), rel=1e-5)
    loss.backward()
    for stage in (model.coarse, model.fine):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters())


def test_a_block_carries_its_coarse_bits_evenly() -> None:
    """Within one block, bits minus fine bits is the same everywhere: the coarse bits / 8."""
    model = tiny()
    grids = torch.randint(0, K, (1, 4, 6, 4), generator=gen(4))
    with torch.no_grad():
        coarse = model.coarse_grid(grids)
        extra = model.bits(grids) - model.fine.bits(grids, None, model.context(coarse))
        rough = model.coarse.bits(coarse)
    block = extra[0, 2:4, 0:2, 2:4]
    assert torch.allclose(block, torch.full_like(block, float(rough[0, 1, 0, 1]) / 8), atol=1e-5)


@pytest.mark.parametrize("first_axis", [1, 2])
def test_repeat_blocks_fills_each_block_with_its_value(first_axis: int) -> None:
    """Every entry of a repeated block equals its source, and block means give the source back."""
    small = torch.randn(2, 3, 2, 4, 5) if first_axis == 2 else torch.randn(2, 2, 4, 5)
    big = coarse_map.repeat_blocks(small, 2, first_axis)
    for corner in [(0, 0, 0), (1, 1, 1), (0, 1, 0)]:
        index = [slice(None)] * first_axis + [slice(c, None, 2) for c in corner]
        assert torch.equal(big[tuple(index)], small)
    pooled = F.avg_pool3d(big if first_axis == 2 else big.unsqueeze(1), 2)
    assert torch.allclose(pooled if first_axis == 2 else pooled.squeeze(1), small, atol=1e-6)


# ---- context in the fine PixelCNN ---------------------------------------------------------------


def context_pixelcnn() -> GatedPixelCNN3D:
    torch.manual_seed(5)
    cfg = PixelCNNConfig(codebook_size=K, context_dim=3, position_embedding=True,
                         dilations=[1, 2, 1], **SMALL)
    return GatedPixelCNN3D(cfg).double().eval()


def test_context_keeps_the_codes_causal() -> None:
    """With a context, logits at p still depend on codes before p only, and read p's context."""
    model = context_pixelcnn()
    shape, p = (3, 4, 3), (1, 2, 1)
    x = torch.randn(1, 6, *shape, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(1, *shape, 3, dtype=torch.float64, requires_grad=True)
    logits = model.forward_embedded(x, None, ctx)
    gx, gc = torch.autograd.grad(logits[0, :, p[0], p[1], p[2]].sum(), (x, ctx))
    seen = gx[0].abs().sum(0) != 0
    order = torch.arange(math.prod(shape)).reshape(shape)
    flat_p = int(order[p])
    assert not seen[order >= flat_p].any()
    assert gc[0, p[0], p[1], p[2]].abs().sum() > 0  # its own position's context is read


def test_stepped_logits_with_context_match_the_forward_pass() -> None:
    model = context_pixelcnn().float()
    grids = torch.randint(0, K, (2, 3, 4, 3), generator=gen(6))
    ctx = torch.randn(2, 3, 4, 3, 3, generator=gen(7))
    with torch.no_grad():
        full = model(grids, None, ctx)
    assert torch.allclose(full, teacher_forced_logits(model, grids, None, ctx), atol=1e-5)


def test_cached_and_naive_samplers_agree_bitwise_with_context() -> None:
    model = context_pixelcnn().float()
    ctx = torch.randn(2, 3, 4, 3, 3, generator=gen(8))
    fast = model.sample((2, 3, 4, 3), gen(9), context=ctx)
    naive = model.sample((2, 3, 4, 3), gen(9), context=ctx, method="naive")
    assert torch.equal(fast, naive)


@pytest.mark.parametrize(
    "context",
    [None, torch.zeros(1, 3, 4, 3, 2), torch.zeros(1, 3, 4, 3, 3, dtype=torch.long)],
    ids=["missing", "wrong_width", "integer"],
)
def test_a_context_prior_refuses_a_missing_or_misshapen_context(context: object) -> None:
    model = context_pixelcnn().float()
    with pytest.raises(PriorInputError, match="context"):
        model(torch.zeros(1, 3, 4, 3, dtype=torch.long), None, context)


def test_a_prior_without_context_refuses_one() -> None:
    model = GatedPixelCNN3D(PixelCNNConfig(codebook_size=K, **SMALL))
    with pytest.raises(PriorInputError, match="context_dim=0"):
        model(torch.zeros(1, 2, 2, 2, dtype=torch.long), None, torch.zeros(1, 2, 2, 2, 1))


# ---- sampling -----------------------------------------------------------------------------------


def test_sampling_is_seeded_and_the_samplers_agree() -> None:
    model = tiny(num_classes=2)
    labels = torch.tensor([1, 0])
    a = model.sample((2, 4, 6, 4), gen(11), labels)
    b = model.sample((2, 4, 6, 4), gen(11), labels, method="naive")
    assert torch.equal(a, b) and a.shape == (2, 4, 6, 4)
    assert int(a.min()) >= 0 and int(a.max()) < K
    assert not torch.equal(a, model.sample((2, 4, 6, 4), gen(12), labels))


def test_an_absorbing_coarse_stage_samples_seeded_in_its_steps() -> None:
    """``steps`` reaches the absorbing stage, ``method`` the fine PixelCNN: the naive fine
    sampler draws what the cached one draws from the same generator state."""
    model = tiny_absorbing(num_classes=2)
    assert set(model.sample_options) == {"temperature", "top_k", "method", "greedy", "steps"}
    labels = torch.tensor([1, 0])
    a = model.sample((2, 4, 6, 4), gen(11), labels, steps=2)
    assert torch.equal(a, model.sample((2, 4, 6, 4), gen(11), labels, steps=2, method="naive"))
    assert a.shape == (2, 4, 6, 4) and int(a.min()) >= 0 and int(a.max()) < K
    assert not torch.equal(a, model.sample((2, 4, 6, 4), gen(12), labels, steps=2))
    with pytest.raises(PriorInputError, match="unknown sampling options"):
        model.sample((1, 4, 6, 4), gen(0), torch.tensor([0]), nucleus=0.9)


def test_top_k_above_the_clusters_is_capped_for_the_coarse_stage() -> None:
    model = tiny()
    grids = model.sample((1, 4, 6, 4), gen(13), top_k=10)  # 4 clusters, 16 codes
    assert grids.shape == (1, 4, 6, 4)


# ---- bad input ----------------------------------------------------------------------------------


def test_an_unprepared_prior_says_how_to_prepare_it() -> None:
    with pytest.raises(PriorInputError, match="prepare"):
        tiny(prepared=False).bits(torch.zeros(1, 4, 6, 4, dtype=torch.long))


@pytest.mark.parametrize("call", ["prepare", "bits", "sample"])
def test_a_grid_the_factor_does_not_divide_is_refused(call: str) -> None:
    model = tiny()
    odd = torch.zeros(1, 4, 5, 4, dtype=torch.long)
    with pytest.raises(PriorInputError, match="multiple of"):
        if call == "prepare":
            model.prepare(odd, None)
        elif call == "bits":
            model.bits(odd)
        else:
            model.sample((1, 4, 5, 4), gen(0))


def test_an_unknown_sampling_option_is_refused() -> None:
    with pytest.raises(PriorInputError, match="steps"):
        tiny().sample((1, 4, 6, 4), gen(0), steps=3)


def test_labels_must_match_the_class_count() -> None:
    with pytest.raises(PriorInputError, match="class-conditional"):
        tiny(num_classes=2).bits(torch.zeros(1, 4, 6, 4, dtype=torch.long))


# ---- size and registry --------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [0, 3])
@pytest.mark.parametrize("coarse", ["pixelcnn", "absorbing"])
def test_size_formula_is_exact_and_the_registry_builds_it(classes: int, coarse: str) -> None:
    stage = {"coarse": ABSORBING} if coarse == "absorbing" else {}
    cfg = TwoLevelConfig(codebook_size=K, num_classes=classes, coarse_codes=6, context_dim=4,
                         **stage)
    model = registry.build_model(cfg)
    assert isinstance(model, TwoLevelPrior)
    assert state_numel(cfg) == sum(t.numel() for t in model.state_dict().values())
    assert model.coarse.codebook_size == 6 and model.fine.config.context_dim == 4


def test_the_coarse_map_is_the_same_under_bf16_autocast() -> None:
    model = tiny()
    grids = torch.randint(0, K, (4, 4, 6, 4), generator=gen(21))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = model.coarse_grid(grids)
    assert torch.equal(under, model.coarse_grid(grids))


def test_more_code_features_than_codes_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="code_features=16 exceeds codebook_size=8"):
        TwoLevelConfig(codebook_size=8, code_features=16)
