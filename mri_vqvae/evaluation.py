"""Held-out evaluation of a trained VQ-VAE (and optionally its prior) on the cases of one split.

Each case goes through the deterministic chain of the config the VQ-VAE was trained with, then
the model in eval mode (the codebook never moves). Reconstruction metrics are per case on the
[0, 1] scale (the decoder output is clamped to it first), each over the whole volume and inside
the foreground, ``target > FOREGROUND``:

* PSNR (MONAI), NMSE ``sum (pred - target)^2 / sum target^2``;
* SSIM (MONAI's 3D Gaussian window, `metrics.ssim`); inside the foreground it is the SSIM map
  averaged over the windows whose centre voxel is foreground;
* MS-SSIM (``monai.metrics.MultiScaleSSIMMetric``) with the settings of `ms_ssim_settings`: up
  to 3 scales (Wang et al.'s first weights renormalised: 0.0711, 0.4530, 0.4760) and the largest
  odd Gaussian window <= 7 (sigma 1.5) that MONAI accepts for the volume. 64 x 80 x 64 volumes get
  3 scales and a 7-voxel window (the coarsest scale is 16 voxels); 16^3 test volumes 3 scales and a
  3-voxel window. The five-scale, 11-voxel default needs >= 161 voxels per axis. Inside the
  foreground each scale's map is averaged with the foreground fraction (average-pooled with the
  images) as weights; with an all-foreground mask it equals MONAI's value.

Statistics over cases (`summarise`): mean, sample std, and a seeded percentile bootstrap interval
of the mean (2000 resamples, 95 %). Non-finite values (PSNR of a perfect reconstruction is inf)
are left out and counted.

Sets of volumes (samples vs held-out scans): `mean_pairwise_ms_ssim` (diversity: lower is more
diverse), `gaussian_mmd2` between VQ-VAE encoder features (`pooled_features`: z_e average-pooled
to 2 x 2 x 2 and flattened; this is *not* an FID, no pretrained feature network is available
offline), and memorisation (`NearestScan`): each volume's nearest training scan by Pearson
correlation; a sample nearer to a training scan than the closest held-out scan comes is flagged.

`evaluate_runs` ties these together for `mri-vqvae evaluate`; it refuses anything but a held-out
split of the manifest the VQ-VAE was trained on (`check_held_out`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.metrics import MultiScaleSSIMMetric
from monai.metrics.regression import compute_ssim_and_cs
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mri_vqvae.atomic import atomic_write_text
from mri_vqvae.batch import Failure, run_batch, write_failures
from mri_vqvae.checkpoint import LoadedCheckpoint, load_checkpoint
from mri_vqvae.config import DataConfig, ExperimentConfig
from mri_vqvae.data import case_items
from mri_vqvae.errors import CheckpointError, MriVqvaeError
from mri_vqvae.manifest import Manifest
from mri_vqvae.metrics import mean_of, psnr, ssim_window
from mri_vqvae.transforms import build_transforms

if TYPE_CHECKING:
    from mri_vqvae.latents import VQVAESource
    from mri_vqvae.prior import GatedPixelCNN3D
    from mri_vqvae.synthesis import PriorRun
    from mri_vqvae.vqvae import VQVAE

log = logging.getLogger(__name__)

FOREGROUND = 0.05  # intensity on the [0, 1] scale above which a voxel counts as foreground
MS_SSIM_SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, 5 scales
MS_SSIM_MAX_SCALES = 3
MS_SSIM_KERNELS = (7, 5, 3)
SSIM_SIGMA = 1.5
BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95
FEATURE_GRID = 2
METRIC_KEYS = ("psnr", "ssim", "ms_ssim", "nmse")
FOREGROUND_KEYS = tuple(f"{k}_foreground" for k in METRIC_KEYS)
NOT_FID = (
    "MMD between VQ-VAE encoder features (z_e average-pooled to 2x2x2) of samples and held-out "
    "scans. This is NOT an FID: no pretrained feature network is available offline, and the "
    "features come from the model under test, so it is only comparable between runs that share "
    "the VQ-VAE."
)


class EvaluationError(MriVqvaeError, ValueError):
    """An evaluation request that would not measure held-out data (says what and how to fix)."""


# --- per-case reconstruction metrics -------------------------------------------------------------


@dataclass(frozen=True)
class CaseQuality:
    """Reconstruction metrics of one case (``*_foreground``: inside ``target > FOREGROUND``)."""

    case_id: str
    subject_id: str
    split: str
    psnr: float
    ssim: float
    nmse: float
    psnr_foreground: float
    codes_used: int
    ms_ssim: float = math.nan
    ssim_foreground: float = math.nan
    ms_ssim_foreground: float = math.nan
    nmse_foreground: float = math.nan


@dataclass(frozen=True)
class QualityReport:
    """Per-case metrics, their means, and codebook usage over all cases together."""

    cases: list[CaseQuality]
    failures: list[Failure]
    codes_used: int
    codebook_size: int

    def summary(self) -> dict[str, Any]:
        """Means over cases plus codebook usage, JSON-ready."""
        keys = ("psnr", "ssim", "nmse", "psnr_foreground", "ms_ssim", "ssim_foreground",
                "ms_ssim_foreground", "nmse_foreground")
        means = {k: mean_of([getattr(c, k) for c in self.cases]) for k in keys}
        return {
            "num_cases": len(self.cases),
            "num_failures": len(self.failures),
            **{f"mean_{k}": v for k, v in means.items()},
            "codes_used": self.codes_used,
            "codebook_size": self.codebook_size,
            "codebook_usage": self.codes_used / self.codebook_size,
            "cases": [asdict(c) for c in self.cases],
        }


@dataclass(frozen=True)
class MsSsimSettings:
    """MS-SSIM window (odd, voxels), per-scale weights (sum 1) and Gaussian sigma."""

    kernel_size: int
    weights: tuple[float, ...]
    sigma: float = SSIM_SIGMA

    def as_dict(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel_size, "sigma": self.sigma,
                "weights": list(self.weights), "scales": len(self.weights)}


def ms_ssim_settings(spatial_shape: Sequence[int]) -> MsSsimSettings:
    """The most scales (<= 3), then the largest window (7, 5, 3) that fit `spatial_shape` (D, H, W).

    A setting fits when MONAI accepts it (``min(shape) // (scales - 1)**2 > kernel - 1``) and the
    coarsest scale is still at least one window wide.
    """
    smallest = min(int(s) for s in spatial_shape)
    for scales in range(MS_SSIM_MAX_SCALES, 0, -1):
        divisor = max(1, scales - 1) ** 2
        coarsest = smallest // 2 ** (scales - 1)
        for kernel in MS_SSIM_KERNELS:
            if smallest // divisor > kernel - 1 and coarsest >= kernel:
                raw = MS_SSIM_SCALE_WEIGHTS[:scales]
                total = math.fsum(raw)
                return MsSsimSettings(kernel, tuple(w / total for w in raw))
    raise ValueError(f"MS-SSIM needs every axis >= 3 voxels, received shape {tuple(spatial_shape)}")


def _plain(x: Any) -> Tensor:
    """A float32 torch tensor (no MetaTensor)."""
    t = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
    return t.detach().float()


def _pair(pred: Tensor, target: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    """(B, 1, D, H, W) float32 tensors, ``pred`` clamped to ``[0, data_range]``."""
    pred, target = _plain(pred), _plain(target)
    if pred.shape != target.shape or pred.ndim != 5 or pred.shape[1] != 1:
        raise ValueError(
            f"metrics need pred and target of the same (B, 1, D, H, W) shape, received "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return pred.clamp(0.0, data_range), target


def ms_ssim(pred: Tensor, target: Tensor, data_range: float = 1.0,
            settings: MsSsimSettings | None = None) -> Tensor:
    """Multi-scale SSIM per volume with MONAI's metric: (B, 1, D, H, W) x 2 -> (B,); 1 = equal."""
    pred, target = _pair(pred, target, data_range)
    s = settings or ms_ssim_settings(tuple(pred.shape[2:]))
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=s.kernel_size,
                                  kernel_sigma=s.sigma, weights=s.weights, reduction="none")
    return metric(pred, target).reshape(-1)


