"""Opening runs: the one best-else-last rule, autoencoder runs, prior runs of every kind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mri_vqvae.artifacts.checkpoint import load_checkpoint
from mri_vqvae.artifacts.checkpoint_folder import WEIGHTS
from mri_vqvae.artifacts.loading import find_checkpoint, open_autoencoder_run, open_prior_run
from mri_vqvae.core.errors import CheckpointError
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.models.priors.base import Prior
from mri_vqvae.models.priors.unigram.model import UnigramPrior
from tests.support.runs import CFG, make_prior_run, make_unigram_run, make_vqvae_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    vq = make_vqvae_run(root, "ab" * 32)
    return {"vqvae": vq, "pixelcnn": make_prior_run(root, vq, "ab" * 32),
            "unigram": make_unigram_run(root, vq, "ab" * 32)}


def test_best_else_last_and_checkpoint_folders(runs: dict[str, Path], tmp_path: Path) -> None:
    vq = runs["vqvae"]
    best = (vq / "checkpoints" / "best").resolve()
    assert find_checkpoint(vq, "autoencoder") == (vq.resolve(), best)
    assert find_checkpoint(best, "autoencoder") == (vq.resolve(), best)
    run = Path(shutil.copytree(vq, tmp_path / "run"))
    (run / "checkpoints" / "best").rename(run / "checkpoints" / "last")
    assert find_checkpoint(run, "prior")[1] == (run / "checkpoints" / "last").resolve()
    (run / "checkpoints" / "last" / "COMPLETE").unlink()  # an interrupted save counts for nothing
    with pytest.raises(CheckpointError, match="no complete checkpoints/best or checkpoints/last"):
        find_checkpoint(run, "prior")
    with pytest.raises(CheckpointError, match="does not exist.*train-vqvae"):
        find_checkpoint(tmp_path / "nowhere", "autoencoder")


def test_open_autoencoder_run_records_what_encode_needs(runs: dict[str, Path]) -> None:
    source = open_autoencoder_run(runs["vqvae"])
    folder = runs["vqvae"] / "checkpoints" / "best"
    assert source.weights_sha256 == sha256_file(folder / WEIGHTS) and source.step == 6
    assert source.data == CFG.data and source.codebook_size == CFG.autoencoder.codebook_size
    assert source.latent_shape == (4, 4, 4)
    stored = load_checkpoint(folder).model.state_dict()
    assert all(torch.equal(v, stored[k]) for k, v in source.model.state_dict().items())


def test_a_run_of_the_other_role_is_refused(runs: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="not an autoencoder"):
        open_autoencoder_run(runs["unigram"])
    with pytest.raises(CheckpointError, match="not a prior"):
        open_prior_run(runs["vqvae"])


@pytest.mark.parametrize("kind", ["pixelcnn", "unigram"])
def test_prior_runs_of_every_kind_open_with_their_vqvae(runs: dict[str, Path], kind: str) -> None:
    run = open_prior_run(runs[kind], device="auto")
    assert isinstance(run.prior, Prior) and run.latent_shape == (4, 4, 4)
    assert run.paths.vqvae_checkpoint == (runs["vqvae"] / "checkpoints" / "best").resolve()
    assert run.sha256s["prior"] == sha256_file(run.paths.prior_checkpoint / WEIGHTS)
    assert isinstance(run.prior, UnigramPrior) == (kind == "unigram")
    grids = torch.zeros((2, 4, 4, 4), dtype=torch.long, device=run.device)
    bits = run.prior.grid_bits(grids)
    assert bits.shape == (2,) and torch.equal(bits[0], bits[1])  # same grid, same bits


def test_a_moved_vqvae_is_found_by_its_run_folder_and_checked_by_sha256(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    moved = Path(shutil.copytree(runs["vqvae"], tmp_path / "moved"))
    run = open_prior_run(runs["unigram"], moved)
    assert run.paths.vqvae_checkpoint == (moved / "checkpoints" / "best").resolve()
    blob = bytearray((moved / "checkpoints" / "best" / WEIGHTS).read_bytes())
    blob[-5] ^= 0xFF
    (moved / "checkpoints" / "best" / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        open_prior_run(runs["unigram"], moved)
