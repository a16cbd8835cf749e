"""VQ-VAE training runs: the run folder, bit-identical resume after SIGKILL, clean stops, errors.

One tiny dataset (3 train + 1 val synthetic heads, 16^3 after preprocessing) and one
uninterrupted reference run are shared by the module. With batch_size 1 an epoch is 3 steps,
so checkpoints every 2 steps land mid-epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mri_vqvae.artifacts.checkpoint import load_checkpoint
from mri_vqvae.artifacts.resume import load_resume_state
from mri_vqvae.artifacts.runs import read_metrics
from mri_vqvae.config import ExperimentConfig, load_config
from mri_vqvae.core.errors import ConfigError
from mri_vqvae.data.datasets import case_items, plain_volume
from mri_vqvae.data.manifest import load_manifest
from mri_vqvae.data.transforms import IMAGE, augment_only, build_transforms
from mri_vqvae.metrics.image import psnr, ssim
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE, SpatialShapeError
from mri_vqvae.training.autoencoder_stage import AugmentedDataset, train_vqvae
from mri_vqvae.training.batching import StepBatchSampler, batch_keys
from mri_vqvae.training.errors import TrainingError
from mri_vqvae.training.loop import KILL_ENV
from pipelines.cli import cli
from tests.support.paths import REPO
from tests.support.runs import write_head_manifest as _write_manifest
from tests.support.training import (
    assert_resumed_exactly,
    assert_same_weights,
    kill_mid_epoch,
    train_in_process,
)

MAX_STEPS = 7
OVERRIDES = [f"train_vqvae.max_steps={MAX_STEPS}", "train_vqvae.batch_size=1",
             "train_vqvae.checkpoint_every=2"]
SET_ARGS = [arg for o in OVERRIDES for arg in ("--set", o)]
TRAIN_KEYS = {"step", "epoch", "split", "time", "loss", "recon_loss", "commitment_loss",
              "perplexity", "codes_used", "grad_norm", "lr"}
VAL_KEYS = {"step", "epoch", "split", "time", "loss", "recon_loss", "commitment_loss", "psnr",
            "ssim", "perplexity", "codes_used", "num_cases"}




@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("heads")
    return _write_manifest(root, {"a": "train", "b": "train", "c": "train", "v": "val"})


@pytest.fixture(scope="module")
def reference(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted smoke run through the CLI; returns its run folder."""
    args = ["train-vqvae", "--manifest", str(manifest), "--config", "smoke", *SET_ARGS]
    run_dir, output = train_in_process(args, tmp_path_factory.mktemp("runs"), "vqvae")
    assert str(run_dir.resolve()) in output
    return run_dir


def _config(*extra: str) -> ExperimentConfig:
    return load_config("smoke", [*OVERRIDES, *extra])


def _val_volume(manifest: Path) -> torch.Tensor:
    """The preprocessed val volume (1, 1, 16, 16, 16), made here independently of training."""
    cfg = _config()
    (item,) = case_items(load_manifest(manifest), cfg.data, "val")
    return plain_volume(build_transforms(cfg.data)(dict(item))[IMAGE])[None]


# --- the run folder ------------------------------------------------------------------------------