def _weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """(B, 1, ...) values and weights -> (B,) weighted means (nan where the weights sum to 0)."""
    w = weights.flatten(1)
    return (values.flatten(1) * w).sum(1) / w.sum(1)


def _window_centres(weights: Tensor, kernel: int) -> Tensor:
    """Crop (B, 1, D, H, W) weights to the centres of the valid windows of size `kernel`."""
    c = (kernel - 1) // 2
    d, h, w = weights.shape[2:]
    return weights[:, :, c:d - c, c:h - c, c:w - c]


def _multiscale(pred: Tensor, target: Tensor, masks: Sequence[Tensor | None],
                s: MsSsimSettings, relu: bool = True) -> list[Tensor]:
    """(MS-)SSIM of prepared pred/target (B, 1, D, H, W) averaged over each mask -> [(B,), ...].

    MONAI's formula (`compute_ssim_and_cs` per scale; contrast sensitivity at the finer scales,
    SSIM at the coarsest; relu; product of the values to the scale weights), with each scale's
    map averaged over the windows centred in a mask; None averages every window, which is
    exactly MONAI's value. The maps are computed once for all masks; a mask is average-pooled
    with the images and used as weights. ``relu=False`` with one scale is plain (masked) SSIM.
    """
    weights = [None if m is None else _plain(m).to(pred.dtype) for m in masks]
    values: list[list[Tensor]] = [[] for _ in masks]
    k = (s.kernel_size,) * 3
    for i in range(len(s.weights)):
        ssim_map, cs_map = compute_ssim_and_cs(pred, target, 3, k, (s.sigma,) * 3)
        last = i == len(s.weights) - 1
        chosen = ssim_map if last else cs_map
        for j, w in enumerate(weights):
            v = (chosen.flatten(1).mean(1) if w is None
                 else _weighted_mean(chosen, _window_centres(w, s.kernel_size)))
            values[j].append(torch.relu(v) if relu else v)
        if not last:
            pred, target = F.avg_pool3d(pred, 2), F.avg_pool3d(target, 2)
            weights = [None if w is None else F.avg_pool3d(w, 2) for w in weights]
    exponents = torch.tensor(s.weights, dtype=pred.dtype, device=pred.device).view(-1, 1)
    return [torch.prod(torch.stack(v) ** exponents, dim=0) for v in values]


