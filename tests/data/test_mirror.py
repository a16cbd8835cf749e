"""The left-right mirror step: off by default (chain and digests unchanged), exact, seeded,
mirrors world left to right whatever the file's orientation, keeps the RAS affine, and leaves the
draws of every step before it unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from mri_vqvae.config import AugmentConfig, config_digest, load_config
from mri_vqvae.core.errors import ConfigError
from mri_vqvae.data.transforms import augment_only, augmentation_steps, build_transforms
from mri_vqvae.tasks.views import Views
from tests.support.volumes import make_head, write_nifti

BASE_STEPS = ("affine", "elastic", "bias_field", "contrast", "noise")
MIRROR_ONLY = AugmentConfig(**{n: {"prob": 0.0} for n in BASE_STEPS},
                            left_right_mirror={"prob": 1.0})


def _item() -> dict[str, MetaTensor]:
    """A preprocessed item: (1, 24, 28, 20) in [0, 1] with a 2 mm RAS affine."""
    head = torch.from_numpy(make_head())
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    return {"image": MetaTensor((head / head.max())[None], affine=affine)}


def test_off_by_default_and_every_digest_kept() -> None:
    assert "left_right_mirror" not in [n for n, _ in augmentation_steps(AugmentConfig())]
    for name in ("brain64", "demo", "smoke", "brain64_dr"):
        aug = load_config(name).augment
        stripped = aug.model_dump(exclude={"left_right_mirror"})
        assert config_digest(aug) == config_digest(AugmentConfig.model_validate(stripped))
    on = AugmentConfig(left_right_mirror={"prob": 0.5})
    assert config_digest(on) != config_digest(AugmentConfig())


def test_mirror_is_the_exact_flip_of_the_first_axis_and_keeps_the_affine() -> None:
    item = _item()
    out = augment_only(MIRROR_ONLY, seed=0)({"image": item["image"].clone()})["image"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    assert torch.equal(out.as_tensor(), item["image"].as_tensor().flip(1))
    assert torch.equal(out.affine, item["image"].affine)
    back = augment_only(MIRROR_ONLY, seed=1)({"image": out})["image"]
    assert torch.equal(back.as_tensor(), item["image"].as_tensor())  # an involution


def test_mirror_moves_a_left_marker_to_the_right_in_world_space(tmp_path: Path) -> None:
    """A file stored left-to-right reversed (x spacing -2): the chain reorients to RAS, then the
    mirror puts a marker of the right hemisphere (world x > 0) into the left one."""
    head = make_head((24, 28, 20))
    head[4:7, 12:16, 8:12] = 400.0  # voxel i small with x spacing -2 and origin +23: world x > 0
    path = write_nifti(tmp_path / "las.nii.gz", head,
                       np.array([[-2.0, 0, 0, 23.0], [0, 2.0, 0, -27.0], [0, 0, 2.0, -19.0],
                                 [0, 0, 0, 1]]))
    smoke = load_config("smoke")
    plain = build_transforms(smoke.data)({"image": str(path)})["image"]
    mirrored = build_transforms(smoke.data, MIRROR_ONLY, train=True, seed=0)(
        {"image": str(path)})["image"]
    world_x = lambda img: float(  # noqa: E731  (marker centre in world mm along x)
        (img.affine @ torch.tensor([*np.argwhere(img[0].numpy() > 0.9).mean(0), 1.0],
                                   dtype=torch.float64))[0])
    assert world_x(plain) > 4.0 and world_x(mirrored) < -4.0
    assert torch.equal(mirrored.affine, plain.affine)
    assert torch.equal(mirrored.as_tensor(), plain.as_tensor().flip(1))


def test_seeded_replayable_and_drawn_at_its_probability() -> None:
    half = AugmentConfig(**{n: {"prob": 0.0} for n in BASE_STEPS}, left_right_mirror={"prob": 0.5})
    original = _item()["image"].as_tensor()
    flipped = []
    for seed in range(40):
        a = augment_only(half, seed)(_item())["image"].as_tensor()
        b = augment_only(half, seed)(_item())["image"].as_tensor()
        assert torch.equal(a, b)
        assert torch.equal(a, original) or torch.equal(a, original.flip(1))
        flipped.append(not torch.equal(a, original))
    assert 10 <= sum(flipped) <= 30


def test_switching_it_on_keeps_the_draws_of_the_steps_before_it() -> None:
    dr = load_config("brain64_dr").augment
    on = dr.model_copy(update={"left_right_mirror": dr.left_right_mirror.model_copy(
        update={"prob": 1.0})})
    before, after = augment_only(dr, 11), augment_only(on, 11)
    assert len(after.transforms) == len(before.transforms) + 1
    for old, new in zip(before.transforms[:-1], after.transforms[:-2], strict=True):
        if hasattr(old, "R"):
            assert np.array_equal(old.R.get_state()[1], new.R.get_state()[1])


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_a_probability_outside_zero_one_is_refused_by_name(value: str) -> None:
    with pytest.raises(ConfigError, match=r"augment\.left_right_mirror\.prob"):
        load_config("brain64", [f"augment.left_right_mirror.prob={value}"])


def test_a_mirrored_encode_view_is_the_plain_view_flipped() -> None:
    """`encode --view-set left_right_mirror.prob=1.0`: every view is its plain pose mirrored."""
    plain = AugmentConfig()
    on = plain.model_copy(update={"left_right_mirror": plain.left_right_mirror.model_copy(
        update={"prob": 1.0})})
    views_plain = Views(2, plain, 7, augment_only(plain, 0))
    views_on = Views(2, on, 7, augment_only(on, 0))
    for view in (1, 2):
        a = views_on.volume(_item(), "case-a", view)
        b = views_plain.volume(_item(), "case-a", view)
        assert torch.equal(a, b.flip(1)) and not torch.equal(a, b)
