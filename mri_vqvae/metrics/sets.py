"""Sets of volumes (samples vs held-out scans): diversity, feature MMD, memorisation, code use.

Volumes are (N, D, H, W) numpy arrays on the [0, 1] scale (one set per call; (N, 1, D, H, W)
tensors for `pooled_features`), features (N, F), code index grids any shape.

* `mean_pairwise_ms_ssim`: diversity, lower is more diverse;
* `gaussian_mmd2` between VQ-VAE encoder features (`pooled_features`: z_e average-pooled to
  2 x 2 x 2 and flattened; this is *not* an FID, no pretrained feature network is available
  offline);
* memorisation (`NearestScan`, `memorisation_flags`): each volume's nearest training scan by
  Pearson correlation; a sample nearer to a training scan than the closest held-out scan comes is
  flagged;
* `code_perplexity`: exp(entropy) of the codes used by a set of index grids.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mri_vqvae.metrics.image import MsSsimSettings, ms_ssim, ms_ssim_settings, plain_float

FEATURE_GRID = 2


def gaussian_mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None
                  ) -> tuple[float, float]:
    """Biased (V-statistic) squared MMD between feature sets x (N, F) and y (M, F).

    Kernel ``exp(-|a - b|^2 / (2 bandwidth^2))``; `bandwidth` None takes the median heuristic,
    the median of the nonzero pairwise distances of x and y pooled. Returns (mmd2 >= 0,
    bandwidth); exactly 0 when x and y are the same set.
    """
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"MMD needs two non-empty (N, F) sets, received {a.shape} and {b.shape}")
    z = np.concatenate([a, b])
    sq = (z**2).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0, None)
    if bandwidth is None:
        pairs = d2[np.triu_indices(len(z), 1)]
        positive = pairs[pairs > 0]
        bandwidth = float(np.sqrt(np.median(positive))) if positive.size else 1.0
    k = np.exp(-d2 / (2.0 * bandwidth**2))
    n = len(a)
    value = k[:n, :n].mean() + k[n:, n:].mean() - 2.0 * k[:n, n:].mean()
    return max(float(value), 0.0), float(bandwidth)


@torch.no_grad()
def pooled_features(model: torch.nn.Module, volumes: Tensor, grid: int = FEATURE_GRID,
                    batch_size: int = 4) -> np.ndarray:
    """VQ-VAE encoder features: volumes (N, 1, D, H, W) -> z_e pooled to grid^3 -> (N, E*grid^3)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(volumes), batch_size):
        z = model.encode(plain_float(volumes[start:start + batch_size]).to(device))
        out.append(F.adaptive_avg_pool3d(z.float(), grid).flatten(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def mean_pairwise_ms_ssim(volumes: np.ndarray, settings: MsSsimSettings | None = None,
                          chunk: int = 16) -> float:
    """Mean MS-SSIM over all pairs of `volumes` (N, D, H, W); nan if N < 2. Lower: more diverse."""
    v = torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32))[:, None]
    pairs = list(itertools.combinations(range(len(v)), 2))
    if not pairs:
        return math.nan
    s = settings or ms_ssim_settings(tuple(v.shape[2:]))
    values = []
    for start in range(0, len(pairs), chunk):
        i, j = zip(*pairs[start:start + chunk], strict=True)
        values.append(ms_ssim(v[list(i)], v[list(j)], settings=s))
    return float(torch.cat(values).double().mean())


def standardise(volumes: np.ndarray) -> np.ndarray:
    """(N, ...) -> (N, V) float32 rows with mean 0 and L2 norm 1 (a constant row stays 0).

    The dot product of two such rows is the Pearson correlation of the volumes.
    """
    x = np.asarray(volumes, dtype=np.float64).reshape(len(volumes), -1)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


class NearestScan:
    """Each query volume's nearest reference volume by Pearson correlation, streamed.

    ``NearestScan(queries (N, D, H, W))``, then ``update(ref_id, volume (D, H, W))`` per reference;
    ``best`` (N,) holds the highest correlation so far and ``best_id`` (N,) its reference id.
    """

    def __init__(self, queries: np.ndarray) -> None:
        self.queries = standardise(queries)
        self.best = np.full(len(self.queries), -np.inf)
        self.best_id: list[str | None] = [None] * len(self.queries)

    def update(self, ref_id: str, volume: np.ndarray) -> None:
        r = self.queries @ standardise(np.asarray(volume)[None])[0]
        for i in np.flatnonzero(r > self.best):
            self.best[i] = float(r[i])
            self.best_id[i] = ref_id


def memorisation_flags(sample_r: np.ndarray, held_out_r: np.ndarray) -> tuple[float, np.ndarray]:
    """(threshold, flags (N,)): samples nearer a training scan than any held-out scan comes.

    ``threshold`` is the largest nearest-training correlation of the held-out scans; a sample
    whose own nearest-training correlation exceeds it is flagged.
    """
    threshold = float(np.max(held_out_r)) if len(held_out_r) else math.inf
    return threshold, np.asarray(sample_r, dtype=np.float64) > threshold


def code_perplexity(indices: Sequence[Tensor], codebook_size: int) -> float:
    """exp(entropy) of the code histogram of all grids in `indices` (any shapes)."""
    counts = torch.zeros(codebook_size, dtype=torch.float64)
    for grid in indices:
        counts += torch.bincount(grid.reshape(-1).cpu(), minlength=codebook_size).double()
    p = counts / counts.sum()
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
