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


def _grid_scores(prior: nn.Module) -> Callable[[Tensor, Tensor | None], dict[str, Tensor]]:
    """Per-grid scores (B,) of `prior`: ``bits`` and, for a prior with ``stage_bits``, each
    stage's bits under ``stage:<name>`` (then ``bits`` is their sum: one pass, not two)."""
    stage_bits = getattr(prior, "stage_bits", None)
    if stage_bits is None:
        scorer = cast(Prior, prior)
        return lambda x, y: {"bits": scorer.grid_bits(x, y)}

    def scores(x: Tensor, y: Tensor | None) -> dict[str, Tensor]:
        stages = stage_bits(x, y)
        return {"bits": sum(stages.values()), **{f"stage:{k}": v for k, v in stages.items()}}

    return scores


@torch.no_grad()
def mean_scores(
    prior: nn.Module, split: PriorSplit, batch_size: int, device: torch.device, bf16: bool = False
) -> tuple[float, dict[str, float]]:
    """Mean bits per latent of `prior` over the grids (N, d, h, w), N > 0, of `split`, and each
    stage's mean bits per latent ({} for a prior without stages, e.g. the PixelCNN).

    Every grid has the same size, so these are means over every position. The prior runs in
    eval mode and is put back in its previous mode afterwards.
    """
    scores = _grid_scores(prior)
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
    means = {name: total / len(split) for name, total in totals.items()}
    stages = {name.removeprefix("stage:"): v for name, v in means.items() if name != "bits"}
    return means["bits"], stages


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
    stages: dict[str, dict[str, float] | None] = {}
    for name in ("val", "test"):
        split = data.splits[name]
        n = len(split)
        scored = mean_scores(prior, split, batch_size, device, bf16) if n else (None, None)
        bits, stages[name] = scored
        splits[name] = {
            "num_cases": n,
            "prior_bits_per_latent": bits,
            "uniform_bits_per_latent": uniform_bits(k) if n else None,
            "unigram_bits_per_latent": unigram_bits(train, split.grids, k) if n else None,
        }
    report = {"codebook_size": k, "latent_shape": list(data.index.latent_shape),
              "train_cases": len(train), "likelihood": cast(Prior, prior).likelihood,
              "label_field": data.label_field, "label_names": list(data.label_names),
              "unigram": "add-one smoothed code frequencies of train", "splits": splits}
    if hasattr(prior, "stage_bits"):  # train beside val/test: which stage overfits
        _, train_stages = mean_scores(prior, data.train, batch_size, device, bf16)
        report["stage_bits_per_latent"] = {"train": train_stages, **stages}
    return report
