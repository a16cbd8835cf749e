"""Sampling and likelihood maps from a prior run (`mri_vqvae.tasks.sample`, `sample`, `likelihood`).

The prior runs are built here with `save_checkpoint` from untrained tiny models, following the
contract of `mri-vqvae train-prior` (checkpoint kind "prior", extra with the VQ-VAE's path and
sha256, the data config, latent shape and codebook size).
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
from mri_vqvae.config import DataConfig
from mri_vqvae.core.errors import CheckpointError
from mri_vqvae.data.manifest import sha256_file
from mri_vqvae.data.transforms import build_transforms
from mri_vqvae.models.autoencoders.vqvae.config import VQVAEConfig
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.models.priors.pixelcnn.config import PixelCNNConfig
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D
from mri_vqvae.tasks.sample import (
    PriorRun,
    SampleSettings,
    SynthesisError,
    block_upsample,
    centred_affine,
    likelihood_map,
    load_prior_run,
    resample_to_grid,
    sample_volumes,
    write_likelihood,
)
from pipelines.cli import cli
from tests.support.volumes import make_head, write_nifti

DATA = DataConfig(spacing=(3.0, 2.5, 2.0), spatial_size=(16, 20, 12))
VQ = VQVAEConfig(levels=2, channels=(4, 8), num_res_channels=(4, 8), num_res_layers=1,
                 codebook_size=16, embedding_dim=4, kmeans_init=False)
PRIOR = PixelCNNConfig(codebook_size=16, embedding_dim=4, hidden_channels=8, num_layers=2,
                    head_channels=8)
LATENT_SHAPE = (4, 5, 3)
TRAIN_CASES = [
    {"case_id": "sub-TRAINA_T1w", "subject_id": "sub-TRAINA", "split": "train",
     "file": "sub-TRAINA_T1w.npy", "sha256": "a1" * 32, "source_sha256": "b2" * 32},
    {"case_id": "sub-TRAINB_T1w", "subject_id": "sub-TRAINB", "split": "val",
     "file": "sub-TRAINB_T1w.npy", "sha256": "c3" * 32, "source_sha256": "d4" * 32},
]
SIDECAR_FIELDS = {
    "format", "format_version", "synthetic", "image", "sample_index", "seed", "num_samples",
    "batch_size", "temperature", "top_k", "method", "greedy", "indices_sha256", "spatial_size",
    "spacing", "affine", "prior_checkpoint", "prior_sha256", "vqvae_checkpoint", "vqvae_sha256",
    "manifest_digest", "latent_shape", "codebook_size", "mri_vqvae_version", "versions",
    "device", "created_utc",
}


def make_prior_run(root: Path, seed: int = 0) -> Path:
    """A VQ-VAE checkpoint, a latents index naming training cases, and a prior run using both."""
    torch.manual_seed(seed)
    vq_folder = save_checkpoint(root / "vqvae" / "vq-run" / "checkpoints" / "best",
                                VQVAE(VQ), "vqvae", VQ)
    latents = root / "latents" / "vq-run"
    latents.mkdir(parents=True)
    (latents / "index.json").write_text(json.dumps({"cases": TRAIN_CASES}))
    extra = {
        "latents_dir": str(latents.resolve()),
        "vqvae_checkpoint": str(vq_folder.resolve()),
        "vqvae_sha256": sha256_file(vq_folder / WEIGHTS),
        "manifest_digest": "f0" * 32,
        "latent_shape": list(LATENT_SHAPE),
        "codebook_size": VQ.codebook_size,
        "data": DATA.model_dump(mode="json"),
    }
    run = root / "prior" / "20250101T000000Z-tiny-s0"
    prior = GatedPixelCNN3D(PRIOR)
    for name in ("best", "last"):
        save_checkpoint(run / "checkpoints" / name, prior, "prior", PRIOR, extra=extra)
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prior_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def prior_run(run_dir: Path) -> PriorRun:
    return load_prior_run(run_dir)


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A head on an LPS-ish 1.5 mm grid, not the training grid."""
    return write_nifti(tmp_path_factory.mktemp("scan") / "scan.nii.gz", make_head(seed=3))


def _settings(n: int = 3, seed: int = 7, method: str = "fast", batch: int = 2) -> SampleSettings:
    return SampleSettings(num_samples=n, seed=seed, temperature=1.0, top_k=None, method=method,
                          batch_size=batch)


def _identifiers() -> list[str]:
    ids = []
    for case in TRAIN_CASES:
        ids += [case["case_id"], case["subject_id"], case["file"], case["sha256"],
                case["source_sha256"], Path(case["file"]).stem]
    return ids


def _readable_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.name.endswith(".gz") else raw


# --- loading -------------------------------------------------------------------------------------


