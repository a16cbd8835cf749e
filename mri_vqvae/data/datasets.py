"""Datasets over manifest cases: dataset items and cached preprocessing (MONAI)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.transforms import Compose

from mri_vqvae.config import DataConfig, config_digest
from mri_vqvae.data.case import Case
from mri_vqvae.data.manifest import Manifest
from mri_vqvae.data.transforms import BRAIN, BRAIN_SHA256, LESION, LESION_SHA256


def case_items(
    manifest: Manifest, data: DataConfig, split: str | None = None
) -> list[dict[str, Any]]:
    """One dict per case of `split` (all cases if None), sorted by case_id.

    ``"prep"`` is the digest of the preprocessing config and ``"sha256"`` the file's checksum, so
    a cache keyed on the item changes when either the config or the file changes; ``"root"`` is
    the manifest's data root, which every file of the case must stay inside. A case with a
    lesion mask also has ``"lesion_mask"`` (path) and ``"lesion_sha256"``; one with a brain mask
    ``"brain_mask"`` and ``"brain_sha256"``.
    """
    prep = config_digest(data)
    cases = [c for c in manifest.cases if split is None or c.split == split]
    return [_item(manifest.data_root, c, prep) for c in sorted(cases, key=lambda c: c.case_id)]


def _item(root: Path, c: Case, prep: str) -> dict[str, Any]:
    item = {
        "image": str(root / c.path),
        "root": str(root),
        "series_uid": c.series_uid,
        "case_id": c.case_id,
        "subject_id": c.subject_id,
        "split": c.split or "",
        "sha256": c.sha256,
        "prep": prep,
    }
    if c.lesion_mask is not None:  # only then, so the cache keys of other cases stay as they were
        item |= {LESION: str(root / c.lesion_mask), LESION_SHA256: c.lesion_mask_sha256}
    if c.brain_mask is not None:
        item |= {BRAIN: str(root / c.brain_mask), BRAIN_SHA256: c.brain_mask_sha256}
    return item


def plain_volume(x: Any) -> torch.Tensor:
    """A contiguous float32 torch.Tensor of `x` (MONAI's MetaTensor metadata dropped)."""
    t = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
    return t.float().contiguous()


def make_dataset(
    items: list[dict[str, Any]], transform: Compose, cache_dir: str | Path | None = None
) -> Dataset:
    """`items` through the deterministic `transform`, computed once and cached.

    In memory (MONAI CacheDataset) by default; on disk (PersistentDataset) with `cache_dir`,
    keyed by a hash of each item, which holds the file checksum and the preprocessing digest
    (see `case_items`), so the cache changes when either changes. Training does not use MONAI's
    DataLoader: with ``num_workers=0`` it reseeds the global torch RNG, breaking exact resume.
    """
    if cache_dir is None:
        return CacheDataset(items, transform, progress=sys.stderr.isatty(), num_workers=None)
    return PersistentDataset(items, transform=transform, cache_dir=Path(cache_dir))
