"""Datasets and loaders over manifest cases (MONAI Dataset / PersistentDataset / DataLoader)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.data import DataLoader, Dataset, PersistentDataset
from monai.transforms import Compose

from mri_vqvae.config import DataConfig, config_digest
from mri_vqvae.manifest import Manifest


def case_items(
    manifest: Manifest, data: DataConfig, split: str | None = None
) -> list[dict[str, Any]]:
    """One dict per case of `split` (all cases if None), sorted by case_id.

    ``"prep"`` is the digest of the preprocessing config and ``"sha256"`` the file's checksum, so
    a cache keyed on the item changes when either the config or the file changes.
    """
    prep = config_digest(data)
    cases = [c for c in manifest.cases if split is None or c.split == split]
    return [
        {
            "image": str(manifest.data_root / c.path),
            "case_id": c.case_id,
            "subject_id": c.subject_id,
            "split": c.split or "",
            "sha256": c.sha256,
            "prep": prep,
        }
        for c in sorted(cases, key=lambda c: c.case_id)
    ]


def make_dataset(
    items: list[dict[str, Any]], transform: Compose, cache_dir: str | Path | None = None
) -> Dataset:
    """A MONAI dataset; with `cache_dir`, the deterministic prefix of `transform` is cached on disk.

    PersistentDataset caches up to the first random transform, keyed by a hash of each item
    (which holds the file checksum and the preprocessing digest, see `case_items`).
    """
    if cache_dir is None:
        return Dataset(items, transform=transform)
    return PersistentDataset(items, transform=transform, cache_dir=Path(cache_dir))


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0
) -> DataLoader:
    """A MONAI DataLoader (it seeds each worker's transforms from the torch generator)."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
