"""The blocks of metrics.json: inputs, reconstruction, likelihood and memorisation.

Each block is a JSON-ready dict (NaN/inf are turned into null when the document is written).
Per-case statistics are `statistics.summarise` blocks ({mean, std, ci, ci_level, n, ...}).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mri_vqvae.artifacts.export import training_citations
from mri_vqvae.data.kit_sources import citations
from mri_vqvae.evaluation.passes import HeldOut, TrainPass
from mri_vqvae.metrics.image import CASE_METRICS, ms_ssim_settings
from mri_vqvae.metrics.quality import FOREGROUND
from mri_vqvae.metrics.sets import NearestScan, code_perplexity, memorisation_flags
from mri_vqvae.metrics.statistics import CI_LEVEL, summarise
from mri_vqvae.models.priors.unigram.baseline import fitted_unigram, uniform_bits

if TYPE_CHECKING:
    from mri_vqvae.artifacts.loading import AutoencoderRun, PriorRun
    from mri_vqvae.data.manifest import Manifest
    from mri_vqvae.models.priors.base import Prior

BITS_ARE = {
    "exact": "exact: the prior's -log2 p of each grid",
    "bound": "an upper bound on -log2 p (e.g. an ELBO): the prior's true bits are at most this",
}


def prior_kind(run: PriorRun) -> str:
    """The registered kind of a run's prior (``pixelcnn``, ``unigram``...)."""
    return str(run.prior.config.kind)  # type: ignore[attr-defined]  # a PriorSettings


def inputs_block(source: AutoencoderRun, prior: PriorRun | None, manifest: Manifest,
                 manifest_path: str | Path | None, settings: dict[str, Any]) -> dict[str, Any]:
    """What was evaluated: runs, checkpoints and hashes, manifest, data config, `settings`."""
    return {
        "vqvae_run": str(source.run_dir),
        "vqvae_checkpoint": str(source.checkpoint),
        "vqvae_sha256": source.weights_sha256,
        "prior_run": None if prior is None else str(prior.paths.run_dir),
        "prior_checkpoint": None if prior is None else str(prior.paths.prior_checkpoint),
        "prior_sha256": None if prior is None else prior.sha256s["prior"],
        "prior_kind": None if prior is None else prior_kind(prior),
        "manifest_name": manifest.name,
        "manifest_path": None if manifest_path is None else str(Path(manifest_path).resolve()),
        "manifest_digest": manifest.digest,
        "data": source.data.model_dump(mode="json"),
        **settings,
        "ci_level": CI_LEVEL,
        "data_citations": {"evaluated": citations(manifest),
                           "trained_on": training_citations(source.run_dir)},
    }


def reconstruction_block(held: HeldOut, num_resamples: int, seed: int,
                         spatial: Sequence[int], codebook_size: int) -> dict[str, Any]:
    """Per-case metric summaries (`CASE_METRICS` and codes used) and codebook use of all grids."""
    stats = {k: summarise([getattr(c, k) for c in held.cases], num_resamples, seed).as_dict()
             for k in (*CASE_METRICS, "codes_used")}
    used = len(set(torch.cat([g.reshape(-1) for g in held.indices]).tolist())) if held.indices \
        else 0
    return {
        "num_cases": len(held.cases),
        "num_failures": len(held.failures),
        "ms_ssim_settings": ms_ssim_settings(spatial).as_dict(),
        "foreground": {"threshold": FOREGROUND,
                       "definition": "voxels of the preprocessed target above the threshold "
                                     "on the [0, 1] intensity scale"},
        "metrics": stats,
        "codebook": {"codebook_size": codebook_size, "codes_used": used,
                     "usage": used / codebook_size,
                     "perplexity": code_perplexity(held.indices, codebook_size)},
    }


@torch.no_grad()
def unigram_case_bits(train_grids: Sequence[Tensor], grids: Sequence[Tensor],
                      codebook_size: int) -> list[float]:
    """Bits per latent of each grid (d, h, w) under the unigram fitted on `train_grids`
    (add-one smoothed, unconditional); NaN each when there is no training grid."""
    if not train_grids or not grids:
        return [float("nan")] * len(grids)
    unigram = fitted_unigram(torch.stack(list(train_grids)), codebook_size)
    return unigram.grid_bits(torch.stack(list(grids))).double().tolist()


def likelihood_block(held: HeldOut, train: TrainPass, prior: Prior, codebook_size: int,
                     num_resamples: int, seed: int) -> dict[str, Any]:
    """Prior bits per latent (held-out vs train) beside the uniform and unigram baselines."""
    held_bits = summarise(held.bits, num_resamples, seed)
    train_bits = summarise(train.bits, num_resamples, seed)
    unigram_held = unigram_case_bits(train.grids, held.indices, codebook_size)
    unigram_train = unigram_case_bits(train.grids, train.grids, codebook_size)
    return {
        "units": "bits per latent (mean -log2 p of a grid's codes under the prior), per case",
        "bits_are": prior.likelihood,
        "bits_note": BITS_ARE[prior.likelihood],
        "held_out": held_bits.as_dict(),
        "train": train_bits.as_dict(),
        "generalisation_gap": held_bits.mean - train_bits.mean,
        "uniform_bits": uniform_bits(codebook_size),
        "unigram_bits": {
            "held_out": summarise(unigram_held, num_resamples, seed).as_dict(),
            "train": summarise(unigram_train, num_resamples, seed).as_dict(),
            "fitted_on": f"the {len(train.grids)} training grids scored here (add-one "
                         "smoothed code frequencies, unconditional)",
        },
        "num_train_cases": len(train.bits),
    }


def memorisation_block(nearest: NearestScan, num_samples: int, held: HeldOut) -> dict[str, Any]:
    """Each sample's and held-out scan's nearest training scan; samples flagged as copies."""
    sample_r, held_r = nearest.best[:num_samples], nearest.best[num_samples:]
    threshold, flags = memorisation_flags(sample_r, held_r)
    return {
        "measure": "Pearson correlation with the nearest training scan (preprocessed grid)",
        "threshold": threshold,
        "rule": "a sample is flagged when it is nearer a training scan than the closest "
                "held-out scan comes (r > threshold)",
        "num_flagged": int(np.sum(flags)),
        "samples": [{"sample": i, "nearest_train_case": nearest.best_id[i], "r": float(r),
                     "flagged": bool(f)}
                    for i, (r, f) in enumerate(zip(sample_r, flags, strict=True))],
        "held_out": [{"case_id": c.case_id, "nearest_train_case": nearest.best_id[num_samples + i],
                      "r": float(held_r[i])} for i, c in enumerate(held.cases)],
    }