def masked_ms_ssim(pred: Tensor, target: Tensor, mask: Tensor, data_range: float = 1.0,
                   settings: MsSsimSettings | None = None) -> Tensor:
    """MS-SSIM with each scale's map averaged over `mask` (B, 1, D, H, W) -> (B,) (`_multiscale`).

    Per scale the mask is average-pooled with the images and used as weights; with an all-ones
    mask this equals MONAI's MS-SSIM.
    """
    pred, target = _pair(pred, target, data_range)
    pred, target = pred / data_range, target / data_range
    s = settings or ms_ssim_settings(tuple(pred.shape[2:]))
    return _multiscale(pred, target, [mask], s)[0]


def masked_ssim(pred: Tensor, target: Tensor, mask: Tensor, data_range: float = 1.0) -> Tensor:
    """SSIM (the window of `metrics.ssim`) averaged over windows centred in `mask` -> (B,)."""
    pred, target = _pair(pred, target, data_range)
    pred, target = pred / data_range, target / data_range
    window = ssim_window(tuple(pred.shape[2:]))
    return _multiscale(pred, target, [mask], MsSsimSettings(window, (1.0,)), relu=False)[0]


def nmse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Normalised squared error ``sum (pred - target)^2 / sum target^2`` over `mask` -> (B,)."""
    pred, target = _pair(pred, target, 1.0)
    w = torch.ones_like(target) if mask is None else _plain(mask)
    err = ((pred - target) ** 2 * w).flatten(1).sum(1)
    return err / (target**2 * w).flatten(1).sum(1)


def masked_psnr(pred: Tensor, target: Tensor, mask: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR in dB over the voxels of `mask` -> (B,); inf where they are reproduced exactly."""
    pred, target = _pair(pred, target, data_range)
    w = _plain(mask)
    mse = ((pred - target) ** 2 * w).flatten(1).sum(1) / w.flatten(1).sum(1)
    return 20 * math.log10(data_range) - 10 * torch.log10(mse)


def _psnr_in(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    return float(masked_psnr(pred, target, mask.float())[0])


def quality_of(pred: Tensor, target: Tensor, item: Mapping[str, Any], indices: Tensor
               ) -> CaseQuality:
    """Every metric of one reconstruction: pred, target (1, 1, D, H, W), indices (1, d, h, w).

    SSIM and MS-SSIM maps are computed once for the whole volume and the foreground together.
    """
    pred, target = _pair(pred, target, 1.0)
    mask = (target > FOREGROUND).float()
    shape = tuple(target.shape[2:])
    ssim_all, ssim_fg = _multiscale(pred, target, [None, mask],
                                    MsSsimSettings(ssim_window(shape), (1.0,)), relu=False)
    ms_all, ms_fg = _multiscale(pred, target, [None, mask], ms_ssim_settings(shape))
    return CaseQuality(
        case_id=str(item["case_id"]),
        subject_id=str(item.get("subject_id", "")),
        split=str(item.get("split", "")),
        psnr=float(psnr(pred, target)[0]),
        ssim=float(ssim_all[0]),
        nmse=float(nmse(pred, target)[0]),
        psnr_foreground=float(masked_psnr(pred, target, mask)[0]),
        codes_used=int(indices.unique().numel()),
        ms_ssim=float(ms_all[0]),
        ssim_foreground=float(ssim_fg[0]),
        ms_ssim_foreground=float(ms_fg[0]),
        nmse_foreground=float(nmse(pred, target, mask)[0]),
    )


def experiment_of(loaded: LoadedCheckpoint) -> ExperimentConfig:
    """The experiment config a VQ-VAE checkpoint was trained with (stored in its extra)."""
    raw = loaded.extra.get("experiment")
    if raw is None:
        raise CheckpointError(
            f"{loaded.path}: no experiment config in the checkpoint's extra; it was not written "
            "by train-vqvae, so the preprocessing it expects is unknown"
        )
    return ExperimentConfig.model_validate(raw)


@torch.no_grad()
def case_quality(model: torch.nn.Module, image: torch.Tensor, item: dict[str, Any]
                 ) -> tuple[CaseQuality, torch.Tensor]:
    """Metrics of one preprocessed volume (1, D, H, W); returns them and the code indices."""
    target = _plain(image).unsqueeze(0)  # (1, 1, D, H, W)
    out = model(target)
    return quality_of(out.reconstruction, target, item, out.indices), out.indices


def evaluate_reconstruction(
    checkpoint: str | Path, manifest: Manifest, split: str, strict: bool = False
) -> QualityReport:
    """Reconstruct every case of `split` with the VQ-VAE in `checkpoint` and measure quality."""
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval()
    config = experiment_of(loaded)
    chain = build_transforms(config.data)
    seen: set[int] = set()

    def one(item: dict[str, Any]) -> CaseQuality:
        quality, indices = case_quality(model, chain(dict(item))["image"], item)
        seen.update(indices.unique().tolist())
        return quality

    cases, failures = run_batch(
        case_items(manifest, config.data, split), one, strict=strict, desc=f"evaluate {split}"
    )
    return QualityReport(cases, failures, len(seen), model.config.codebook_size)


# --- statistics over cases -----------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Mean, sample std and bootstrap interval of the mean over the finite values."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int
    n_excluded: int = 0
    level: float = CI_LEVEL

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "ci": [self.ci_low, self.ci_high],
                "ci_level": self.level, "n": self.n, "n_excluded_non_finite": self.n_excluded}

    def text(self, digits: int = 4) -> str:
        """``mean ± std [low, high]``."""
        if not self.n:
            return "n/a"
        return (f"{self.mean:.{digits}f} ± {self.std:.{digits}f} "
                f"[{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]")


