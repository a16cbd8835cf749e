"""A VQ-VAE run, a prior run and a scan shared by the API tests (built once per module)."""

from __future__ import annotations

import pytest

import mri_vqvae as mv
from mri_vqvae.api import Model
from tests.support.shared_runs import SharedRuns, make_shared_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SharedRuns:
    return make_shared_runs(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def prior_model(runs: SharedRuns) -> Model:
    return mv.load(runs.prior)


@pytest.fixture(scope="module")
def vqvae_model(runs: SharedRuns) -> Model:
    return mv.load(runs.vqvae)
