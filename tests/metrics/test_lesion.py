"""Lesion AUROC of a voxel score: agreement with the Mann-Whitney U statistic, the region rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mri_vqvae.metrics.lesion import inner_head, lesion_auroc


def _mann_whitney_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC as U / (n_pos n_neg) with mid-ranks for ties (the textbook definition)."""
    values = np.concatenate([pos, neg])
    order = np.argsort(values, kind="stable")
    _, inverse, counts = np.unique(values[order], return_inverse=True, return_counts=True)
    mid = np.cumsum(counts) - (counts - 1) / 2
    ranks = np.empty_like(values)
    ranks[order] = mid[inverse]
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def test_auroc_equals_mann_whitney_with_ties() -> None:
    rng = np.random.default_rng(0)
    score = rng.integers(0, 12, (12, 14, 10)).astype(np.float64)  # many ties, like block maps
    lesion = rng.random(score.shape) < 0.05
    region = rng.random(score.shape) < 0.8
    keep = region | lesion
    expected = _mann_whitney_auc(score[keep & lesion], score[keep & ~lesion])
    assert lesion_auroc(score, lesion, region) == pytest.approx(expected, abs=1e-12)


def test_a_score_that_ranks_the_lesion_first_is_one_and_reversed_is_zero() -> None:
    lesion = np.zeros((8, 8, 8), bool)
    lesion[2:4, 2:5, 3:6] = True
    region = np.ones_like(lesion)
    score = lesion + np.random.default_rng(1).uniform(0, 0.5, lesion.shape)
    assert lesion_auroc(score, lesion, region) == 1.0
    assert lesion_auroc(-score, lesion, region) == 0.0
    assert lesion_auroc(np.ones(lesion.shape), lesion, region) == 0.5  # all tied: chance


def test_voxels_outside_the_region_are_not_negatives() -> None:
    lesion = np.zeros((6, 6, 6), bool)
    lesion[2, 2, 2] = True
    score = np.zeros(lesion.shape)
    score[2, 2, 2] = 5.0
    score[0] = 10.0  # a hot edge, as at the field-of-view border
    region = np.zeros_like(lesion)
    region[1:5, 1:5, 1:5] = True
    assert lesion_auroc(score, lesion, region) == 1.0
    assert lesion_auroc(score, lesion, np.ones_like(lesion)) < 1.0


def test_no_lesion_or_no_negative_gives_nan_and_shapes_must_agree() -> None:
    region = np.ones((4, 4, 4), bool)
    assert math.isnan(lesion_auroc(np.zeros((4, 4, 4)), np.zeros((4, 4, 4), bool), region))
    assert math.isnan(lesion_auroc(np.zeros((4, 4, 4)), np.ones((4, 4, 4), bool), region))
    with pytest.raises(ValueError, match="one grid"):
        lesion_auroc(np.zeros((4, 4, 4)), np.zeros((4, 4, 5), bool), region)


def test_inner_head_is_the_head_eroded_by_the_margin() -> None:
    volume = np.zeros((20, 20, 20), np.float32)
    volume[4:16, 5:15, 6:14] = 0.5
    assert np.array_equal(inner_head(volume, 0), volume > 0.05)
    expected = np.zeros(volume.shape, bool)
    expected[6:14, 7:13, 8:12] = True  # 2 voxels in from every face
    assert np.array_equal(inner_head(volume, 2), expected)  # a box: ball erosion = face shift


def test_the_field_of_view_edge_counts_as_outside_and_erosion_is_a_ball() -> None:
    full = np.ones((9, 9, 9), np.float32)
    expected = np.zeros(full.shape, bool)
    expected[1:-1, 1:-1, 1:-1] = True
    assert np.array_equal(inner_head(full, 1), expected)
    hole = full.copy()
    hole[4, 4, 4] = 0.0
    kept = inner_head(hole, 2)
    assert not kept[4, 4, 6] and not kept[4, 6, 4]  # at distance 2 from the hole
    assert kept[2, 2, 2] and kept[6, 6, 6]  # corner-wise sqrt(12) > 2 from it: kept