def bootstrap_ci(values: Sequence[float], num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                 level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (n,): the same seed, the same interval.

    `num_resamples` resamples of n values drawn with replacement by ``numpy.random.default_rng
    (seed)``; the interval is their means' (1 - level)/2 and (1 + level)/2 quantiles.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def summarise(values: Sequence[float], num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
              level: float = CI_LEVEL) -> Summary:
    """`Summary` of per-case `values`; non-finite ones (PSNR inf) are left out and counted."""
    x = np.asarray(values, dtype=np.float64)
    finite = x[np.isfinite(x)]
    excluded = int(x.size - finite.size)
    if finite.size == 0:
        return Summary(math.nan, math.nan, math.nan, math.nan, 0, excluded, level)
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    low, high = bootstrap_ci(finite, num_resamples, seed, level)
    return Summary(float(finite.mean()), std, low, high, int(finite.size), excluded, level)


# --- sets of volumes: diversity, feature MMD, memorisation ---------------------------------------


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
        z = model.encode(_plain(volumes[start:start + batch_size]).to(device))
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


# --- preprocessing many cases (optionally in worker processes) -----------------------------------


@dataclass(frozen=True)
class Prepared:
    """One case after the deterministic chain: volume (D, H, W) float32, affine (4, 4) RAS.

    ``error`` holds the reason (and volume/affine are None) when preprocessing failed.
    """

    item: dict[str, Any]
    volume: np.ndarray | None
    affine: np.ndarray | None
    error: str | None = None


def describe_error(exc: BaseException) -> str:
    """One line naming the innermost cause (MONAI wraps reader errors in RuntimeError)."""
    while exc.__cause__ is not None and not isinstance(exc, MriVqvaeError):
        exc = exc.__cause__
    text = str(exc) if isinstance(exc, MriVqvaeError) else f"{type(exc).__name__}: {exc}"
    return text.replace("\n", " ")


class _PreparedCases(Dataset):
    """``ds[i]`` -> `Prepared` of ``items[i]``; errors are caught and described (picklable)."""

    def __init__(self, items: Sequence[dict[str, Any]], data: DataConfig) -> None:
        self.items = list(items)
        self.chain = build_transforms(data)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Prepared:
        item = self.items[i]
        try:
            image = self.chain(dict(item))["image"]
        except Exception as exc:  # any unreadable case is reported, never fatal in a worker
            return Prepared(item, None, None, describe_error(exc))
        volume = _plain(image)[0].cpu().numpy().astype(np.float32)
        return Prepared(item, volume, np.asarray(image.affine, dtype=np.float64))


def _first(batch: list[Prepared]) -> Prepared:
    return batch[0]


def iter_prepared(items: Sequence[dict[str, Any]], data: DataConfig, num_workers: int = 0
                  ) -> Iterator[Prepared]:
    """Preprocess `items` in order with `num_workers` worker processes (0: in this process)."""
    if not items:
        return iter(())
    loader = DataLoader(_PreparedCases(items, data), batch_size=1, shuffle=False,
                        num_workers=num_workers, collate_fn=_first)
    return iter(loader)


