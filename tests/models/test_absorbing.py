"""The absorbing-state (masked-token) diffusion prior: masking schedule, loss, bound, sampling,
checkpoints (`mri_vqvae.models.priors.absorbing`)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from mri_vqvae.artifacts.checkpoint import load_checkpoint, save_checkpoint
from mri_vqvae.core.finite import NonFiniteError
from mri_vqvae.models import registry
from mri_vqvae.models.priors.absorbing.config import AbsorbingConfig
from mri_vqvae.models.priors.absorbing.masking import (
    bound_masks,
    level_sizes,
    masked_counts,
    masked_cross_entropy,
    masking_ratio,
    still_masked,
    training_mask,
)
from mri_vqvae.models.priors.absorbing.model import AbsorbingPrior
from mri_vqvae.models.priors.absorbing.network import state_numel
from mri_vqvae.models.priors.base import Prior, PriorInputError

K = 16
GRID = (1, 4, 5, 3)
SMALL = {"codebook_size": K, "channels": 8, "coarse_channels": 16, "attention_heads": 2,
         "max_grid_size": 8}


def _prior(seed: int = 0, **overrides: object) -> AbsorbingPrior:
    torch.manual_seed(seed)
    return AbsorbingPrior(AbsorbingConfig(**{**SMALL, **overrides})).eval()


def _grid(seed: int = 0, shape: tuple[int, ...] = GRID) -> torch.Tensor:
    return torch.randint(0, K, shape, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the masking schedule ------------------------------------------------------------------------


def test_masking_ratio_lies_in_zero_one_and_has_the_cosine_mean() -> None:
    u = torch.rand(400_000, generator=_gen(0), dtype=torch.float64)
    ratio = masking_ratio(u)
    assert float(ratio.min()) > 0 and float(ratio.max()) <= 1
    assert float(masking_ratio(torch.zeros(1))) == 1.0
    assert float(ratio.mean()) == pytest.approx(2 / math.pi, abs=2e-3)  # int_0^1 cos(pi u / 2)


def test_masked_counts_round_the_ratio_and_mask_at_least_one() -> None:
    counts = masked_counts(torch.tensor([1e-6, 0.26, 0.5, 0.74, 1.0]), 10)
    assert counts.tolist() == [1, 3, 5, 7, 10]


def test_training_mask_masks_the_scheduled_count_from_the_global_rng() -> None:
    batch, n = 64, 60
    torch.manual_seed(3)
    mask = training_mask(batch, n, torch.device("cpu"))
    torch.manual_seed(3)
    expected = masked_counts(masking_ratio(torch.rand(batch)), n)
    assert mask.shape == (batch, n) and mask.dtype == torch.bool
    assert torch.equal(mask.sum(1), expected) and bool((mask.sum(1) >= 1).all())
    torch.manual_seed(3)
    assert torch.equal(training_mask(batch, n, torch.device("cpu")), mask)  # resume replays it
    assert mask.float().mean(0).min() > 0  # every position gets masked in some grid


# --- the loss ------------------------------------------------------------------------------------


def test_masked_cross_entropy_counts_only_masked_positions() -> None:
    logits = torch.randn(2, K, *GRID[1:], generator=_gen(1), requires_grad=True)
    targets = _grid(2, (2, *GRID[1:]))
    mask = torch.rand(2, *GRID[1:], generator=_gen(3)) < 0.4
    mask[:, 0, 0, 0] = True
    loss = masked_cross_entropy(logits, targets, mask)
    ce = F.cross_entropy(logits, targets, reduction="none")
    expected = torch.stack([ce[b][mask[b]].mean() for b in range(2)]).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    changed = torch.where(mask, targets, (targets + 1) % K)  # other targets where unmasked
    assert torch.equal(masked_cross_entropy(logits, changed, mask), loss)
    loss.backward()
    assert logits.grad is not None
    assert float(logits.grad.permute(0, 2, 3, 4, 1)[~mask].abs().max()) == 0.0


def test_loss_is_the_masked_loss_of_the_drawn_mask() -> None:
    model, grids = _prior(), _grid(4, (3, *GRID[1:]))
    torch.manual_seed(7)
    loss = model.loss(grids)
    torch.manual_seed(7)
    mask = training_mask(3, math.prod(GRID[1:]), torch.device("cpu")).view(grids.shape)
    assert torch.equal(model.masked_loss(grids, mask), loss)
    assert math.isfinite(float(loss.detach())) and loss.requires_grad


# --- the bound -----------------------------------------------------------------------------------


def test_bound_masks_score_every_position_once_per_level() -> None:
    grid = _grid(5)[0]
    n = grid.numel()
    levels = bound_masks(grid, 4)
    assert [int(m.sum(1)[0]) for m, _ in levels] == level_sizes(4, n)
    for (masks, scored), m in zip(levels, level_sizes(4, n), strict=True):
        assert bool((masks.sum(1) == m).all()) and torch.equal(scored.sum(0), torch.ones(n).long())
        assert bool((scored <= masks).all())  # a chunk scores only positions it masks
    again = bound_masks(grid.clone(), 4)
    assert all(torch.equal(a, b) for x, y in zip(levels, again, strict=True)
               for a, b in zip(x, y, strict=True))


def test_bound_is_deterministic_and_independent_of_the_batch() -> None:
    model, grids = _prior(), _grid(6, (2, *GRID[1:]))
    first = model.grid_bits(grids)
    assert torch.equal(first, model.grid_bits(grids))
    assert torch.equal(model.grid_bits(grids[1:])[0], first[1])
    bits = model.bits(grids)
    assert bits.shape == grids.shape and torch.equal(bits.flatten(1).mean(1), first)


def test_the_bound_is_exact_for_a_model_that_ignores_the_context() -> None:
    """With the code embedding (MASK included) zeroed the logits depend on position only, so the
    model is factorised: -log2 p = sum_i CE_i, and every term of the ELBO is that CE_i."""
    model = _prior(8)
    with torch.no_grad():
        model.net.embedding.weight.zero_()
        grids = _grid(9, (2, *GRID[1:]))
        exact = F.cross_entropy(model(grids), grids, reduction="none") / math.log(2)
        assert torch.allclose(model(torch.full_like(grids, K)), model(grids), atol=1e-6)
    torch.testing.assert_close(model.bits(grids), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.grid_bits(grids), exact.flatten(1).mean(1), rtol=1e-5,
                               atol=1e-5)


def _mixture_bits(model: AbsorbingPrior, grid: torch.Tensor) -> tuple[float, float]:
    """(-log2 p(x), the ELBO) of a 2-position grid in bits, by enumerating both orders."""
    a, b = grid.flatten().tolist()
    shape, m = grid.shape, model.mask_token

    def logp(tokens: list[int], position: int, code: int) -> float:
        logits = model(torch.tensor(tokens).view(1, *shape))[0].flatten(1)
        return float(F.log_softmax(logits[:, position], 0)[code])

    first = logp([m, m], 0, a) + logp([a, m], 1, b)  # reveal 0 then 1
    second = logp([m, m], 1, b) + logp([m, b], 0, a)  # reveal 1 then 0
    exact = -math.log2(0.5 * math.exp(first) + 0.5 * math.exp(second))
    return exact, -(first + second) / 2 / math.log(2)


@torch.no_grad()
def test_the_bound_is_the_elbo_and_at_least_the_exact_bits_of_a_two_latent_grid() -> None:
    """p(x) = E_order prod p(x_t | revealed) is computable for n = 2 (two orders): it sums to 1
    over all grids, and by Jensen the ELBO (bound_levels=2 enumerates it exactly here:
    one level masks each position alone, the other both) is >= -log2 p(x)."""
    model = _prior(10, codebook_size=3, bound_levels=2)
    total, gaps = 0.0, []
    for a, b in itertools.product(range(3), repeat=2):
        grid = torch.tensor([[[[a, b]]]])
        exact, elbo = _mixture_bits(model, grid[0])
        total += 2.0 ** -exact
        bound = float(model.grid_bits(grid)[0]) * 2  # bits per latent -> bits per grid
        assert bound == pytest.approx(elbo, abs=1e-5)
        assert bound >= exact - 1e-6
        gaps.append(bound - exact)
    assert total == pytest.approx(1.0, abs=1e-6)
    assert max(gaps) > 1e-4  # the model uses the context, so Jensen is strict somewhere


# --- sampling ------------------------------------------------------------------------------------


def test_still_masked_follows_the_cosine_schedule_to_zero() -> None:
    n, steps, left = 5120, 12, 5120
    counts = []
    for s in range(steps):
        left = still_masked(s, steps, n, left)
        counts.append(left)
    assert counts[-1] == 0 and all(a > b for a, b in zip([n, *counts], counts, strict=False))
    assert counts[0] == math.floor(n * math.cos(math.pi / 2 / steps))
    left, tiny = 3, []
    for s in range(steps):  # fewer positions than steps: one per step, then none
        left = still_masked(s, steps, 3, left)
        tiny.append(left)
    assert tiny[:3] == [2, 1, 0] and set(tiny[3:]) == {0}


def test_sampling_is_seeded_and_fills_every_position_with_a_code() -> None:
    model = _prior()
    a = model.sample((2, *GRID[1:]), _gen(0))
    assert torch.equal(a, model.sample((2, *GRID[1:]), _gen(0)))
    assert not torch.equal(a, model.sample((2, *GRID[1:]), _gen(1)))
    assert a.dtype == torch.long and a.shape == (2, *GRID[1:])
    assert int(a.min()) >= 0 and int(a.max()) < K


def test_each_position_is_revealed_once_and_never_changed() -> None:
    model, seen = _prior(), []
    hook = model.net.register_forward_hook(lambda _m, args, _o: seen.append(args[0].clone()))
    try:
        final = model.sample((1, *GRID[1:]), _gen(2), steps=5)
    finally:
        hook.remove()
    n = math.prod(GRID[1:])
    masked = [int((t == K).sum()) for t in seen]
    expected, left = [n], n
    for s in range(4):
        left = still_masked(s, 5, n, left)
        expected.append(left)
    assert masked == expected
    for tokens in seen:
        revealed = tokens != K
        assert torch.equal(tokens[revealed], final[revealed])


def test_labels_change_the_samples() -> None:
    model = _prior(num_classes=2)
    zero = model.sample((2, *GRID[1:]), _gen(0), torch.tensor([0, 0]))
    one = model.sample((2, *GRID[1:]), _gen(0), torch.tensor([1, 1]))
    assert not torch.equal(zero, one)
    with pytest.raises(PriorInputError, match="class-conditional"):
        model.sample((2, *GRID[1:]), _gen(0))


def test_zero_temperature_and_top_k_one_are_greedy_whatever_the_seed() -> None:
    model = _prior()
    greedy = model.sample((1, *GRID[1:]), _gen(0), temperature=0)
    assert torch.equal(greedy, model.sample((1, *GRID[1:]), _gen(9), temperature=0))
    assert torch.equal(greedy, model.sample((1, *GRID[1:]), _gen(5), greedy=True))
    assert torch.equal(greedy, model.sample((1, *GRID[1:]), _gen(3), top_k=1))


def test_complete_keeps_the_unmasked_codes_and_fills_the_masked_ones() -> None:
    model, grids = _prior(), _grid(3, (2, *GRID[1:]))
    masked = torch.rand(grids.shape, generator=_gen(4)).flatten(1).argsort(1) < 25
    masked = masked.view(grids.shape)
    done = model.complete(grids, masked, _gen(0), steps=4)
    assert done.dtype == torch.long and done.shape == grids.shape
    assert torch.equal(done[~masked], grids[~masked])
    assert int(done.min()) >= 0 and int(done.max()) < K
    assert torch.equal(done, model.complete(grids, masked, _gen(0), steps=4))  # seeded
    assert torch.equal(model.complete(grids, torch.zeros_like(masked), _gen(0)), grids)


def test_complete_with_everything_masked_is_sample() -> None:
    model, grids = _prior(num_classes=2), _grid(5, (2, *GRID[1:]))
    labels = torch.tensor([1, 0])
    everything = torch.ones(grids.shape, dtype=torch.bool)
    assert torch.equal(model.complete(grids, everything, _gen(7), labels, steps=6),
                       model.sample(grids.shape, _gen(7), labels, steps=6))


def test_complete_decodes_on_the_schedule_of_the_masked_count() -> None:
    model, seen, grid = _prior(), [], _grid(1)
    masked = torch.zeros(grid.shape, dtype=torch.bool)
    masked.view(-1)[:40] = True
    hook = model.net.register_forward_hook(lambda _m, args, _o: seen.append(args[0].clone()))
    try:
        model.complete(grid, masked, _gen(2), steps=5)
    finally:
        hook.remove()
    expected, left = [40], 40
    for s in range(4):
        left = still_masked(s, 5, 40, left)
        expected.append(left)
    assert [int((t == K).sum()) for t in seen] == expected


@pytest.mark.parametrize(("make", "match"), [
    (lambda g: torch.zeros(g.shape, dtype=torch.long), "bool tensor"),
    (lambda g: torch.zeros(g.shape[1:], dtype=torch.bool), "bool tensor"),
    (lambda g: torch.arange(g.numel()).view(g.shape) < g[0].numel() + 3, "same number"),
])
def test_complete_refuses_a_bad_mask(make, match: str) -> None:
    grids = _grid(0, (2, *GRID[1:]))
    with pytest.raises(PriorInputError, match=match):
        _prior().complete(grids, make(grids), _gen(0))


@pytest.mark.parametrize(("options", "match"), [
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"temperature": -1.0}, "temperature must be"),
    ({"top_k": K + 1}, "top_k must be"),
])
def test_bad_sampling_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(PriorInputError, match=match):
        _prior().sample((1, *GRID[1:]), _gen(0), **options)


def test_a_grid_beyond_the_position_tables_is_refused() -> None:
    with pytest.raises(PriorInputError, match="max_grid_size=8"):
        _prior().grid_bits(_grid(0, (1, 9, 2, 2)))


def test_attention_heads_must_divide_the_coarse_width() -> None:
    with pytest.raises(ValidationError, match="must divide coarse_channels"):
        AbsorbingConfig(coarse_channels=30, attention_heads=4)


# --- the registry and checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"num_classes": 3, "attention_heads": 0}])
def test_state_numel_is_exact(overrides: dict) -> None:
    model = _prior(**overrides)
    assert state_numel(model.config) == sum(t.numel() for t in model.state_dict().values())


def test_registry_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = _prior(11, num_classes=2, label_field="modality")
    assert isinstance(model, Prior) and model.likelihood == "bound"
    assert isinstance(registry.build_model(model.config), AbsorbingPrior)
    model.prepare(_grid(12, (4, *GRID[1:])), None)
    folder = save_checkpoint(tmp_path / "ckpt", model, "absorbing", model.config)
    loaded = load_checkpoint(folder)
    assert loaded.kind == "absorbing" and isinstance(loaded.model, AbsorbingPrior)
    other = loaded.model.eval()
    grids, labels = _grid(13, (2, *GRID[1:])), torch.tensor([0, 1])
    assert torch.equal(other.grid_bits(grids, labels), model.grid_bits(grids, labels))
    assert torch.equal(other.sample((2, *GRID[1:]), _gen(4), labels),
                       model.sample((2, *GRID[1:]), _gen(4), labels))


def test_prepare_starts_the_head_at_the_smoothed_code_frequencies() -> None:
    model = _prior()
    train = torch.zeros(2, *GRID[1:], dtype=torch.long)  # code 0 only
    model.prepare(train, None)
    counts = torch.ones(K, dtype=torch.float64)
    counts[0] += train.numel()
    torch.testing.assert_close(model.head.bias.double(), (counts / counts.sum()).log(),
                               rtol=1e-6, atol=1e-6)


def test_nonfinite_logits_stop_sampling() -> None:
    model = _prior()
    with torch.no_grad():
        model.head.bias[3] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or Inf at decoding step 1 of 12"):
        model.sample((1, *GRID[1:]), _gen(0))
