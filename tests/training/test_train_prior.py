"""Prior training runs: run folder, likelihood.json, checkpoint provenance, exact resume, errors.

Tiny latents (4x4x4 grids over 32 codes: 3 train, 1 val, 1 test) come from the untrained smoke
VQ-VAE of `tests.artifacts.test_latents`; one uninterrupted reference run is shared by the module.
With
batch_size 1 an epoch is 3 steps, so checkpoints every 2 steps land mid-epoch; dropout makes the
steps draw random numbers, so a resume must restore them to match.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mri_vqvae.artifacts.checkpoint import load_checkpoint, load_resume_state
from mri_vqvae.artifacts.latents import encode_manifest, load_latents, unigram_bits
from mri_vqvae.artifacts.runs import read_metrics
from mri_vqvae.config import ExperimentConfig, load_config
from mri_vqvae.core.errors import ConfigError
from mri_vqvae.data.manifest import load_manifest
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D
from mri_vqvae.training.loop import KILL_ENV, TrainingError, train_prior
from pipelines.cli import cli
from tests.support.paths import REPO
from tests.support.runs import HEAD_SPLITS as SPLITS
from tests.support.runs import save_vqvae_run, write_cases

MAX_STEPS = 7
OVERRIDES = [f"train_prior.max_steps={MAX_STEPS}", "train_prior.batch_size=1",
             "train_prior.checkpoint_every=2", "prior.dropout=0.2"]
SET_ARGS = [arg for o in OVERRIDES for arg in ("--set", o)]
PROVENANCE = {"latents_dir", "vqvae_checkpoint", "vqvae_sha256", "manifest_digest",
              "latent_shape", "codebook_size", "data"}
TRAIN_KEYS = {"step", "epoch", "split", "time", "loss", "bits_per_latent", "grad_norm", "lr"}
VAL_KEYS = {"step", "epoch", "split", "time", "loss", "bits_per_latent", "num_cases"}


@pytest.fixture(scope="module")
def latents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    manifest = write_cases(tmp_path_factory.mktemp("heads"), SPLITS)
    run = save_vqvae_run(tmp_path_factory.mktemp("vqvae") / "run", manifest=manifest)
    out = tmp_path_factory.mktemp("latents") / "lat"
    encode_manifest(run, load_manifest(manifest), out, device="cpu")
    return out


@pytest.fixture(scope="module")
def reference(latents: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An uninterrupted smoke run through the CLI; returns its run folder and output."""
    runs = tmp_path_factory.mktemp("runs")
    args = ["train-prior", "--latents", str(latents), "--config", "smoke", *SET_ARGS,
            "--runs-root", str(runs)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = (runs / "prior").iterdir()
    return run_dir, result.output


def _config(*extra: str) -> ExperimentConfig:
    return load_config("smoke", [*OVERRIDES, *extra])


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a).model.state_dict(), load_checkpoint(b).model.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors differ after resume: {different}"


def _timeless(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run_dir)]


# --- the run folder ------------------------------------------------------------------------------


def test_run_writes_the_whole_run_folder(reference: tuple[Path, str], latents: Path) -> None:
    run_dir, _ = reference
    for name in ("config.yaml", "run.json", "metrics.jsonl", "likelihood.json"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "latents_index.json").read_bytes() == (latents / "index.json").read_bytes()
    assert load_config(run_dir / "config.yaml") == _config()
    run = json.loads((run_dir / "run.json").read_text())
    assert (run["stage"], run["status"], run["steps_done"]) == ("prior", "completed", MAX_STEPS)
    assert {k: run[k] for k in PROVENANCE} == load_latents(latents).provenance()

    train, val = read_metrics(run_dir, "train"), read_metrics(run_dir, "val")
    assert [r["step"] for r in train] == list(range(1, MAX_STEPS + 1))
    assert all(set(r) == TRAIN_KEYS for r in train)
    assert all(r["bits_per_latent"] == pytest.approx(r["loss"] / math.log(2)) for r in train)
    assert [r["step"] for r in val] == [3, 6, 7] and all(set(r) == VAL_KEYS for r in val)


def test_likelihood_json_has_both_baselines(reference: tuple[Path, str], latents: Path) -> None:
    run_dir, output = reference
    report = json.loads((run_dir / "likelihood.json").read_text())
    index = load_latents(latents)
    assert report["checkpoint"] == str((run_dir / "checkpoints" / "best").resolve())
    val_records = read_metrics(run_dir, "val")
    best = min(val_records, key=lambda r: r["bits_per_latent"])
    assert report["step"] == best["step"]
    for split in ("val", "test"):
        row = report["splits"][split]
        assert row["num_cases"] == 1 and math.isfinite(row["prior_bits_per_latent"])
        assert row["uniform_bits_per_latent"] == 5.0  # log2 32
        expected = unigram_bits(index.stack("train"), index.stack(split), 32)
        assert row["unigram_bits_per_latent"] == pytest.approx(expected)
    assert report["splits"]["val"]["prior_bits_per_latent"] == pytest.approx(
        best["bits_per_latent"])
    assert "unigram" in output and "uniform" in output and "test" in output


