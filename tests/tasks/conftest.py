"""Prior runs shared by the sampling and likelihood tests (one of each per test module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mri_vqvae.artifacts.loading import PriorRun, open_prior_run
from tests.support.runs import make_tiny_prior_run, split_unigram


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unconditional tiny PixelCNN prior run."""
    return make_tiny_prior_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def prior_run(run_dir: Path) -> PriorRun:
    return open_prior_run(run_dir)


@pytest.fixture(scope="module")
def conditional_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A unigram prior on modality: class T1w uses codes 0-7, class T2w codes 8-15."""
    prior = split_unigram(16, "modality", classes=2)
    return make_tiny_prior_run(tmp_path_factory.mktemp("cond"), prior, label_names=("T1w", "T2w"))
