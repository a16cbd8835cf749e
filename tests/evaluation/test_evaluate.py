"""`mri-vqvae evaluate`: metric values, statistics, MMD, memorisation, held-out guards, report.

The runs are built by hand from untrained tiny models (smoke config): a VQ-VAE run records the
manifest digest in run.json and in its checkpoint's extra, as `train-vqvae` does; a prior run
follows the contract of `train-prior` (see tests/tasks/test_synthesis.py).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mri_vqvae.core.errors import EvaluationError
from mri_vqvae.evaluation.evaluate import EvaluateSettings, evaluate_runs, quality_of
from mri_vqvae.evaluation.heldout import check_held_out
from mri_vqvae.evaluation.metrics import (
    masked_ms_ssim,
    masked_ssim,
    ms_ssim,
    ms_ssim_settings,
    nmse,
    psnr,
    ssim,
)
from mri_vqvae.evaluation.sample_metrics import (
    NearestScan,
    gaussian_mmd2,
    memorisation_flags,
    pooled_features,
)
from mri_vqvae.evaluation.statistics import bootstrap_ci, summarise
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from pipelines.cli import cli
from tests.support.browser import rendered_image_widths
from tests.support.runs import CFG, make_manifest, make_prior_run, make_vqvae_run
from tests.support.runs import EVAL_SPLITS as SPLITS
from tests.support.volumes import make_head

# --- fixtures: a manifest, a VQ-VAE run and a prior run ------------------------------------------








@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    manifest, manifest_path = make_manifest(root, bad=("te2",))
    vq = make_vqvae_run(root / "runs", manifest.digest)
    prior = make_prior_run(root / "runs", vq, manifest.digest)
    return {"root": root, "manifest": manifest_path, "vqvae": vq, "prior": prior}


@pytest.fixture(scope="module")
def evaluated(world: dict[str, Path]) -> Path:
    """One full `mri-vqvae evaluate --prior` run through the CLI (default output folder)."""
    args = ["evaluate", "--vqvae", str(world["vqvae"]), "--prior", str(world["prior"]),
            "--manifest", str(world["manifest"]), "--split", "test", "-n", "3", "--seed", "5",
            "--runs-root", str(world["root"] / "runs"), "--device", "cpu", "--report-cases", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    (out,) = (world["root"] / "runs" / "eval").iterdir()
    return out


# --- metrics against known values ----------------------------------------------------------------


def _head_tensor(seed: int = 0, shape: tuple[int, int, int] = (16, 16, 16)) -> torch.Tensor:
    vol = make_head(shape, seed=seed)
    return torch.from_numpy(vol / vol.max())[None, None].float()


def test_identical_volumes_are_perfect() -> None:
    x = _head_tensor()
    mask = (x > 0.05).float()
    assert math.isinf(float(psnr(x, x)[0]))
    assert float(ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(ms_ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(masked_ssim(x, x, mask)[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(masked_ms_ssim(x, x, mask)[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(nmse(x, x)[0]) == 0.0
    q = quality_of(x, x, {"case_id": "c"}, torch.zeros(1, 4, 4, 4, dtype=torch.long))
    assert math.isinf(q.psnr) and math.isinf(q.psnr_foreground) and q.codes_used == 1
    assert q.ms_ssim_foreground == pytest.approx(1.0, abs=1e-6)


def test_gaussian_noise_gives_the_expected_psnr_and_nmse() -> None:
    gen = torch.Generator().manual_seed(0)
    target = 0.3 + 0.4 * torch.rand((1, 1, 24, 24, 24), generator=gen)  # clamping never acts
    sigma = 0.02
    pred = target + sigma * torch.randn(target.shape, generator=gen)
    expected = -10 * math.log10(sigma**2)  # 33.98 dB
    assert float(psnr(pred, target)[0]) == pytest.approx(expected, abs=0.15)
    ones = torch.ones_like(target)
    assert float(nmse(pred, target)[0]) == pytest.approx(
        sigma**2 / float((target**2).mean()), rel=0.03)
    assert float(ms_ssim(pred, target)[0]) < 1.0
    assert float(masked_ssim(pred, target, ones)[0]) < 1.0


def test_masked_forms_equal_monai_with_a_full_mask() -> None:
    x, y = _head_tensor(1), _head_tensor(2)
    ones = torch.ones_like(x)
    assert float(masked_ms_ssim(x, y, ones)[0]) == pytest.approx(float(ms_ssim(x, y)[0]), rel=1e-5)
    assert float(masked_ssim(x, y, ones)[0]) == pytest.approx(float(ssim(x, y)[0]), rel=1e-5)
    half = ones.clone()
    half[..., 8:] = 0
    assert float(masked_ms_ssim(x, y, half)[0]) != pytest.approx(float(ms_ssim(x, y)[0]))
    fg = (y > 0.05).float()
    q = quality_of(x, y, {"case_id": "c"}, torch.zeros(1, 4, 4, 4, dtype=torch.long))
    assert q.ssim == float(ssim(x, y)[0])  # the same maps, the same mean: bit for bit
    assert q.ms_ssim == pytest.approx(float(ms_ssim(x, y)[0]), rel=1e-6)
    assert q.ssim_foreground == pytest.approx(float(masked_ssim(x, y, fg)[0]), rel=1e-6)
    assert q.ms_ssim_foreground == pytest.approx(float(masked_ms_ssim(x, y, fg)[0]), rel=1e-6)
    assert q.nmse_foreground == pytest.approx(float(nmse(x, y, fg)[0]), rel=1e-6)


@pytest.mark.parametrize(("shape", "kernel", "scales"),
                         [((64, 80, 64), 7, 3), ((16, 16, 16), 3, 3), ((96, 96, 96), 7, 3),
                          ((10, 12, 10), 5, 2)])
def test_ms_ssim_settings_fit_monai(shape: tuple[int, int, int], kernel: int, scales: int) -> None:
    s = ms_ssim_settings(shape)
    assert (s.kernel_size, len(s.weights)) == (kernel, scales)
    assert sum(s.weights) == pytest.approx(1.0)
    x = torch.rand((1, 1, *shape), generator=torch.Generator().manual_seed(0))
    assert 0.0 <= float(ms_ssim(x, x.flip(-1), settings=s)[0]) < 1.0  # MONAI accepts it


# --- statistics ----------------------------------------------------------------------------------


def test_bootstrap_interval_contains_the_mean_and_is_seeded() -> None:
    values = np.random.default_rng(3).gamma(2.0, 3.0, size=40)
    low, high = bootstrap_ci(values, 2000, seed=7)
    assert low < values.mean() < high
    assert (low, high) == bootstrap_ci(values, 2000, seed=7)
    assert (low, high) != bootstrap_ci(values, 2000, seed=8)
    wider = bootstrap_ci(values, 2000, seed=7, level=0.99)
    assert wider[0] < low and wider[1] > high
    s = summarise([*values, math.inf], 2000, seed=7)
    assert s.n == 40 and s.n_excluded == 1
    assert s.mean == pytest.approx(values.mean()) and s.std == pytest.approx(values.std(ddof=1))
    assert (s.ci_low, s.ci_high) == (low, high)
    assert summarise([2.5]).ci_low == summarise([2.5]).ci_high == 2.5


# --- sets of volumes -----------------------------------------------------------------------------


def test_mmd_is_zero_for_the_same_set_and_grows_with_a_shift() -> None:
    x = np.random.default_rng(0).normal(size=(30, 16))
    assert gaussian_mmd2(x, x)[0] == pytest.approx(0.0, abs=1e-12)
    y = np.random.default_rng(1).normal(size=(30, 16))
    same_law = gaussian_mmd2(x, y)[0]
    shifted = [gaussian_mmd2(x, y + d)[0] for d in (0.5, 1.0, 2.0)]
    assert same_law < shifted[0] < shifted[1] < shifted[2]
    fixed = [gaussian_mmd2(x, y + d, bandwidth=4.0)[0] for d in (0.0, 0.5, 1.0, 2.0)]
    assert fixed == sorted(fixed) and fixed[0] < fixed[-1]
    with pytest.raises(ValueError, match="non-empty"):
        gaussian_mmd2(x, np.zeros((0, 16)))


def test_pooled_features_shape() -> None:
    model = VQVAE(CFG.autoencoder).eval()
    feats = pooled_features(model, torch.rand(3, 1, 16, 16, 16))
    assert feats.shape == (3, CFG.autoencoder.embedding_dim * 8)


def test_memorisation_flags_an_exact_copy_of_a_training_scan() -> None:
    train = {f"t{i}": make_head(seed=20 + i) for i in range(4)}
    held = np.stack([make_head(seed=40 + i) for i in range(3)])
    rng = np.random.default_rng(0)
    samples = np.stack([train["t2"], rng.random(held.shape[1:]).astype(np.float32),
                        held[0] + rng.normal(0, 30, held.shape[1:]).astype(np.float32)])
    nearest = NearestScan(np.concatenate([samples, held]))
    for cid, vol in train.items():
        nearest.update(cid, vol)
    assert nearest.best_id[0] == "t2" and nearest.best[0] == pytest.approx(1.0, abs=1e-5)
    threshold, flags = memorisation_flags(nearest.best[:3], nearest.best[3:])
    assert threshold < 1.0 - 1e-4
    assert flags.tolist() == [True, False, False]


# --- guards --------------------------------------------------------------------------------------


def test_train_split_is_refused(world: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["evaluate", "--vqvae", str(world["vqvae"]), "--manifest",
                                      str(world["manifest"]), "--split", "train"])
    assert isinstance(result.exception, EvaluationError)
    assert "train split" in str(result.exception)


def test_other_manifest_digest_is_refused(tmp_path: Path, world: dict[str, Path]) -> None:
    other, other_path = make_manifest(tmp_path, {**SPLITS, "te0": "val"})
    with pytest.raises(EvaluationError, match="digest") as err:
        evaluate_runs(world["vqvae"], other, tmp_path / "out")
    assert other.digest[:16] in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(EvaluationError, match="digest"):
        evaluate_runs(world["vqvae"], other, None, runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists(), "a refused evaluation must leave no folder"


def test_run_without_recorded_digest_is_refused(tmp_path: Path) -> None:
    manifest, _ = make_manifest(tmp_path)
    run = make_vqvae_run(tmp_path / "runs", None, run_json=False)
    with pytest.raises(EvaluationError, match="records no manifest digest"):
        evaluate_runs(run, manifest, tmp_path / "out")


def test_subject_overlap_is_refused(tmp_path: Path) -> None:
    manifest, _ = make_manifest(tmp_path, subjects={"te0": "str1"})  # te0 shares tr1's subject
    run = make_vqvae_run(tmp_path / "runs", manifest.digest)
    with pytest.raises(EvaluationError, match=r"subjects \['str1'\] of split 'test'"):
        evaluate_runs(run, manifest, tmp_path / "out")
    without = replace(manifest, cases=tuple(c for c in manifest.cases if c.case_id != "te0"))
    assert check_held_out(without, "test", {"x": without.digest}, "run")["subject_overlap"] == 0


def test_check_held_out_reports_what_it_checked(world: dict[str, Path]) -> None:
    from mri_vqvae.data.manifest import load_manifest

    manifest = load_manifest(world["manifest"])
    done = check_held_out(manifest, "test", {"run.json": manifest.digest}, "run")
    assert done["held_out_subjects"] == 3 and done["train_subjects"] == 3
    with pytest.raises(EvaluationError, match="unknown split"):
        check_held_out(manifest, "holdout", {"run.json": manifest.digest}, "run")


# --- end to end ----------------------------------------------------------------------------------


def test_metrics_json_and_per_case_csv(evaluated: Path, world: dict[str, Path]) -> None:
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert re.fullmatch(r"\d{8}T\d{6}Z-20250101T000000Z-smoke-s0_20250101T000000Z-smoke-prior-s0",
                        evaluated.name)
    rec = metrics["reconstruction"]
    assert rec["num_cases"] == 2 and rec["num_failures"] == 1
    for key in ("psnr", "ssim", "ms_ssim", "nmse", "psnr_foreground", "ssim_foreground",
                "ms_ssim_foreground", "nmse_foreground"):
        block = rec["metrics"][key]
        assert block["n"] == 2 and block["ci"][0] <= block["mean"] <= block["ci"][1], key
    assert rec["ms_ssim_settings"] == {"kernel_size": 3, "sigma": 1.5, "scales": 3,
                                       "weights": list(ms_ssim_settings((16,) * 3).weights)}
    assert 0 < rec["codebook"]["codes_used"] <= CFG.autoencoder.codebook_size
    lik = metrics["likelihood"]
    assert lik["held_out"]["n"] == 2 and lik["train"]["n"] == 3
    assert lik["generalisation_gap"] == pytest.approx(
        lik["held_out"]["mean"] - lik["train"]["mean"])
    smp = metrics["samples"]
    assert smp["num_samples"] == 3 and "NOT an FID" in smp["mmd"]["note"]
    assert smp["mmd"]["mmd2"] >= 0 and 0 <= smp["diversity"]["samples"] <= 1
    mem = smp["memorisation"]
    assert len(mem["samples"]) == 3 and len(mem["held_out"]) == 2
    assert {m["nearest_train_case"] for m in mem["held_out"]} <= {"tr0", "tr1", "tr2"}
    assert metrics["held_out_check"]["subject_overlap"] == 0
    assert [f["case_id"] for f in metrics["failures"]] == ["te2"]
    with open(evaluated / "per_case.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == ["te0", "te1"]
    assert {"ms_ssim_foreground", "bits_per_latent", "nearest_train_case"} <= set(rows[0])
    assert len(list((evaluated / "samples").glob("sample_*.nii.gz"))) == 3


def test_report_is_self_contained_and_renders(evaluated: Path, tmp_path: Path) -> None:
    page = (evaluated / "report.html").read_text()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(srcs) >= 2 + 2 + 2 + 2  # case views, likelihood maps, samples + real, curves
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"<script|<link|https?://|url\(", page)
    for section in ("Reconstruction", "Per-case views", "Likelihood maps", "Samples",
                    "Training curves", "Per-case metrics"):
        assert f">{section}</h2>" in page
    assert "±" in page and "NOT an FID" in page
    widths = rendered_image_widths(evaluated / "report.html", tmp_path)
    assert len(widths) == len(srcs) and all(w > 0 for w in widths), widths


def test_evaluate_without_prior(world: dict[str, Path], tmp_path: Path) -> None:
    from mri_vqvae.data.manifest import load_manifest

    manifest = load_manifest(world["manifest"])
    settings = EvaluateSettings(split="val", report_cases=1, num_resamples=200)
    result = evaluate_runs(world["vqvae"], manifest, tmp_path / "e", settings=settings)
    assert result.metrics["likelihood"] is None and result.metrics["samples"] is None
    assert result.metrics["reconstruction"]["num_cases"] == 1
    assert result.report_path.is_file() and not (tmp_path / "e" / "samples").exists()
    with pytest.raises(EvaluationError, match="strict|te2|constant|no case") as err:
        evaluate_runs(world["vqvae"], manifest, tmp_path / "s",
                      settings=EvaluateSettings(split="test", strict=True))
    assert "te2" in str(err.value)
