"""Domain randomisation steps: seeded and replayable, off by default (the chain and every digest
unchanged), in [0, 1]; thick slices blur exactly one axis; bad settings are refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from mri_vqvae.config import (
    DOMAIN_RANDOMISATION,
    AugmentConfig,
    ExperimentConfig,
    config_digest,
    load_config,
)
from mri_vqvae.core.errors import ConfigError
from mri_vqvae.data.kit import pseudo_tag
from mri_vqvae.data.transforms import (
    RandThickSlicesd,
    augment_only,
    augmentation_steps,
    build_transforms,
)
from tests.support.volumes import make_head

BASE_STEPS = ("affine", "elastic", "bias_field", "contrast", "noise")
ONLY = {name: {"prob": 0.0} for name in BASE_STEPS}  # every step of today's chain off
KIT_TAG = "s0-1.5mm-da0380f11f"  # the kit's pseudo-subject folder of every shipped config
DEFAULT_AUGMENT_DIGEST = "6d6d8b1491e63e6ba9296e7a3764f10c0dba8acba01c5026fb3bab508eb83bb4"
SMOKE_AUGMENT_DIGEST = "1e86579f4ed6064d7680260518cbe9da984be86af811fbe6dc20e25a36acdb5c"


def _volume() -> dict[str, MetaTensor]:
    """A preprocessed item: (1, 24, 28, 20) head in [0, 1] with a 2 mm affine."""
    head = torch.from_numpy(make_head())
    return {"image": MetaTensor((head / head.max())[None], affine=torch.diag(
        torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)))}


def _only(name: str, **settings: object) -> AugmentConfig:
    return AugmentConfig(**ONLY, **{name: {"prob": 1.0, **settings}})


def _augmented(aug: AugmentConfig, seed: int) -> torch.Tensor:
    return augment_only(aug, seed)(_volume())["image"]


@pytest.mark.parametrize("name", DOMAIN_RANDOMISATION)
def test_each_step_is_seeded_replayable_and_stays_in_the_unit_range(name: str) -> None:
    aug = _only(name)
    assert name in [n for n, _ in augmentation_steps(aug)]
    a, b, c = _augmented(aug, 5), _augmented(aug, 5), _augmented(aug, 6)
    assert torch.equal(a.as_tensor(), b.as_tensor())
    assert not torch.equal(a.as_tensor(), c.as_tensor())
    assert not torch.equal(a.as_tensor(), _volume()["image"].as_tensor())
    assert a.shape == (1, 24, 28, 20) and a.dtype == torch.float32
    assert bool(torch.isfinite(a).all()) and 0.0 <= float(a.min()) <= float(a.max()) <= 1.0


def test_off_by_default_so_the_chain_is_todays() -> None:
    assert [n for n, _ in augmentation_steps(AugmentConfig())] == list(BASE_STEPS)
    # a changed range with prob 0 adds no step and changes no output bit
    tuned = AugmentConfig(thick_slices={"prob": 0.0, "factor": (2.0, 3.0)},
                          gibbs={"prob": 0.0, "alpha": (0.1, 0.2)})
    assert [n for n, _ in augmentation_steps(tuned)] == list(BASE_STEPS)
    for seed in (0, 7):
        assert torch.equal(_augmented(tuned, seed).as_tensor(),
                           _augmented(AugmentConfig(), seed).as_tensor())


def test_switching_them_on_keeps_the_draws_of_todays_steps() -> None:
    dr = load_config("brain64_dr").augment
    names = [n for n, _ in augmentation_steps(dr)]
    assert names == [*BASE_STEPS, *DOMAIN_RANDOMISATION, "clip_unit_range"]
    today, with_dr = augment_only(AugmentConfig(), 11), augment_only(dr, 11)
    for old, new in zip(today.transforms[:5], with_dr.transforms[:5], strict=True):
        assert np.array_equal(old.R.get_state()[1], new.R.get_state()[1])


def test_the_full_training_chain_with_every_step_on(head_nifti: Path) -> None:
    smoke = load_config("smoke")
    on = AugmentConfig(**{n: {"prob": 1.0} for n in DOMAIN_RANDOMISATION})
    a = build_transforms(smoke.data, on, train=True, seed=3)({"image": str(head_nifti)})["image"]
    b = build_transforms(smoke.data, on, train=True, seed=3)({"image": str(head_nifti)})["image"]
    assert torch.equal(a.as_tensor(), b.as_tensor())
    assert tuple(a.shape) == (1, *smoke.data.spatial_size) and a.dtype == torch.float32
    assert bool(torch.isfinite(a).all()) and 0.0 <= float(a.min()) <= float(a.max()) <= 1.0


def _separable() -> torch.Tensor:
    """(1, 24, 28, 20) sum of three random 1D profiles, one per axis, in [0, 1]."""
    gen = torch.Generator().manual_seed(0)
    f, g, h = (torch.rand(n, generator=gen) / 3 for n in (24, 28, 20))
    return (f[:, None, None] + g[None, :, None] + h[None, None, :])[None]


def _axis_energy(x: torch.Tensor) -> torch.Tensor:
    """High-frequency energy along each spatial axis of (1, D, H, W): sum of squared steps."""
    return torch.stack([(torch.diff(x.double(), dim=a) ** 2).sum() for a in (1, 2, 3)])


def test_thick_slices_blur_exactly_one_random_axis() -> None:
    x = _separable()
    before = _axis_energy(x)
    chosen = set()
    for seed in range(12):
        step = RandThickSlicesd("image", (3.0, 3.0), prob=1.0)
        step.set_random_state(seed)
        out = step({"image": MetaTensor(x.clone())})["image"]
        ratio = _axis_energy(out.as_tensor()) / before
        blurred = [a for a in range(3) if ratio[a] < 0.5]
        assert blurred == [step.axis], ratio
        kept = [a for a in range(3) if a != step.axis]
        torch.testing.assert_close(ratio[kept], torch.ones(2, dtype=torch.float64), rtol=1e-5,
                                   atol=0)
        chosen.add(step.axis)
    assert chosen == {0, 1, 2}


def test_thick_slices_keep_shape_dtype_and_affine() -> None:
    item = _volume()
    step = RandThickSlicesd("image", (2.0, 4.0), prob=1.0)
    out = step({"image": item["image"].clone()})["image"]
    assert isinstance(out, MetaTensor) and out.shape == item["image"].shape
    assert out.dtype == torch.float32
    assert torch.equal(out.affine, item["image"].affine)


def test_new_settings_at_their_defaults_keep_every_digest() -> None:
    assert config_digest(AugmentConfig()) == DEFAULT_AUGMENT_DIGEST
    assert config_digest(load_config("smoke").augment) == SMOKE_AUGMENT_DIGEST
    for name in (None, "brain64", "demo", "demo_quick", "smoke", "brain64_dr"):
        config = load_config(name)
        assert pseudo_tag(config.kit, config.augment) == KIT_TAG, name
    dr = load_config("brain64_dr")
    assert config_digest(dr.augment) != DEFAULT_AUGMENT_DIGEST  # switched on: it counts
    assert config_digest(ExperimentConfig(augment={"gibbs": {"prob": 0.0, "alpha": (0, 1)}})) \
        != config_digest(ExperimentConfig())  # a changed range counts too


@pytest.mark.parametrize(("override", "message"), [
    ("augment.gibbs.prob=-0.1", "augment.gibbs.prob: Input should be greater than or equal to 0"),
    ("augment.thick_slices.factor=[0.5, 2]", "augment.thick_slices.factor: Value error, factor "
     "must be a range [low, high] with 1 <= low <= high <= 16"),
    ("augment.low_resolution.zoom=[0.9, 0.5]", "augment.low_resolution.zoom: Value error, zoom "
     "must be a range [low, high] with 0.1 <= low <= high <= 1"),
])
def test_bad_settings_are_refused_by_name(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("brain64", [override])
    assert message in str(info.value)
