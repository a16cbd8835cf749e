"""Tests of the 3D gated PixelCNN prior: masks, causality, reach, likelihood, samplers, errors."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from mri_vqvae.config import load_config
from mri_vqvae.core.errors import MriVqvaeError
from mri_vqvae.models.priors.base import PriorInputError
from mri_vqvae.models.priors.pixelcnn.config import PixelCNNConfig
from mri_vqvae.models.priors.pixelcnn.draw import sample_categorical
from mri_vqvae.models.priors.pixelcnn.layers import causal_mask
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D, state_numel
from mri_vqvae.models.priors.pixelcnn.sampling import teacher_forced_logits
from tests.support.paths import REPO

K = 16
LEGACY = REPO / "tests/fixtures/legacy_2055c4e"
LEGACY_PRIOR = LEGACY / "runs/prior/20261201T110515Z-smoke-s0"


def tiny(
    num_layers: int = 3, num_classes: int = 0, kernel_size: int = 3, **options: Any
) -> GatedPixelCNN3D:
    """A seeded CPU-tiny prior (K=16, 8 channels); ``options``: further `PixelCNNConfig` keys."""
    torch.manual_seed(1234)
    cfg = PixelCNNConfig(
        codebook_size=K,
        embedding_dim=6,
        hidden_channels=8,
        num_layers=num_layers,
        kernel_size=kernel_size,
        head_channels=12,
        num_classes=num_classes,
        **options,
    )
    return GatedPixelCNN3D(cfg).eval()


# the new options on a 4-layer prior: dilated stacks and/or the absolute-position embedding
OPTIONS = {
    "plain": {},
    "position": {"position_embedding": True, "max_grid_size": 5},
    "dilated": {"dilations": [1, 2, 1, 2]},
    "dilated+position": {"dilations": [1, 2, 3, 1], "position_embedding": True},
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def raster(shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    d, h, w = shape
    return [(z, y, x) for z in range(d) for y in range(h) for x in range(w)]


# ---- masks -------------------------------------------------------------------------------------

Z = [[0, 0, 0], [0, 0, 0], [0, 0, 0]]
ONES = [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
GOLDEN = {  # [dz][dy][dx], centre (1, 1, 1)
    ("depth", "A"): [ONES, Z, Z],
    ("depth", "B"): [ONES, ONES, Z],
    ("height", "A"): [Z, [[1, 1, 1], [0, 0, 0], [0, 0, 0]], Z],
    ("height", "B"): [Z, [[1, 1, 1], [1, 1, 1], [0, 0, 0]], Z],
    ("width", "A"): [Z, [[0, 0, 0], [1, 0, 0], [0, 0, 0]], Z],
    ("width", "B"): [Z, [[0, 0, 0], [1, 1, 0], [0, 0, 0]], Z],
}
# what one mask-A gated layer (width output, fed by the height and depth links) sees: the
# classic raster-order 3D mask A, 13 taps
RASTER_A = [ONES, [[1, 1, 1], [1, 0, 0], [0, 0, 0]], Z]


@pytest.mark.parametrize("stack,kind", sorted(GOLDEN))
def test_golden_masks(stack: str, kind: str) -> None:
    golden = torch.tensor(GOLDEN[(stack, kind)], dtype=torch.float32)
    assert torch.equal(causal_mask(3, stack, kind), golden)
    layer = tiny(num_layers=2).layers[0 if kind == "A" else 1]
    conv = getattr(layer, stack)
    assert torch.equal(conv.full_mask(), golden)
    if kind == "A":  # the mask is applied in forward: the raw weight of a masked tap is non-zero
        assert (conv.weight * (1 - conv.mask)).abs().sum() > 0


def input_grad(model: GatedPixelCNN3D, shape: tuple[int, int, int], p: tuple[int, int, int]):
    """|d logits[p] / d input embedding| summed over channels: (d, h, w), float64."""
    torch.manual_seed(7)
    x = torch.randn(1, model.config.embedding_dim, *shape, dtype=torch.float64, requires_grad=True)
    logits = model.forward_embedded(x)
    proj = torch.randn(K, dtype=torch.float64)
    (grad,) = torch.autograd.grad((logits[0, :, p[0], p[1], p[2]] * proj).sum(), x)
    return grad[0].abs().sum(0)


def test_one_layer_sees_exactly_the_raster_mask_a() -> None:
    model = tiny(num_layers=1).double()
    seen = input_grad(model, (3, 3, 3), (1, 1, 1)) != 0
    assert torch.equal(seen, torch.tensor(RASTER_A, dtype=torch.bool))


# ---- causality ---------------------------------------------------------------------------------

CASES = {
    (4, 4, 4): [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 2, 1), (2, 2, 1), (3, 3, 3)],
    (3, 5, 4): [(0, 0, 3), (0, 4, 0), (1, 0, 0), (2, 4, 0), (2, 2, 2), (2, 4, 3)],
}


def assert_sees_exactly_the_past(grad: torch.Tensor, p: tuple[int, int, int]) -> None:
    """``grad`` (d, h, w) is non-zero exactly at the positions before ``p`` in raster order."""
    for q in raster(tuple(grad.shape)):
        if q >= p:  # tuples compare in raster order
            assert grad[q] == 0, f"logits at {p} depend on {q}"
        else:
            assert grad[q] > 0, f"logits at {p} do not see earlier position {q}"


@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("shape", sorted(CASES))
def test_causality_by_gradients_and_no_blind_spot(
    shape: tuple[int, int, int], options: str
) -> None:
    model = tiny(num_layers=4, **OPTIONS[options]).double()
    for p in CASES[shape]:
        grad = input_grad(model, shape, p)
        assert_sees_exactly_the_past(grad, p)
        z, y, x = p
        # positions a plain masked-convolution stack misses (the blind spot), asserted explicitly
        blind = [(z, y - 1, xx) for xx in range(x + 1, shape[2])]
        blind += [(z - 1, yy, xx) for yy in range(y + 1, shape[1]) for xx in range(shape[2])]
        for q in blind:
            if min(q) >= 0:
                assert grad[q] > 0, f"blind spot at {q} for {p}"


# k = 3: a stack reaches back 1 + (a subset sum of the later layers' dilations) along its axis, so
# with six layers [1, 1, 2, 4, 8, 4] every offset 1..20 (>= 19, the 20 rows) is reached; five
# layers give at most 2^4 = 16 distinct offsets, too few for the 19 earlier rows.
REACH = (16, 20, 16)


@pytest.mark.parametrize("p", [(15, 19, 15), (15, 0, 0), (8, 10, 7)])
def test_dilated_stacks_see_every_earlier_latent_of_a_16x20x16_grid(p) -> None:
    torch.manual_seed(3)
    cfg = PixelCNNConfig(codebook_size=K, embedding_dim=2, hidden_channels=4, num_layers=6,
                         head_channels=4, dilations=[1, 1, 2, 4, 8, 4], position_embedding=True)
    model = GatedPixelCNN3D(cfg).double().eval()
    assert_sees_exactly_the_past(input_grad(model, REACH, p), p)


def test_shorter_reach_misses_the_start_of_the_head() -> None:
    model = tiny(num_layers=6).double()  # undilated: 6 slices back, no further
    seen = input_grad(model, REACH, (15, 19, 15)) > 0
    assert not seen[:9].any() and seen[9:].any()
    model = tiny(num_layers=5, dilations=[1, 1, 2, 4, 8]).double()  # 16 rows back, not 19
    seen = input_grad(model, REACH, (15, 19, 15)) > 0
    assert not seen[:, :3].any() and seen[:15, 3:].all() and seen[15, 3:].any()


def test_training_step_keeps_causality() -> None:
    model = tiny(num_layers=2).double().train()
    idx = torch.randint(0, K, (2, 3, 3, 3))
    torch.optim.SGD(model.parameters(), lr=1.0).zero_grad()
    model.loss(idx).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= p.grad
    grad = input_grad(model.eval(), (3, 3, 3), (1, 1, 1))
    assert all(grad[q] == 0 for q in raster((3, 3, 3)) if q >= (1, 1, 1))


# ---- likelihood --------------------------------------------------------------------------------


def test_forward_matches_the_samplers_step_arithmetic() -> None:
    model = tiny(num_layers=3, num_classes=3)
    idx = torch.randint(0, K, (2, 3, 5, 4))
    labels = torch.tensor([0, 2])
    full = model(idx, labels)
    assert full.shape == (2, K, 3, 5, 4)
    assert torch.allclose(full, teacher_forced_logits(model, idx, labels), atol=1e-5, rtol=1e-5)


def test_nll_of_uniform_logits_is_log2_k() -> None:
    model = tiny()
    with torch.no_grad():
        model.head_out.weight.zero_()
        model.head_out.bias.zero_()
    idx = torch.randint(0, K, (2, 3, 4, 2))
    assert torch.allclose(model.grid_bits(idx), torch.full((2,), math.log2(K)), rtol=1e-6)
    assert math.isclose(model.loss(idx).item(), math.log(K), rel_tol=1e-6)
    per = model.bits(idx)
    assert per.shape == (2, 3, 4, 2)
    assert torch.allclose(per, torch.full_like(per, math.log2(K)))


def test_class_conditioning_changes_logits() -> None:
    model = tiny(num_classes=3)
    idx = torch.randint(0, K, (1, 2, 3, 3))
    a, b = model(idx, torch.tensor([0])), model(idx, torch.tensor([1]))
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(a, model(idx, torch.tensor([0])))


# ---- sampling ----------------------------------------------------------------------------------

SETTINGS = [(0, 1.0, None), (1, 0.7, 5), (2, 1.5, 3)]


@pytest.mark.parametrize("shape", [(2, 4, 4, 4), (2, 3, 5, 4)])
@pytest.mark.parametrize("seed,temperature,top_k", SETTINGS)
def test_fast_sampler_equals_naive_sampler_exactly(shape, seed, temperature, top_k) -> None:
    model = tiny()
    kwargs = {"temperature": temperature, "top_k": top_k}
    fast = model.sample(shape, gen(seed), method="fast", **kwargs)
    naive = model.sample(shape, gen(seed), method="naive", **kwargs)
    assert fast.dtype == torch.int64 and fast.shape == shape
    assert torch.equal(fast, naive)
    assert fast.min() >= 0 and fast.max() < K


@pytest.mark.parametrize("options", sorted(OPTIONS))
def test_fast_equals_naive_with_class_labels(options: str) -> None:
    model = tiny(num_layers=4, num_classes=3, **OPTIONS[options])
    labels = torch.tensor([2, 0])
    shape = (2, 3, 4, 3)
    fast = model.sample(shape, gen(5), labels=labels, top_k=6)
    assert torch.equal(fast, model.sample(shape, gen(5), labels=labels, top_k=6, method="naive"))
    assert not torch.equal(fast, model.sample(shape, gen(5), labels=labels.flip(0), top_k=6))
    stepped = teacher_forced_logits(model, fast, labels)
    assert torch.allclose(model(fast, labels), stepped, atol=1e-5, rtol=1e-5)


def test_position_embedding_makes_the_prior_depend_on_where_it_is() -> None:
    # period-2 codes: (3, 3, 3) and (5, 5, 5) have the same codes within 3 latents (the reach of
    # 3 layers), so only the position embedding can tell them apart
    z, y, x = torch.meshgrid(*[torch.arange(9)] * 3, indexing="ij")
    grid = ((z % 2) * 4 + (y % 2) * 2 + x % 2 + 5)[None]
    plain = tiny()(grid)
    assert torch.allclose(plain[..., 3, 3, 3], plain[..., 5, 5, 5], atol=1e-6)
    placed = tiny(position_embedding=True, max_grid_size=9)(grid)
    assert (placed[..., 3, 3, 3] - placed[..., 5, 5, 5]).abs().max() > 1e-3


def test_same_seed_same_sample_different_seed_different() -> None:
    model = tiny()
    a = model.sample((2, 3, 4, 4), gen(11))
    assert torch.equal(a, model.sample((2, 3, 4, 4), gen(11)))
    assert not torch.equal(a, model.sample((2, 3, 4, 4), gen(12)))


def test_cold_limits_equal_greedy_argmax() -> None:
    model = tiny()
    shape = (2, 3, 4, 4)
    greedy = model.sample(shape, gen(0), greedy=True)
    for kwargs in ({"temperature": 0.0}, {"top_k": 1}, {"temperature": 1e-6}):
        assert torch.equal(greedy, model.sample(shape, gen(3), **kwargs)), kwargs
    # a greedy grid is its own argmax under teacher forcing (stepped and vectorised logits)
    assert torch.equal(teacher_forced_logits(model, greedy).argmax(1), greedy)
    assert torch.equal(model(greedy).argmax(1), greedy)


def test_top_k_never_samples_outside_the_top_k() -> None:
    model = tiny()
    grid = model.sample((2, 3, 4, 4), gen(4), top_k=2, temperature=2.0)
    top2 = teacher_forced_logits(model, grid).topk(2, dim=1).indices  # (B, 2, d, h, w)
    assert (top2 == grid[:, None]).any(dim=1).all()
    logits = torch.randn(1, 10).expand(4000, 10)
    draws = sample_categorical(logits, gen(0), top_k=3)
    allowed = set(logits[0].topk(3).indices.tolist())
    assert set(draws.tolist()) == allowed
    want = torch.softmax(logits[0, sorted(allowed)], 0)
    got = torch.bincount(draws, minlength=10)[sorted(allowed)] / 4000.0
    assert (got - want).abs().max() < 0.05


def test_draw_uses_one_uniform_per_row_inverse_cdf() -> None:
    logits = torch.randn(5, 7)
    g1, g2 = gen(9), gen(9)
    drawn = sample_categorical(logits, g1, temperature=0.8)
    u = torch.rand(5, generator=g2, dtype=torch.float64)
    assert torch.equal(g1.get_state(), g2.get_state())
    cdf = torch.softmax(logits.double() / 0.8, 1).cumsum(1)
    assert torch.equal(drawn, (cdf <= (u * cdf[:, -1])[:, None]).sum(1))
    greedy = sample_categorical(logits, g1, greedy=True)
    torch.rand(5, generator=g2, dtype=torch.float64)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert torch.equal(greedy, logits.argmax(1))


# ---- errors and config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "indices,match",
    [
        (torch.full((1, 2, 2, 2), K), "codebook_size"),
        (torch.full((1, 2, 2, 2), -1), r"\[0, 16\)"),
        (torch.zeros(2, 2, 2, dtype=torch.long), r"\(B, d, h, w\)"),
        (torch.zeros(1, 2, 2, 2), "integer"),
        (torch.zeros(1, 0, 2, 2, dtype=torch.long), r"\(B, d, h, w\)"),
    ],
)
def test_bad_indices_raise_clear_errors(indices: torch.Tensor, match: str) -> None:
    with pytest.raises(PriorInputError, match=match):
        tiny()(indices)


def test_bad_labels_and_sampling_arguments_raise_clear_errors() -> None:
    idx = torch.zeros(2, 2, 2, 2, dtype=torch.long)
    with pytest.raises(PriorInputError, match="unconditional"):
        tiny()(idx, torch.tensor([0, 1]))
    cond = tiny(num_classes=3)
    with pytest.raises(PriorInputError, match="pass labels"):
        cond(idx)
    with pytest.raises(PriorInputError, match=r"\[0, 3\)"):
        cond(idx, torch.tensor([0, 3]))
    with pytest.raises(PriorInputError, match="batch of 2"):
        cond(idx, torch.tensor([0]))
    model = tiny()
    bad_calls = [
        ({"shape": (2, 2, 2)}, "four integers"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": K + 1}, "top_k"),
        ({"temperature": -1.0}, "temperature"),
        ({"method": "fancy"}, "method"),
        ({"generator": 0}, "torch.Generator"),
        ({"labels": torch.tensor([0])}, "unconditional"),
    ]
    for kwargs, match in bad_calls:
        call = {"shape": (1, 2, 2, 2), "generator": gen(0), **kwargs}
        with pytest.raises(PriorInputError, match=match):
            model.sample(**call)
    assert issubclass(PriorInputError, MriVqvaeError) and issubclass(PriorInputError, ValueError)


def test_grid_beyond_the_position_tables_is_refused() -> None:
    model = tiny(position_embedding=True, max_grid_size=4)
    for call in (
        lambda: model(torch.zeros(1, 2, 5, 2, dtype=torch.long)),
        lambda: model.sample((1, 5, 2, 2), gen(0)),
        lambda: teacher_forced_logits(model, torch.zeros(1, 2, 2, 5, dtype=torch.long)),
    ):
        with pytest.raises(PriorInputError, match="max_grid_size=4"):
            call()
    assert model(torch.zeros(1, 4, 4, 4, dtype=torch.long)).shape == (1, K, 4, 4, 4)


def test_old_config_without_the_new_keys_loads_as_the_plain_model() -> None:
    best = LEGACY_PRIOR / "checkpoints/best"
    old = json.loads((best / "config.json").read_text())["config"]
    assert not {"dilations", "position_embedding", "max_grid_size"} & set(old)
    cfg = PixelCNNConfig.model_validate(old)
    assert (cfg.dilations, cfg.position_embedding) == (None, False)
    model = GatedPixelCNN3D(cfg).eval()
    model.load_state_dict(load_file(best / "model.safetensors"), strict=True)
    spelled = GatedPixelCNN3D(cfg.model_copy(update={"dilations": (1,) * cfg.num_layers})).eval()
    spelled.load_state_dict(model.state_dict(), strict=True)
    idx = torch.randint(0, cfg.codebook_size, (2, 3, 4, 5), generator=gen(0))
    assert torch.equal(model(idx), spelled(idx))
    assert torch.equal(model.sample((1, 3, 4, 4), gen(1)), spelled.sample((1, 3, 4, 4), gen(1)))
    # the bits per latent the code of commit 2055c4e recorded for this checkpoint
    recorded = json.loads((LEGACY_PRIOR / "likelihood.json").read_text())["splits"]
    for split, name in (("val", "v"), ("test", "t")):
        grid = torch.from_numpy(np.load(LEGACY / f"latents/{name}.npy").astype(np.int64))[None]
        bits = model.grid_bits(grid).mean().item()
        assert math.isclose(bits, recorded[split]["prior_bits_per_latent"], rel_tol=1e-6)


@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("num_classes", [0, 2])
def test_state_numel_is_exact_with_the_new_options(options: str, num_classes: int) -> None:
    model = tiny(num_layers=4, num_classes=num_classes, kernel_size=5, **OPTIONS[options])
    assert state_numel(model.config) == sum(t.numel() for t in model.state_dict().values())


def test_prior_config_defaults_and_validation() -> None:
    cfg = load_config(overrides=["prior.num_layers=2", "prior.num_classes=4"]).prior
    assert (cfg.num_layers, cfg.num_classes, cfg.codebook_size) == (2, 4, 512)
    with pytest.raises(ValidationError, match="odd"):
        PixelCNNConfig(kernel_size=4)
    with pytest.raises(ValidationError, match="top_k"):
        PixelCNNConfig(codebook_size=8, top_k=9)
    model = tiny(kernel_size=5)
    assert model.layers[0].depth.weight.shape[2:] == (3, 5, 5)
    for dilations, match in [([1, 2], "one entry per layer"), ([1, 0, 2], ">= 1"),
                             ([2, 1, 1], "first")]:
        with pytest.raises(ValidationError, match=match):
            PixelCNNConfig(num_layers=3, dilations=dilations)
    cfg = load_config(overrides=["prior.num_layers=3", "prior.dilations=[1,2,4]"]).prior
    assert cfg.dilations == (1, 2, 4) and not cfg.position_embedding