def progress(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A tqdm bar with ETA on a terminal (off otherwise)."""
    return tqdm(total=total, desc=desc, unit="case", disable=not enabled or not sys.stderr.isatty())


# --- the held-out guard --------------------------------------------------------------------------

HELD_OUT_SPLITS = ("val", "test")


def recorded_manifest_digests(run_dir: Path, extra: Mapping[str, Any]) -> dict[str, str]:
    """Manifest digests a VQ-VAE run recorded: ``run.json`` and the checkpoint's extra."""
    found: dict[str, str] = {}
    run_json = run_dir / "run.json"
    if run_json.is_file():
        try:
            doc = json.loads(run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            doc = {}
        if isinstance(doc, dict) and doc.get("manifest_digest"):
            found[str(run_json)] = str(doc["manifest_digest"])
    if extra.get("manifest_digest"):
        found["checkpoint extra.manifest_digest"] = str(extra["manifest_digest"])
    return found


def refuse_split(split: str) -> None:
    """Raise `EvaluationError` unless `split` is a held-out split (val or test)."""
    if split == "train":
        raise EvaluationError(
            "refusing to evaluate on the train split: its cases trained the model, so the "
            "numbers would not measure generalisation; pass --split test (or val)"
        )
    if split not in HELD_OUT_SPLITS:
        raise EvaluationError(f"unknown split {split!r}; use one of {list(HELD_OUT_SPLITS)}")


def check_held_out(manifest: Manifest, split: str, recorded: Mapping[str, str],
                   run_label: str) -> dict[str, Any]:
    """Refuse anything but a held-out split of the manifest the run was trained on.

    Raises `EvaluationError` when `split` is ``train`` (or unknown), when the run recorded no
    manifest digest or one that differs from ``manifest.digest``, when the split is empty, or
    when a held-out subject also has training cases. Returns what was checked (JSON-ready).
    """
    refuse_split(split)
    if not recorded:
        raise EvaluationError(
            f"{run_label} records no manifest digest (run.json manifest_digest or checkpoint "
            "extra.manifest_digest), so it cannot be checked that the evaluated cases were held "
            "out; evaluate a run made by `mri-vqvae train-vqvae`"
        )
    wrong = {where: d for where, d in recorded.items() if d != manifest.digest}
    if wrong:
        where, digest = next(iter(wrong.items()))
        raise EvaluationError(
            f"manifest {manifest.name!r} has digest {manifest.digest[:16]}..., but {run_label} was "
            f"trained on a manifest with digest {digest[:16]}... ({where}); the splits may "
            "differ, so held-out cases cannot be trusted: pass the exact manifest the run used "
            "(a copy is in the run folder as manifest.json)"
        )
    held = {c.subject_id for c in manifest.cases if c.split == split}
    train = {c.subject_id for c in manifest.cases if c.split == "train"}
    if not held:
        raise EvaluationError(f"manifest {manifest.name!r} has no case in split {split!r}")
    overlap = sorted(held & train)
    if overlap:
        raise EvaluationError(
            f"subjects {overlap[:5]} of split {split!r} also have training cases in manifest "
            f"{manifest.name!r}: they are not held out; re-split the manifest by subject and "
            "retrain, or evaluate on a split whose subjects the model never saw"
        )
    return {"split": split, "manifest_digest": manifest.digest,
            "digest_sources": sorted(recorded), "held_out_subjects": len(held),
            "train_subjects": len(train), "subject_overlap": 0}


# --- the evaluate command ------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluateSettings:
    """What `evaluate_runs` measures; ``max_train_cases`` None uses every training case."""

    split: str = "test"
    num_samples: int = 8
    seed: int = 0
    num_resamples: int = BOOTSTRAP_RESAMPLES
    max_train_cases: int | None = None
    report_cases: int = 4
    num_workers: int = 0
    strict: bool = False
    sample_batch_size: int = 8
    sample_threads: int | None = 1


@dataclass
class HeldOut:
    """What the held-out pass kept: per-case metrics, volumes (D, H, W), grids (d, h, w)."""

    cases: list[CaseQuality] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)
    volumes: list[np.ndarray] = field(default_factory=list)
    indices: list[Tensor] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    bits: list[float] = field(default_factory=list)
    views: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)


@dataclass(frozen=True)
class EvaluationResult:
    """Where `evaluate_runs` wrote its files, and metrics.json's content."""

    out_dir: Path
    metrics: dict[str, Any]
    failures: list[Failure]

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.json"

    @property
    def per_case_path(self) -> Path:
        return self.out_dir / "per_case.csv"

    @property
    def report_path(self) -> Path:
        return self.out_dir / "report.html"


def default_eval_dir(runs_root: str | Path, run_names: Sequence[str]) -> Path:
    """``runs_root/eval/<UTC>-<run>[_<run>]/``, created (``-2``... on a clash)."""
    from mri_vqvae.runs import utc_stamp

    parent = Path(runs_root) / "eval"
    parent.mkdir(parents=True, exist_ok=True)
    base = f"{utc_stamp()}-{'_'.join(run_names)}"
    for n in range(1, 10_000):
        path = parent / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise EvaluationError(f"could not create a new evaluation folder under {parent}")


