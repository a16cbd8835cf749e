"""The map from a fine code grid to its coarse grid: each block of codes -> one cluster.

Codes are arbitrary symbols, so they are first given features from the train grids: a code's
profile of neighbours (how often each code sits next to it along any axis, as a probability
row), square-rooted (Hellinger) and projected onto its ``dim`` principal directions. Codes of the
same tissue have similar neighbours, hence nearby features. A block's feature is the mean of its
codes' features; k-means on the train blocks gives the cluster centres. Fitting is seeded and runs
in float64; the fitted tables are the prior's buffers, so a checkpoint carries them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mri_vqvae.models.priors.base import PriorInputError

KMEANS_ITERATIONS = 40


def fit_code_features(train: Tensor, codebook_size: int, dim: int) -> Tensor:
    """Features (K, dim) float64 of each code from neighbour counts in grids (N, d, h, w).

    A code absent from ``train`` gets the features of an empty profile.
    """
    k = codebook_size
    counts = torch.zeros(k * k, dtype=torch.float64)
    grids = train.long()
    for axis in (1, 2, 3):
        n = grids.shape[axis]
        if n < 2:
            continue
        a = grids.narrow(axis, 0, n - 1).flatten()
        b = grids.narrow(axis, 1, n - 1).flatten()
        ones = torch.ones(a.numel(), dtype=torch.float64)
        counts.index_add_(0, a * k + b, ones)
        counts.index_add_(0, b * k + a, ones)
    counts = counts.reshape(k, k)
    profile = (counts / counts.sum(1, keepdim=True).clamp_min(1.0)).sqrt()
    centred = profile - profile.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:dim].T


def block_features(indices: Tensor, features: Tensor, factor: int) -> Tensor:
    """Mean code feature of each factor^3 block: (B, d, h, w) -> (B, d/f, h/f, w/f, F)."""
    b, d, h, w = indices.shape
    f = factor
    x = features[indices].reshape(b, d // f, f, h // f, f, w // f, f, features.shape[-1])
    return x.mean(dim=(2, 4, 6))


def kmeans(points: Tensor, clusters: int, seed: int = 0, weights: Tensor | None = None,
           iterations: int = KMEANS_ITERATIONS) -> Tensor:
    """Cluster centres (clusters, F) of points (N, F): k-means++ seeding, then Lloyd steps.

    ``weights`` (N,) >= 0 make it weighted k-means (a point counts its weight in the seeding and
    the means; the first centre is drawn by weight); None is every point once. Distinct points
    fewer than ``clusters`` leave some centres duplicated (never chosen).
    """
    gen = torch.Generator().manual_seed(seed)
    if weights is None:
        mass = torch.ones(len(points), dtype=points.dtype)
        centres = points[torch.randint(len(points), (1,), generator=gen)]
    else:
        mass = weights.to(points.dtype).clamp_min(0)
        centres = points[torch.multinomial(mass / mass.sum(), 1, generator=gen)]
    for _ in range(clusters - 1):
        nearest = torch.cdist(points, centres).min(1).values.square() * mass
        if float(nearest.sum()) == 0.0:
            pick = torch.zeros(1, dtype=torch.long)
        else:
            pick = torch.multinomial(nearest / nearest.sum(), 1, generator=gen)
        centres = torch.cat([centres, points[pick]])
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, points * mass[:, None])
        sizes = torch.zeros(clusters, dtype=points.dtype).index_add_(0, assign, mass)[:, None]
        centres = torch.where(sizes > 0, sums / sizes.clamp_min(1e-12), centres)
    return centres


def coarse_codes(indices: Tensor, features: Tensor, centres: Tensor, factor: int) -> Tensor:
    """The nearest cluster of each block: (B, d, h, w) -> (B, d/f, h/f, w/f) int64."""
    check_divisible(indices.shape[1:], factor)
    with torch.autocast(indices.device.type, enabled=False):  # the same clusters in any precision
        blocks = block_features(indices, features.float(), factor)
        flat = blocks.reshape(-1, blocks.shape[-1])
        return torch.cdist(flat, centres.float()).argmin(1).reshape(blocks.shape[:-1])


def repeat_blocks(grid: Tensor, factor: int, first_axis: int) -> Tensor:
    """Repeat each entry ``factor`` times along three axes from ``first_axis``:
    (..., d, h, w, ...) -> (..., f d, f h, f w, ...) (the inverse of taking one value per block)."""
    for axis in range(first_axis, first_axis + 3):
        grid = grid.repeat_interleave(factor, dim=axis)
    return grid


def check_divisible(grid: tuple[int, ...] | torch.Size, factor: int) -> None:
    """Raise `PriorInputError` unless every extent of the grid (d, h, w) is a multiple of factor."""
    if any(n % factor for n in grid):
        raise PriorInputError(
            f"latent grid {tuple(grid)} is not a multiple of the two-level prior's factor "
            f"{factor} along every axis; use a VQ-VAE whose latent grid is, or prior.factor "
            "that divides it"
        )
