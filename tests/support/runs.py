"""Manifests of synthetic heads and run folders (VQ-VAE, prior) written with the real savers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from mri_vqvae.artifacts.checkpoint import save_checkpoint
from mri_vqvae.artifacts.checkpoint_folder import WEIGHTS
from mri_vqvae.artifacts.latents import FORMAT, INDEX, npy_bytes
from mri_vqvae.config import DataConfig, load_config
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data.case import Case
from mri_vqvae.data.manifest import Manifest, load_manifest, write_manifest
from mri_vqvae.data.transforms import build_transforms
from mri_vqvae.models.autoencoders.vqvae.config import VQVAEConfig
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.models.priors.pixelcnn.config import PixelCNNConfig
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D
from mri_vqvae.models.priors.unigram.config import UnigramConfig
from mri_vqvae.models.priors.unigram.model import UnigramPrior
from tests.support.volumes import make_head, write_nifti

CFG = load_config("smoke")


EVAL_SPLITS = {"tr0": "train", "tr1": "train", "tr2": "train", "va0": "val", "te0": "test",
          "te1": "test", "te2": "test"}


def make_manifest(root: Path, splits: dict[str, str] = EVAL_SPLITS, subjects: dict[str, str] | None
                  = None, bad: tuple[str, ...] = (), shape: tuple[int, int, int] = (24, 28, 20)
                  ) -> tuple[Manifest, Path]:
    """Tiny heads of `shape` (one per case, subject = case unless `subjects` says otherwise),
    written out. Cases named in `bad` hold a constant volume (preprocessing refuses it).
    """
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, (cid, split) in enumerate(sorted(splits.items())):
        vol = np.ones((9, 9, 9), np.float32) if cid in bad else make_head(shape, seed=10 + i)
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


def write_latents(folder: Path, grids: Mapping[str, tuple[str, np.ndarray]],
                  codebook_size: int = 32, labels: bool = True) -> Path:
    """A latents folder by hand: ``grids`` maps case_id -> (split, (d, h, w) uint16 grid).

    With `labels`, each entry records modality ``T1w`` and source_id ``src-<case_id>``; without,
    the entries look like those of folders written before labels were recorded.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for cid, (split, grid) in sorted(grids.items()):
        content = npy_bytes(grid)
        (folder / f"{cid}.npy").write_bytes(content)
        entry = {"case_id": cid, "subject_id": f"sub-{cid}", "split": split, "file": f"{cid}.npy",
                 "sha256": hashlib.sha256(content).hexdigest(), "source_sha256": "0" * 64}
        if labels:
            entry.update(modality="T1w", source_id=f"src-{cid}")
        cases.append(entry)
    shape = next(iter(grids.values()))[1].shape
    doc = {"format": FORMAT, "format_version": 1, "vqvae_checkpoint": "/runs/vq/checkpoints/best",
           "vqvae_sha256": "1" * 64, "manifest_digest": "2" * 64, "latent_shape": list(shape),
           "codebook_size": codebook_size, "dtype": "uint16",
           "data": CFG.data.model_dump(mode="json"), "cases": cases}
    (folder / INDEX).write_text(json.dumps(doc, indent=2))
    return folder


# --- prior runs of any kind: sampling, likelihood maps, evaluate (tests/tasks, tests/evaluation) --

TINY_DATA = DataConfig(spacing=(3.0, 2.5, 2.0), spatial_size=(16, 20, 12))
TINY_VQ = VQVAEConfig(levels=2, channels=(4, 8), num_res_channels=(4, 8), num_res_layers=1,
                      codebook_size=16, embedding_dim=4, kmeans_init=False)
TINY_LATENT_SHAPE = (4, 5, 3)
TINY_TRAIN_CASES = [
    {"case_id": "sub-TRAINA_T1w", "subject_id": "sub-TRAINA", "split": "train",
     "file": "sub-TRAINA_T1w.npy", "sha256": "a1" * 32, "source_sha256": "b2" * 32},
    {"case_id": "sub-TRAINB_T1w", "subject_id": "sub-TRAINB", "split": "val",
     "file": "sub-TRAINB_T1w.npy", "sha256": "c3" * 32, "source_sha256": "d4" * 32},
]


def save_prior_run(run: Path, prior: torch.nn.Module, vq_folder: Path, latents: Path,
                   digest: str, latent_shape: tuple[int, int, int], data: DataConfig,
                   label_names: tuple[str, ...] = ()) -> Path:
    """checkpoints/best and /last of `prior` (its config's kind) as `train-prior` writes them.

    `label_names` (class i is ``label_names[i]``) go to extra with ``label_field`` from the
    prior's config, as for a class-conditional prior.
    """
    cfg = prior.config  # type: ignore[attr-defined]
    extra = {
        "latents_dir": str(latents.resolve()),
        "vqvae_checkpoint": str(vq_folder.resolve()),
        "vqvae_sha256": sha256_file(vq_folder / WEIGHTS),
        "manifest_digest": digest,
        "latent_shape": list(latent_shape),
        "codebook_size": cfg.codebook_size,
        "data": data.model_dump(mode="json"),
        "label_field": cfg.label_field,
        "label_names": list(label_names),
    }
    for name in ("best", "last"):
        save_checkpoint(run / "checkpoints" / name, prior, cfg.kind, cfg, extra=extra, step=6)
    return run