@torch.no_grad()
def _held_out_pass(model: VQVAE, data: DataConfig, items: list[dict[str, Any]],
                   prior: GatedPixelCNN3D | None, s: EvaluateSettings, device: torch.device
                   ) -> HeldOut:
    """Metrics, grids, encoder features (and bits, with a prior) of every held-out case."""
    held = HeldOut()
    bar = progress(len(items), f"evaluate {s.split}")
    with bar:
        for prepared in iter_prepared(items, data, s.num_workers):
            bar.update(1)
            item = prepared.item
            try:
                if prepared.error is not None:
                    raise EvaluationError(prepared.error)
                assert prepared.volume is not None
                target = torch.from_numpy(prepared.volume)[None, None].to(device)
                z_e = model.encode(target)
                q = model.quantize(z_e)
                recon = model.decode(q.quantized).float()
                quality = quality_of(recon.cpu(), target.cpu(), item, q.indices)
            except (MriVqvaeError, OSError, RuntimeError, ValueError) as exc:
                reason = describe_error(exc)
                if s.strict:
                    raise EvaluationError(f"case {item['case_id']} ({item['image']}): {reason}"
                                          ) from None
                log.warning("skipping %s: %s", item["case_id"], reason)
                held.failures.append(Failure(item["case_id"], item["image"], reason))
                continue
            held.cases.append(quality)
            held.paths[quality.case_id] = item["image"]
            held.volumes.append(prepared.volume)
            held.indices.append(q.indices[0].cpu())
            held.features.append(F.adaptive_avg_pool3d(z_e.float(), FEATURE_GRID)
                                 .flatten(1)[0].cpu().numpy())
            if prior is not None:
                held.bits.append(float(prior.nll(q.indices)))
            if len(held.views) < s.report_cases:
                held.views.append((quality.case_id, prepared.volume,
                                   recon[0, 0].clamp(0, 1).cpu().numpy()))
    return held


def _train_items(manifest: Manifest, data: DataConfig, s: EvaluateSettings
                 ) -> list[dict[str, Any]]:
    items = case_items(manifest, data, "train")
    if s.max_train_cases is not None and len(items) > s.max_train_cases:
        rng = np.random.default_rng(s.seed)
        keep = sorted(rng.choice(len(items), size=s.max_train_cases, replace=False).tolist())
        items = [items[i] for i in keep]
    return items


@torch.no_grad()
def _train_pass(model: VQVAE, prior: GatedPixelCNN3D, data: DataConfig,
                items: list[dict[str, Any]], nearest: NearestScan, s: EvaluateSettings,
                device: torch.device) -> tuple[list[float], list[Failure]]:
    """Bits per latent of each training case; streams every training scan into `nearest`."""
    bits: list[float] = []
    failures: list[Failure] = []
    bar = progress(len(items), "train grids")
    with bar:
        for prepared in iter_prepared(items, data, s.num_workers):
            bar.update(1)
            item = prepared.item
            if prepared.error is not None or prepared.volume is None:
                log.warning("skipping training case %s: %s", item["case_id"], prepared.error)
                failures.append(Failure(item["case_id"], item["image"], str(prepared.error)))
                continue
            x = torch.from_numpy(prepared.volume)[None, None].to(device)
            bits.append(float(prior.nll(model.encode_indices(x))))
            nearest.update(str(item["case_id"]), prepared.volume)
    return bits, failures


def _reconstruction_block(held: HeldOut, s: EvaluateSettings, spatial: Sequence[int],
                          codebook_size: int) -> dict[str, Any]:
    keys = METRIC_KEYS + FOREGROUND_KEYS + ("codes_used",)
    stats = {k: summarise([getattr(c, k) for c in held.cases], s.num_resamples, s.seed).as_dict()
             for k in keys}
    used = len(set(torch.cat([g.reshape(-1) for g in held.indices]).tolist())) if held.indices \
        else 0
    return {
        "num_cases": len(held.cases),
        "num_failures": len(held.failures),
        "ms_ssim_settings": ms_ssim_settings(spatial).as_dict(),
        "foreground": {"threshold": FOREGROUND,
                       "definition": "voxels of the preprocessed target above the threshold "
                                     "on the [0, 1] intensity scale"},
        "metrics": stats,
        "codebook": {"codebook_size": codebook_size, "codes_used": used,
                     "usage": used / codebook_size,
                     "perplexity": code_perplexity(held.indices, codebook_size)},
    }


def json_ready(obj: Any) -> Any:
    """A JSON-ready copy: NaN and inf become None (JSON has neither), numpy scalars numbers."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_per_case(path: Path, held: HeldOut, nearest: NearestScan | None,
                   num_samples: int) -> None:
    """per_case.csv: one row per held-out case (metrics, bits, nearest training scan)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    cols = ["case_id", "subject_id", "split", *METRIC_KEYS, *FOREGROUND_KEYS, "codes_used"]
    extra = ["bits_per_latent", "nearest_train_case", "nearest_train_r"] if held.bits else []
    writer.writerow(cols + extra)
    for i, case in enumerate(held.cases):
        row: list[Any] = [getattr(case, c) for c in cols]
        if extra:
            ref = None if nearest is None else nearest.best_id[num_samples + i]
            r = math.nan if nearest is None else nearest.best[num_samples + i]
            row += [held.bits[i], ref or "", r]
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())