def test_smoke_run_writes_the_whole_run_folder(reference: Path) -> None:
    for name in ("config.yaml", "manifest.json", "run.json", "metrics.jsonl"):
        assert (reference / name).is_file(), name
    assert any((reference / "tb").glob("events.out.tfevents.*"))
    assert load_config(reference / "config.yaml") == _config()
    run = json.loads((reference / "run.json").read_text())
    assert (run["status"], run["stop_reason"], run["steps_done"]) == ("completed", "max_steps", 7)
    assert run["stage"] == "vqvae" and run["resumed_from"] == []

    train = read_metrics(reference, "train")
    val = read_metrics(reference, "val")
    assert [r["step"] for r in train] == list(range(1, MAX_STEPS + 1))
    assert [r["epoch"] for r in train] == [0, 0, 0, 1, 1, 1, 2]
    assert all(set(r) == TRAIN_KEYS for r in train)
    assert [r["step"] for r in val] == [3, 6, 7]  # val_every=3, and at the end
    assert all(set(r) == VAL_KEYS for r in val)
    assert all(r["num_cases"] == 1 for r in val)
    assert all(r["loss"] == pytest.approx(r["recon_loss"] + r["commitment_loss"]) for r in val)

    previews = sorted(p.name for p in (reference / "previews").glob("*.png"))
    assert previews == ["step_0000003.png", "step_0000006.png", "step_0000007.png"]
    assert (reference / "previews" / previews[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_rebuild_the_model_without_yaml(reference: Path) -> None:
    cfg = _config()
    last = load_checkpoint(reference / "checkpoints" / "last")
    assert isinstance(last.model, VQVAE) and last.model.config == cfg.autoencoder
    assert last.step == MAX_STEPS and last.extra["experiment"]["name"] == "smoke"
    state = load_resume_state(reference / "checkpoints" / "last")  # weights_only load
    assert (state["step"], state["train_cases"]) == (MAX_STEPS, 3)
    assert not {"epoch", "sampler_position"} & state.keys()  # the step alone fixes the order
    best = load_checkpoint(reference / "checkpoints" / "best")
    val = read_metrics(reference, "val")
    top = max(val, key=lambda r: r["psnr"])
    assert best.step == top["step"] and best.state_path is None
    assert best.extra["val"]["psnr"] == pytest.approx(top["psnr"])


@torch.no_grad()
def test_logged_validation_is_what_the_saved_models_score(reference: Path, manifest: Path) -> None:
    """Each checkpoint, reloaded alone, scores the logged val PSNR / SSIM / codes on the val
    volume; and its reconstruction is the decode of its own codes."""
    volume = _val_volume(manifest)
    val = {r["step"]: r for r in read_metrics(reference, "val")}
    for name in ("best", "last"):
        loaded = load_checkpoint(reference / "checkpoints" / name)
        model, logged = loaded.model, val[loaded.step]
        out = model(volume)
        assert float(psnr(out.reconstruction, volume)[0]) == pytest.approx(logged["psnr"],
                                                                          rel=1e-5)
        assert float(ssim(out.reconstruction, volume)[0]) == pytest.approx(logged["ssim"],
                                                                          rel=1e-5)
        codes = model.encode_indices(volume)
        assert logged["codes_used"] == int(codes.unique().numel())
        torch.testing.assert_close(model.decode_indices(codes), out.reconstruction)


# --- exact resume --------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(
    manifest: Path, reference: Path, tmp_path: Path
) -> None:
    run_dir = kill_mid_epoch("pipelines.train_vqvae",
                             ["--manifest", str(manifest), "--config", "smoke", *SET_ARGS],
                             tmp_path / "runs", "vqvae")
    assert max(r["step"] for r in read_metrics(run_dir)) == 5  # step 5 logged, then killed
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"

    result = CliRunner().invoke(cli, ["train-vqvae", "--manifest", str(manifest),
                                      "--resume", str(run_dir)], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    assert assert_resumed_exactly(reference, run_dir)["status"] == "completed"


def test_time_limit_stops_cleanly_with_a_resumable_checkpoint(
    manifest: Path, reference: Path, tmp_path: Path
) -> None:
    result = train_vqvae(_config("train_vqvae.time_limit_minutes=1e-6"), manifest,
                         runs_root=tmp_path)
    assert (result.stop_reason, result.step) == ("time_limit", 1)
    run = json.loads((result.run_dir / "run.json").read_text())
    assert (run["status"], run["stop_reason"]) == ("interrupted", "time_limit")
    assert load_resume_state(result.last_checkpoint)["step"] == 1

    resumed = train_vqvae(_config(), manifest, resume=result.run_dir)
    assert (resumed.stop_reason, resumed.step) == ("max_steps", MAX_STEPS)
    assert_same_weights(reference / "checkpoints" / "last", resumed.last_checkpoint)


def test_time_limit_stop_validates_the_last_step(manifest: Path, tmp_path: Path) -> None:
    """A run stopped before its first periodic validation still validates where it stopped."""
    config = _config("train_vqvae.time_limit_minutes=1e-6", "train_vqvae.val_every=100")
    result = train_vqvae(config, manifest, runs_root=tmp_path)
    assert (result.stop_reason, result.step) == ("time_limit", 1)
    assert result.best_metric is not None and result.best_checkpoint is not None
    (val,) = read_metrics(result.run_dir, "val")
    assert val["step"] == 1 and val["psnr"] == pytest.approx(result.best_metric)
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["best_step"] == 1 and run["precision"]["precision"] in ("fp32", "bf16")


@pytest.mark.slow
def test_sigterm_stops_after_the_step_with_validation_and_checkpoint(
    manifest: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    env = {**os.environ, KILL_ENV: "3:SIGTERM", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.train_vqvae", "--manifest", str(manifest),
         "--config", "smoke", *SET_ARGS, "--set", "train_vqvae.val_every=100",
         "--runs-root", str(runs)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SIGTERM received" in proc.stderr and "Traceback" not in proc.stderr
    (run_dir,) = (runs / "vqvae").iterdir()
    run = json.loads((run_dir / "run.json").read_text())
    # the signal arrives after step 3's work, so step 4 (the one under way) is the last
    assert (run["stop_reason"], run["steps_done"], run["best_step"]) == ("signal", 4, 4)
    assert load_resume_state(run_dir / "checkpoints" / "last")["step"] == 4
    assert f"--resume {run_dir}" in proc.stdout


def test_precision_fp32_is_recorded(manifest: Path, tmp_path: Path) -> None:
    result = train_vqvae(_config("train_vqvae.precision=fp32", "train_vqvae.max_steps=1"),
                         manifest, runs_root=tmp_path)
    precision = json.loads((result.run_dir / "run.json").read_text())["precision"]
    assert precision == {"precision": "fp32", "requested": "fp32",
                         "reason": precision["reason"]}


@pytest.mark.slow
def test_resume_without_manifest_uses_the_recorded_one(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    path = _write_manifest(root, {"a": "train", "b": "train", "v": "val"})
    stopped = train_vqvae(_config("train_vqvae.time_limit_minutes=1e-6"), path,
                          runs_root=tmp_path / "runs")
    args = ["train-vqvae", "--resume", str(stopped.run_dir), "--set",
            "train_vqvae.time_limit_minutes=null"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((stopped.run_dir / "run.json").read_text())["steps_done"] == MAX_STEPS

    _write_manifest(root, {"a": "train", "b": "train", "v": "val", "w": "val"})  # changed
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, TrainingError)
    assert "changed since the run started" in str(result.exception)
    assert "pass --manifest" in str(result.exception)


def test_no_manifest_and_no_resume_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["train-vqvae", "--config", "smoke"])
    assert result.exit_code == 2 and "--manifest" in result.output


# --- errors a user can cause ---------------------------------------------------------------------


def test_unknown_set_key_suggests_the_closest(manifest: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["train-vqvae", "--manifest", str(manifest), "--config",
                                      "smoke", "--set", "train_vqvae.max_step=3",
                                      "--runs-root", str(tmp_path)])
    assert isinstance(result.exception, ConfigError)
    assert "did you mean 'train_vqvae.max_steps'" in str(result.exception)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("missing", ["train", "val"])
def test_empty_split_fails_before_any_folder(manifest: Path, tmp_path: Path, missing: str) -> None:
    other = "val" if missing == "train" else "train"
    path = _write_manifest(manifest.parent, {"a": other, "b": other}, name=f"only_{other}.json")
    with pytest.raises(TrainingError, match=f"no '{missing}' cases") as caught:
        train_vqvae(_config(), path, runs_root=tmp_path)
    assert f"split counts {{'{other}': 2}}" in str(caught.value)  # counts, not a method repr
    assert not any(tmp_path.iterdir())


def test_shape_not_divisible_by_the_downsampling_fails(manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(SpatialShapeError, match="multiple of 4"):
        train_vqvae(_config("data.spatial_size=[18,16,16]"), manifest, runs_root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_resume_refuses_folders_it_cannot_continue(
    manifest: Path, reference: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text("{}")
    with pytest.raises(TrainingError, match="nothing to resume"):
        train_vqvae(_config(), manifest, resume=empty)
    before = (reference / "metrics.jsonl").read_bytes()
    with pytest.raises(TrainingError, match="codebook_size"):
        train_vqvae(_config("vqvae.codebook_size=16", "prior.codebook_size=16"), manifest,
                    resume=reference)
    assert (reference / "metrics.jsonl").read_bytes() == before


# --- pieces --------------------------------------------------------------------------------------


def test_batch_order_is_a_seeded_permutation_per_epoch() -> None:
    n, bs = 5, 2  # 3 steps per epoch, the last batch holds one item
    epoch0 = [k for step in range(3) for k in batch_keys(step, n, bs, seed=0)]
    assert sorted(i for _, i in epoch0) == list(range(n)) and {e for e, _ in epoch0} == {0}
    assert batch_keys(3, n, bs, seed=0)[0][0] == 1
    orders = {tuple(i for s in range(3 * e, 3 * e + 3) for _, i in batch_keys(s, n, bs, 0))
              for e in range(4)}
    assert len(orders) > 1  # epochs are shuffled differently
    full = list(StepBatchSampler(n, bs, 0, start_step=0, stop_step=8))
    assert list(StepBatchSampler(n, bs, 0, start_step=4, stop_step=8)) == full[4:]


def test_augmentation_is_replayable_and_order_independent() -> None:
    cfg = load_config("smoke", ["augment.noise.prob=1.0", "augment.affine.prob=1.0"])
    base = [{"image": torch.full((1, 8, 8, 8), 0.5)} for _ in range(2)]
    ds = AugmentedDataset(base, augment_only(cfg.augment, seed=0), seed=3)
    first = ds[(1, 0)]["image"]
    ds[(0, 1)]
    ds[(2, 0)]
    again = AugmentedDataset(base, augment_only(cfg.augment, seed=0), seed=3)[(1, 0)]["image"]
    assert torch.equal(first, ds[(1, 0)]["image"]) and torch.equal(first, again)
    assert not torch.equal(first, ds[(2, 0)]["image"])  # another epoch, another draw
    assert not torch.equal(first, ds[(1, 1)]["image"])  # another item, another draw


@pytest.mark.slow
def test_worker_processes_do_not_change_training(
    manifest: Path, reference: Path, tmp_path: Path
) -> None:
    """Augmentation is seeded per (epoch, item): two DataLoader workers give the same weights."""
    result = train_vqvae(_config("train_vqvae.num_workers=2"), manifest, runs_root=tmp_path)
    assert_same_weights(reference / "checkpoints" / "last", result.last_checkpoint)


def test_command_is_registered_with_help() -> None:
    result = CliRunner().invoke(cli, ["train-vqvae", "--help"])
    assert result.exit_code == 0
    assert all(opt in result.output for opt in ("--manifest", "--resume", "--runs-root", "--set"))
