"""Which positions the absorbing prior masks: in training, in its bound, and while sampling.

* Training (`training_mask`): per grid a ratio ``r = cos(pi/2 * u)``, ``u ~ U[0, 1)`` (MaskGIT's
  cosine schedule, r in (0, 1], mean 2/pi), and ``max(1, round(r * n))`` positions chosen
  uniformly; every draw comes from torch's global RNG (seeded and saved by training, so a resume
  replays it exactly).
* The bound (`bound_masks`): for each of L levels, m = the midpoint of the level's share of
  {1, ..., n} masked positions, and a random partition of the grid (from a generator seeded by
  the grid's bytes) into chunks of m positions; each chunk is masked in one forward and scores
  the positions it masks first, so every position is scored exactly once per level.
* Sampling (`still_masked`): how many positions stay masked after each decoding step.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def masking_ratio(u: Tensor) -> Tensor:
    """The cosine schedule: u in [0, 1) -> ratio ``cos(pi/2 * u)`` in (0, 1]."""
    return torch.cos(0.5 * math.pi * u)


def masked_counts(ratios: Tensor, positions: int) -> Tensor:
    """Positions to mask per grid: ``max(1, round(ratio * positions))``, (B,) int64."""
    return torch.round(ratios.double() * positions).long().clamp(1, positions)


def training_mask(batch: int, positions: int, device: torch.device) -> Tensor:
    """(B, n) bool: per grid a cosine-schedule ratio, then that many positions chosen uniformly.

    Draws B + B * n uniforms from torch's global RNG (of `device`).
    """
    counts = masked_counts(masking_ratio(torch.rand(batch, device=device)), positions)
    rank = torch.rand(batch, positions, device=device).argsort(dim=1).argsort(dim=1)
    return rank < counts[:, None]


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean over grids of the mean cross-entropy (nats) over each grid's masked positions.

    logits (B, K, d, h, w), targets (B, d, h, w) int64, mask (B, d, h, w) bool with at least one
    masked position per grid -> scalar. Unmasked positions contribute nothing (nor gradient).
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    weight = mask.flatten(1).float()
    per_grid = (ce.flatten(1) * weight).sum(1) / weight.sum(1)
    return per_grid.mean()


def level_sizes(levels: int, positions: int) -> list[int]:
    """Masked positions m of each bound level: ``floor((l - 1/2) / L * n + 1/2)`` in [1, n]."""
    return [min(positions, max(1, math.floor((level - 0.5) / levels * positions + 0.5)))
            for level in range(1, levels + 1)]


def grid_generator(grid: Tensor) -> torch.Generator:
    """A CPU generator seeded from a grid's shape and codes (the same grid, the same draws)."""
    codes = grid.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(repr(tuple(codes.shape)).encode() + codes.numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little"))


def partition(positions: int, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Chunks of a random partition: (masks, scored), each (ceil(n / m), n) bool.

    Chunk j masks ``perm[j*m : (j+1)*m]`` (the last one ``perm[n-m:]``, always m positions) and
    scores ``perm[j*m : (j+1)*m]``: the positions it masks first. Every position is scored once.
    """
    perm = torch.randperm(positions, generator=generator)
    chunks = -(-positions // size)
    masks = torch.zeros(chunks, positions, dtype=torch.bool)
    scored = torch.zeros(chunks, positions, dtype=torch.bool)
    for j in range(chunks):
        start = min(j * size, positions - size)
        masks[j, perm[start:start + size]] = True
        scored[j, perm[j * size:(j + 1) * size]] = True
    return masks, scored


def bound_masks(grid: Tensor, levels: int) -> list[tuple[Tensor, Tensor]]:
    """(masks, scored) of every level (see `partition`) for one grid (d, h, w), deterministic."""
    generator = grid_generator(grid)
    n = grid.numel()
    return [partition(n, m, generator) for m in level_sizes(levels, n)]


def still_masked(step: int, steps: int, positions: int, masked_now: int) -> int:
    """Positions left masked after decoding step `step` (0-based) of `steps`.

    ``floor(n * cos(pi/2 * (step + 1) / steps))``, but at least one fewer than `masked_now`
    (every step reveals a position while any is masked) and 0 after the last step.
    """
    if step >= steps - 1:
        return 0
    keep = math.floor(positions * math.cos(0.5 * math.pi * (step + 1) / steps))
    return max(0, min(keep, masked_now - 1))
