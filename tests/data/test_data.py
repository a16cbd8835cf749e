"""Cached preprocessing: the on-disk cache key changes when the config or the file changes."""

from __future__ import annotations

from pathlib import Path

import torch

from mri_vqvae.config import load_config
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data.case import Case
from mri_vqvae.data.datasets import case_items, make_dataset
from mri_vqvae.data.manifest import Manifest
from mri_vqvae.data.transforms import build_transforms
from tests.support.volumes import make_head, write_nifti


def _manifest(root: Path) -> Manifest:
    path = root / "a.nii.gz"
    case = Case(case_id="a", subject_id="a", source_id="syn", path="a.nii.gz",
                sha256=sha256_file(path), bytes=path.stat().st_size, modality="T1w",
                shape=(24, 28, 20), spacing=(1.5, 1.5, 1.5), split="train")
    return Manifest(name="m", cases=(case,), data_root=root)


def _cached(root: Path, cache: Path, overrides: list[str]) -> torch.Tensor:
    data = load_config("smoke", overrides).data
    items = case_items(_manifest(root), data, "train")
    return make_dataset(items, build_transforms(data), cache)[0]["image"]


def test_cache_key_follows_config_and_file(tmp_path: Path) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    write_nifti(root / "a.nii.gz", make_head(seed=0))
    first = _cached(root, cache, [])
    assert len(list(cache.glob("*.pt"))) == 1
    again = _cached(root, cache, [])
    assert torch.equal(torch.as_tensor(first), torch.as_tensor(again))
    assert len(list(cache.glob("*.pt"))) == 1, "same config and file: the cache is reused"
    _cached(root, cache, ["data.foreground_margin=4"])
    assert len(list(cache.glob("*.pt"))) == 2, "a changed config gets its own entry"
    write_nifti(root / "a.nii.gz", make_head(seed=1))
    changed = _cached(root, cache, [])
    assert len(list(cache.glob("*.pt"))) == 3, "a changed file gets its own entry"
    assert not torch.equal(torch.as_tensor(first), torch.as_tensor(changed))


def test_memory_cache_matches_the_chain(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    write_nifti(root / "a.nii.gz", make_head(seed=0))
    data = load_config("smoke").data
    items = case_items(_manifest(root), data, "train")
    cached = make_dataset(items, build_transforms(data))[0]["image"]
    direct = build_transforms(data)(dict(items[0]))["image"]
    assert torch.equal(torch.as_tensor(cached), torch.as_tensor(direct))