def test_load_prior_run_reads_best_and_records_hashes(run_dir: Path, prior_run: PriorRun) -> None:
    assert prior_run.paths.prior_checkpoint == (run_dir / "checkpoints" / "best").resolve()
    assert prior_run.sha256s["prior"] == sha256_file(prior_run.paths.prior_checkpoint / WEIGHTS)
    assert prior_run.sha256s["vqvae"] == sha256_file(prior_run.paths.vqvae_checkpoint / WEIGHTS)
    assert prior_run.latent_shape == LATENT_SHAPE and prior_run.data == DATA
    assert prior_run.name == run_dir.name


def test_falls_back_to_last_when_best_is_missing(tmp_path: Path) -> None:
    run = make_prior_run(tmp_path)
    shutil.rmtree(run / "checkpoints" / "best")
    assert load_prior_run(run).paths.prior_checkpoint == (run / "checkpoints" / "last").resolve()


@pytest.mark.parametrize("tamper", ["byte_flip", "retrained"])
def test_vqvae_sha_mismatch_is_refused_naming_both_paths(tmp_path: Path, tamper: str) -> None:
    run = make_prior_run(tmp_path)
    vq_folder = tmp_path / "vqvae" / "vq-run" / "checkpoints" / "best"
    if tamper == "byte_flip":
        blob = bytearray((vq_folder / WEIGHTS).read_bytes())
        blob[-5] ^= 0xFF
        (vq_folder / WEIGHTS).write_bytes(bytes(blob))
    else:  # a consistent checkpoint, but not the one the prior was trained on
        torch.manual_seed(99)
        save_checkpoint(vq_folder, VQVAE(VQ), "vqvae", VQ)
    with pytest.raises(CheckpointError) as err:
        load_prior_run(run)
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
    out = sample_volumes(prior_run, _settings(n=3, batch=2), tmp_path / "s")
    assert [p.name for p in out.images] == [f"sample_{i:04d}.nii.gz" for i in range(3)]
    assert out.montage.is_file() and out.indices.shape == (3, *LATENT_SHAPE)
    for i, (image, sidecar) in enumerate(zip(out.images, out.sidecars, strict=True)):
        img = nib.load(str(image))
        assert img.shape == DATA.spatial_size and img.get_data_dtype() == np.float32
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(img.header.get_zooms(), DATA.spacing)
        sform, scode = img.get_sform(coded=True)
        qform, qcode = img.get_qform(coded=True)
        assert scode == qcode == 1
        np.testing.assert_allclose(sform, qform, atol=1e-5)
        centre = img.affine @ np.r_[(np.array(DATA.spatial_size) - 1) / 2, 1.0]
        np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)
        itk = sitk.ReadImage(str(image))
        assert itk.GetSize() == DATA.spatial_size
        np.testing.assert_allclose(itk.GetSpacing(), DATA.spacing, rtol=1e-6)
        lps_origin = img.affine[:3, 3] * np.array([-1, -1, 1])
        np.testing.assert_allclose(itk.GetOrigin(), lps_origin, atol=1e-4)
        np.testing.assert_allclose(itk.GetDirection(), np.diag([-1.0, -1.0, 1.0]).ravel(),
                                   atol=1e-6)
        doc = json.loads(sidecar.read_text())
        assert set(doc) >= SIDECAR_FIELDS, SIDECAR_FIELDS - set(doc)
        assert doc["sample_index"] == i and doc["image"] == image.name and doc["seed"] == 7
        assert doc["latent_shape"] == list(LATENT_SHAPE) and doc["codebook_size"] == 16
        assert doc["prior_sha256"] == prior_run.sha256s["prior"]
        assert doc["vqvae_sha256"] == prior_run.sha256s["vqvae"]
        assert doc["manifest_digest"] == "f0" * 32 and doc["synthetic"] is True
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
        result = CliRunner().invoke(cli, ["sample", "--prior", str(run_dir), "-n", "2",
                                          "--seed", "3", "--temperature", "1.3", "--top-k", "6",
                                          "--method", method, "--out", str(out),
                                          "--device", "cpu"])
        assert result.exit_code == 0, result.output
        volumes[method] = [nib.load(str(p)).get_fdata(dtype=np.float32)
                           for p in sorted(out.glob("sample_*.nii.gz"))]
        docs = [json.loads(p.read_text()) for p in sorted(out.glob("sample_*.json"))]
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


# --- likelihood ----------------------------------------------------------------------------------


