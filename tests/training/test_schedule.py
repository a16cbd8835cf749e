"""The learning-rate schedule as a pure function of the step, and the checks on its settings."""

from __future__ import annotations

import math

import pytest

from mri_vqvae.config import TrainConfig, load_config
from mri_vqvae.core.errors import ConfigError
from mri_vqvae.training.schedule import lr_factor

T, W, R = 100, 10, 0.1


def _cosine(**extra: object) -> TrainConfig:
    return TrainConfig(max_steps=T, lr_schedule="warmup_cosine", warmup_steps=W, min_lr_ratio=R,
                       **extra)


def test_constant_is_exactly_one_at_every_step() -> None:
    tc = TrainConfig(max_steps=T)
    assert tc.lr_schedule == "constant"
    assert {lr_factor(tc, step) for step in range(T + 1)} == {1.0}


def test_warmup_cosine_at_its_landmarks() -> None:
    tc = _cosine()
    assert lr_factor(tc, 0) == 1 / W  # the first step already trains
    assert lr_factor(tc, W - 1) == 1.0  # end of warm-up
    assert lr_factor(tc, W) == 1.0  # the decay starts at the peak
    assert lr_factor(tc, W + (T - W) // 2) == pytest.approx((1 + R) / 2, abs=1e-15)  # halfway
    assert lr_factor(tc, T) == pytest.approx(R, abs=1e-15)  # end
    step = 37
    expected = R + (1 - R) * (1 + math.cos(math.pi * (step - W) / (T - W))) / 2
    assert lr_factor(tc, step) == expected


def test_warmup_rises_and_the_decay_falls_monotonically() -> None:
    tc = _cosine()
    factors = [lr_factor(tc, step) for step in range(T + 1)]
    assert factors[:W] == sorted(factors[:W])
    assert factors[W:] == sorted(factors[W:], reverse=True)
    assert min(factors) >= R and max(factors) == 1.0


def test_no_warmup_starts_at_the_peak() -> None:
    tc = TrainConfig(max_steps=T, lr_schedule="warmup_cosine")
    assert lr_factor(tc, 0) == 1.0 and lr_factor(tc, T) == 0.0


def test_defaults_written_out_are_the_same_config() -> None:
    explicit = load_config("smoke", ["train_vqvae.lr_schedule=constant",
                                     "train_vqvae.adversarial_weight=0.0"])
    assert explicit == load_config("smoke")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train_vqvae.lr_schedule=cosine"], "lr_schedule must be one of"),
        (["train_vqvae.warmup_steps=5"], "warmup_steps applies to lr_schedule=warmup_cosine"),
        (["train_prior.min_lr_ratio=0.1"], "min_lr_ratio applies to lr_schedule=warmup_cosine"),
        (["train_vqvae.lr_schedule=warmup_cosine", "train_vqvae.warmup_steps=6"],
         "warmup_steps must be below max_steps=6"),
        (["train_vqvae.lr_schedule=warmup_cosine", "train_vqvae.min_lr_ratio=1.5"],
         "train_vqvae.min_lr_ratio: Input should be less than or equal to 1"),
        (["train_vqvae.adversarial_weight=0.1", "train_vqvae.adversarial_start_step=6"],
         "adversarial_start_step: Value error, must be below max_steps=6"),
        (["train_vqvae.adversarial_loss=bce"], "adversarial_loss must be least_squares or hinge"),
        (["train_vqvae.adversarial_weight=-1"], "adversarial_weight: Input should be greater"),
        (["train_prior.adversarial_weight=0.1"], "did you mean 'train_vqvae.adversarial_weight'"),
    ],
)
def test_bad_settings_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", overrides)
