"""Prior training runs: run folder, likelihood.json, checkpoint provenance, exact resume, errors,
any prior kind (pixelcnn, unigram), class labels, and resuming a run of an older version.

Tiny latents (4x4x4 grids over 32 codes: 3 train, 1 val, 1 test) come from an untrained smoke
VQ-VAE; one uninterrupted reference run is shared by the module. With batch_size 1 an epoch is
3 steps, so checkpoints every 2 steps land mid-epoch; dropout makes the steps draw random numbers,
so a resume must restore them to match.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mri_vqvae.artifacts.checkpoint import load_checkpoint
from mri_vqvae.artifacts.latents import LatentIndex, load_latents
from mri_vqvae.artifacts.resume import load_resume_state
from mri_vqvae.artifacts.runs import read_metrics
from mri_vqvae.config import ExperimentConfig, load_config
from mri_vqvae.core.errors import ConfigError
from mri_vqvae.data.manifest import load_manifest
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D
from mri_vqvae.models.priors.twolevel.model import TwoLevelPrior
from mri_vqvae.models.priors.unigram.baseline import uniform_bits, unigram_bits
from mri_vqvae.models.priors.unigram.model import UnigramPrior
from mri_vqvae.tasks.encode import encode_manifest
from mri_vqvae.training.errors import TrainingError
from mri_vqvae.training.prior_stage import train_prior
from pipelines.cli import cli
from tests.support.paths import REPO
from tests.support.runs import HEAD_SPLITS as SPLITS
from tests.support.runs import save_vqvae_run, write_cases
from tests.support.training import assert_resumed_exactly, kill_mid_epoch, train_in_process

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
    args = ["train-prior", "--latents", str(latents), "--config", "smoke", *SET_ARGS]
    return train_in_process(args, tmp_path_factory.mktemp("runs"), "prior")


def _config(*extra: str) -> ExperimentConfig:
    return load_config("smoke", [*OVERRIDES, *extra])


def _grids(index: LatentIndex, split: str) -> torch.Tensor:
    """The `split` grids (N, d, h, w) as int64."""
    return torch.from_numpy(index.stack(split).astype(np.int64))


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
        assert row["uniform_bits_per_latent"] == 5.0 == uniform_bits(32)  # log2 32
        expected = unigram_bits(_grids(index, "train"), _grids(index, split), 32)
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
        assert isinstance(loaded.model, GatedPixelCNN3D) and loaded.kind == "pixelcnn"
        assert {k: loaded.extra[k] for k in PROVENANCE} == provenance
        assert (loaded.extra["label_field"], loaded.extra["label_names"]) == (None, [])
        assert Path(loaded.extra["vqvae_checkpoint"]).is_absolute()
        assert Path(loaded.extra["latents_dir"]) == latents.resolve()
    state = load_resume_state(run_dir / "checkpoints" / "last")
    assert (state["step"], state["train_cases"]) == (MAX_STEPS, 3)
    assert not {"epoch", "sampler_position"} & state.keys()  # the step alone fixes the order


# --- exact resume --------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(
    latents: Path, reference: tuple[Path, str], tmp_path: Path
) -> None:
    ref, _ = reference
    run_dir = kill_mid_epoch("pipelines.train_prior",
                             ["--latents", str(latents), "--config", "smoke", *SET_ARGS],
                             tmp_path / "runs", "prior")
    assert not (run_dir / "likelihood.json").exists()

    # no --latents and no --config: the run's own latents and config.yaml
    result = CliRunner().invoke(cli, ["train-prior", "--resume", str(run_dir)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output

    assert_resumed_exactly(ref, run_dir)
    splits = [json.loads((d / "likelihood.json").read_text())["splits"] for d in (ref, run_dir)]
    assert splits[0] == splits[1]


# --- errors a user can cause ---------------------------------------------------------------------


def test_codebook_size_mismatch_in_the_config_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("smoke", ["prior.codebook_size=16"])
    message = str(info.value)
    assert "prior.codebook_size=16" in message and "autoencoder.codebook_size=32" in message
    assert "leave prior.codebook_size out" in message  # the fix
    assert load_config("smoke", ["vqvae.codebook_size=64"]).prior.codebook_size == 64


def test_the_latents_set_the_prior_codebook_size(latents: Path, tmp_path: Path) -> None:
    """The config's autoencoder section does not matter to the prior: the latents' K does."""
    config = _config("vqvae.codebook_size=16", "train_prior.max_steps=1")
    result = train_prior(config, latents, runs_root=tmp_path)
    loaded = load_checkpoint(result.last_checkpoint)
    assert loaded.model.codebook_size == loaded.config["codebook_size"] == 32
    own = load_config(result.run_dir / "config.yaml", ["train_prior.max_steps=2"])
    assert own.prior.codebook_size == 16  # config.yaml keeps the config as given
    assert train_prior(own, latents, resume=result.run_dir).step == 2  # and resumes with it


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


# --- any prior kind, labels, runs of older versions ----------------------------------------------


def _add_one_unigram_bits(train: np.ndarray, grids: np.ndarray, k: int) -> float:
    """Bits per latent of `grids` under the add-one smoothed code frequencies of `train`."""
    counts = np.bincount(train.astype(np.int64).ravel(), minlength=k) + 1.0
    return float(-np.log2(counts / counts.sum())[grids.astype(np.int64)].mean())


def test_a_unigram_prior_trains_end_to_end_from_its_fitted_frequencies(
    latents: Path, tmp_path: Path
) -> None:
    """prepare fits the add-one unigram of the train grids; with a vanishing lr its val bits
    stay those of the baseline, computed here independently."""
    args = ["train-prior", "--latents", str(latents), "--config", "smoke", "--set",
            "prior.kind=unigram", "--set", "train_prior.lr=1e-12", "--set",
            "train_prior.max_steps=2", "--runs-root", str(tmp_path)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "prior").iterdir()
    index = load_latents(latents)
    train = index.stack("train")
    expected = {s: _add_one_unigram_bits(train, index.stack(s), 32) for s in ("val", "test")}
    baseline = unigram_bits(_grids(index, "train"), _grids(index, "val"), 32)
    assert baseline == pytest.approx(expected["val"], abs=1e-6)
    (val,) = read_metrics(run_dir, "val")
    assert val["bits_per_latent"] == pytest.approx(expected["val"], abs=1e-6)
    report = json.loads((run_dir / "likelihood.json").read_text())
    for split, row in report["splits"].items():
        assert row["prior_bits_per_latent"] == pytest.approx(expected[split], abs=1e-6)
        assert row["unigram_bits_per_latent"] == pytest.approx(expected[split], abs=1e-6)
    loaded = load_checkpoint(run_dir / "checkpoints" / "last")
    assert loaded.kind == "unigram" and isinstance(loaded.model, UnigramPrior)
    assert loaded.config["codebook_size"] == 32 and report["likelihood"] == "exact"


TWO_LEVEL = ["prior.kind=twolevel", "prior.coarse_codes=4", "prior.context_dim=4",
             "prior.coarse.hidden_channels=4", "prior.fine.hidden_channels=4",
             "train_prior.max_steps=3"]


ABSORBING_COARSE = ["prior.coarse.kind=absorbing", "prior.coarse.channels=4",
                    "prior.coarse.coarse_channels=8", "prior.coarse.attention_heads=2",
                    "prior.coarse.bound_levels=2", "prior.coarse_masks=2"]


@pytest.mark.parametrize("coarse", [[], ABSORBING_COARSE], ids=["pixelcnn", "absorbing"])
def test_a_two_level_prior_trains_end_to_end_and_its_checkpoint_keeps_the_coarse_map(
    latents: Path, tmp_path: Path, coarse: list[str]
) -> None:
    """prepare fits the coarse map on the train grids once; the checkpoint carries it, so the
    reloaded prior's val bits are those the run logged, and likelihood.json calls them a bound.
    The same with a masked-token diffusion coarse stage."""
    args = ["train-prior", "--latents", str(latents), "--config", "smoke", "--runs-root",
            str(tmp_path), *(a for o in [*TWO_LEVEL, *coarse] for a in ("--set", o))]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "prior").iterdir()
    loaded = load_checkpoint(run_dir / "checkpoints" / "last")
    assert loaded.kind == "twolevel" and isinstance(loaded.model, TwoLevelPrior)
    prior = loaded.model.eval()
    assert prior.config.coarse.kind == ("absorbing" if coarse else "pixelcnn")
    index = load_latents(latents)
    fresh = TwoLevelPrior(prior.config)
    fresh.prepare(_grids(index, "train"), None)
    assert torch.equal(fresh.centres, prior.centres)
    with torch.no_grad():
        bits = float(prior.grid_bits(_grids(index, "val")).mean())
    last_val = read_metrics(run_dir, "val")[-1]
    assert last_val["step"] == 3 and last_val["bits_per_latent"] == pytest.approx(bits, rel=1e-4)
    stages = last_val["coarse_bits_per_latent"] + last_val["fine_bits_per_latent"]
    assert stages == pytest.approx(last_val["bits_per_latent"], rel=1e-5)
    report = json.loads((run_dir / "likelihood.json").read_text())
    assert report["likelihood"] == "bound"
    for split, row in report["stage_bits_per_latent"].items():  # train beside val and test
        assert set(row) == {"coarse", "fine"} and all(v > 0 for v in row.values())
        if split != "train":
            total = report["splits"][split]["prior_bits_per_latent"]
            assert row["coarse"] + row["fine"] == pytest.approx(total, rel=1e-5)
    volumes = []
    for method in ("fast", "naive"):  # `sample` takes it, and both samplers draw the same
        out = tmp_path / method
        result = CliRunner().invoke(cli, ["sample", "--prior", str(run_dir), "-n", "2", "--seed",
                                          "3", "--method", method, "--out", str(out)])
        assert result.exit_code == 0, result.output
        volumes.append([nib.load(str(f)).get_fdata() for f in sorted(out.glob("sample_*.nii.gz"))])
    assert len(volumes[0]) == 2
    assert all(np.array_equal(a, b) for a, b in zip(*volumes, strict=True))


def _relabelled(latents: Path, out: Path, modality: dict[str, str]) -> Path:
    """A copy of `latents` whose index.json records `modality` per case (absent if not given)."""
    out.mkdir(parents=True)
    doc = json.loads((latents / "index.json").read_text())
    for case in doc["cases"]:
        shutil.copy(latents / case["file"], out / case["file"])
        case.pop("modality", None)
        if case["case_id"] in modality:
            case["modality"] = modality[case["case_id"]]
    (out / "index.json").write_text(json.dumps(doc))
    return out


def test_a_labelled_prior_records_its_classes_and_depends_on_them(
    latents: Path, tmp_path: Path
) -> None:
    modality = {"a": "T2w", "b": "T1w", "c": "T2w", "v": "T1w", "t": "T2w"}
    labelled = _relabelled(latents, tmp_path / "lat", modality)
    config = _config("prior.label_field=modality", "train_prior.max_steps=3")
    result = train_prior(config, labelled, runs_root=tmp_path / "runs")
    run = json.loads((result.run_dir / "run.json").read_text())
    assert (run["label_field"], run["label_names"]) == ("modality", ["T1w", "T2w"])
    for name in ("best", "last"):
        loaded = load_checkpoint(result.run_dir / "checkpoints" / name)
        assert loaded.model.num_classes == loaded.config["num_classes"] == 2
        assert loaded.config["label_field"] == "modality"
        assert (loaded.extra["label_field"], loaded.extra["label_names"]) == (
            "modality", ["T1w", "T2w"])
    prior = load_checkpoint(result.best_checkpoint).model
    index = load_latents(labelled)
    val = _grids(index, "val")
    with torch.no_grad():
        as_t1, as_t2 = (float(prior.loss(val, torch.tensor([c]))) for c in (0, 1))
        scored = float(prior.grid_bits(val, torch.tensor([0]))[0])  # v is T1w: label 0
    assert as_t1 != as_t2
    assert result.likelihood is not None
    assert result.likelihood["splits"]["val"]["prior_bits_per_latent"] == pytest.approx(scored)
    assert result.likelihood["label_names"] == ["T1w", "T2w"]


def test_a_class_unseen_in_train_or_a_missing_label_is_refused(
    latents: Path, tmp_path: Path
) -> None:
    unseen = _relabelled(latents, tmp_path / "unseen",
                         {"a": "T1w", "b": "T2w", "c": "T1w", "v": "FLAIR", "t": "T1w"})
    config = _config("prior.label_field=modality")
    with pytest.raises(TrainingError, match=r"\['v'\] of val/test hold modality \['FLAIR'\]") \
            as info:
        train_prior(config, unseen, runs_root=tmp_path / "runs")
    assert "train classes ['T1w', 'T2w']" in str(info.value)
    missing = _relabelled(latents, tmp_path / "missing", {"a": "T1w", "c": "T1w", "v": "T1w"})
    with pytest.raises(TrainingError, match=r"2 case\(s\) .* record no modality: \['b', 't'\]"):
        train_prior(config, missing, runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_a_prior_run_of_an_older_version_resumes(tmp_path: Path) -> None:
    """Its checkpoints say kind 'prior' and its resume state holds epoch / sampler_position."""
    legacy = REPO / "tests" / "fixtures" / "legacy_2055c4e"
    run_dir = tmp_path / "run"
    shutil.copytree(legacy / "runs" / "prior" / "20261201T110515Z-smoke-s0", run_dir)
    assert load_checkpoint(run_dir / "checkpoints" / "last").kind == "prior"
    config = load_config(run_dir / "config.yaml", ["train_prior.max_steps=4"])
    result = train_prior(config, legacy / "latents", resume=run_dir)
    assert (result.step, result.stop_reason) == (4, "max_steps")
    loaded = load_checkpoint(result.last_checkpoint)
    assert loaded.kind == "pixelcnn" and isinstance(loaded.model, GatedPixelCNN3D)
    assert load_resume_state(result.last_checkpoint)["step"] == 4
    (entry,) = json.loads((run_dir / "run.json").read_text())["resumed_from"]
    assert entry["step"] == 3
    assert [r["step"] for r in read_metrics(run_dir, "train")] == [1, 2, 3, 4]
    report = json.loads((run_dir / "likelihood.json").read_text())
    assert (report["run"], report["label_names"]) == ("run", [])  # rewritten by this version