def test_likelihood_map_on_the_preprocessed_grid(
    prior_run: PriorRun, scan: Path, tmp_path: Path
) -> None:
    result = likelihood_map(prior_run, scan)
    image = build_transforms(DATA)({"image": str(scan)})["image"]
    x = image[None].float()
    with torch.no_grad():
        indices = prior_run.vqvae.encode_indices(x)
        expected = float(prior_run.prior.grid_bits(indices)[0])
    assert result.bits.shape == LATENT_SHAPE and result.bits_map.shape == DATA.spatial_size
    assert np.isclose(result.mean_bits, expected, rtol=1e-5, atol=1e-6)
    assert np.isclose(result.bits_map.mean(dtype=np.float64), expected, rtol=1e-5, atol=1e-6)
    assert (result.bits >= 0).all()
    np.testing.assert_array_equal(result.indices, indices[0].numpy())
    written = write_likelihood(prior_run, result, scan, tmp_path / "map.nii.gz")
    bits_img, input_img = nib.load(str(written.map)), nib.load(str(written.input))
    assert written.input.name == "map_input.nii.gz" and written.montage.is_file()
    assert bits_img.shape == input_img.shape == DATA.spatial_size
    np.testing.assert_allclose(bits_img.affine, np.asarray(image.affine), atol=1e-5)
    np.testing.assert_allclose(input_img.affine, np.asarray(image.affine), atol=1e-5)
    np.testing.assert_allclose(input_img.get_fdata(), image[0].numpy(), atol=1e-6)
    data = bits_img.get_fdata()
    assert data.min() >= 0
    np.testing.assert_allclose(data, block_upsample(result.bits, 4), rtol=1e-6)
    doc = json.loads(written.sidecar.read_text())
    assert doc["grid"] == "preprocessed" and np.isclose(doc["mean_bits_per_latent"], expected)


def test_likelihood_native_cli_matches_input_grid(
    run_dir: Path, scan: Path, tmp_path: Path
) -> None:
    out = tmp_path / "native.nii.gz"
    result = CliRunner().invoke(cli, ["likelihood", "--prior", str(run_dir), "--input", str(scan),
                                      "--out", str(out), "--native"])
    assert result.exit_code == 0, result.output
    assert "bits/latent" in result.output
    src, bits = nib.load(str(scan)), nib.load(str(out))
    assert bits.shape == src.shape
    np.testing.assert_allclose(bits.affine, src.affine, atol=1e-5)
    assert bits.get_fdata().min() >= 0 and bits.get_fdata().max() > 0
    copy = nib.load(str(tmp_path / "native_input.nii.gz"))
    np.testing.assert_allclose(copy.affine, src.affine, atol=1e-5)
    assert json.loads((tmp_path / "native.json").read_text())["grid"] == "native"


def test_resample_to_grid_keeps_world_positions() -> None:
    """A map whose value is the world x of each voxel keeps it, within half a source voxel."""
    shape, dshape = (16, 20, 12), (24, 28, 20)
    src_affine = centred_affine((3.0, 2.5, 2.0), shape)
    dst_affine = np.diag([-1.5, -1.5, 1.5, 1.0])
    dst_affine[:3, 3] = [17.0, 20.0, -14.0]

    def world(affine: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), -1)
        return ijk @ affine[:3, :3].T + affine[:3, 3]

    out = resample_to_grid(world(src_affine, shape)[..., 0], src_affine, dshape, dst_affine)
    dst_world = world(dst_affine, dshape)
    vox = (dst_world - src_affine[:3, 3]) / np.diag(src_affine)[:3]
    inside = np.all((vox > 0.01) & (vox < np.array(shape) - 1.01), axis=-1)
    assert out.shape == dshape and inside.sum() > 1000
    assert np.abs(out - dst_world[..., 0])[inside].max() <= 1.5 + 1e-4
    assert (out[~np.all((vox > -0.5) & (vox < np.array(shape) - 0.5), axis=-1)] == 0).all()


def test_no_training_identifier_in_any_output(
    prior_run: PriorRun, scan: Path, tmp_path: Path
) -> None:
    sample_volumes(prior_run, _settings(n=2), tmp_path / "samples")
    result = likelihood_map(prior_run, scan)
    write_likelihood(prior_run, result, scan, tmp_path / "lik" / "m.nii.gz")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 2 * 2 + 1 + 4
    for path in files:
        content = _readable_bytes(path)
        for ident in _identifiers():
            assert ident not in path.name
            assert ident.encode() not in content, f"{ident} leaked into {path}"
    header = nib.load(str(tmp_path / "samples" / "sample_0000.nii.gz")).header
    assert header["descrip"].tobytes().strip(b"\x00") == b""


def test_bad_arguments_are_refused(prior_run: PriorRun, scan: Path, tmp_path: Path) -> None:
    with pytest.raises(SynthesisError, match="num_samples"):
        sample_volumes(prior_run, SampleSettings(num_samples=0, seed=0), tmp_path / "x")
    with pytest.raises(SynthesisError, match=r"\.nii\.gz"):
        write_likelihood(prior_run, likelihood_map(prior_run, scan), scan, tmp_path / "map.txt")
