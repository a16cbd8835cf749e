"""Anatomical plausibility of single volumes, each judged against the range of real scans.

Volumes are (X, Y, Z) numpy arrays on one preprocessed grid (RAS, intensities in [0, 1], the head
centred by the pad/crop), X the left-right axis; ``spacing`` is (sx, sy, sz) in mm.

* `register_rigid`: a small, seeded rigid registration (SimpleITK, Mattes mutual information,
  two shrink levels, one thread) of a volume onto a reference; None when it fails. Rigid, not
  affine: an affine transform stretches a fragment over the whole head and makes it look right;
* `masked_correlation` with the reference inside the reference's head (after registration), and
  `head_overlap`, the Dice overlap of the two head masks (after registration);
* `inner_structure_correlation`: the correlation of fine structure (a volume minus its Gaussian
  blur) with the reference's, only deep inside the reference's head (`inner_head`): ventricles,
  white and grey matter where the reference has them. The outline, which the other checks
  judge, is left out, so a head-shaped volume with a textured inside fails it;
* `inner_detail`: how much fine structure there is in the same region, relative to its mean
  intensity (a blurred head has little; texture counts as much as anatomy, which
  `inner_structure_correlation` tells apart);
* `mirror_symmetry`: correlation of a volume and its left-right mirror inside the head;
* `largest_component_fraction` and `foreground_fraction` of the head mask (``> FOREGROUND``);
* `intensity_histogram` / `wasserstein1`: the distance between head-intensity distributions;
* `real_range`, `inside_fraction`, `leave_one_out_inside`: how many values fall inside the range
  of the real scans (leave-one-out for the real scans themselves, so it is not trivially 1; a
  distance is bounded above only, its range starting at 0).

Every check returns NaN where it is undefined (an empty head, a failed registration).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from mri_vqvae.metrics.quality import FOREGROUND

INTENSITY_BINS = 1000  # histogram bins on [0, 1]; W1 is exact to within one bin width


@dataclass(frozen=True)
class RegistrationSettings:
    """A fast rigid registration: iterations per level, shrink factors (each capped to keep 8
    voxels a side) and smoothing sigmas (voxels) per level, the fraction of voxels sampled
    (seeded), MI bins and threads."""

    iterations: int = 40
    shrink: tuple[int, ...] = (4, 2)
    smoothing: tuple[float, ...] = (2.0, 1.0)
    sampling: float = 0.25
    bins: int = 32
    seed: int = 0
    threads: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "transform": "rigid (rotation + translation), from moments",
                "metric": "Mattes mutual information", "optimizer": "regular step gradient descent"}


def _image(volume: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    """A SimpleITK image of an (X, Y, Z) array (SimpleITK reads arrays as (z, y, x))."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing))))
    return image


