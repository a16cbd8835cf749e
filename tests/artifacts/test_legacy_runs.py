"""Run folders written before the architecture change (tests/fixtures/legacy_2055c4e/) load.

Checkpoints rebuild their models with exactly the stored tensors, the legacy kind ``prior``
resolves to ``pixelcnn``, the prior run opens with its VQ-VAE (passed explicitly: the recorded
path is under /tmp), latents without labels load, and the old resume state still loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from mri_vqvae.artifacts.checkpoint import load_checkpoint
from mri_vqvae.artifacts.checkpoint_folder import WEIGHTS
from mri_vqvae.artifacts.latents import load_latents
from mri_vqvae.artifacts.loading import open_autoencoder_run, open_prior_run
from mri_vqvae.artifacts.resume import load_resume_state
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.models.registry import model_kind
from tests.support.paths import REPO

LEGACY = REPO / "tests" / "fixtures" / "legacy_2055c4e"
VQ_RUN = LEGACY / "runs" / "vqvae" / "20261201T110509Z-smoke-s0"
PRIOR_RUN = LEGACY / "runs" / "prior" / "20261201T110515Z-smoke-s0"


@pytest.mark.parametrize(
    ("folder", "kind", "registered"),
    [(VQ_RUN / "checkpoints" / "best", "vqvae", "vqvae"),
     (PRIOR_RUN / "checkpoints" / "best", "prior", "pixelcnn"),
     (PRIOR_RUN / "checkpoints" / "last", "prior", "pixelcnn")],
)
def test_legacy_checkpoints_rebuild_their_exact_tensors(
    folder: Path, kind: str, registered: str
) -> None:
    loaded = load_checkpoint(folder)
    assert loaded.kind == kind and model_kind(loaded.kind).name == registered
    assert loaded.step == 3 and not loaded.model.training
    stored = safetensors.torch.load_file(str(folder / WEIGHTS))
    state = loaded.model.state_dict()
    assert state.keys() == stored.keys()
    assert all(torch.equal(state[k], stored[k]) for k in stored)


def test_the_legacy_prior_run_opens_with_its_vqvae_passed_explicitly() -> None:
    for vqvae in (VQ_RUN, VQ_RUN / "checkpoints" / "best"):
        run = open_prior_run(PRIOR_RUN, vqvae)
        assert run.paths.prior_checkpoint == (PRIOR_RUN / "checkpoints" / "best").resolve()
        assert run.paths.vqvae_checkpoint == (VQ_RUN / "checkpoints" / "best").resolve()
        assert run.sha256s["vqvae"] == sha256_file(VQ_RUN / "checkpoints" / "best" / WEIGHTS)
        assert run.latent_shape == (4, 4, 4) and run.prior.codebook_size == 32
    latents = load_latents(LEGACY / "latents")
    grids = torch.from_numpy(latents.stack("train").astype(np.int64))
    bits = run.prior.grid_bits(grids)  # (N,) exact bits per latent of each train grid
    per_position = run.prior.bits(grids)
    assert per_position is not None
    torch.testing.assert_close(bits, per_position.flatten(1).mean(1))
    assert torch.isfinite(bits).all() and (bits > 0).all()


def test_the_legacy_vqvae_run_opens_and_reproduces_its_latents() -> None:
    source = open_autoencoder_run(VQ_RUN)
    latents = load_latents(LEGACY / "latents")
    assert source.weights_sha256 == latents.doc["vqvae_sha256"]
    assert (source.latent_shape, source.codebook_size) == (latents.latent_shape, 32)
    assert source.data.model_dump(mode="json") == latents.data


def test_legacy_latents_load_without_labels() -> None:
    latents = load_latents(LEGACY / "latents")
    assert [c.case_id for c in latents.cases] == sorted(latents.grids)
    assert all(c.modality is None and c.source_id is None for c in latents.cases)
    assert all(g.dtype == np.uint16 and g.shape == (4, 4, 4) for g in latents.grids.values())


def test_the_legacy_resume_state_loads() -> None:
    state = load_resume_state(PRIOR_RUN / "checkpoints" / "last")
    assert (state["step"], state["best_step"], state["train_cases"]) == (3, 3, 2)
    assert (state["epoch"], state["sampler_position"]) == (3, 0)  # written then, unread now
    assert {"optimizer", "rng", "best_metric"} <= set(state)
    assert isinstance(state["rng"]["torch"], torch.Tensor)
