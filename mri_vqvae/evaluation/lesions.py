"""Do the prior's likelihood maps point at pathology? The lesion block of metrics.json.

For each held-out case with a lesion mask (`passes.LesionCase`), the per-latent bits map is
mapped to voxels (each latent fills its block) and scored by `metrics.lesion.lesion_auroc`:
lesion voxels against the other voxels of the brain where the manifest records a brain mask
(the kit's come from ROBEX), else of the head eroded by one latent block (the scalp and the
field-of-view edge left out; each row says which). Beside it, the same AUROC of the
unigram's map (-log2 of each code's training frequency: rarity without context), so a reader
sees what the prior's context adds, and of the healed-reconstruction map
(`mri_vqvae.evaluation.healing`) where the prior can redraw part of a grid. Figures: the scan
with the maps and the lesion outlined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri_vqvae.evaluation.healing import HEAL_DRAWS, HEAL_P, Healer
from mri_vqvae.evaluation.passes import HeldOut, LesionCase, TrainPass
from mri_vqvae.evaluation.report.figures import lesion_overlay
from mri_vqvae.metrics.lesion import inner_head, lesion_auroc
from mri_vqvae.models.priors.unigram.baseline import fitted_unigram
from mri_vqvae.tasks.likelihood import block_upsample

GOAL_AUROC = 0.8
REGION_BRAIN = "brain mask"
REGION_HEAD = "head eroded by one latent block"


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


@torch.no_grad()
def lesion_block(held: HeldOut, train: TrainPass, codebook_size: int, factor: int,
                 spacing: Sequence[float], figures: Path | None,
                 healer: Healer | None = None) -> dict[str, Any] | None:
    """AUROC of the prior's, the unigram's and the healed maps per lesion case (None without
    one); with `figures`, writes ``lesion_<case>.png`` there and records its name."""
    if not held.lesions:
        return None
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
    unigram = fitted_unigram(torch.stack(train.grids), codebook_size) if train.grids else None
    volumes = {c.case_id: v for c, v in zip(held.cases, held.volumes, strict=True)}
    healing = healer if healer is not None and healer.available() else None
    rows = [_case_row(les, volumes[les.case_id], unigram, factor, spacing, figures, healing)
            for les in held.lesions]
    return {
        "measure": "AUROC of -log2 p per latent (each latent filling its voxel block) for lesion "
                   "voxels against the other voxels of the case's region: its brain mask where "
                   "the manifest records one, else the head eroded by one latent block",
        "region_margin_voxels": factor,
        "baseline": "the unigram's map: -log2 of each code's add-one smoothed training frequency",
        "healed": None if healing is None else {
            "measure": "mean |scan - decoded healed grid| over the draws, weighted by the "
                       "smoothed mask of redrawn latents (the same region and lesion voxels)",
            "redraw_below_p": HEAL_P, "draws": HEAL_DRAWS, "seed": healing.seed},
        "goal": GOAL_AUROC,
        "num_cases": len(rows),
        "mean_auroc_prior": _mean([r["auroc_prior"] for r in rows]),
        "mean_auroc_unigram": _mean([r["auroc_unigram"] for r in rows]),
        "mean_auroc_healed": _mean([r["auroc_healed"] for r in rows]),
        "cases": rows,
    }


def _case_row(les: LesionCase, volume: np.ndarray, unigram: Any, factor: int,
              spacing: Sequence[float], figures: Path | None,
              healer: Healer | None) -> dict[str, Any]:
    region = les.brain if les.brain is not None else inner_head(volume, factor)
    prior = None if les.latent_bits is None else block_upsample(les.latent_bits, factor)
    rarity = None if unigram is None else \
        block_upsample(unigram.bits(les.indices[None])[0].float().numpy(), factor)
    healed = None if healer is None or les.latent_bits is None else \
        healer.heal(les.case_id, volume, les.indices, les.latent_bits)
    row: dict[str, Any] = {
        "case_id": les.case_id,
        "lesion_voxels": int(les.lesion.sum()),
        "region": REGION_BRAIN if les.brain is not None else REGION_HEAD,
        "region_voxels": int(region.sum()),
        "auroc_prior": math.nan if prior is None else lesion_auroc(prior, les.lesion, region),
        "auroc_unigram": math.nan if rarity is None else lesion_auroc(rarity, les.lesion, region),
        "auroc_healed": math.nan if healed is None else
        lesion_auroc(healed.residual, les.lesion, region),
        "redrawn_share": None if healed is None else healed.redrawn,
        "figure": None,
    }
    maps = [(name, m, unit) for name, m, unit in (
        ("prior", prior, "bits / latent"), ("unigram", rarity, "bits / latent"),
        ("healed", None if healed is None else healed.residual, "|scan - healed|"))
        if m is not None]
    if figures is not None and maps and les.lesion.any():
        path = lesion_overlay(les.case_id, volume, les.lesion, maps, spacing,
                              figures / f"lesion_{les.case_id}.png", les.brain)
        row["figure"] = f"figures/{path.name}"
    return row
