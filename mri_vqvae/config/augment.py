"""The ``augment:`` section: the named random training steps, in the order they run."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from mri_vqvae.config.fields import ADDED, within
from mri_vqvae.core.strict import StrictModel


class AffineAugment(StrictModel):
    prob: float = Field(0.5, ge=0, le=1)
    rotate_deg: float = Field(8.0, ge=0, description="max rotation about each axis")
    scale: float = Field(0.08, ge=0, description="max relative zoom per axis")
    translate_vox: float = Field(3.0, ge=0, description="max shift per axis in voxels")


class ElasticAugment(StrictModel):
    prob: float = Field(0.2, ge=0, le=1)
    sigma: tuple[float, float] = (5.0, 7.0)
    magnitude: tuple[float, float] = (20.0, 60.0)


class BiasFieldAugment(StrictModel):
    prob: float = Field(0.3, ge=0, le=1)
    coeff: float = Field(0.3, ge=0, description="max polynomial coefficient of the log bias field")


class ContrastAugment(StrictModel):
    prob: float = Field(0.3, ge=0, le=1)
    gamma: tuple[float, float] = (0.7, 1.5)


class NoiseAugment(StrictModel):
    prob: float = Field(0.2, ge=0, le=1)
    std: float = Field(0.02, ge=0, description="Gaussian noise std on the [0, 1] intensity scale")


class LowResolutionAugment(StrictModel):
    """Isotropic down- then up-sampling (MONAI `RandSimulateLowResolutiond`): a coarser scan."""

    prob: float = Field(0.0, ge=0, le=1)
    zoom: Annotated[tuple[float, float], within(0.1, 1.0)] = Field(
        (0.5, 1.0), description="range of the zoom of every axis (0.5: half the voxels per axis)")


class ThickSliceAugment(StrictModel):
    """Thick slices along one random axis: averaged down by a factor, resampled back (linear)."""

    prob: float = Field(0.0, ge=0, le=1)
    factor: Annotated[tuple[float, float], within(1.0, 16.0)] = Field(
        (2.0, 4.0), description="range of the slice thickness in voxels of the output grid")


class HistogramShiftAugment(StrictModel):
    """A random monotone piecewise-linear intensity map (MONAI `RandHistogramShiftd`)."""

    prob: float = Field(0.0, ge=0, le=1)
    control_points: Annotated[tuple[int, int], within(3, 64)] = Field(
        (5, 10), description="range of the map's control points (fewer: larger shifts)")


class GibbsAugment(StrictModel):
    """Gibbs ringing: k-space truncated to a sphere (MONAI `RandGibbsNoised`)."""

    prob: float = Field(0.0, ge=0, le=1)
    alpha: Annotated[tuple[float, float], within(0.0, 1.0)] = Field(
        (0.3, 0.6), description="range of the truncation (0: none, 1: all of k-space)")


class KSpaceSpikeAugment(StrictModel):
    """One k-space spike (stripes) at a random frequency (MONAI `RandKSpaceSpikeNoised`)."""

    prob: float = Field(0.0, ge=0, le=1)
    log_intensity: Annotated[tuple[float, float], within(0.0, 30.0)] = Field(
        (9.0, 10.5), description="range of the spike's natural-log k-space magnitude")


class LeftRightMirrorAugment(StrictModel):
    """The head mirrored left to right on the same RAS grid: another plausible head.

    Brains are near mirror-symmetric, so a mirrored training head is a plausible new one with its
    lateralised details swapped (its layout is the original's; docs/benchmarks.md measures what
    mirrored views do for the prior).
    """

    prob: float = Field(0.0, ge=0, le=1)


class AugmentConfig(StrictModel):
    """Named random steps added to the training chain, applied in this order.

    The domain randomisation steps (``low_resolution`` to ``kspace_spikes``) and the left-right
    mirror are off by default and come last, so switching them on leaves the draws of the steps
    before them unchanged.
    """

    enabled: bool = True
    affine: AffineAugment = AffineAugment()
    elastic: ElasticAugment = ElasticAugment()
    bias_field: BiasFieldAugment = BiasFieldAugment()
    contrast: ContrastAugment = ContrastAugment()
    noise: NoiseAugment = NoiseAugment()
    low_resolution: Annotated[LowResolutionAugment, ADDED] = LowResolutionAugment()
    thick_slices: Annotated[ThickSliceAugment, ADDED] = ThickSliceAugment()
    histogram_shift: Annotated[HistogramShiftAugment, ADDED] = HistogramShiftAugment()
    gibbs: Annotated[GibbsAugment, ADDED] = GibbsAugment()
    kspace_spikes: Annotated[KSpaceSpikeAugment, ADDED] = KSpaceSpikeAugment()
    left_right_mirror: Annotated[LeftRightMirrorAugment, ADDED] = LeftRightMirrorAugment()


DOMAIN_RANDOMISATION = ("low_resolution", "thick_slices", "histogram_shift", "gibbs",
                        "kspace_spikes")
"""The steps of `AugmentConfig` that mimic other scanners and protocols (training only)."""
