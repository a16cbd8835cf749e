"""The samples' plausibility block on tiny volumes: real-vs-real ranges, bad inputs, the CSV."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from mri_vqvae.evaluation.samples import CHECKS, plausibility_block, write_plausibility_csv
from mri_vqvae.metrics.plausibility import intensity_histogram, wasserstein1
from tests.support.volumes import make_head

SHAPE = (24, 24, 24)


def _heads(seeds: tuple[int, ...]) -> np.ndarray:
    return np.stack([make_head(SHAPE, seed=s) / 110.0 for s in seeds]).clip(0, 1)


def test_a_blank_sample_is_nan_counted_and_outside_without_crashing(tmp_path: Path) -> None:
    real = _heads((1, 2, 3))
    reference = _heads((4, 5)).mean(0)
    samples = np.stack([real[0], np.zeros(SHAPE, np.float32)])  # a copy of a real scan; nothing
    block = plausibility_block(samples, real, ["a", "b", "c"], reference, 2, (1.0, 1.0, 1.0))
    checks = block["checks"]
    assert list(checks) == list(CHECKS)
    assert block["registration"]["num_failed"] == {"samples": 1, "held_out": 0}
    for name in ("reference_r", "symmetry_r", "largest_component", "intensity_w1"):
        assert math.isnan(checks[name]["samples"][1]), name
        assert checks[name]["num_nan"] == {"samples": 1, "held_out": 0}
        assert checks[name]["samples"][0] == checks[name]["held_out"][0] or name == "intensity_w1"
    assert checks["foreground_fraction"]["samples"][1] == 0.0  # defined: an empty head
    # the copy of scan "a" lies inside every real range (its distance to the pool of all
    # three is below its distance to the other two, inside 0..max), the blank in none
    assert block["samples_inside_every_range"] == 0.5
    pool = intensity_histogram(real[1]) + intensity_histogram(real[2])
    assert checks["intensity_w1"]["held_out"][0] == wasserstein1(intensity_histogram(real[0]),
                                                                 pool)
    write_plausibility_csv(tmp_path / "p.csv", block)
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == ["0", "1", "a", "b", "c"]
    assert rows[1]["reference_r"] == "nan" and rows[1]["reference_r_inside"] == "False"
    assert rows[0]["largest_component_inside"] == "True"
    for name, floor in (("foreground_fraction", None), ("intensity_w1", 0.0)):
        values = checks[name]["held_out"]
        expected = []
        for i, v in enumerate(values):  # inside the range of the other two held-out scans
            others = values[:i] + values[i + 1:]
            expected.append((min(others) if floor is None else floor) <= v <= max(others))
        assert [r[f"{name}_inside"] for r in rows[2:]] == [str(e) for e in expected]
        fraction = checks[name]["held_out_inside_leave_one_out_range"]
        assert fraction == pytest.approx(sum(expected) / 3)
    assert checks["intensity_w1"]["real_range"] == [0.0, max(checks["intensity_w1"]["held_out"])]


def test_without_a_reference_the_registered_checks_are_nan() -> None:
    real = _heads((1, 2))
    block = plausibility_block(real[:1], real, ["a", "b"], None, 0, (1.0, 1.0, 1.0))
    assert block["reference"].startswith("none")
    for name in ("reference_r", "symmetry_r", "inner_structure_r", "inner_detail"):
        assert all(math.isnan(v) for v in block["checks"][name]["held_out"])
    assert block["registration"]["num_failed"] == {"samples": 0, "held_out": 0}
    assert block["checks"]["largest_component"]["samples"][0] == \
        block["checks"]["largest_component"]["held_out"][0]


def test_each_volume_is_judged_against_the_mean_of_its_own_group() -> None:
    first, second = _heads((1,))[0], np.flip(_heads((2,))[0], axis=1).copy()
    volumes = np.stack([first, second])
    groups = ["A", "B", "A", "B"]  # samples, then held-out scans
    block = plausibility_block(volumes, volumes, ["a", "b"], (first + second) / 2, 2,
                               (1.5, 1.5, 1.5), groups=groups,
                               group_references={"A": first, "B": second})
    assert block["reference_groups"] == ["A", "B"]
    assert block["reference_of"] == {"samples": ["A", "B"], "held_out": ["A", "B"]}
    check = block["checks"]["reference_r"]
    assert check["samples"] == pytest.approx([1.0, 1.0], abs=1e-3)  # each is its group's mean
    mixed = plausibility_block(volumes, volumes, ["a", "b"], (first + second) / 2, 2,
                               (1.5, 1.5, 1.5))
    assert max(mixed["checks"]["reference_r"]["samples"]) < 0.999
    assert mixed["reference_groups"] is None


def test_the_train_pass_sums_scans_in_all_and_per_group() -> None:
    from mri_vqvae.evaluation.passes import TrainPass

    a, b, c = (np.full((2, 2, 2), v, np.float32) for v in (1.0, 3.0, 8.0))
    one, other = TrainPass(), TrainPass()
    one.add_volume(a, "T1w")
    one.add_volume(b, "T2w")
    other.add_volume(c, "T1w")
    one.merge_sums(other.sums)
    assert one.num_volumes == 3
    assert np.all(one.mean_volume() == 4.0)
    assert {k: float(v.flat[0]) for k, v in one.group_means().items()} == {"T1w": 4.5,
                                                                           "T2w": 3.0}
    assert TrainPass().mean_volume() is None and TrainPass().group_means() == {}
