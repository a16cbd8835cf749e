"""VQ-VAE training with a learning-rate schedule and the optional patch discriminator.

Tiny runs (3 train + 1 val synthetic heads, 16^3, batch 1, 7 steps, warm-up 2 steps then cosine
decay) with and without a discriminator (1 layer, 8 channels, joining after step 3). The steps
before it joins are the same bit for bit; a stop and resume anywhere reproduces the uninterrupted
run (VQ-VAE, discriminator, both optimizers, metrics with their lr); the published checkpoint
holds the VQ-VAE alone.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mri_vqvae.artifacts.checkpoint import load_checkpoint
from mri_vqvae.artifacts.resume import load_resume_state
from mri_vqvae.artifacts.runs import read_metrics
from mri_vqvae.config import ExperimentConfig, load_config
from mri_vqvae.training.adversarial import build_adversary, check_patch_grid
from mri_vqvae.training.autoencoder_stage import train_vqvae
from mri_vqvae.training.errors import TrainingError
from mri_vqvae.training.loop import KILL_ENV
from mri_vqvae.training.schedule import lr_factor
from tests.support.paths import REPO
from tests.support.runs import write_head_manifest
from tests.support.training import assert_same_weights, timeless_metrics

START, WEIGHT = 3, 0.1
RUN = ["train_vqvae.max_steps=7", "train_vqvae.batch_size=1", "train_vqvae.checkpoint_every=2",
       "train_vqvae.lr_schedule=warmup_cosine", "train_vqvae.warmup_steps=2",
       "train_vqvae.min_lr_ratio=0.1"]
ADVERSARIAL = [f"train_vqvae.adversarial_weight={WEIGHT}",
               f"train_vqvae.adversarial_start_step={START}",
               "train_vqvae.discriminator_layers=1", "train_vqvae.discriminator_channels=8"]


def _config(*extra: str) -> ExperimentConfig:
    return load_config("smoke", [*RUN, *extra])


def _discriminator(run_dir: Path) -> dict:
    return load_resume_state(run_dir / "checkpoints" / "last")["discriminator"]


def _train_lines(run_dir: Path) -> list[dict]:
    """The train lines of metrics.jsonl without time (a stop adds a validation line)."""
    return [r for r in timeless_metrics(run_dir) if r["split"] == "train"]


def _assert_same_tensors(a: object, b: object) -> None:
    """Nested dicts/lists `a` and `b` hold equal tensors and values."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same_tensors(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("heads")
    return write_head_manifest(root, {"a": "train", "b": "train", "c": "train", "v": "val"})


