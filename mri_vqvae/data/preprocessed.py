"""Preprocess once: later stages read a `preprocess` output folder instead of the raw files.

`PreprocessedStore` looks a dataset item up in a folder written by
`mri_vqvae.tasks.preprocess.preprocess_manifest` and returns the stored volume only when the case's
sidecar names the same source sha256 (the manifest's), the same data-config digest, subject and
split, and the stored NIfTI still hashes to what the sidecar recorded (`finished_case`). Anything
else (a case not there, another config, a changed file) falls back to the MONAI chain on the raw
file, so a store can only save time, never change a result: the stored NIfTI holds the chain's
float32 output exactly, and the chain's own MetaTensor is replaced by one with the same voxels
and the stored (float32-rounded) affine.

``with_store(chain, store)`` is what `train-vqvae`, `encode`, `reconstruct` and `evaluate` use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Transform

from mri_vqvae.config import DataConfig, config_digest
from mri_vqvae.data.transforms import IMAGE
from mri_vqvae.tasks.preprocess import finished_case

log = logging.getLogger(__name__)


class PreprocessedStore:
    """Verified read access to a `preprocess` output folder for one data config."""

    def __init__(self, folder: str | Path, data: DataConfig) -> None:
        self.folder = Path(folder)
        self.digest = config_digest(data)
        self.hits = 0
        self.misses = 0

    def load(self, item: Mapping[str, Any]) -> MetaTensor | None:
        """The stored (1, D, H, W) float32 volume of `item` with its affine, or None."""
        if "sha256" not in item:
            return None
        case = finished_case(self.folder, dict(item), self.digest)
        if case is None:
            self.misses += 1
            return None
        img = nib.load(self.folder / case.image)
        voxels = np.asarray(img.dataobj, dtype=np.float32)[None]
        self.hits += 1
        return MetaTensor(torch.from_numpy(voxels), affine=torch.as_tensor(img.affine))


class StoreOrChain(Transform):
    """A deterministic transform: the stored volume when `store` has the item, else `chain`.

    A MONAI `Transform` (not randomizable), so `CacheDataset` caches its output once per item.
    """

    def __init__(self, chain: Callable[[dict[str, Any]], dict[str, Any]],
                 store: PreprocessedStore | None) -> None:
        self.chain, self.store = chain, store

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        stored = None if self.store is None else self.store.load(data)
        if stored is None:
            return self.chain(dict(data))
        return {**data, IMAGE: stored}


def with_store(chain: Compose, folder: str | Path | None, data: DataConfig) -> Compose:
    """`chain` itself without a folder; else a Compose reading `folder` first (verified)."""
    if folder is None:
        return chain
    if not Path(folder).is_dir():
        log.warning("preprocessed folder %s does not exist: every case is preprocessed anew",
                    folder)
        return chain
    return Compose([StoreOrChain(chain, PreprocessedStore(folder, data))])
