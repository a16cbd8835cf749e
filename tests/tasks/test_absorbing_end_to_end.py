"""The absorbing prior through every command: `train-prior --set prior.kind=absorbing` on the
latents of a tiny manifest, then `sample`, `likelihood` and `evaluate` with no other change."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mri_vqvae.artifacts.checkpoint import load_checkpoint
from mri_vqvae.artifacts.latents import load_latents
from mri_vqvae.artifacts.loading import open_prior_run
from mri_vqvae.data.manifest import load_manifest
from mri_vqvae.evaluation.evaluate import EvaluateSettings, evaluate_runs
from mri_vqvae.models.priors.absorbing.model import AbsorbingPrior
from mri_vqvae.tasks.encode import encode_manifest
from mri_vqvae.tasks.likelihood import likelihood_map
from mri_vqvae.tasks.sample import SynthesisError
from pipelines.cli import cli
from tests.support.runs import make_manifest, make_vqvae_run
from tests.support.training import assert_resumed_exactly, kill_mid_epoch, train_in_process
from tests.support.volumes import make_head, write_nifti

pytestmark = pytest.mark.slow

SMALL = ["prior.kind=absorbing", "prior.channels=8", "prior.coarse_channels=16",
         "prior.attention_heads=2", "prior.bound_levels=2", "prior.sample_steps=4",
         "train_prior.max_steps=3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A manifest, a VQ-VAE run, its latents and an absorbing prior trained on them by the CLI."""
    root = tmp_path_factory.mktemp("absorbing")
    manifest, manifest_path = make_manifest(root)
    vq = make_vqvae_run(root / "runs", manifest.digest)
    latents = root / "latents"
    encode_manifest(vq, manifest, latents, device="cpu", manifest_path=manifest_path)
    args = ["train-prior", "--latents", str(latents), "--config", "smoke",
            "--runs-root", str(root / "runs")]
    result = CliRunner().invoke(cli, [*args, *(a for s in SMALL for a in ("--set", s))],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (prior,) = (root / "runs" / "prior").iterdir()
    return {"root": root, "manifest": manifest_path, "vqvae": vq, "latents": latents,
            "prior": prior}


def test_train_prior_writes_a_bound_likelihood(world: dict[str, Path]) -> None:
    report = json.loads((world["prior"] / "likelihood.json").read_text())
    assert report["likelihood"] == "bound"
    loaded = load_checkpoint(world["prior"] / "checkpoints" / "best")
    assert loaded.kind == "absorbing" and isinstance(loaded.model, AbsorbingPrior)
    val = torch.from_numpy(load_latents(world["latents"]).stack("val").astype(np.int64))
    bits = float(loaded.model.eval().grid_bits(val).double().mean())
    assert report["splits"]["val"]["prior_bits_per_latent"] == pytest.approx(bits, rel=1e-6)
    assert all(math.isfinite(r["prior_bits_per_latent"]) for r in report["splits"].values())


def test_sample_is_seeded_and_refuses_options_it_does_not_take(
    world: dict[str, Path], tmp_path: Path
) -> None:
    runner = CliRunner()
    volumes = []
    for name in ("a", "b"):
        args = ["sample", "--prior", str(world["prior"]), "-n", "2", "--seed", "4", "--out",
                str(tmp_path / name)]
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
        volumes.append([nib.load(str(p)).get_fdata() for p in
                        sorted((tmp_path / name).glob("sample_*.nii.gz"))])
    assert len(volumes[0]) == 2
    assert all(np.array_equal(x, y) for x, y in zip(*volumes, strict=True))
    result = runner.invoke(cli, ["sample", "--prior", str(world["prior"]), "-n", "1",
                                 "--method", "naive", "--out", str(tmp_path / "c")])
    assert isinstance(result.exception, SynthesisError)
    assert "does not take the sampling option(s) ['method']" in str(result.exception)


def test_likelihood_map_is_the_bound_per_latent(world: dict[str, Path], tmp_path: Path) -> None:
    scan = write_nifti(tmp_path / "scan.nii.gz", make_head(seed=3))
    out = tmp_path / "map.nii.gz"
    result = CliRunner().invoke(cli, ["likelihood", "--prior", str(world["prior"]), "--input",
                                      str(scan), "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "map.json").read_text())
    assert doc["bits_are"] == "bound"
    run = open_prior_run(world["prior"])
    direct = likelihood_map(run, scan)
    indices = torch.from_numpy(direct.indices)[None]
    assert doc["mean_bits_per_latent"] == pytest.approx(float(run.prior.grid_bits(indices)[0]),
                                                        rel=1e-5)


def test_evaluate_scores_and_samples_the_absorbing_prior(
    world: dict[str, Path], tmp_path: Path
) -> None:
    settings = EvaluateSettings(split="test", num_samples=2, seed=3, report_cases=1,
                                num_resamples=200)
    result = evaluate_runs(world["vqvae"], load_manifest(world["manifest"]), tmp_path / "e",
                           prior_run=world["prior"], settings=settings)
    metrics = result.metrics
    assert metrics["inputs"]["prior_kind"] == "absorbing"
    lik = metrics["likelihood"]
    assert lik["bits_are"] == "bound" and math.isfinite(lik["held_out"]["mean"])
    assert len(list((tmp_path / "e" / "samples").glob("sample_*.nii.gz"))) == 2
    assert (tmp_path / "e" / "figures" / "likelihood_te0.png").is_file()
    assert "upper bound" in result.report_path.read_text()


def test_a_killed_run_resumes_bit_identically(world: dict[str, Path], tmp_path: Path) -> None:
    """The masks are drawn from torch's global RNG, which checkpoints restore: a run SIGKILLed
    mid-epoch and resumed equals the uninterrupted one."""
    steps = ["train_prior.max_steps=7", "train_prior.batch_size=1",
             "train_prior.checkpoint_every=2"]
    args = ["--latents", str(world["latents"]), "--config", "smoke",
            *(a for s in [*SMALL, *steps] for a in ("--set", s))]
    reference, _ = train_in_process(["train-prior", *args], tmp_path / "ref", "prior")
    run_dir = kill_mid_epoch("pipelines.train_prior", args, tmp_path / "runs", "prior")
    result = CliRunner().invoke(cli, ["train-prior", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert_resumed_exactly(reference, run_dir)
