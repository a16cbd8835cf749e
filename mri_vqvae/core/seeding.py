"""Seeding every random number generator a run draws from."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = True, strict: bool = False) -> None:
    """Seed python `random`, numpy's global RNG and torch (all devices).

    `deterministic` picks deterministic cuDNN kernels and turns autotuning off (cheap);
    `strict` also calls ``torch.use_deterministic_algorithms(True, warn_only=True)``.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if strict:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