def make_tiny_prior_run(root: Path, prior: torch.nn.Module | None = None, seed: int = 0,
                        label_names: tuple[str, ...] = ()) -> Path:
    """A tiny VQ-VAE checkpoint, a latents index naming training cases, and a prior run over
    its (4, 5, 3) grids (an untrained PixelCNN unless `prior` is given)."""
    torch.manual_seed(seed)
    vq_folder = save_checkpoint(root / "vqvae" / "vq-run" / "checkpoints" / "best",
                                VQVAE(TINY_VQ), "vqvae", TINY_VQ)
    latents = root / "latents" / "vq-run"
    latents.mkdir(parents=True, exist_ok=True)
    (latents / "index.json").write_text(json.dumps({"cases": TINY_TRAIN_CASES}))
    if prior is None:
        prior = GatedPixelCNN3D(PixelCNNConfig(codebook_size=16, embedding_dim=4,
                                               hidden_channels=8, num_layers=2, head_channels=8))
    kind = prior.config.kind  # type: ignore[attr-defined]
    return save_prior_run(root / "prior" / f"20250101T000000Z-tiny-{kind}-s{seed}", prior,
                          vq_folder, latents, "f0" * 32, TINY_LATENT_SHAPE, TINY_DATA,
                          label_names)


def split_unigram(codebook_size: int, label_field: str | None = None, classes: int = 1
                  ) -> UnigramPrior:
    """A unigram prior fitted on grids where class c uses only codes ``[c*q, (c+1)*q)``,
    ``q = codebook_size // classes`` (one table, all codes, when unconditional)."""
    cfg = UnigramConfig(codebook_size=codebook_size, label_field=label_field,
                        num_classes=classes if label_field else 0)
    q = codebook_size // classes
    grids = torch.stack([torch.arange(c * q, (c + 1) * q).repeat(64 // q + 1)[:64].view(4, 4, 4)
                         for c in range(classes)])
    model = UnigramPrior(cfg)
    model.prepare(grids, torch.arange(classes) if label_field else None)
    return model.eval()


def make_unigram_run(root: Path, vq_run: Path, digest: str, prior: UnigramPrior | None = None,
                     label_names: tuple[str, ...] = ()) -> Path:
    """runs/prior/<run>/ of a unigram prior (kind ``unigram``) over the smoke VQ-VAE's grids
    (`label_names` for a conditional one)."""
    model = prior if prior is not None else split_unigram(CFG.autoencoder.codebook_size, None, 4)
    return make_smoke_prior_run(root, vq_run, digest, model, label_names)


def make_smoke_prior_run(root: Path, vq_run: Path, digest: str, prior: torch.nn.Module,
                         label_names: tuple[str, ...] = ()) -> Path:
    """runs/prior/<run>/ of any `prior` over the smoke VQ-VAE's 4x4x4 grids, named by its kind,
    with an empty latents index and a one-line metrics.jsonl."""
    latents = root / "latents" / vq_run.name
    latents.mkdir(parents=True, exist_ok=True)
    (latents / "index.json").write_text(json.dumps({"cases": []}))
    kind = prior.config.kind  # type: ignore[attr-defined]
    run = save_prior_run(root / "prior" / f"20250101T000000Z-smoke-{kind}-s0", prior,
                         vq_run / "checkpoints" / "best", latents, digest, (4, 4, 4), CFG.data,
                         label_names)
    (run / "metrics.jsonl").write_text(json.dumps(
        {"step": 6, "epoch": 0, "split": "train", "loss": 3.0, "bits_per_latent": 4.3}) + "\n")
    return run


def lesion_cube(shape: tuple[int, int, int] = (24, 28, 20)) -> np.ndarray:
    """A uint8 lesion mask (1 inside a small cube off the head's centre) for `make_head` grids."""
    mask = np.zeros(shape, np.uint8)
    x, y, z = (n // 2 for n in shape)
    mask[x + 1:x + 6, y - 3:y + 2, z - 2:z + 3] = 1
    return mask


def annotate_lesions(manifest: Manifest, case_ids: tuple[str, ...]) -> Manifest:
    """`manifest` with a `lesion_cube` mask (written beside each image, same affine) recorded as
    the lesion_mask of each case in `case_ids`."""
    return _annotate(manifest, case_ids, "lesion_mask", "lesion", lesion_cube)


def _annotate(manifest: Manifest, case_ids: tuple[str, ...], field: str, suffix: str,
              volume: Callable[[tuple[int, int, int]], np.ndarray]) -> Manifest:
    """`manifest` with ``volume(image shape)`` written as ``<case>_<suffix>.nii.gz`` beside each
    image of `case_ids` (same affine) and recorded as its annotation `field` (+ sha256)."""
    cases = []
    for case in manifest.cases:
        if case.case_id in case_ids:
            image = nib.load(str(manifest.data_root / case.path))
            path = write_nifti(manifest.data_root / f"{case.case_id}_{suffix}.nii.gz",
                               volume(image.shape), image.affine)
            case = dataclasses.replace(case, **{field: path.name,
                                                f"{field}_sha256": sha256_file(path)})
        cases.append(case)
    return dataclasses.replace(manifest, cases=tuple(cases))


def brain_block(shape: tuple[int, int, int]) -> np.ndarray:
    """A box brain mask (X, Y, Z) float32: the middle half of each axis, plus the lesion cube
    (a mask drawn around the lesion), so that it leaves out the rest of the head."""
    mask = np.zeros(shape, np.float32)
    mask[tuple(slice(n // 4, n - n // 4) for n in shape)] = 1.0
    return np.maximum(mask, lesion_cube(shape))


def annotate_brains(manifest: Manifest, case_ids: tuple[str, ...]) -> Manifest:
    """`manifest` with a `brain_block` mask (beside each image, same affine) recorded as the
    brain_mask of each case in `case_ids`."""
    return _annotate(manifest, case_ids, "brain_mask", "brain", brain_block)
