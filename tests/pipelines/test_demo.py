"""The README's main job at toy sizes: kit → VQ-VAE → prior → samples → evaluation report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.kit]


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MRI_VQVAE_CACHE=str(tmp_path.parent / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "demo", "--quick", "--out", str(tmp_path / "runs"),
         *args],
        capture_output=True, text=True, env=env, check=False, timeout=900,
    )
    if proc.returncode != 0 and "no kit file could be fetched" in proc.stderr:
        pytest.skip(f"the kit cannot be downloaded here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _run(demo: Path, stage: str) -> tuple[Path, dict, dict]:
    (run,) = (demo / "runs" / stage).iterdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    return run, json.loads((run / "run.json").read_text()), config


def test_quick_demo_in_fp32_runs_every_configured_step(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--set", "train_vqvae.precision=fp32",
                 "--set", "train_prior.precision=fp32")
    (demo,) = (tmp_path / "runs").iterdir()
    preprocessed = json.loads((demo / "preprocessed" / "index.json").read_text())["cases"]
    assert len(list((demo / "preprocessed" / "montages").glob("*.png"))) == len(preprocessed) >= 6
    for stage in ("vqvae", "prior"):
        run, info, config = _run(demo, stage)
        section = config[f"train_{stage}"]
        assert (info["status"], info["stop_reason"]) == ("completed", "max_steps")
        assert info["steps_done"] == section["max_steps"]  # defined by steps, not minutes
        assert info["precision"]["precision"] == "fp32"
        assert (run / "checkpoints" / "best" / "COMPLETE").is_file()
    _, prior_info, _ = _run(demo, "prior")
    likelihood = prior_info["likelihood"]
    assert all(np.isfinite(likelihood[s]["prior_bits_per_latent"]) for s in ("val", "test"))
    samples = sorted((demo / "samples").glob("sample_*.nii.gz"))
    assert len(samples) == 4
    sidecar = json.loads((demo / "samples" / "sample_0000.json").read_text())
    credited = " ".join(sidecar["training_data"])
    assert "Licence:" in credited and "nilearn-mni152" in credited
    volume = nib.load(samples[0])
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert np.isfinite(volume.get_fdata()).all() and volume.get_fdata().std() > 0
    metrics = json.loads((demo / "eval" / "metrics.json").read_text())
    assert 0 < metrics["reconstruction"]["metrics"]["psnr"]["mean"] < 60
    assert metrics["samples"]["num_samples"] == 4
    assert [t["complete"] for t in metrics["training"]] == [True, True]
    cited = metrics["inputs"]["data_citations"]
    assert cited["trained_on"] and cited["evaluated"]
    report = demo / "eval" / "report.html"
    assert "Data the models were trained on" in report.read_text()
    assert "STOPPED EARLY" not in report.read_text()
    assert f"report: {report.resolve()}" in proc.stdout
    assert "used    open-ms-longitudinal" in proc.stdout or "SKIPPED open-ms" in proc.stderr
    assert "STOPPED EARLY" not in proc.stdout


def test_demo_time_limit_before_validation_carries_on_and_says_so(tmp_path: Path) -> None:
    """A time limit that fires at the first step (long before val_every) and no samples."""
    proc = _demo(tmp_path, "--set", "train_vqvae.time_limit_minutes=0.0001", "-n", "0")
    (demo,) = (tmp_path / "runs").iterdir()
    run, info, _ = _run(demo, "vqvae")
    assert (info["stop_reason"], info["steps_done"], info["best_step"]) == ("time_limit", 1, 1)
    assert (run / "checkpoints" / "best" / "COMPLETE").is_file()
    assert "STOPPED EARLY: the time limit" in proc.stdout
    assert "WARNING: the vqvae stage did not train every configured step" in proc.stderr
    metrics = json.loads((demo / "eval" / "metrics.json").read_text())
    assert metrics["samples"] is None and metrics["likelihood"]
    assert [t["complete"] for t in metrics["training"]] == [False, True]
    assert "STOPPED EARLY" in (demo / "eval" / "report.html").read_text()
    assert not (demo / "samples").exists()