@pytest.fixture(scope="module")
def plain(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run with the schedule and no discriminator."""
    return train_vqvae(_config(), manifest, runs_root=tmp_path_factory.mktemp("plain")).run_dir


@pytest.fixture(scope="module")
def adversarial(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run with the schedule and the discriminator."""
    runs = tmp_path_factory.mktemp("adversarial")
    return train_vqvae(_config(*ADVERSARIAL), manifest, runs_root=runs).run_dir


def test_the_logged_lr_is_the_schedule_of_the_step(plain: Path) -> None:
    tc = _config().train_vqvae
    lrs = [r["lr"] for r in read_metrics(plain, "train")]
    assert lrs == [tc.lr * lr_factor(tc, step) for step in range(tc.max_steps)]
    assert lrs[0] == tc.lr / 2 and lrs[1] == lrs[2] == tc.lr and lrs[-1] < lrs[2]


def test_the_schedule_resumes_exactly(manifest: Path, plain: Path, tmp_path: Path) -> None:
    stopped = train_vqvae(_config("train_vqvae.time_limit_minutes=1e-6"), manifest,
                          runs_root=tmp_path)
    assert (stopped.stop_reason, stopped.step) == ("time_limit", 1)
    resumed = train_vqvae(_config(), manifest, resume=stopped.run_dir)
    assert resumed.step == 7
    assert _train_lines(resumed.run_dir) == _train_lines(plain)  # lr included
    assert_same_weights(plain / "checkpoints" / "last", resumed.last_checkpoint)


def test_the_term_joins_at_its_start_step(plain: Path, adversarial: Path) -> None:
    """Before the start the run is the plain one bit for bit; from it the loss holds the term."""
    before = [r for r in timeless_metrics(adversarial) if r["step"] <= START]
    assert before == [r for r in timeless_metrics(plain) if r["step"] <= START]
    for r in read_metrics(adversarial, "train"):
        joined = r["step"] > START
        assert ("adversarial_loss" in r, "discriminator_loss" in r) == (joined, joined)
        term = WEIGHT * r["adversarial_loss"] if joined else 0.0
        assert r["loss"] == pytest.approx(r["recon_loss"] + r["commitment_loss"] + term,
                                          rel=1e-6)
    last_plain = load_checkpoint(plain / "checkpoints" / "last").model.state_dict()
    last_adv = load_checkpoint(adversarial / "checkpoints" / "last").model.state_dict()
    assert any(not torch.equal(last_plain[k], last_adv[k]) for k in last_plain)


def test_the_discriminator_trains_and_stays_out_of_the_published_checkpoint(
    plain: Path, adversarial: Path
) -> None:
    config = _config(*ADVERSARIAL)
    fresh = build_adversary(config.train_vqvae, config.data.spatial_size, config.seed,
                            torch.device("cpu"))
    assert fresh is not None
    trained = _discriminator(adversarial)["weights"]
    assert trained.keys() == fresh.discriminator.state_dict().keys()
    assert all(not torch.equal(v, trained[k])
               for k, v in fresh.discriminator.state_dict().items())
    for name in ("last", "best"):
        keys = load_checkpoint(adversarial / "checkpoints" / name).model.state_dict().keys()
        assert keys == load_checkpoint(plain / "checkpoints" / name).model.state_dict().keys()
    assert "discriminator" not in load_resume_state(plain / "checkpoints" / "last")


def test_a_stop_after_the_start_resumes_exactly(
    manifest: Path, adversarial: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KILL_ENV, "4:SIGTERM")  # stops after step 5, mid-epoch
    stopped = train_vqvae(_config(*ADVERSARIAL), manifest, runs_root=tmp_path)
    assert (stopped.stop_reason, stopped.step) == ("signal", 5)
    monkeypatch.delenv(KILL_ENV)
    resumed = train_vqvae(_config(*ADVERSARIAL), manifest, resume=stopped.run_dir)
    assert resumed.step == 7
    assert_same_weights(adversarial / "checkpoints" / "last", resumed.last_checkpoint)
    _assert_same_tensors(_discriminator(resumed.run_dir), _discriminator(adversarial))
    assert _train_lines(resumed.run_dir) == _train_lines(adversarial)


def test_a_checkpoint_without_discriminator_resumes_before_the_start(
    manifest: Path, adversarial: Path, tmp_path: Path
) -> None:
    """checkpoints/last of a run without one (as every older one) takes a fresh discriminator,
    exactly as the uninterrupted run had it when the start is still ahead."""
    stopped = train_vqvae(_config("train_vqvae.time_limit_minutes=1e-6"), manifest,
                          runs_root=tmp_path)
    assert "discriminator" not in load_resume_state(stopped.last_checkpoint)
    resumed = train_vqvae(_config(*ADVERSARIAL), manifest, resume=stopped.run_dir)
    assert_same_weights(adversarial / "checkpoints" / "last", resumed.last_checkpoint)
    _assert_same_tensors(_discriminator(resumed.run_dir), _discriminator(adversarial))


def test_bf16_autocast_trains_the_discriminator(manifest: Path, tmp_path: Path) -> None:
    config = _config(*ADVERSARIAL, "train_vqvae.precision=bf16", "train_vqvae.max_steps=2",
                     "train_vqvae.adversarial_start_step=0", "train_vqvae.warmup_steps=1")
    result = train_vqvae(config, manifest, runs_root=tmp_path)
    train = read_metrics(result.run_dir, "train")
    assert all(torch.isfinite(torch.tensor([r["adversarial_loss"], r["discriminator_loss"]])).all()
               for r in train)
    fresh = build_adversary(config.train_vqvae, config.data.spatial_size, config.seed,
                            torch.device("cpu"))
    assert fresh is not None
    trained = _discriminator(result.run_dir)["weights"]
    for key, value in fresh.discriminator.state_dict().items():
        assert torch.isfinite(trained[key]).all() and not torch.equal(trained[key], value), key


def test_a_changed_discriminator_cannot_resume(adversarial: Path, tmp_path: Path,
                                               manifest: Path) -> None:
    before = (adversarial / "metrics.jsonl").read_bytes()
    with pytest.raises(TrainingError, match="discriminator does not fit"):
        train_vqvae(_config(*ADVERSARIAL, "train_vqvae.discriminator_channels=4",
                            "train_vqvae.max_steps=8"), manifest, resume=adversarial)
    assert (adversarial / "metrics.jsonl").read_bytes() == before


def test_a_discriminator_too_deep_for_the_volume_fails_before_any_folder(
    manifest: Path, tmp_path: Path
) -> None:
    with pytest.raises(TrainingError, match=r"discriminator_layers=2 is too deep for "
                                            r"data.spatial_size=\[16, 16, 16\]"):
        train_vqvae(_config(*ADVERSARIAL, "train_vqvae.discriminator_layers=2"), manifest,
                    runs_root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_shipped_ablation_config_is_brain64_plus_schedule_and_discriminator() -> None:
    adv, base = load_config("brain64_adv"), load_config("brain64")
    changed = {k for k, v in adv.train_vqvae.model_dump().items()
               if v != getattr(base.train_vqvae, k)}
    assert changed == {"lr_schedule", "warmup_steps", "min_lr_ratio", "adversarial_weight",
                       "adversarial_start_step", "discriminator_lr"}
    assert adv.model_copy(update={"name": "brain64", "train_vqvae": base.train_vqvae}) == base
    check_patch_grid(adv.data.spatial_size, adv.train_vqvae.discriminator_layers)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    """DDP (2 gloo processes, global batch 4 split 2 + 2) against one process: the
    discriminator and the loss terms agree to float rounding. (A near-tie between two codes can
    flip one code assignment, so the EMA codebook counts are not compared.)"""
    heads = write_head_manifest(tmp_path, {**{f"c{i}": "train" for i in range(8)}, "v": "val"})
    sets = [*RUN[3:], *ADVERSARIAL, "train_vqvae.batch_size=4", "train_vqvae.max_steps=3",
            "train_vqvae.adversarial_start_step=1"]
    args = ["-m", "pipelines.train_vqvae", "--manifest", str(heads), "--config", "smoke",
            *[arg for o in sets for arg in ("--set", o)], "--runs-root", str(tmp_path / "ddp")]
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args],
        cwd=REPO, env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ddp,) = (tmp_path / "ddp" / "vqvae").iterdir()
    one = train_vqvae(load_config("smoke", sets), heads, runs_root=tmp_path / "one").run_dir
    a, b = _discriminator(ddp)["weights"], _discriminator(one)["weights"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    for x, y in zip(_train_lines(ddp), _train_lines(one), strict=True):
        assert x.keys() == y.keys()
        for key in {"loss", "adversarial_loss", "discriminator_loss", "lr"} & x.keys():
            assert x[key] == pytest.approx(y[key], rel=1e-5), (x["step"], key)
