"""Sampling from a prior run (`mri_vqvae.tasks.sample`, `mri-vqvae sample`), any prior kind.

The prior runs are written by `tests.support.runs.make_tiny_prior_run` from untrained tiny models
(or a fitted unigram), following the contract of `mri-vqvae train-prior`.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from mri_vqvae.artifacts.checkpoint import WEIGHTS, save_checkpoint
from mri_vqvae.artifacts.loading import PriorRun, open_prior_run
from mri_vqvae.core.errors import CheckpointError
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.tasks.likelihood import likelihood_map, write_likelihood
from mri_vqvae.tasks.sample import SampleSettings, SynthesisError, sample_volumes
from pipelines.cli import cli
from tests.support.runs import (
    TINY_DATA,
    TINY_LATENT_SHAPE,
    TINY_TRAIN_CASES,
    TINY_VQ,
    make_tiny_prior_run,
)
from tests.support.volumes import make_head, write_nifti

SIDECAR_FIELDS = {
    "format", "format_version", "synthetic", "image", "sample_index", "seed", "num_samples",
    "batch_size", "temperature", "top_k", "method", "greedy", "label", "label_field",
    "label_mode", "indices_sha256", "spatial_size", "spacing", "affine", "prior_checkpoint",
    "prior_sha256", "vqvae_checkpoint", "vqvae_sha256", "manifest_digest", "latent_shape",
    "codebook_size", "mri_vqvae_version", "versions", "device", "created_utc",
}


def _settings(n: int = 3, seed: int = 7, method: str = "fast", batch: int = 2) -> SampleSettings:
    return SampleSettings(num_samples=n, seed=seed, temperature=1.0, top_k=None, method=method,
                          batch_size=batch)


def _identifiers() -> list[str]:
    ids = []
    for case in TINY_TRAIN_CASES:
        ids += [case["case_id"], case["subject_id"], case["file"], case["sha256"],
                case["source_sha256"], Path(case["file"]).stem]
    return ids


def _readable_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.name.endswith(".gz") else raw


def _cli_sample(run: Path, out: Path, *args: str) -> tuple[object, list[dict]]:
    result = CliRunner().invoke(cli, ["sample", "--prior", str(run), "--out", str(out),
                                      "--device", "cpu", *args])
    docs = [json.loads(p.read_text()) for p in sorted(out.glob("sample_*.json"))]
    return result, docs


# --- loading a prior run -------------------------------------------------------------------------


def test_load_prior_run_reads_best_and_records_hashes(run_dir: Path, prior_run: PriorRun) -> None:
    assert prior_run.paths.prior_checkpoint == (run_dir / "checkpoints" / "best").resolve()
    assert prior_run.sha256s["prior"] == sha256_file(prior_run.paths.prior_checkpoint / WEIGHTS)
    assert prior_run.sha256s["vqvae"] == sha256_file(prior_run.paths.vqvae_checkpoint / WEIGHTS)
    assert prior_run.latent_shape == TINY_LATENT_SHAPE and prior_run.data == TINY_DATA
    assert prior_run.name == run_dir.name


def test_falls_back_to_last_when_best_is_missing(tmp_path: Path) -> None:
    run = make_tiny_prior_run(tmp_path)
    shutil.rmtree(run / "checkpoints" / "best")
    assert open_prior_run(run).paths.prior_checkpoint == (run / "checkpoints" / "last").resolve()


@pytest.mark.parametrize("tamper", ["byte_flip", "retrained"])
def test_vqvae_sha_mismatch_is_refused_naming_both_paths(tmp_path: Path, tamper: str) -> None:
    run = make_tiny_prior_run(tmp_path)
    vq_folder = tmp_path / "vqvae" / "vq-run" / "checkpoints" / "best"
    if tamper == "byte_flip":
        blob = bytearray((vq_folder / WEIGHTS).read_bytes())
        blob[-5] ^= 0xFF
        (vq_folder / WEIGHTS).write_bytes(bytes(blob))
    else:  # a consistent checkpoint, but not the one the prior was trained on
        torch.manual_seed(99)
        save_checkpoint(vq_folder, VQVAE(TINY_VQ), "vqvae", TINY_VQ)
    with pytest.raises(CheckpointError) as err:
        open_prior_run(run)
    message = str(err.value)
    assert str((vq_folder / WEIGHTS).resolve()) in message
    assert str((run / "checkpoints" / "best").resolve()) in message
    assert "sha256" in message
    result = CliRunner().invoke(cli, ["sample", "--prior", str(run), "-n", "1",
                                      "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, CheckpointError)
    assert not (tmp_path / "out").exists()


# --- sampling ------------------------------------------------------------------------------------


def test_samples_have_training_geometry_and_full_sidecars(
    prior_run: PriorRun, tmp_path: Path
) -> None:
    out = sample_volumes(prior_run, _settings(n=3, batch=2), tmp_path / "s", keep_volumes=True)
    assert [p.name for p in out.images] == [f"sample_{i:04d}.nii.gz" for i in range(3)]
    assert out.montage.is_file() and out.indices.shape == (3, *TINY_LATENT_SHAPE)
    assert out.labels == [None, None, None] and out.volumes is not None
    decoded = prior_run.vqvae.decode_indices(out.indices).float()[:, 0].detach().numpy()
    np.testing.assert_allclose(out.volumes, decoded, atol=1e-6)  # (batching changes rounding)
    for i, (image, sidecar) in enumerate(zip(out.images, out.sidecars, strict=True)):
        img = nib.load(str(image))
        assert img.shape == TINY_DATA.spatial_size and img.get_data_dtype() == np.float32
        np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), out.volumes[i])
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(img.header.get_zooms(), TINY_DATA.spacing)
        sform, scode = img.get_sform(coded=True)
        qform, qcode = img.get_qform(coded=True)
        assert scode == qcode == 1
        np.testing.assert_allclose(sform, qform, atol=1e-5)
        centre = img.affine @ np.r_[(np.array(TINY_DATA.spatial_size) - 1) / 2, 1.0]
        np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)
        itk = sitk.ReadImage(str(image))
        assert itk.GetSize() == TINY_DATA.spatial_size
        np.testing.assert_allclose(itk.GetSpacing(), TINY_DATA.spacing, rtol=1e-6)
        lps_origin = img.affine[:3, 3] * np.array([-1, -1, 1])
        np.testing.assert_allclose(itk.GetOrigin(), lps_origin, atol=1e-4)
        np.testing.assert_allclose(itk.GetDirection(), np.diag([-1.0, -1.0, 1.0]).ravel(),
                                   atol=1e-6)
        doc = json.loads(sidecar.read_text())
        assert set(doc) >= SIDECAR_FIELDS, SIDECAR_FIELDS - set(doc)
        assert doc["sample_index"] == i and doc["image"] == image.name and doc["seed"] == 7
        assert doc["latent_shape"] == list(TINY_LATENT_SHAPE) and doc["codebook_size"] == 16
        assert doc["prior_sha256"] == prior_run.sha256s["prior"]
        assert doc["vqvae_sha256"] == prior_run.sha256s["vqvae"]
        assert doc["manifest_digest"] == "f0" * 32 and doc["synthetic"] is True
        assert (doc["label"], doc["label_field"], doc["label_mode"]) == (None, None, None)
        np.testing.assert_allclose(doc["affine"], img.affine)


def test_same_seed_is_bit_identical_and_other_seeds_differ(
    prior_run: PriorRun, tmp_path: Path
) -> None:
    a = sample_volumes(prior_run, _settings(seed=11), tmp_path / "a")
    b = sample_volumes(prior_run, _settings(seed=11), tmp_path / "b")
    c = sample_volumes(prior_run, _settings(seed=12), tmp_path / "c")
    for pa, pb in zip(a.images, b.images, strict=True):
        va = nib.load(str(pa)).get_fdata(dtype=np.float32)
        vb = nib.load(str(pb)).get_fdata(dtype=np.float32)
        assert va.tobytes() == vb.tobytes()
    assert torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, c.indices)
    va = np.stack([nib.load(str(p)).get_fdata(dtype=np.float32) for p in a.images])
    vc = np.stack([nib.load(str(p)).get_fdata(dtype=np.float32) for p in c.images])
    assert not np.array_equal(va, vc)


def test_fast_and_naive_cli_give_identical_volumes(run_dir: Path, tmp_path: Path) -> None:
    volumes = {}
    for method in ("fast", "naive"):
        out = tmp_path / method
        result, docs = _cli_sample(run_dir, out, "-n", "2", "--seed", "3", "--temperature",
                                   "1.3", "--top-k", "6", "--method", method)
        assert result.exit_code == 0, result.output
        volumes[method] = [nib.load(str(p)).get_fdata(dtype=np.float32)
                           for p in sorted(out.glob("sample_*.nii.gz"))]
        assert [d["method"] for d in docs] == [method] * 2 and docs[0]["top_k"] == 6
        volumes[method + "_sha"] = [d["indices_sha256"] for d in docs]
    assert volumes["fast_sha"] == volumes["naive_sha"]
    for f, n in zip(volumes["fast"], volumes["naive"], strict=True):
        assert f.tobytes() == n.tobytes()


def test_default_out_dir_and_refusal_to_mix(run_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["sample", "--prior", str(run_dir), "-n", "1", "--seed", "5",
            "--runs-root", str(tmp_path)]
    assert runner.invoke(cli, args).exit_code == 0
    (made,) = (tmp_path / "samples" / run_dir.name).iterdir()
    assert made.name.endswith("-s5") and (made / "sample_0000.nii.gz").is_file()
    again = runner.invoke(cli, ["sample", "--prior", str(run_dir), "-n", "1", "--out", str(made)])
    assert isinstance(again.exception, SynthesisError)


def test_no_training_identifier_in_any_output(prior_run: PriorRun, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    scan = write_nifti(tmp_path / "in" / "scan.nii.gz", make_head(seed=3))
    sample_volumes(prior_run, _settings(n=2), tmp_path / "samples")
    write_likelihood(prior_run, likelihood_map(prior_run, scan), scan,
                     tmp_path / "lik" / "m.nii.gz")
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != scan.parent]
    assert len(files) == 2 * 2 + 1 + 4
    for path in files:
        content = _readable_bytes(path)
        for ident in _identifiers():
            assert ident not in path.name
            assert ident.encode() not in content, f"{ident} leaked into {path}"
    header = nib.load(str(tmp_path / "samples" / "sample_0000.nii.gz")).header
    assert header["descrip"].tobytes().strip(b"\x00") == b""


def test_bad_arguments_are_refused(prior_run: PriorRun, tmp_path: Path) -> None:
    with pytest.raises(SynthesisError, match="num_samples"):
        sample_volumes(prior_run, SampleSettings(num_samples=0, seed=0), tmp_path / "x")


# --- other prior kinds and classes ---------------------------------------------------------------


def test_unigram_prior_samples_and_refuses_options_it_does_not_take(
    conditional_dir: Path, tmp_path: Path
) -> None:
    run = open_prior_run(conditional_dir)
    assert run.prior.sample_options == ("temperature", "top_k")
    refused = r"does not take the sampling option\(s\) \['greedy'\]"
    with pytest.raises(SynthesisError, match=refused):
        sample_volumes(run, SampleSettings(num_samples=1, seed=0, greedy=True), tmp_path / "g")
    result, _ = _cli_sample(conditional_dir, tmp_path / "m", "--method", "naive")
    assert isinstance(result.exception, SynthesisError) and "['method']" in str(result.exception)
    assert not (tmp_path / "g").exists() and not (tmp_path / "m").exists()


def test_label_draws_that_class_of_a_conditional_prior(conditional_dir: Path,
                                                       tmp_path: Path) -> None:
    grids = {}
    for name, codes in (("T1w", range(0, 8)), ("T2w", range(8, 16))):
        out = tmp_path / name
        result, docs = _cli_sample(conditional_dir, out, "-n", "3", "--seed", "1", "--top-k",
                                   "8", "--label", name)
        assert result.exit_code == 0, result.output
        assert f"of class {name}" in result.output
        assert [(d["label"], d["label_field"], d["label_mode"]) for d in docs] == \
            [(name, "modality", "given")] * 3
        run = open_prior_run(conditional_dir)
        drawn = sample_volumes(run, SampleSettings(num_samples=3, seed=1, top_k=8, label=name),
                               tmp_path / f"{name}-api")
        # top-k 8 keeps exactly the class's own codes: every latent lies in its range
        assert set(drawn.indices.unique().tolist()) <= set(codes)
        assert [d["indices_sha256"] for d in docs] == [
            json.loads(p.read_text())["indices_sha256"] for p in drawn.sidecars]
        grids[name] = drawn.indices
    assert not torch.equal(grids["T1w"], grids["T2w"])


def test_conditional_prior_without_label_draws_classes_in_turn(conditional_dir: Path,
                                                               tmp_path: Path) -> None:
    run = open_prior_run(conditional_dir)
    drawn = sample_volumes(run, SampleSettings(num_samples=5, seed=2, top_k=8, batch_size=2),
                           tmp_path / "turn")
    assert drawn.labels == ["T1w", "T2w", "T1w", "T2w", "T1w"]
    for grid, name in zip(drawn.indices, drawn.labels, strict=True):
        low = 0 if name == "T1w" else 8
        assert int(grid.min()) >= low and int(grid.max()) < low + 8
    docs = [json.loads(p.read_text()) for p in drawn.sidecars]
    assert [d["label_mode"] for d in docs] == ["in turn"] * 5
    assert [d["label"] for d in docs] == drawn.labels


def test_unknown_label_lists_the_classes_and_unconditional_refuses_label(
    conditional_dir: Path, run_dir: Path, tmp_path: Path
) -> None:
    result, _ = _cli_sample(conditional_dir, tmp_path / "u", "--label", "FLAIR")
    assert isinstance(result.exception, SynthesisError)
    assert "'FLAIR'" in str(result.exception) and "['T1w', 'T2w']" in str(result.exception)
    result, _ = _cli_sample(run_dir, tmp_path / "v", "--label", "T1w")
    assert isinstance(result.exception, SynthesisError)
    assert "unconditional" in str(result.exception)
    assert not (tmp_path / "u").exists() and not (tmp_path / "v").exists()