def evaluate_runs(
    vqvae_run: str | Path,
    manifest: Manifest,
    out_dir: str | Path | None,
    prior_run: str | Path | None = None,
    settings: EvaluateSettings | None = None,
    device: str | torch.device = "cpu",
    manifest_path: str | Path | None = None,
    runs_root: str | Path = "runs",
) -> EvaluationResult:
    """Evaluate a VQ-VAE run (and a prior run) on a held-out split; write the evaluation folder.

    Files: metrics.json (see docs/evaluation.md for the schema), per_case.csv, failures.csv,
    figures/*.png, samples/ (with a prior) and report.html (self-contained). `out_dir` None
    makes ``runs_root/eval/<UTC>-<runs>/`` once every check has passed.
    """
    from mri_vqvae.latents import load_vqvae_source

    s = settings or EvaluateSettings()
    dev = torch.device(device)
    source = load_vqvae_source(vqvae_run)
    loaded_extra = load_checkpoint(source.checkpoint).extra
    recorded = recorded_manifest_digests(source.run_dir, loaded_extra)
    guard = check_held_out(manifest, s.split, recorded, f"VQ-VAE run {source.run_dir}")
    prior = _load_prior(prior_run, source, manifest, dev) if prior_run is not None else None
    names = [source.run_dir.name] + ([] if prior is None else [prior.paths.run_dir.name])
    out = Path(out_dir) if out_dir is not None else default_eval_dir(runs_root, names)
    out.mkdir(parents=True, exist_ok=True)
    model = source.model.to(dev).eval()
    items = case_items(manifest, source.data, s.split)
    held = _held_out_pass(model, source.data, items, None if prior is None else prior.prior, s,
                          dev)
    if not held.cases:
        raise EvaluationError(
            f"no case of split {s.split!r} could be evaluated ({len(held.failures)} failed: "
            f"{held.failures[0].reason if held.failures else 'none listed'})"
        )
    metrics: dict[str, Any] = {
        "format": "mri-vqvae-evaluation",
        "format_version": 1,
        "inputs": _inputs(source, prior, manifest, manifest_path, s),
        "held_out_check": guard,
        "reconstruction": _reconstruction_block(held, s, source.data.spatial_size,
                                                source.codebook_size),
        "likelihood": None,
        "samples": None,
    }
    nearest = None
    failures = list(held.failures)
    sample_volumes_ = None
    if prior is not None:
        sample_volumes_, samples_block = _samples_block(prior, model, held, s, out, dev)
        nearest = NearestScan(np.concatenate([sample_volumes_, np.stack(held.volumes)]))
        train_items = _train_items(manifest, source.data, s)
        train_bits, train_failures = _train_pass(model, prior.prior, source.data, train_items,
                                                 nearest, s, dev)
        failures += train_failures
        metrics["likelihood"] = _likelihood_block(held.bits, train_bits, source.codebook_size, s)
        samples_block["memorisation"] = _memorisation_block(nearest, s.num_samples, held)
        metrics["samples"] = samples_block
    metrics["failures"] = [asdict(f) for f in failures]
    metrics = json_ready(_with_provenance(metrics, dev))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_per_case(out / "per_case.csv", held, nearest, s.num_samples)
    write_failures(out / "failures.csv", failures)
    write_report(out, metrics, held, source, prior)
    log.info("wrote metrics.json, per_case.csv and report.html to %s", out)
    return EvaluationResult(out, metrics, failures)


def _load_prior(prior_run: str | Path, source: VQVAESource, manifest: Manifest,
                device: torch.device) -> PriorRun:
    """The prior run, checked to model the codes of `source` on `manifest`'s training split."""
    from mri_vqvae.synthesis import load_prior_run

    try:
        prior = load_prior_run(prior_run, device, vqvae_checkpoint=source.checkpoint)
    except CheckpointError as exc:
        raise EvaluationError(
            f"the prior run {prior_run} cannot be used with the VQ-VAE {source.checkpoint}: {exc}"
        ) from None
    digest = str(prior.extra.get("manifest_digest"))
    if digest != manifest.digest:
        raise EvaluationError(
            f"the prior {prior.paths.prior_checkpoint} was trained on latents of a manifest with "
            f"digest {digest[:16]}..., not {manifest.name!r} ({manifest.digest[:16]}...); pass "
            "the manifest both runs were trained on"
        )
    if prior.data != source.data:
        raise EvaluationError(
            f"the prior {prior.paths.prior_checkpoint} records a different data config than the "
            f"VQ-VAE {source.checkpoint}; re-encode the latents and retrain the prior"
        )
    return prior


def _inputs(source: VQVAESource, prior: PriorRun | None, manifest: Manifest,
            manifest_path: str | Path | None, s: EvaluateSettings) -> dict[str, Any]:
    return {
        "vqvae_run": str(source.run_dir),
        "vqvae_checkpoint": str(source.checkpoint),
        "vqvae_sha256": source.weights_sha256,
        "prior_run": None if prior is None else str(prior.paths.run_dir),
        "prior_checkpoint": None if prior is None else str(prior.paths.prior_checkpoint),
        "prior_sha256": None if prior is None else prior.sha256s["prior"],
        "manifest_name": manifest.name,
        "manifest_path": None if manifest_path is None else str(Path(manifest_path).resolve()),
        "manifest_digest": manifest.digest,
        "data": source.data.model_dump(mode="json"),
        **{k: v for k, v in asdict(s).items() if k not in ("strict",)},
        "ci_level": CI_LEVEL,
    }