def register_rigid(moving: np.ndarray, reference: np.ndarray,
                    spacing: Sequence[float] = (1.0, 1.0, 1.0),
                    settings: RegistrationSettings | None = None) -> np.ndarray | None:
    """`moving` (X, Y, Z) registered rigidly onto `reference` (X, Y, Z) and resampled on its grid
    (linear, 0 outside): float32 (X, Y, Z). None when the registration fails (an empty volume,
    a non-finite metric or transform); the same inputs and settings give the same result."""
    s = settings or RegistrationSettings()
    fixed, mov = _image(reference, spacing), _image(moving, spacing)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=s.bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(s.sampling, s.seed + 1)  # ITK reads seed 0 as the clock
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3,
                                                 numberOfIterations=s.iterations,
                                                 relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    most = max(1, min(np.shape(reference)) // 8)  # keep >= 8 voxels a side at every level
    reg.SetShrinkFactorsPerLevel([min(f, most) for f in s.shrink])
    reg.SetSmoothingSigmasPerLevel(list(s.smoothing))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetNumberOfThreads(s.threads)
    try:
        start = sitk.CenteredTransformInitializer(
            fixed, mov, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS)
        reg.SetInitialTransform(start, inPlace=False)
        transform = reg.Execute(fixed, mov)
    except RuntimeError:
        return None
    if not (math.isfinite(reg.GetMetricValue())
            and np.all(np.isfinite(transform.GetParameters()))):
        return None
    out = sitk.GetArrayFromImage(sitk.Resample(mov, fixed, transform, sitk.sitkLinear, 0.0))
    return out if np.all(np.isfinite(out)) else None


def masked_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of `a` and `b` (same shape) over the voxels where `mask` (bool, same
    shape) holds; NaN with fewer than 2 voxels or a constant side."""
    x = np.asarray(a, np.float64)[mask]
    y = np.asarray(b, np.float64)[mask]
    if x.size < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    norm = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / norm) if norm > 0 else math.nan


def reference_correlation(registered: np.ndarray | None, reference: np.ndarray,
                          foreground: float = FOREGROUND) -> float:
    """Correlation of a registered volume (X, Y, Z) with the reference inside the reference's
    head (``reference > foreground``); NaN when the registration failed (None)."""
    if registered is None:
        return math.nan
    return masked_correlation(registered, reference, np.asarray(reference) > foreground)


INNER_DEPTH = 0.35  # inner head: deeper than this fraction of the head's largest depth
DETAIL_SIGMA = 2.0  # voxels: fine structure = volume - Gaussian blur of this sigma


def inner_head(reference: np.ndarray, depth: float = INNER_DEPTH,
               foreground: float = FOREGROUND) -> np.ndarray:
    """Bool (X, Y, Z): voxels of the reference's head (largest component of ``> foreground``,
    holes filled) whose distance to the head's surface exceeds `depth` times the largest such
    distance; all False for an empty head."""
    mask = sitk.GetImageFromArray((np.asarray(reference) > foreground).astype(np.uint8))
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    head = sitk.BinaryFillhole(components == 1)
    inside = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        head, insideIsPositive=True, squaredDistance=False, useImageSpacing=False))
    inside = np.where(sitk.GetArrayFromImage(head) > 0, inside, 0.0)
    deepest = float(inside.max())
    return inside > depth * deepest if deepest > 0 else np.zeros(inside.shape, bool)


def fine_structure(volume: np.ndarray, sigma: float = DETAIL_SIGMA) -> np.ndarray:
    """`volume` (X, Y, Z) minus its Gaussian blur (sigma in voxels): edges and small structures."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
    return np.asarray(volume, np.float32) - sitk.GetArrayFromImage(
        sitk.SmoothingRecursiveGaussian(image, sigma))


def inner_structure_correlation(registered: np.ndarray | None, reference: np.ndarray,
                                inner: np.ndarray | None = None, *,
                                fine: np.ndarray | None = None,
                                reference_fine: np.ndarray | None = None) -> float:
    """Correlation of the fine structure of a registered volume (X, Y, Z) with the reference's
    inside the reference's inner head (`inner`, default `inner_head(reference)`); NaN when the
    registration failed (None) or the inner head is empty. `fine` / `reference_fine`: the two
    `fine_structure`s when the caller already has them (computed here otherwise)."""
    if registered is None:
        return math.nan
    region = inner_head(reference) if inner is None else inner
    fine = fine_structure(registered) if fine is None else fine
    reference_fine = fine_structure(reference) if reference_fine is None else reference_fine
    return masked_correlation(fine, reference_fine, region)


def inner_detail(registered: np.ndarray | None, inner: np.ndarray, *,
                 fine: np.ndarray | None = None) -> float:
    """Standard deviation of the fine structure of a registered volume (X, Y, Z) inside `inner`
    (the reference's inner head) over the volume's mean intensity there: scale-free detail
    contrast. NaN when the registration failed (None), `inner` is empty or the region is dark.
    `fine`: the volume's `fine_structure` when the caller already has it."""
    if registered is None or not inner.any():
        return math.nan
    mean = float(np.asarray(registered, np.float64)[inner].mean())
    if mean <= 1e-6:
        return math.nan
    fine = fine_structure(registered) if fine is None else fine
    return float(np.asarray(fine, np.float64)[inner].std() / mean)


def head_overlap(registered: np.ndarray | None, reference: np.ndarray,
                 foreground: float = FOREGROUND) -> float:
    """Dice overlap of the head masks (``> foreground``) of a registered volume (X, Y, Z) and the
    reference: 1 for the same head shape; NaN when the registration failed or both are empty."""
    if registered is None:
        return math.nan
    a, b = np.asarray(registered) > foreground, np.asarray(reference) > foreground
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / total if total else math.nan


