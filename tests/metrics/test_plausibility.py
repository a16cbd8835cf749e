"""Anatomical plausibility checks on tiny synthetic volumes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from mri_vqvae.metrics.plausibility import (
    RegistrationSettings,
    fine_structure,
    foreground_fraction,
    head_overlap,
    inner_detail,
    inner_head,
    inner_structure_correlation,
    inside_fraction,
    intensity_histogram,
    largest_component_fraction,
    leave_one_out_inside,
    masked_correlation,
    mirror_symmetry,
    others_range,
    real_range,
    reference_correlation,
    register_rigid,
    wasserstein1,
)
from tests.support.volumes import make_head

SHAPE = (32, 36, 28)


def _asymmetric_head(seed: int = 0) -> np.ndarray:
    """A smooth head in [0, 1] with a dark block in its left half (so a mirror or a turn shows);
    smoothed (sigma 1 voxel) so resampling it twice loses little."""
    head = make_head(SHAPE, seed=seed)
    head[6:14, 10:22, 8:18] *= 0.3
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(head), 1.0))
    return np.clip(smooth / smooth.max(), 0, 1).astype(np.float32)


def _moved(volume: np.ndarray) -> np.ndarray:
    """`volume` turned (about 8, 3 and 6 degrees) and shifted (2, -2, 1.5 voxels)."""
    image = sitk.GetImageFromArray(volume)
    turn = sitk.Euler3DTransform()
    turn.SetCenter([n / 2 for n in reversed(volume.shape)])
    turn.SetRotation(0.14, 0.05, 0.1)
    turn.SetTranslation((2.0, -2.0, 1.5))
    return sitk.GetArrayFromImage(sitk.Resample(image, image, turn, sitk.sitkLinear, 0.0))


def test_registration_recovers_a_turned_and_shifted_copy() -> None:
    reference = _asymmetric_head()
    moved = _moved(reference)
    before = reference_correlation(moved, reference)
    registered = register_rigid(moved, reference)
    assert registered is not None and registered.shape == reference.shape
    after = reference_correlation(registered, reference)
    assert after > 0.95 and after > before + 0.1, (before, after)
    again = register_rigid(moved, reference)
    assert again is not None and np.array_equal(registered, again)  # seeded: the same result


def test_a_failed_registration_is_none_and_its_checks_nan() -> None:
    reference = _asymmetric_head()
    assert register_rigid(np.zeros(SHAPE, np.float32), reference) is None
    assert math.isnan(reference_correlation(None, reference))
    assert math.isnan(mirror_symmetry(None))


def test_registration_settings_are_recorded() -> None:
    settings = RegistrationSettings(iterations=7, seed=3).as_dict()
    assert (settings["iterations"], settings["seed"], settings["shrink"]) == (7, 3, (4, 2))
    assert settings["metric"] == "Mattes mutual information"


def test_masked_correlation_uses_only_the_mask() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((6, 6, 6))
    mask = np.zeros(a.shape, bool)
    mask[:3] = True
    b = np.where(mask, 2 * a + 1, rng.random(a.shape))  # linear inside the mask only
    assert masked_correlation(a, b, mask) == pytest.approx(1.0, abs=1e-12)
    assert masked_correlation(a, b, np.ones(a.shape, bool)) < 0.9
    assert math.isnan(masked_correlation(a, np.ones(a.shape), mask))  # a constant side


def test_symmetry_is_one_for_a_mirror_symmetric_volume_and_lower_otherwise() -> None:
    head = make_head(SHAPE, seed=1)
    head = head / head.max()
    symmetric = 0.5 * (head + head[::-1])
    assert mirror_symmetry(symmetric) == pytest.approx(1.0, abs=1e-9)
    lopsided = _asymmetric_head(1)
    assert mirror_symmetry(lopsided) < mirror_symmetry(symmetric) - 0.05
    assert math.isnan(mirror_symmetry(np.zeros(SHAPE)))  # an empty head


def test_connectivity_of_one_blob_two_equal_blobs_and_nothing() -> None:
    one = np.zeros((20, 20, 20), np.float32)
    one[2:8, 2:8, 2:8] = 1.0
    assert largest_component_fraction(one) == 1.0
    two = one.copy()
    two[12:18, 12:18, 12:18] = 1.0  # the same size, not touching (not even at a corner)
    assert largest_component_fraction(two) == 0.5
    diagonal = one.copy()
    diagonal[8:14, 8:14, 8:14] = 1.0  # touches the first blob at one corner: 26-connected
    assert largest_component_fraction(diagonal) == 1.0
    assert math.isnan(largest_component_fraction(np.zeros((5, 5, 5))))
    assert foreground_fraction(two) == 2 * 6**3 / 20**3
    assert foreground_fraction(np.zeros((5, 5, 5))) == 0.0


def test_histogram_distance_is_zero_for_identical_and_grows_with_contrast() -> None:
    head = make_head(SHAPE, seed=2)
    head = head / head.max()
    base = intensity_histogram(head)
    assert base.sum() == np.count_nonzero(head > 0.05)
    assert wasserstein1(base, base) == 0.0
    distances = [wasserstein1(base, intensity_histogram(np.clip(head * g, 0, 1)))
                 for g in (0.9, 0.7, 0.5)]
    assert 0 < distances[0] < distances[1] < distances[2]
    flat = np.zeros(SHAPE)
    flat[:10] = 0.3
    moved = np.where(flat > 0, 0.5, 0.0)
    w1 = wasserstein1(intensity_histogram(flat), intensity_histogram(moved))
    assert w1 == pytest.approx(0.2, abs=1e-3)  # every unit of mass moves 0.2
    assert math.isnan(wasserstein1(base, np.zeros_like(base)))  # an empty head


def test_range_fractions_count_exactly() -> None:
    assert real_range([0.2, math.nan, 0.9, 0.5]) == (0.2, 0.9)
    assert all(math.isnan(v) for v in real_range([math.nan]))
    values = [0.0, 0.5, 1.0, 2.0, math.nan]
    assert inside_fraction(values, 0.0, 1.0) == 3 / 5  # both ends count; NaN is outside
    assert math.isnan(inside_fraction([], 0.0, 1.0))
    assert math.isnan(inside_fraction([0.5], math.nan, math.nan))
    assert leave_one_out_inside([1.0, 2.0, 3.0]) == 1 / 3  # only 2 lies inside its others'
    assert leave_one_out_inside([1.0, 2.0, 2.0, 3.0]) == 2 / 4
    assert leave_one_out_inside([1.0, 1.0]) == 1.0 and leave_one_out_inside([1.0, 2.0]) == 0.0
    assert math.isnan(leave_one_out_inside([1.0]))
    assert others_range([3.0, 1.0, 2.0], 0) == (1.0, 2.0)
    assert others_range([3.0, 1.0, 2.0], 0, floor=0.0) == (0.0, 2.0)
    assert leave_one_out_inside([0.1, 0.2, 0.3], floor=0.0) == 2 / 3  # only 0.3 is above


def test_head_overlap_is_one_for_the_head_and_low_for_a_fragment_even_after_registration() -> None:
    reference = _asymmetric_head()
    moved = np.roll(reference, 2, axis=0)
    assert head_overlap(register_rigid(moved, reference), reference) > 0.95
    fragment = np.zeros_like(reference)
    fragment[8:14, 8:14, 8:14] = reference[8:14, 8:14, 8:14] + 0.5  # a small bright piece
    registered = register_rigid(fragment, reference)
    assert head_overlap(registered, reference) < 0.3  # rigid: it cannot be stretched over the head
    assert math.isnan(head_overlap(None, reference))
    assert math.isnan(head_overlap(np.zeros_like(reference), np.zeros_like(reference)))



def _ball(shape: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    return np.sqrt((grid**2).sum(0)) <= radius


def test_the_inner_head_is_the_deep_core_of_the_largest_component() -> None:
    head = _ball(SHAPE, 12.0).astype(np.float32)
    head[0:3, 0:3, 0:3] = 1.0  # a speck in a corner: not part of the head
    inner = inner_head(head, depth=0.5)
    assert inner.sum() > 0 and not inner[0:3, 0:3, 0:3].any()
    assert np.array_equal(inner, inner & _ball(SHAPE, 6.5))  # deeper than half of ~12 voxels
    assert inner[_ball(SHAPE, 5.0)].all()
    assert not inner_head(np.zeros(SHAPE, np.float32)).any()


def test_fine_structure_is_flat_inside_a_constant_region() -> None:
    volume = _ball(SHAPE, 12.0).astype(np.float32)
    detail = fine_structure(volume, sigma=1.0)
    assert np.abs(detail[_ball(SHAPE, 6.0)]).max() < 1e-3  # far from the edge: nothing left
    assert np.abs(detail).max() > 0.1  # the edge remains


def _anatomy(seed: int) -> np.ndarray:
    """A head with fixed internal structure: dark 'ventricles' and a bright 'white matter' shell,
    plus a little noise (seeded)."""
    head = _ball(SHAPE, 13.0) * 0.5
    head = head + 0.3 * (_ball(SHAPE, 9.0) & ~_ball(SHAPE, 5.0))
    core = np.zeros(SHAPE, bool)
    core[12:15, 13:17, 10:18] = True
    core[17:20, 13:17, 10:18] = True
    head = np.where(core, 0.1, head)
    head = head + np.random.default_rng(seed).normal(0, 0.02, SHAPE)
    return np.clip(head, 0, 1).astype(np.float32)


def test_inner_structure_tells_anatomy_from_a_textured_head_of_the_same_outline() -> None:
    reference = _anatomy(0)
    registered = register_rigid(_moved(_anatomy(1)), reference)
    same = inner_structure_correlation(registered, reference)
    texture = np.random.default_rng(2).uniform(0.2, 0.9, SHAPE)
    texture = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(texture.astype(np.float32)), 1.0))
    blob = np.where(_ball(SHAPE, 13.0), texture, 0).astype(np.float32)  # same outline
    other = inner_structure_correlation(register_rigid(blob, reference), reference)
    assert same > 0.5 and abs(other) < 0.2, (same, other)
    assert reference_correlation(register_rigid(blob, reference), reference) > 0.3  # the outline
    assert math.isnan(inner_structure_correlation(None, reference))


def test_inner_detail_is_low_for_a_blurred_head_and_scale_free() -> None:
    reference = _anatomy(0)
    inner = inner_head(reference)
    sharp = inner_detail(reference, inner)
    blurred = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(reference), 2.0))
    assert inner_detail(blurred, inner) < 0.5 * sharp, (inner_detail(blurred, inner), sharp)
    assert inner_detail(0.5 * reference, inner) == pytest.approx(sharp, rel=1e-5)
    texture = np.random.default_rng(3).uniform(0.2, 0.9, SHAPE).astype(np.float32)
    assert inner_detail(texture, inner) > sharp  # detail, not anatomy: inner_structure judges that
    assert math.isnan(inner_detail(None, inner))
    assert math.isnan(inner_detail(reference, np.zeros(SHAPE, bool)))
    assert math.isnan(inner_detail(np.zeros(SHAPE, np.float32), inner))