def _with_provenance(metrics: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from mri_vqvae.runs import describe_device, git_state, package_versions, utc_stamp

    return {**metrics, "created_utc": utc_stamp(), "device": describe_device(device),
            "git": git_state(), "versions": package_versions()}


def _likelihood_block(held_bits: list[float], train_bits: list[float], codebook_size: int,
                      s: EvaluateSettings) -> dict[str, Any]:
    held = summarise(held_bits, s.num_resamples, s.seed)
    train = summarise(train_bits, s.num_resamples, s.seed)
    return {
        "units": "bits per latent (mean -log2 p(code | earlier codes) over a grid), per case",
        "held_out": held.as_dict(),
        "train": train.as_dict(),
        "generalisation_gap": held.mean - train.mean,
        "uniform_bits": math.log2(codebook_size),
        "num_train_cases": len(train_bits),
    }


def _samples_block(prior: PriorRun, model: VQVAE, held: HeldOut, s: EvaluateSettings,
                   out: Path, device: torch.device) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw samples into out/samples/; diversity and feature MMD against the held-out scans."""
    from mri_vqvae.synthesis import SampleSettings, decode_volumes, sample_volumes

    settings = SampleSettings(num_samples=s.num_samples, seed=s.seed,
                              batch_size=s.sample_batch_size)
    drawn = sample_volumes(prior, settings, out / "samples", threads=s.sample_threads)
    volumes = np.clip(decode_volumes(prior.vqvae, drawn.indices.to(device)), 0.0, 1.0)
    real = np.stack(held.volumes)
    pick = np.sort(np.random.default_rng(s.seed).permutation(len(real))[: s.num_samples])
    sample_features = pooled_features(model, torch.from_numpy(volumes)[:, None])
    mmd2, bandwidth = gaussian_mmd2(sample_features, np.stack(held.features))
    resolved = settings.resolved(prior)
    return volumes, {
        "num_samples": s.num_samples,
        "seed": s.seed,
        "temperature": resolved.temperature,
        "top_k": resolved.top_k,
        "folder": "samples",
        "diversity": {
            "measure": "mean pairwise MS-SSIM (lower = more diverse)",
            "samples": mean_pairwise_ms_ssim(volumes),
            "held_out": mean_pairwise_ms_ssim(real[pick]),
            "num_held_out_used": int(len(pick)),
        },
        "mmd": {"mmd2": mmd2, "bandwidth": bandwidth, "kernel": "gaussian, median heuristic",
                "estimator": "biased (V-statistic), >= 0",
                "features": f"VQ-VAE z_e average-pooled to {FEATURE_GRID}^3, flattened",
                "num_samples": len(sample_features), "num_held_out": len(held.features),
                "note": NOT_FID},
    }


def _memorisation_block(nearest: NearestScan, num_samples: int, held: HeldOut
                        ) -> dict[str, Any]:
    sample_r, held_r = nearest.best[:num_samples], nearest.best[num_samples:]
    threshold, flags = memorisation_flags(sample_r, held_r)
    return {
        "measure": "Pearson correlation with the nearest training scan (preprocessed grid)",
        "threshold": threshold,
        "rule": "a sample is flagged when it is nearer a training scan than the closest "
                "held-out scan comes (r > threshold)",
        "num_flagged": int(flags.sum()),
        "samples": [{"sample": i, "nearest_train_case": nearest.best_id[i], "r": float(r),
                     "flagged": bool(f)} for i, (r, f) in enumerate(zip(sample_r, flags,
                                                                          strict=True))],
        "held_out": [{"case_id": c.case_id, "nearest_train_case": nearest.best_id[num_samples + i],
                      "r": float(held_r[i])} for i, c in enumerate(held.cases)],
    }


# --- report.html ---------------------------------------------------------------------------------


def write_report(out: Path, metrics: Mapping[str, Any], held: HeldOut, source: VQVAESource,
                 prior: PriorRun | None) -> Path:
    """report.html in `out` (figures in out/figures/, each embedded as a base64 data URI).

    Likelihood maps (`synthesis.likelihood_map`) are computed here for the cases shown.
    """
    from mri_vqvae.report import CaseView, LikelihoodView, RunCurves, evaluation_report
    from mri_vqvae.runs import read_metrics

    by_id = {c.case_id: c for c in held.cases}
    views = [CaseView(cid, image, recon, asdict(by_id[cid])) for cid, image, recon in held.views]
    likelihoods = []
    runs = [RunCurves("vqvae", source.run_dir.name, read_metrics(source.run_dir))]
    if prior is not None:
        from mri_vqvae.synthesis import likelihood_map

        for cid, _, _ in held.views:
            result = likelihood_map(prior, held.paths[cid])
            likelihoods.append(LikelihoodView(cid, result.image, result.bits_map,
                                              result.mean_bits))
        runs.append(RunCurves("prior", prior.paths.run_dir.name,
                              read_metrics(prior.paths.run_dir)))
    return evaluation_report(out, metrics, views, likelihoods, runs,
                             [asdict(c) for c in held.cases], source.data.spacing)
