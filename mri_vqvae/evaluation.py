"""Reconstruction quality of a trained VQ-VAE on the cases of one manifest split.

Each case goes through the deterministic chain of the config the VQ-VAE was trained with, then
the model in eval mode (the codebook never moves). Metrics are per case on the [0, 1] scale:
PSNR and SSIM (MONAI), NMSE, and PSNR inside the foreground (target > `FOREGROUND`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mri_vqvae.batch import Failure, run_batch
from mri_vqvae.checkpoint import LoadedCheckpoint, load_checkpoint
from mri_vqvae.config import ExperimentConfig
from mri_vqvae.data import case_items
from mri_vqvae.errors import CheckpointError
from mri_vqvae.manifest import Manifest
from mri_vqvae.metrics import mean_of, psnr, ssim
from mri_vqvae.transforms import build_transforms

FOREGROUND = 0.05  # intensity on the [0, 1] scale above which a voxel counts as foreground


@dataclass(frozen=True)
class CaseQuality:
    """Reconstruction metrics of one case."""

    case_id: str
    subject_id: str
    split: str
    psnr: float
    ssim: float
    nmse: float
    psnr_foreground: float
    codes_used: int


@dataclass(frozen=True)
class QualityReport:
    """Per-case metrics, their means, and codebook usage over all cases together."""

    cases: list[CaseQuality]
    failures: list[Failure]
    codes_used: int
    codebook_size: int

    def summary(self) -> dict[str, Any]:
        """Means over cases plus codebook usage, JSON-ready."""
        keys = ("psnr", "ssim", "nmse", "psnr_foreground")
        means = {k: mean_of([getattr(c, k) for c in self.cases]) for k in keys}
        return {
            "num_cases": len(self.cases),
            "num_failures": len(self.failures),
            **{f"mean_{k}": v for k, v in means.items()},
            "codes_used": self.codes_used,
            "codebook_size": self.codebook_size,
            "codebook_usage": self.codes_used / self.codebook_size,
            "cases": [asdict(c) for c in self.cases],
        }


def experiment_of(loaded: LoadedCheckpoint) -> ExperimentConfig:
    """The experiment config a VQ-VAE checkpoint was trained with (stored in its extra)."""
    raw = loaded.extra.get("experiment")
    if raw is None:
        raise CheckpointError(
            f"{loaded.path}: no experiment config in the checkpoint's extra; it was not written "
            "by train-vqvae, so the preprocessing it expects is unknown"
        )
    return ExperimentConfig.model_validate(raw)


def _psnr_in(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    mse = float(((pred.clamp(0, 1) - target)[mask] ** 2).mean())
    return math.inf if mse == 0 else -10.0 * math.log10(mse)


@torch.no_grad()
def case_quality(model: torch.nn.Module, image: torch.Tensor, item: dict[str, Any]
                 ) -> tuple[CaseQuality, torch.Tensor]:
    """Metrics of one preprocessed volume (1, D, H, W); returns them and the code indices."""
    target = torch.as_tensor(image).float().unsqueeze(0)  # (1, 1, D, H, W)
    out = model(target)
    pred = out.reconstruction.float()
    err = (pred.clamp(0, 1) - target).pow(2).sum()
    quality = CaseQuality(
        case_id=item["case_id"],
        subject_id=item["subject_id"],
        split=item["split"],
        psnr=float(psnr(pred, target)[0]),
        ssim=float(ssim(pred, target)[0]),
        nmse=float(err / target.pow(2).sum()),
        psnr_foreground=_psnr_in(pred, target, target > FOREGROUND),
        codes_used=int(out.indices.unique().numel()),
    )
    return quality, out.indices


def evaluate_reconstruction(
    checkpoint: str | Path, manifest: Manifest, split: str, strict: bool = False
) -> QualityReport:
    """Reconstruct every case of `split` with the VQ-VAE in `checkpoint` and measure quality."""
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval()
    config = experiment_of(loaded)
    chain = build_transforms(config.data)
    seen: set[int] = set()

    def one(item: dict[str, Any]) -> CaseQuality:
        quality, indices = case_quality(model, chain(dict(item))["image"], item)
        seen.update(indices.unique().tolist())
        return quality

    cases, failures = run_batch(
        case_items(manifest, config.data, split), one, strict=strict, desc=f"evaluate {split}"
    )
    return QualityReport(cases, failures, len(seen), model.config.codebook_size)
