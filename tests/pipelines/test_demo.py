"""The README's main job at toy sizes: kit → VQ-VAE → prior → samples → evaluation report."""

from __future__ import annotations

import json
import os
import re
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


def _listed_files(stdout: str) -> list[Path]:
    """The files the demo names on its ``montage:``, ``metrics:`` and ``report:`` lines."""
    return [Path(p) for p in re.findall(r"(?:montage|metrics|report): (\S+)", stdout)]


def _headline(stdout: str, metrics: dict) -> None:
    """The printed held-out numbers are metrics.json's, at the printed precision."""
    rec = metrics["reconstruction"]["metrics"]
    assert f"held-out PSNR {rec['psnr']['mean']:.2f} dB, SSIM {rec['ssim']['mean']:.4f}" in stdout
    lik = metrics["likelihood"]
    assert (f"prior {lik['held_out']['mean']:.4f} bits/latent ({lik['bits_are']}), unigram "
            f"baseline {lik['unigram_bits']['held_out']['mean']:.4f}, uniform "
            f"{lik['uniform_bits']:.4f}") in stdout


def _run(demo: Path, stage: str) -> tuple[Path, dict, dict]:
    (run,) = (demo / "runs" / stage).iterdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    return run, json.loads((run / "run.json").read_text()), config


def test_quick_demo_in_fp32_runs_every_configured_step(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--set", "train_vqvae.precision=fp32",
                 "--set", "train_prior.precision=fp32", "--pretrained")
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
    rec = metrics["reconstruction"]
    assert 0 < rec["metrics"]["psnr"]["mean"] < 60
    assert rec["num_failures"] == 0  # the demo preprocesses strictly: every case is readable
    assert rec["metrics"]["psnr"]["n"] == rec["num_cases"] == len(
        [c for c in preprocessed if c["split"] == "test"])
    assert metrics["samples"]["num_samples"] == 4
    assert len(metrics["samples"]["memorisation"]["samples"]) == 4
    assert [t["complete"] for t in metrics["training"]] == [True, True]
    assert [t["steps_done"] for t in metrics["training"]] == [
        _run(demo, s)[1]["steps_done"] for s in ("vqvae", "prior")]
    lik = metrics["likelihood"]
    assert lik["bits_are"] == "exact" and lik["uniform_bits"] > 0
    assert lik["held_out"]["n"] == rec["num_cases"]
    assert 0 < lik["unigram_bits"]["held_out"]["mean"] <= lik["uniform_bits"] + 0.5
    _headline(proc.stdout, metrics)
    cited = metrics["inputs"]["data_citations"]
    assert any("nilearn-mni152" in line for line in cited["trained_on"])
    assert any("Licence:" in line for line in cited["evaluated"])
    listed = _listed_files(proc.stdout)
    if "pretrained model's test split is not available here" not in proc.stderr:  # cohort mirror
        assert listed.pop(2) == (demo / "pretrained" / "report.html").resolve()  # shipped model
        shipped = json.loads((demo / "pretrained" / "metrics.json").read_text())
        assert shipped["reconstruction"]["metrics"]["psnr"]["n"] == 10
        assert re.search(r"held-out PSNR \(dB\) +[\d.]+ \(n=\d+\) +23\.9\d \(n=10\)",
                         proc.stdout)  # the card's figure, beside the demo's
    assert [p.name for p in listed] == ["samples.png", "metrics.json", "report.html"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in listed), listed
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
    assert metrics["samples"] is None and not list((demo / "eval").glob("samples"))
    assert metrics["likelihood"]["held_out"]["n"] == metrics["reconstruction"]["num_cases"]
    _headline(proc.stdout, metrics)
    assert [t["complete"] for t in metrics["training"]] == [False, True]
    assert metrics["training"][0]["steps_done"] == 1
    assert "STOPPED EARLY" in (demo / "eval" / "report.html").read_text()
    assert not (demo / "samples").exists()
