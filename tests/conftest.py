"""Shared fixtures: tiny synthetic volumes written as real NIfTI files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.volumes import make_head, write_nifti


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One MRI_VQVAE_CACHE per test session (subprocesses inherit it): the kit's ROBEX brain
    masks are made once, not by every test that builds a kit, and never in the user's cache."""
    before = os.environ.get("MRI_VQVAE_CACHE")
    os.environ["MRI_VQVAE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        del os.environ["MRI_VQVAE_CACHE"]
    else:
        os.environ["MRI_VQVAE_CACHE"] = before


@pytest.fixture
def head_nifti(tmp_path: Path) -> Path:
    """One tiny head volume on disk as .nii.gz."""
    return write_nifti(tmp_path / "head.nii.gz", make_head())


@pytest.fixture
def head_folder(tmp_path: Path) -> Path:
    """A flat folder of four tiny heads from two subjects."""
    root = tmp_path / "heads"
    root.mkdir()
    for i, name in enumerate(["subA_T1", "subA_T2", "subB_T1", "subC_T1"]):
        write_nifti(root / f"{name}.nii.gz", make_head(seed=i))
    return root
