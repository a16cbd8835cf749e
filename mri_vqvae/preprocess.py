"""Batch preprocessing: normalised RAS NIfTI, a montage per case, an index, a failures table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import Compose

from mri_vqvae.atomic import atomic_write_text
from mri_vqvae.batch import Failure, run_batch, write_failures
from mri_vqvae.config import ExperimentConfig, config_digest
from mri_vqvae.data import case_items
from mri_vqvae.manifest import Manifest
from mri_vqvae.report import orthogonal_montage
from mri_vqvae.transforms import build_transforms
from mri_vqvae.writers import affine_spacing, write_nifti


@dataclass(frozen=True)
class PreprocessedCase:
    """One written case; paths are relative to the output folder."""

    case_id: str
    subject_id: str
    split: str
    image: str
    montage: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: list[list[float]]
    source_sha256: str


def preprocess_case(item: dict[str, Any], chain: Compose, out_dir: Path) -> PreprocessedCase:
    """Run the deterministic chain on one item and write its NIfTI and montage."""
    image = chain(dict(item))["image"]  # MetaTensor (1, X, Y, Z), RAS
    volume = image[0].detach().cpu().numpy().astype(np.float32)
    affine = np.asarray(image.affine, dtype=np.float64)
    case_id = item["case_id"]
    rel_image = f"images/{case_id}.nii.gz"
    rel_montage = f"montages/{case_id}.png"
    write_nifti(out_dir / rel_image, volume, affine)
    spacing = affine_spacing(affine)
    orthogonal_montage([(case_id, volume)], spacing, out_dir / rel_montage, title=case_id, vmax=1.0)
    return PreprocessedCase(
        case_id=case_id,
        subject_id=item["subject_id"],
        split=item["split"],
        image=rel_image,
        montage=rel_montage,
        shape=tuple(int(s) for s in volume.shape),
        spacing=spacing,
        affine=affine.tolist(),
        source_sha256=item["sha256"],
    )


def preprocess_manifest(
    manifest: Manifest,
    config: ExperimentConfig,
    out_dir: str | Path,
    split: str | None = None,
    strict: bool = False,
) -> tuple[list[PreprocessedCase], list[Failure]]:
    """Preprocess every case of `split` into `out_dir`; writes index.json and failures.csv."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chain = build_transforms(config.data)
    items = case_items(manifest, config.data, split)
    done, failures = run_batch(
        items, lambda item: preprocess_case(item, chain, out_dir), strict=strict, desc="preprocess"
    )
    index = {
        "manifest_name": manifest.name,
        "manifest_digest": manifest.digest,
        "config_digest": config_digest(config.data),
        "data": config.data.model_dump(mode="json"),
        "split": split,
        "cases": [asdict(c) for c in done],
        "failures": [asdict(f) for f in failures],
    }
    atomic_write_text(out_dir / "index.json", json.dumps(index, indent=2) + "\n")
    write_failures(out_dir / "failures.csv", failures)
    return done, failures
