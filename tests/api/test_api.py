"""`mri_vqvae.load` and the model's methods agree with the model and the commands' own code."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import mri_vqvae as mv
from mri_vqvae.api import ApiError, Model
from mri_vqvae.artifacts.export import ExportError
from mri_vqvae.artifacts.loading import open_autoencoder_run, open_prior_run
from mri_vqvae.tasks.cases import Prepared
from mri_vqvae.tasks.likelihood import likelihood_map, preprocess_scan
from mri_vqvae.tasks.reconstruct import reconstruct_prepared
from mri_vqvae.tasks.sample import SampleSettings, centred_affine, sample_volumes
from tests.support.shared_runs import SharedRuns


def _voxels(image: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(image.dataobj)


def test_a_vqvae_run_loads_without_a_prior(vqvae_model: Model, runs: SharedRuns) -> None:
    reference = open_autoencoder_run(runs.vqvae)
    assert vqvae_model.prior is None
    assert vqvae_model.latent_shape == reference.latent_shape
    for ours, theirs in zip(vqvae_model.vqvae.state_dict().values(),
                            reference.model.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs)


def test_a_prior_run_loads_both_models(prior_model: Model, runs: SharedRuns) -> None:
    reference = open_prior_run(runs.prior)
    assert prior_model.prior is not None
    assert prior_model.prior.sha256s == reference.sha256s
    assert prior_model.opened.autoencoder.weights_sha256 == reference.sha256s["vqvae"]


def test_preprocess_is_the_training_chain(prior_model: Model, runs: SharedRuns) -> None:
    volume, affine = preprocess_scan(runs.scan, prior_model.data)
    image = prior_model.preprocess(runs.scan)
    assert np.array_equal(_voxels(image), volume)
    assert np.array_equal(image.affine, affine)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert int(image.header["sform_code"]) == int(image.header["qform_code"]) == 1


def test_encode_decode_round_trip_is_the_models_own(prior_model: Model, runs: SharedRuns) -> None:
    image = prior_model.preprocess(runs.scan)
    x = torch.from_numpy(_voxels(image))[None, None]
    expected = prior_model.vqvae.encode_indices(x)[0]
    indices = prior_model.encode(runs.scan)
    assert indices.dtype == torch.int64 and indices.shape == prior_model.latent_shape
    assert torch.equal(indices, expected)
    assert torch.equal(prior_model.encode(image), expected)
    with torch.no_grad():
        decoded = prior_model.vqvae.decode_indices(indices[None])[0, 0].numpy()
    assert np.array_equal(_voxels(prior_model.decode(indices, like=image)), decoded)


def test_decoded_volumes_lie_on_the_preprocessed_grid(prior_model: Model,
                                                      runs: SharedRuns) -> None:
    image = prior_model.preprocess(runs.scan)
    decoded = prior_model.decode(prior_model.encode(image), like=image)
    reconstructed = prior_model.reconstruct(runs.scan)
    assert decoded.shape == reconstructed.shape == image.shape
    assert np.array_equal(decoded.affine, image.affine)
    assert np.array_equal(reconstructed.affine, image.affine)
    data = prior_model.data
    assert np.array_equal(prior_model.decode(prior_model.encode(image)).affine,
                          centred_affine(data.spacing, data.spatial_size))


def test_reconstruct_is_the_reconstruct_commands(prior_model: Model, runs: SharedRuns) -> None:
    image = prior_model.preprocess(runs.scan)
    prepared = Prepared({"case_id": "scan"}, np.asarray(image.dataobj), image.affine)
    expected, _ = reconstruct_prepared(prior_model.vqvae, prepared, prior_model.device)
    assert np.array_equal(_voxels(prior_model.reconstruct(runs.scan)), expected)


def test_sampling_is_seeded(prior_model: Model) -> None:
    first, again, other = (prior_model.sample(3, seed=s) for s in (5, 5, 6))
    assert all(np.array_equal(_voxels(a), _voxels(b)) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(_voxels(a), _voxels(b))
                   for a, b in zip(first, other, strict=True))


def test_samples_are_the_sample_commands(prior_model: Model, tmp_path: Path) -> None:
    assert prior_model.prior is not None
    written = sample_volumes(prior_model.prior, SampleSettings(num_samples=3, seed=2,
                                                               batch_size=2),
                             tmp_path / "s", progress=False, keep_volumes=True)
    ours = prior_model.sample(3, seed=2, batch_size=2)
    assert written.volumes is not None
    assert np.array_equal(np.stack([_voxels(i) for i in ours]), written.volumes)
    assert np.array_equal(ours[0].affine, nib.load(written.images[0]).affine)


def test_likelihood_is_the_likelihood_commands(prior_model: Model, runs: SharedRuns) -> None:
    assert prior_model.prior is not None
    expected = likelihood_map(prior_model.prior, runs.scan)
    image = prior_model.likelihood(runs.scan)
    assert np.array_equal(_voxels(image), expected.bits_map)
    assert np.array_equal(image.affine, expected.affine)
    native = prior_model.likelihood(runs.scan, native=True)
    scan = nib.load(runs.scan)
    assert native.shape == scan.shape and np.allclose(native.affine, scan.affine)


def test_a_vqvae_alone_refuses_to_sample(vqvae_model: Model) -> None:
    with pytest.raises(ApiError, match="holds only a VQ-VAE; load a prior run"):
        vqvae_model.sample(1)


def test_encode_refuses_an_image_off_the_preprocessed_grid(prior_model: Model,
                                                           runs: SharedRuns) -> None:
    with pytest.raises(ApiError, match=r"not the preprocessed .*pass the scan's path"):
        prior_model.encode(nib.load(runs.scan))


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"nowhere does not exist; pass a training run folder"):
        mv.load(tmp_path / "nowhere")


def test_an_empty_folder_is_neither_run_nor_export(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"neither a training run folder .* it is empty"):
        mv.load(tmp_path)


def test_an_incomplete_run_is_named(runs: SharedRuns, tmp_path: Path) -> None:
    run = shutil.copytree(runs.vqvae, tmp_path / "run")
    (run / "checkpoints" / "best" / "COMPLETE").unlink()
    with pytest.raises(ExportError, match=r"incomplete run: .*no complete checkpoint"):
        mv.load(run)
