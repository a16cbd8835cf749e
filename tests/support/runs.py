"""Manifests of synthetic heads and run folders (VQ-VAE, prior) written with the real savers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mri_vqvae.artifacts.checkpoint import WEIGHTS, save_checkpoint
from mri_vqvae.config import load_config
from mri_vqvae.data.manifest import Case, Manifest, load_manifest, sha256_file, write_manifest
from mri_vqvae.data.transforms import build_transforms
from mri_vqvae.models.autoencoders.vqvae.config import VQVAEConfig
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D
from tests.support.volumes import make_head, write_nifti

CFG = load_config("smoke")


EVAL_SPLITS = {"tr0": "train", "tr1": "train", "tr2": "train", "va0": "val", "te0": "test",
          "te1": "test", "te2": "test"}


def make_manifest(root: Path, splits: dict[str, str] = EVAL_SPLITS, subjects: dict[str, str] | None
                  = None, bad: tuple[str, ...] = ()) -> tuple[Manifest, Path]:
    """Tiny heads (one per case, subject = case unless `subjects` says otherwise), written out.

    Cases named in `bad` hold a constant volume (preprocessing refuses it).
    """
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, (cid, split) in enumerate(sorted(splits.items())):
        vol = np.ones((9, 9, 9), np.float32) if cid in bad else make_head(seed=10 + i)
        path = write_nifti(data / f"{cid}.nii.gz", vol)
        cases.append(Case(case_id=cid, subject_id=(subjects or {}).get(cid, f"s{cid}"),
                          source_id="syn", path=path.name, sha256=sha256_file(path),
                          bytes=path.stat().st_size, modality="T1w", shape=vol.shape,
                          spacing=(1.5, 1.5, 1.5), split=split))
    manifest = Manifest(name="tiny", cases=tuple(cases), data_root=data)
    path = root / "manifest.json"
    if subjects is None:
        write_manifest(manifest, path)
    return manifest, path


def make_vqvae_run(root: Path, digest: str | None, seed: int = 0, run_json: bool = True) -> Path:
    """runs/vqvae/<run>/ with checkpoints/best, run.json and a few metrics.jsonl records."""
    torch.manual_seed(seed)
    run = root / "vqvae" / "20250101T000000Z-smoke-s0"
    extra = {"experiment": CFG.model_dump(mode="json")}
    if digest is not None:
        extra["manifest_digest"] = digest
    model = VQVAE(CFG.autoencoder).eval()
    save_checkpoint(run / "checkpoints" / "best", model, "vqvae", CFG.autoencoder,
                    extra=extra, step=6)
    if run_json:
        (run / "run.json").write_text(json.dumps({"manifest_digest": digest, "status": "done"}))
    records = [{"step": s, "epoch": 0, "split": "train", "loss": 1.0 / s, "psnr": 10.0 + s}
               for s in range(1, 7)] + [{"step": 6, "epoch": 0, "split": "val", "psnr": 14.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def make_prior_run(root: Path, vq_run: Path, digest: str) -> Path:
    """runs/prior/<run>/ over the VQ-VAE's 4x4x4 grids, recording its weights' sha256."""
    torch.manual_seed(1)
    vq_folder = vq_run / "checkpoints" / "best"
    latents = root / "latents" / vq_run.name
    latents.mkdir(parents=True)
    (latents / "index.json").write_text(json.dumps({"cases": []}))
    extra = {
        "latents_dir": str(latents.resolve()),
        "vqvae_checkpoint": str(vq_folder.resolve()),
        "vqvae_sha256": sha256_file(vq_folder / WEIGHTS),
        "manifest_digest": digest,
        "latent_shape": [4, 4, 4],
        "codebook_size": CFG.autoencoder.codebook_size,
        "data": CFG.data.model_dump(mode="json"),
    }
    run = root / "prior" / "20250101T000000Z-smoke-prior-s0"
    save_checkpoint(run / "checkpoints" / "best", GatedPixelCNN3D(CFG.prior), "prior", CFG.prior,
                    extra=extra, step=6)
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "epoch": 0, "split": "train", "loss": 4.0 - s / 10,
                    "bits_per_latent": 5.0 - s / 10}) + "\n" for s in range(1, 7)))
    return run


HEAD_SPLITS = {"a": "train", "b": "train", "c": "train", "v": "val", "t": "test"}


def write_cases(root: Path, splits: dict[str, str], name: str = "m.json",
                bad: tuple[str, ...] = ()) -> Path:
    """A manifest of synthetic heads (cases in `bad` hold garbage bytes) under `root`."""
    cases = []
    for i, (case_id, split) in enumerate(splits.items()):
        path = root / f"{case_id}.nii.gz"
        if case_id in bad:
            path.write_bytes(b"this is not a NIfTI file" * 20)
        elif not path.exists():
            write_nifti(path, make_head(seed=i))
        cases.append(Case(case_id=case_id, subject_id=f"sub-{case_id}", source_id="synthetic",
                          path=path.name, sha256=sha256_file(path), bytes=path.stat().st_size,
                          modality="T1w", shape=(24, 28, 20), spacing=(1.5, 1.5, 1.5),
                          split=split))
    write_manifest(Manifest(name="tiny", cases=tuple(cases), data_root=root), root / name)
    return root / name


def save_vqvae_run(run_dir: Path, seed: int = 0, vqvae: VQVAEConfig | None = None,
                   manifest: Path | None = None) -> Path:
    """An untrained VQ-VAE saved as a train-vqvae run would: ``run_dir/checkpoints/best``.

    With `manifest`, one training-mode forward pass over its volumes runs the codebook's k-means
    initialisation, so the codes spread over the data (no optimizer step).
    """
    cfg = load_config("smoke")
    torch.manual_seed(seed)
    model = VQVAE(vqvae or cfg.autoencoder)
    if manifest is not None:
        m = load_manifest(manifest)
        chain = build_transforms(cfg.data)
        volumes = [chain({"image": str(m.data_root / c.path)})["image"].as_tensor()
                   for c in m.cases]
        with torch.no_grad():
            model.train()(torch.stack(volumes).float())
        model.eval()
    save_checkpoint(run_dir / "checkpoints" / "best", model, "vqvae", model.config,
                    {"experiment": cfg.model_dump(mode="json")}, step=0)
    return run_dir


def write_head_manifest(root: Path, splits: dict[str, str], name: str = "m.json") -> Path:
    cases = []
    for i, (case_id, split) in enumerate(splits.items()):
        path = root / f"{case_id}.nii.gz"
        if not path.exists():
            write_nifti(path, make_head(seed=i))
        cases.append(Case(case_id=case_id, subject_id=case_id, source_id="synthetic",
                          path=path.name, sha256=sha256_file(path), bytes=path.stat().st_size,
                          modality="T1w", shape=(24, 28, 20), spacing=(1.5, 1.5, 1.5),
                          split=split))
    write_manifest(Manifest(name="tiny", cases=tuple(cases), data_root=root), root / name)
    return root / name