def mirror_symmetry(volume: np.ndarray | None, foreground: float = FOREGROUND) -> float:
    """Correlation of `volume` (X, Y, Z) with its left-right mirror (X reversed, i.e. about the
    grid's mid-sagittal plane) inside the head and its mirror; 1 for a mirror-symmetric volume.
    NaN for None (a failed registration) or an empty head."""
    if volume is None:
        return math.nan
    v = np.asarray(volume)
    mirrored = v[::-1]
    head = v > foreground
    return masked_correlation(v, mirrored, head | head[::-1])


def foreground_fraction(volume: np.ndarray, foreground: float = FOREGROUND) -> float:
    """Fraction of the voxels of `volume` (any shape) above `foreground`."""
    v = np.asarray(volume)
    return float(np.count_nonzero(v > foreground) / v.size) if v.size else math.nan


def largest_component_fraction(volume: np.ndarray, foreground: float = FOREGROUND) -> float:
    """Fraction of the head (``volume > foreground``, (X, Y, Z)) in its largest 26-connected
    component: 1 for one piece, 0.5 for two equal ones; NaN for an empty head."""
    head = np.asarray(volume) > foreground
    if not head.any():
        return math.nan
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(
        sitk.GetImageFromArray(head.astype(np.uint8)), True))
    sizes = np.bincount(labels.reshape(-1))[1:]
    return float(sizes.max() / sizes.sum())


def intensity_histogram(volume: np.ndarray, foreground: float = FOREGROUND,
                        bins: int = INTENSITY_BINS) -> np.ndarray:
    """Counts (bins,) int64 of the head intensities (``> foreground``) of `volume` (any shape),
    clipped to [0, 1], in `bins` equal bins; histograms of several volumes add up to the pool."""
    v = np.clip(np.asarray(volume, np.float64), 0.0, 1.0)
    counts, _ = np.histogram(v[np.asarray(volume) > foreground], bins=bins, range=(0.0, 1.0))
    return counts.astype(np.int64)


def wasserstein1(counts_a: np.ndarray, counts_b: np.ndarray) -> float:
    """Wasserstein-1 distance (intensity units, [0, 1]) between two histograms (bins,) on
    [0, 1]: the area between their cumulative distributions; NaN when either is empty."""
    a, b = np.asarray(counts_a, np.float64), np.asarray(counts_b, np.float64)
    if a.sum() <= 0 or b.sum() <= 0:
        return math.nan
    gap = np.abs(np.cumsum(a / a.sum()) - np.cumsum(b / b.sum()))
    return float(gap[:-1].sum() / len(a))


def real_range(values: Sequence[float], floor: float | None = None) -> tuple[float, float]:
    """(min, max) of the finite `values` (n,); (NaN, NaN) when none is finite. `floor` (when
    given) replaces the low end (a distance: 0, so only the high end bounds it)."""
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return math.nan, math.nan
    return (float(x.min()) if floor is None else floor), float(x.max())


def inside_fraction(values: Sequence[float], low: float, high: float) -> float:
    """Fraction of `values` (n,) inside [low, high]; a NaN value counts as outside. NaN when
    there is no value or the range is NaN."""
    x = np.asarray(values, np.float64)
    if not x.size or not (math.isfinite(low) and math.isfinite(high)):
        return math.nan
    return float(np.count_nonzero((x >= low) & (x <= high)) / x.size)


def others_range(values: Sequence[float], i: int, floor: float | None = None
                 ) -> tuple[float, float]:
    """`real_range` of `values` (n,) without value i, with the same `floor`."""
    return real_range(np.delete(np.asarray(values, np.float64), i), floor)


def leave_one_out_inside(values: Sequence[float], floor: float | None = None) -> float:
    """Fraction of `values` (n,) each inside the range of the other n - 1 (`others_range`; a
    NaN value counts as outside); NaN for fewer than 2 values."""
    x = np.asarray(values, np.float64)
    if x.size < 2:
        return math.nan
    hits = [inside_fraction(x[i:i + 1], *others_range(x, i, floor)) == 1.0
            for i in range(x.size)]
    return float(np.mean(hits))