def test_checkpoints_record_what_sampling_needs(
    reference: tuple[Path, str], latents: Path
) -> None:
    run_dir, _ = reference
    provenance = load_latents(latents).provenance()
    for name in ("best", "last"):
        loaded = load_checkpoint(run_dir / "checkpoints" / name)
        assert isinstance(loaded.model, GatedPixelCNN3D) and loaded.kind == "prior"
        assert {k: loaded.extra[k] for k in PROVENANCE} == provenance
        assert Path(loaded.extra["vqvae_checkpoint"]).is_absolute()
        assert Path(loaded.extra["latents_dir"]) == latents.resolve()
    state = load_resume_state(run_dir / "checkpoints" / "last")
    assert (state["step"], state["epoch"], state["sampler_position"]) == (7, 2, 1)


# --- exact resume --------------------------------------------------------------------------------


def test_sigkill_mid_epoch_then_resume_is_bit_identical(
    latents: Path, reference: tuple[Path, str], tmp_path: Path
) -> None:
    ref, _ = reference
    runs = tmp_path / "runs"
    env = {**os.environ, KILL_ENV: "5", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.train_prior", "--latents", str(latents),
         "--config", "smoke", *SET_ARGS, "--runs-root", str(runs)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (run_dir,) = (runs / "prior").iterdir()
    killed = load_resume_state(run_dir / "checkpoints" / "last")
    assert (killed["step"], killed["epoch"], killed["sampler_position"]) == (4, 1, 1)
    assert not (run_dir / "likelihood.json").exists()

    # no --latents and no --config: the run's own latents and config.yaml
    result = CliRunner().invoke(cli, ["train-prior", "--resume", str(run_dir)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output

    _assert_same_weights(ref / "checkpoints" / "last", run_dir / "checkpoints" / "last")
    _assert_same_weights(ref / "checkpoints" / "best", run_dir / "checkpoints" / "best")
    opt_a = load_resume_state(ref / "checkpoints" / "last")["optimizer"]["state"]
    opt_b = load_resume_state(run_dir / "checkpoints" / "last")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    assert _timeless(run_dir) == _timeless(ref)
    splits = [json.loads((d / "likelihood.json").read_text())["splits"] for d in (ref, run_dir)]
    assert splits[0] == splits[1]
    (entry,) = json.loads((run_dir / "run.json").read_text())["resumed_from"]
    assert (entry["step"], entry["dropped_metric_lines"]) == (4, 1)


# --- errors a user can cause ---------------------------------------------------------------------


def test_codebook_size_mismatch_in_the_config_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("smoke", ["prior.codebook_size=16"])
    message = str(info.value)
    assert "prior.codebook_size=16" in message and "autoencoder.codebook_size=32" in message
    assert "leave prior.codebook_size out" in message  # the fix
    assert load_config("smoke", ["vqvae.codebook_size=64"]).prior.codebook_size == 64


def test_latents_of_another_codebook_size_are_refused(latents: Path, tmp_path: Path) -> None:
    config = _config("vqvae.codebook_size=16", "prior.codebook_size=16")
    with pytest.raises(TrainingError, match=r"prior.codebook_size=16 .* codebook_size=32"):
        train_prior(config, latents, runs_root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_latents_without_a_val_split_are_refused(latents: Path, tmp_path: Path) -> None:
    lat = tmp_path / "lat"
    lat.mkdir()
    doc = json.loads((latents / "index.json").read_text())
    doc["cases"] = [c for c in doc["cases"] if c["split"] != "val"]
    for c in doc["cases"]:
        (lat / c["file"]).write_bytes((latents / c["file"]).read_bytes())
    (lat / "index.json").write_text(json.dumps(doc))
    with pytest.raises(TrainingError, match="no 'val' grids"):
        train_prior(_config(), lat, runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_a_vqvae_sized_change(
    latents: Path, reference: tuple[Path, str]
) -> None:
    run_dir, _ = reference
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(TrainingError, match=r"prior\.\['hidden_channels'\]"):
        train_prior(_config("prior.hidden_channels=4"), latents, resume=run_dir)
    assert (run_dir / "metrics.jsonl").read_bytes() == before
