"""`mri-vqvae evaluate`: metric values, statistics, MMD, memorisation, held-out guards, report.

The runs are built by hand from untrained tiny models (smoke config): a VQ-VAE run records the
manifest digest in run.json and in its checkpoint's extra, as `train-vqvae` does; prior runs
(a legacy-kind PixelCNN, a unigram, a unigram conditioned on modality) follow the contract of
`train-prior` (see tests/support/runs.py). Every prior kind goes through the same code path.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mri_vqvae.artifacts.checkpoint import load_checkpoint
from mri_vqvae.core.errors import EvaluationError
from mri_vqvae.data.transforms import build_transforms
from mri_vqvae.evaluation.evaluate import EvaluateSettings, evaluate_runs
from mri_vqvae.evaluation.heldout import check_held_out
from mri_vqvae.metrics.image import (
    CASE_METRICS,
    METRICS,
    masked_ms_ssim,
    masked_ssim,
    ms_ssim,
    ms_ssim_settings,
    nmse,
    psnr,
    ssim,
)
from mri_vqvae.metrics.plausibility import (
    RegistrationSettings,
    foreground_fraction,
    head_overlap,
    inner_detail,
    inner_head,
    inner_structure_correlation,
    inside_fraction,
    intensity_histogram,
    largest_component_fraction,
    leave_one_out_inside,
    mirror_symmetry,
    real_range,
    reference_correlation,
    register_rigid,
    wasserstein1,
)
from mri_vqvae.metrics.quality import CaseQuality, quality_of
from mri_vqvae.metrics.sets import (
    NearestScan,
    gaussian_mmd2,
    memorisation_flags,
    pooled_features,
)
from mri_vqvae.metrics.statistics import bootstrap_ci, summarise
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.models.priors.unigram.baseline import fitted_unigram
from pipelines.cli import cli
from tests.support.browser import assert_self_contained, inline_scripts, render_page
from tests.support.runs import (
    CFG,
    make_manifest,
    make_prior_run,
    make_unigram_run,
    make_vqvae_run,
    split_unigram,
)
from tests.support.runs import EVAL_SPLITS as SPLITS
from tests.support.volumes import make_head

# --- fixtures: a manifest, a VQ-VAE run and prior runs -------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    manifest, manifest_path = make_manifest(root, bad=("te2",))
    vq = make_vqvae_run(root / "runs", manifest.digest)
    prior = make_prior_run(root / "runs", vq, manifest.digest)
    unigram = make_unigram_run(root / "uni", vq, manifest.digest)
    conditional = make_unigram_run(root / "cond", vq, manifest.digest,
                                   split_unigram(CFG.autoencoder.codebook_size, "modality", 2),
                                   label_names=("PD", "T1w"))
    return {"root": root, "manifest": manifest_path, "vqvae": vq, "prior": prior,
            "unigram": unigram, "conditional": conditional}


def _encoded(world: dict[str, Path], case_ids: list[str]) -> tuple[VQVAE, dict]:
    """The VQ-VAE of the world and, per case, (preprocessed (1, 1, D, H, W), grid (1, d, h, w))."""
    model = load_checkpoint(world["vqvae"] / "checkpoints" / "best").model.eval()
    chain = build_transforms(CFG.data)
    data = world["root"] / "data"
    out = {}
    for cid in case_ids:
        x = chain({"image": str(data / f"{cid}.nii.gz")})["image"].as_tensor()[None].float()
        with torch.no_grad():
            out[cid] = (x, model.encode_indices(x))
    return model, out


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


def test_a_known_offset_gives_its_exact_psnr_and_nmse() -> None:
    target = 0.2 + 0.5 * torch.rand((1, 1, 16, 16, 16), generator=torch.Generator().manual_seed(2))
    delta = 0.05  # pred = target + delta stays inside [0, 1], so the clamp never acts
    q = quality_of(target + delta, target, {"case_id": "c", "split": "test"},
                   torch.tensor([[[[3, 5], [5, 7]]]]))
    assert q.psnr == pytest.approx(-20 * math.log10(delta), abs=1e-3)  # 26.0206 dB
    assert q.psnr_foreground == pytest.approx(q.psnr, abs=1e-3)  # every voxel is > FOREGROUND
    assert q.nmse == pytest.approx(delta**2 / float((target.double() ** 2).mean()), rel=1e-4)
    assert q.codes_used == 3 and (q.case_id, q.split) == ("c", "test")


def test_case_quality_holds_exactly_the_named_metrics() -> None:
    names = [f.name for f in fields(CaseQuality)]
    assert names == ["case_id", "subject_id", "split", *CASE_METRICS, "codes_used"]
    assert (*METRICS, *(f"{m}_foreground" for m in METRICS)) == CASE_METRICS


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


def test_pooled_features_are_z_e_block_means_batch_by_batch() -> None:
    torch.manual_seed(0)
    model = VQVAE(CFG.autoencoder).eval()
    x = torch.rand(3, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    feats = pooled_features(model, x, batch_size=2)
    with torch.no_grad():
        z = model.encode(x[1:2])  # (1, E, 4, 4, 4): each 2 x 2 x 2 block of latents averaged
    expected = z.reshape(1, -1, 2, 2, 2, 2, 2, 2).mean((3, 5, 7)).flatten(1)[0]
    assert feats.shape == (3, CFG.autoencoder.embedding_dim * 8)
    np.testing.assert_allclose(feats[1], expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled_features(model, x, batch_size=3), feats, atol=1e-6)


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


def _per_case(folder: Path) -> list[dict[str, str]]:
    with open(folder / "per_case.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_metrics_json_and_per_case_csv(evaluated: Path, world: dict[str, Path]) -> None:
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert re.fullmatch(r"\d{8}T\d{6}Z-20250101T000000Z-smoke-s0_20250101T000000Z-smoke-prior-s0",
                        evaluated.name)
    rows = _per_case(evaluated)
    assert [r["case_id"] for r in rows] == ["te0", "te1"]  # case order; te2 failed
    assert [f["case_id"] for f in metrics["failures"]] == ["te2"]
    model, encoded = _encoded(world, ["te0", "te1", "tr0", "tr1", "tr2"])
    for row in rows:  # each row is the direct computation on that case
        x, grid = encoded[row["case_id"]]
        with torch.no_grad():
            direct = quality_of(model(x).reconstruction, x, {"case_id": row["case_id"]}, grid)
        for key in CASE_METRICS:
            assert float(row[key]) == pytest.approx(getattr(direct, key), rel=1e-4, abs=1e-6)
        assert int(row["codes_used"]) == direct.codes_used
    rec = metrics["reconstruction"]
    assert rec["num_cases"] == 2 and rec["num_failures"] == 1
    for key in CASE_METRICS:  # each summary is of the per-case column
        block = rec["metrics"][key]
        assert block["n"] == 2 and block["ci"][0] <= block["mean"] <= block["ci"][1], key
        assert block["mean"] == pytest.approx(np.mean([float(r[key]) for r in rows]), rel=1e-9)
    assert rec["ms_ssim_settings"] == {"kernel_size": 3, "sigma": 1.5, "scales": 3,
                                       "weights": list(ms_ssim_settings((16,) * 3).weights)}
    held_grids = torch.cat([encoded[c][1] for c in ("te0", "te1")])
    assert rec["codebook"]["codes_used"] == len(held_grids.unique())
    lik = metrics["likelihood"]
    assert lik["held_out"]["n"] == 2 and lik["train"]["n"] == 3 and lik["bits_are"] == "exact"
    prior = load_checkpoint(world["prior"] / "checkpoints" / "best").model.eval()
    with torch.no_grad():
        direct_bits = prior.grid_bits(held_grids).tolist()
    assert [float(r["bits_per_latent"]) for r in rows] == pytest.approx(direct_bits, rel=1e-5)
    assert lik["held_out"]["mean"] == pytest.approx(np.mean(direct_bits), rel=1e-5)
    assert lik["generalisation_gap"] == pytest.approx(
        lik["held_out"]["mean"] - lik["train"]["mean"])
    assert lik["uniform_bits"] == pytest.approx(math.log2(CFG.autoencoder.codebook_size))
    train_grids = torch.cat([encoded[c][1] for c in ("tr0", "tr1", "tr2")])
    unigram = fitted_unigram(train_grids, CFG.autoencoder.codebook_size)
    expected = unigram.grid_bits(held_grids).detach().tolist()
    assert [float(r["unigram_bits_per_latent"]) for r in rows] == pytest.approx(expected)
    assert lik["unigram_bits"]["held_out"]["mean"] == pytest.approx(np.mean(expected))
    assert lik["unigram_bits"]["train"]["mean"] == pytest.approx(
        float(unigram.grid_bits(train_grids).detach().mean()))
    smp = metrics["samples"]
    assert smp["num_samples"] == 3 and "NOT an FID" in smp["mmd"]["note"]
    assert smp["mmd"]["mmd2"] >= 0 and 0 <= smp["diversity"]["samples"] <= 1
    assert smp["labels"] is None and smp["temperature"] == 1.0
    mem = smp["memorisation"]
    assert len(mem["samples"]) == 3 and len(mem["held_out"]) == 2
    for m, row in zip(mem["held_out"], rows, strict=True):  # Pearson r with each training scan
        x = encoded[m["case_id"]][0].flatten().double()
        r = {t: float(torch.corrcoef(torch.stack([x, encoded[t][0].flatten().double()]))[0, 1])
             for t in ("tr0", "tr1", "tr2")}
        best = max(r, key=r.get)
        assert (m["nearest_train_case"], row["nearest_train_case"]) == (best, best)
        assert m["r"] == pytest.approx(r[best], abs=1e-5)
        assert float(row["nearest_train_r"]) == pytest.approx(r[best], abs=1e-5)
    assert mem["threshold"] == pytest.approx(max(m["r"] for m in mem["held_out"]))
    assert mem["num_flagged"] == sum(m["r"] > mem["threshold"] for m in mem["samples"])
    assert metrics["held_out_check"]["subject_overlap"] == 0
    assert metrics["held_out_check"]["matched_by"] == "digest"
    sidecars = sorted((evaluated / "samples").glob("sample_*.json"))
    assert len(sidecars) == len(list((evaluated / "samples").glob("sample_*.nii.gz"))) == 3


def _same(recorded: float | None, direct: float) -> bool:
    """A metrics.json number (NaN written as null) equals a direct computation."""
    if recorded is None or (isinstance(recorded, float) and math.isnan(recorded)):
        return math.isnan(direct)
    return recorded == pytest.approx(direct, rel=1e-5, abs=1e-7)


def test_plausibility_block_holds_the_functions_values(evaluated: Path,
                                                       world: dict[str, Path]) -> None:
    import nibabel as nib

    plaus = json.loads((evaluated / "metrics.json").read_text())["samples"]["plausibility"]
    _, encoded = _encoded(world, ["te0", "te1", "tr0", "tr1", "tr2"])
    real = [encoded[c][0][0, 0].numpy() for c in ("te0", "te1")]
    total = np.zeros(real[0].shape, np.float64)
    for c in ("tr0", "tr1", "tr2"):  # the mean of the training scans the evaluation read
        total = total + encoded[c][0][0, 0].numpy()
    reference = (total / 3).astype(np.float32)
    samples = [np.clip(np.asarray(nib.load(p).dataobj, np.float32), 0, 1)
               for p in sorted((evaluated / "samples").glob("sample_*.nii.gz"))]
    settings = RegistrationSettings(seed=5)
    assert plaus["registration"]["seed"] == 5 and plaus["held_out_cases"] == ["te0", "te1"]
    assert "3 training scans" in plaus["reference"]
    hists = [intensity_histogram(v) for v in samples + real]
    pool = hists[3] + hists[4]
    direct: dict[str, list[float]] = {"intensity_w1": [
        *(wasserstein1(h, pool) for h in hists[:3]), wasserstein1(hists[3], hists[4]),
        wasserstein1(hists[4], hists[3])]}
    registered = [register_rigid(v, reference, CFG.data.spacing, settings)
                  for v in samples + real]
    direct["reference_r"] = [reference_correlation(r, reference) for r in registered]
    direct["inner_structure_r"] = [inner_structure_correlation(r, reference)
                                   for r in registered]
    inner = inner_head(reference)
    direct["inner_detail"] = [inner_detail(r, inner) for r in registered]
    direct["head_overlap"] = [head_overlap(r, reference) for r in registered]
    direct["symmetry_r"] = [mirror_symmetry(r) for r in registered]
    direct["largest_component"] = [largest_component_fraction(v) for v in samples + real]
    direct["foreground_fraction"] = [foreground_fraction(v) for v in samples + real]
    assert set(plaus["checks"]) == set(direct)
    rows = _csv_rows(evaluated / "plausibility.csv")
    assert [(r["set"], r["id"]) for r in rows] == [("samples", "0"), ("samples", "1"),
                                                   ("samples", "2"), ("held_out", "te0"),
                                                   ("held_out", "te1")]
    for name, values in direct.items():
        check = plaus["checks"][name]
        recorded = check["samples"] + check["held_out"]
        assert all(_same(a, b) for a, b in zip(recorded, values, strict=True)), (name, recorded)
        assert all(_same(float(r[name]) if r[name] else None, b)
                   for r, b in zip(rows, values, strict=True)), name
        low, high = real_range(values[3:])
        floor = 0.0 if name == "intensity_w1" else None  # a distance: 0 .. the real maximum
        low = low if floor is None else floor
        assert _same(check["real_range"][0], low) and _same(check["real_range"][1], high)
        assert _same(check["samples_inside_real_range"], inside_fraction(values[:3], low, high))
        assert _same(check["held_out_inside_leave_one_out_range"],
                     leave_one_out_inside(values[3:], floor))
        assert check["num_nan"]["samples"] == sum(math.isnan(v) for v in values[:3])
    assert plaus["registration"]["num_failed"]["held_out"] == sum(r is None for r in registered[3:])
    montage = json.loads((evaluated / "metrics.json").read_text())["samples"]["montage"]
    assert (evaluated / montage["figure"]).is_file() and len(montage["held_out_cases"]) == 2


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_report_is_self_contained_and_renders(evaluated: Path, tmp_path: Path) -> None:
    page = (evaluated / "report.html").read_text()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(srcs) == 2 + 2 + 1 + 1 + 2  # case views, likelihood maps, samples beside real
    # scans, plausibility strips, curves
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert_self_contained(page)
    assert len(inline_scripts(page)) == 2  # the vendored NiiVue bundle and viewer.js
    for section in ("Reconstruction", "Per-case views", "Likelihood maps", "Samples",
                    "Anatomical plausibility", "Training curves", "Per-case metrics"):
        assert f">{section}</h2>" in page
    assert "±" in page and "NOT an FID" in page
    shown = render_page(evaluated / "report.html", tmp_path)
    assert len(shown.widths) == len(srcs) and all(w > 0 for w in shown.widths), shown.widths
    # viewers: the first case, its bits map, a sample beside a held-out scan
    assert shown.viewers == ["ready"] * 3 and all(p > 0.02 for p in shown.painted), shown
    assert shown.blocked == [] and shown.resources == []  # nothing fetched


def test_evaluate_without_prior(world: dict[str, Path], tmp_path: Path) -> None:
    from mri_vqvae.data.manifest import load_manifest

    manifest = load_manifest(world["manifest"])
    settings = EvaluateSettings(split="val", report_cases=1, num_resamples=200, viewer=False)
    result = evaluate_runs(world["vqvae"], manifest, tmp_path / "e", settings=settings)
    assert result.metrics["likelihood"] is None and result.metrics["samples"] is None
    assert "<script" not in result.report_path.read_text()  # --no-viewer: the static page
    assert result.metrics["reconstruction"]["num_cases"] == 1
    assert result.report_path.is_file() and not (tmp_path / "e" / "samples").exists()
    with pytest.raises(EvaluationError, match="strict|te2|constant|no case") as err:
        evaluate_runs(world["vqvae"], manifest, tmp_path / "s",
                      settings=EvaluateSettings(split="test", strict=True))
    assert "te2" in str(err.value)


def test_evaluate_draws_its_samples_as_sample_does_with_temperature_and_top_k(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """`evaluate --temperature --top-k` records them and draws the grids `sample` draws."""
    drawing = ["--prior", str(world["prior"]), "-n", "2", "--seed", "5", "--device", "cpu",
               "--temperature", "0.5", "--top-k", "4"]
    evaluated = CliRunner().invoke(cli, [
        "evaluate", "--vqvae", str(world["vqvae"]), "--manifest", str(world["manifest"]),
        "--out", str(tmp_path / "e"), "--report-cases", "0", "--bootstrap", "100",
        "--no-viewer", *drawing])
    assert evaluated.exit_code == 0, evaluated.output
    sampled = CliRunner().invoke(cli, ["sample", "--out", str(tmp_path / "s"), *drawing])
    assert sampled.exit_code == 0, sampled.output
    smp = json.loads((tmp_path / "e" / "metrics.json").read_text())["samples"]
    assert (smp["temperature"], smp["top_k"]) == (0.5, 4)
    docs = {folder: [json.loads(p.read_text()) for p in sorted(folder.glob("sample_*.json"))]
            for folder in (tmp_path / "e" / "samples", tmp_path / "s")}
    from_evaluate, from_sample = docs.values()
    assert [(d["temperature"], d["top_k"]) for d in from_evaluate] == [(0.5, 4)] * 2
    assert [d["indices_sha256"] for d in from_evaluate] == [
        d["indices_sha256"] for d in from_sample]


def test_evaluate_refuses_sampling_options_without_a_prior(world: dict[str, Path],
                                                          tmp_path: Path) -> None:
    for option in (["--temperature", "0.7"], ["--top-k", "3"]):
        result = CliRunner().invoke(cli, [
            "evaluate", "--vqvae", str(world["vqvae"]), "--manifest", str(world["manifest"]),
            "--out", str(tmp_path / "e"), *option])
        assert result.exit_code == 2 and "need --prior" in result.output
        assert not (tmp_path / "e").exists()  # refused before anything was written


# --- other prior kinds, one code path ------------------------------------------------------------


def test_evaluate_with_a_unigram_prior_run(world: dict[str, Path], tmp_path: Path) -> None:
    from mri_vqvae.data.manifest import load_manifest

    settings = EvaluateSettings(split="test", num_samples=2, seed=3, report_cases=1,
                                num_resamples=200)
    result = evaluate_runs(world["vqvae"], load_manifest(world["manifest"]), tmp_path / "u",
                           prior_run=world["unigram"], settings=settings)
    metrics = result.metrics
    assert metrics["inputs"]["prior_kind"] == "unigram"
    lik = metrics["likelihood"]
    _, encoded = _encoded(world, ["te0", "te1"])
    held = torch.cat([encoded[c][1] for c in ("te0", "te1")])
    prior = load_checkpoint(world["unigram"] / "checkpoints" / "best").model.eval()
    table = torch.log_softmax(prior.logits.detach().double(), dim=1)[0]
    direct = (-table[held].flatten(1).mean(1) / math.log(2)).tolist()  # -log2 q(code), averaged
    rows = _per_case(tmp_path / "u")
    assert [float(r["bits_per_latent"]) for r in rows] == pytest.approx(direct, rel=1e-5)
    assert lik["held_out"]["mean"] == pytest.approx(np.mean(direct), rel=1e-5)
    assert lik["bits_are"] == "exact" and lik["train"]["n"] == 3
    sidecars = [json.loads(p.read_text()) for p in sorted((tmp_path / "u" / "samples")
                                                              .glob("sample_*.json"))]
    assert [d["prior_sha256"] for d in sidecars] == [metrics["inputs"]["prior_sha256"]] * 2
    assert all(d["method"] is None and d["label"] is None for d in sidecars)
    page = result.report_path.read_text()
    assert "unigram baseline" in page and ">Likelihood maps</h2>" in page
    assert (tmp_path / "u" / "figures" / "likelihood_te0.png").is_file()


def test_a_conditional_prior_scores_cases_by_class_and_samples_classes_in_turn(
    world: dict[str, Path], tmp_path: Path
) -> None:
    from mri_vqvae.data.manifest import load_manifest

    settings = EvaluateSettings(split="test", num_samples=3, seed=1, report_cases=0,
                                num_resamples=200)
    result = evaluate_runs(world["vqvae"], load_manifest(world["manifest"]), tmp_path / "c",
                           prior_run=world["conditional"], settings=settings)
    smp = result.metrics["samples"]
    assert smp["labels"] == ["PD", "T1w", "PD"] and smp["label_field"] == "modality"
    docs = [json.loads(p.read_text()) for p in sorted((tmp_path / "c" / "samples")
                                                          .glob("sample_*.json"))]
    assert [(d["label"], d["label_mode"]) for d in docs] == [
        ("PD", "in turn"), ("T1w", "in turn"), ("PD", "in turn")]
    _, encoded = _encoded(world, ["te0", "te1"])
    prior = load_checkpoint(world["conditional"] / "checkpoints" / "best").model.eval()
    t1w = torch.ones(1, dtype=torch.long)  # every manifest case is T1w: class 1
    with torch.no_grad():
        direct = [float(prior.grid_bits(encoded[c][1], t1w)) for c in ("te0", "te1")]
        other = [float(prior.grid_bits(encoded[c][1], t1w - 1)) for c in ("te0", "te1")]
    rows = _per_case(tmp_path / "c")
    assert [float(r["bits_per_latent"]) for r in rows] == pytest.approx(direct, rel=1e-5)
    assert direct != pytest.approx(other)  # the class matters
