"""Bits per latent of a prior on held-out grids, beside the uniform and unigram floors.

Any `mri_vqvae.models.priors.base.Prior` is scored through its ``grid_bits``; the floors come
from `mri_vqvae.models.priors.unigram.baseline` (log2 K, and the add-one smoothed unconditional
code frequencies of the train grids).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from mri_vqvae.models.priors.base import Prior
from mri_vqvae.models.priors.unigram.baseline import uniform_bits, unigram_bits
from mri_vqvae.training.prior_data import PriorData, PriorSplit

LN2 = math.log(2.0)


@torch.no_grad()
def _mean_scores(
    scores: Callable[[Tensor, Tensor | None], dict[str, Tensor]], prior: nn.Module,
    split: PriorSplit, batch_size: int, device: torch.device, bf16: bool,
) -> dict[str, float]:
    """Mean over the grids of `split` (N > 0) of each per-grid score (B,) that `scores` returns.

    The prior runs in eval mode and is put back in its previous mode afterwards.
    """
    was_training = prior.training
    prior.eval()
    totals: dict[str, float] = {}
    try:
        for start in range(0, len(split), batch_size):
            x = split.grids[start : start + batch_size].to(device)
            y = None if split.labels is None else split.labels[start : start + batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                batch = scores(x, None if y is None else y.to(device))
            for name, values in batch.items():
                totals[name] = totals.get(name, 0.0) + float(values.double().sum())
    finally:
        prior.train(was_training)
    return {name: total / len(split) for name, total in totals.items()}


def mean_bits(
    prior: nn.Module, split: PriorSplit, batch_size: int, device: torch.device, bf16: bool = False
) -> float:
    """Mean bits per latent of `prior` over the grids (N, d, h, w), N > 0, of `split`.

    Every grid has the same size, so this is the mean over every position.
    """
    scorer = cast(Prior, prior)
    return _mean_scores(lambda x, y: {"bits": scorer.grid_bits(x, y)}, prior, split,
                        batch_size, device, bf16)["bits"]


def mean_stage_bits(
    prior: nn.Module, split: PriorSplit, batch_size: int, device: torch.device, bf16: bool = False
) -> dict[str, float] | None:
    """Mean bits per latent of each stage (e.g. the two-level prior's coarse and fine) over the
    grids of `split`, or None for a prior without ``stage_bits``."""
    stage_bits = getattr(prior, "stage_bits", None)
    if stage_bits is None or len(split) == 0:
        return None
    return _mean_scores(stage_bits, prior, split, batch_size, device, bf16)


def likelihood_report(
    prior: nn.Module, data: PriorData, batch_size: int, device: torch.device, bf16: bool = False
) -> dict[str, Any]:
    """Bits per latent of `prior` on the val and test grids beside two baselines.

    ``uniform`` is log2 K; ``unigram`` the cross-entropy under the add-one smoothed code
    frequencies of all train grids (unconditional). A split without grids reports ``num_cases``
    0 and nulls. A prior with stages (``stage_bits``) adds ``stage_bits_per_latent``: each
    stage's bits on the train, val and test grids.
    """
    k = data.index.codebook_size
    train = data.train.grids
    splits: dict[str, Any] = {}
    for name in ("val", "test"):
        split = data.splits[name]
        n = len(split)
        splits[name] = {
            "num_cases": n,
            "prior_bits_per_latent": mean_bits(prior, split, batch_size, device, bf16)
            if n else None,
            "uniform_bits_per_latent": uniform_bits(k) if n else None,
            "unigram_bits_per_latent": unigram_bits(train, split.grids, k) if n else None,
        }
    report = {"codebook_size": k, "latent_shape": list(data.index.latent_shape),
              "train_cases": len(train), "likelihood": cast(Prior, prior).likelihood,
              "label_field": data.label_field, "label_names": list(data.label_names),
              "unigram": "add-one smoothed code frequencies of train", "splits": splits}
    stages = {name: mean_stage_bits(prior, data.splits[name], batch_size, device, bf16)
              for name in ("train", "val", "test")}
    if any(v is not None for v in stages.values()):
        report["stage_bits_per_latent"] = stages  # train beside val/test: where it overfits
    return report
