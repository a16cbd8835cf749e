"""Samples drawn for an evaluation, measured against the held-out scans.

`draw_and_measure` writes ``num_samples`` samples into ``out/samples/`` with
`mri_vqvae.tasks.sample.sample_volumes` (a conditional prior draws its classes in turn) and uses
the volumes it decoded, clipped to [0, 1]: diversity (mean pairwise MS-SSIM, also of as many
held-out scans) and the MMD between VQ-VAE encoder features of samples and held-out scans.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mri_vqvae.evaluation.passes import HeldOut
from mri_vqvae.metrics.sets import (
    FEATURE_GRID,
    gaussian_mmd2,
    mean_pairwise_ms_ssim,
    pooled_features,
)
from mri_vqvae.tasks.sample import SampleSettings, class_labels, sample_volumes

if TYPE_CHECKING:
    from mri_vqvae.artifacts.loading import PriorRun
    from mri_vqvae.models.autoencoders.vqvae.model import VQVAE

NOT_FID = (
    "MMD between VQ-VAE encoder features (z_e average-pooled to 2x2x2) of samples and held-out "
    "scans. This is NOT an FID: no pretrained feature network is available offline, and the "
    "features come from the model under test, so it is only comparable between runs that share "
    "the VQ-VAE."
)


def draw_and_measure(run: PriorRun, model: VQVAE, held: HeldOut, num_samples: int, seed: int,
                     out: Path, batch_size: int = 8, threads: int | None = 1
                     ) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw samples into ``out/samples/``: (volumes (N, D, H, W) in [0, 1], the samples block)."""
    settings = SampleSettings(num_samples=num_samples, seed=seed, batch_size=batch_size)
    drawn = sample_volumes(run, settings, out / "samples", threads=threads, keep_volumes=True)
    assert drawn.volumes is not None
    volumes = np.clip(drawn.volumes, 0.0, 1.0)
    real = np.stack(held.volumes)
    pick = np.sort(np.random.default_rng(seed).permutation(len(real))[:num_samples])
    sample_features = pooled_features(model, torch.from_numpy(volumes)[:, None])
    mmd2, bandwidth = gaussian_mmd2(sample_features, np.stack(held.features))
    resolved = settings.resolved(run)
    classes = class_labels(run)
    return volumes, {
        "num_samples": num_samples,
        "seed": seed,
        "temperature": resolved.temperature,
        "top_k": resolved.top_k,
        "folder": "samples",
        "label_field": classes.field,
        "labels": drawn.labels if classes.names else None,
        "label_mode": "in turn" if classes.names else None,
        "diversity": {
            "measure": "mean pairwise MS-SSIM (lower = more diverse)",
            "samples": mean_pairwise_ms_ssim(volumes),
            "held_out": mean_pairwise_ms_ssim(real[pick]),
            "num_held_out_used": int(len(pick)),
        },
        "mmd": {"mmd2": mmd2, "bandwidth": bandwidth, "kernel": "gaussian, median heuristic",
                "estimator": "biased (V-statistic), >= 0",
                "features": f"VQ-VAE z_e average-pooled to {FEATURE_GRID}^3, flattened",
                "num_samples": len(sample_features), "num_held_out": len(held.features),
                "note": NOT_FID},
    }
