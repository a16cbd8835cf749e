"""Learning-rate schedules: the rate of a step is a pure function of the step.

`lr_factor` gives the multiplier of a base rate for the optimizer step taken after ``step``
completed steps; the session sets every param group's rate from it just before each step
(`mri_vqvae.training.session.Session.descend`). Nothing about the schedule is stored, so a
``--resume`` continues it exactly. With T = ``max_steps``, W = ``warmup_steps`` and
r = ``min_lr_ratio``:

- ``constant``: 1 at every step (the rate is ``lr`` exactly, as before schedules existed);
- ``warmup_cosine``: ``(step + 1) / W`` while ``step < W`` (no step at rate 0; the last warm-up
  step reaches 1), then ``r + (1 - r) * (1 + cos(pi * (step - W) / (T - W))) / 2``: 1 at W,
  ``(1 + r) / 2`` halfway, r at T.
"""

from __future__ import annotations

import math

import torch

from mri_vqvae.config import TrainConfig


def lr_factor(tc: TrainConfig, step: int) -> float:
    """Multiplier of the base rate for the step after `step` completed ones (0 <= step <= T)."""
    if tc.lr_schedule == "constant":
        return 1.0
    warmup, total, floor = tc.warmup_steps, tc.max_steps, tc.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * progress)) / 2.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the rate of every param group of `optimizer` to `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
