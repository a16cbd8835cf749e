"""The VQ-VAE stage: volumes of a manifest, the reconstruction step, PSNR validation, previews.

Data. The deterministic preprocessing chain runs once per case (MONAI `CacheDataset` in memory,
or `PersistentDataset` on disk when ``train_vqvae.cache_dir`` is set). The random augmentation
steps then run per item with a seed derived from ``(config seed, epoch, dataset index)``, so an
augmented volume does not depend on the worker count or on what was drawn before.

A step's loss is the reconstruction loss (``train_vqvae.loss``) plus the commitment loss, plus,
with ``train_vqvae.adversarial_weight`` > 0 and from ``adversarial_start_step`` on, the weighted
adversarial term of a patch discriminator that then trains beside it
(`mri_vqvae.training.adversarial`; logged as ``adversarial_loss`` and ``discriminator_loss``). Under
DDP the EMA codebook is kept identical on every rank by the quantizer
(`mri_vqvae.models.autoencoders.vqvae.quantizer`) and the step draws only from the global RNG
(k-means initialisation, code revival), which stays identical on every rank. Logged train terms
are those of the whole batch.

The run folder adds manifest.json and previews/step_XXXXXXX.png (input, reconstruction and
|error| of the first val volume); checkpoints/best is the highest mean validation PSNR.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.transforms import Compose
from pydantic import BaseModel
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mri_vqvae.artifacts.runs import manifest_digest
from mri_vqvae.config import AutoencoderTrainConfig, ExperimentConfig
from mri_vqvae.core import distributed
from mri_vqvae.core.device import resolve_device
from mri_vqvae.core.figures import orthogonal_montage
from mri_vqvae.core.seeding import seed_everything
from mri_vqvae.data.datasets import case_items, make_dataset, plain_volume
from mri_vqvae.data.manifest import Manifest, load_manifest
from mri_vqvae.data.preprocessed import with_store
from mri_vqvae.data.transforms import IMAGE, augment_only, build_transforms
from mri_vqvae.metrics.image import mean_of, psnr, ssim
from mri_vqvae.models import registry
from mri_vqvae.models.autoencoders.vqvae.quantizer import usage
from mri_vqvae.training.adversarial import Adversary, build_adversary
from mri_vqvae.training.batching import StepBatchSampler, check_world_size, item_seed
from mri_vqvae.training.errors import TrainingError
from mri_vqvae.training.loop import TrainResult, due, run_stage
from mri_vqvae.training.resume import recorded_info, training_input
from mri_vqvae.training.session import Session

log = logging.getLogger(__name__)


class AugmentedDataset(Dataset):
    """Preprocessed items plus seeded augmentation; indexed by an (epoch, index) key.

    ``ds[(epoch, i)]`` -> ``{"image": (1, D, H, W) float32, "index": i}``; the same key always
    gives the same volume, whatever was drawn before and in whichever process.
    """

    def __init__(self, base: Dataset, augment: Compose, seed: int) -> None:
        self.base, self.augment, self.seed = base, augment, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        self.augment.set_random_state(seed=item_seed(self.seed, epoch, index))
        out = self.augment(dict(self.base[index]))
        return {"image": plain_volume(out[IMAGE]), "index": index}


def split_items(manifest: Manifest, config: ExperimentConfig, split: str) -> list[dict[str, Any]]:
    """The `split` cases of `manifest` as dataset items; raises `TrainingError` when empty."""
    items = case_items(manifest, config.data, split)
    if not items:
        counts = manifest.split_counts()
        raise TrainingError(
            f"manifest {manifest.name!r} has no {split!r} cases (split counts {counts}): "
            f"train-vqvae trains on 'train' and validates on 'val'; assign splits with "
            f"`mri-vqvae manifest split` or use a manifest with both splits"
        )
    return items


def reconstruction_loss(recon: Tensor, target: Tensor, kind: str) -> Tensor:
    """Mean L1 or MSE between (B, 1, D, H, W) volumes -> scalar float32."""
    recon, target = recon.float(), target.float()
    return F.l1_loss(recon, target) if kind == "l1" else F.mse_loss(recon, target)


@dataclass(kw_only=True)
class AutoencoderStage:
    """`Stage` of the VQ-VAE: augmented train volumes, val volumes, the manifest's digest, and
    the adversary when ``train.adversarial_weight`` > 0."""

    train: AutoencoderTrainConfig
    model_config: BaseModel
    model: nn.Module
    train_ds: AugmentedDataset
    val_ds: Dataset
    manifest_digest: str
    spacing: tuple[float, ...]
    adversary: Adversary | None = None
    name: str = "vqvae"
    section: str = "train_vqvae"
    model_section: str = "autoencoder"
    best_key: str = "psnr"
    maximize: bool = True
    bar_keys: tuple[str, ...] = ("loss", "perplexity")
    stop_work_factor: float = 1.0

    @property
    def kind(self) -> str:
        return str(self.model_config.kind)  # type: ignore[attr-defined]

    @property
    def module(self) -> nn.Module:
        return self.model

    @property
    def n_train(self) -> int:
        return len(self.train_ds)

    @property
    def n_val(self) -> int:
        return len(self.val_ds)  # type: ignore[arg-type]

    def batches(self, s: Session) -> Iterable[Any]:
        """A DataLoader over the steps left; a private generator leaves global RNG alone."""
        sampler = StepBatchSampler(self.n_train, self.train.batch_size, s.config.seed,
                                   s.step, self.train.max_steps, s.rank, s.world)
        return DataLoader(
            self.train_ds, batch_sampler=sampler, num_workers=self.train.num_workers,
            generator=torch.Generator().manual_seed(s.config.seed),
            pin_memory=s.device.type == "cuda",
        )

    def train_step(self, s: Session, batch: Any) -> dict[str, Tensor]:
        """One step on this rank's (B, 1, D, H, W) volumes; the terms of the whole batch."""
        images = batch["image"].to(s.device)
        s.net.train()
        with s.autocast():
            out = s.net(images)
        recon = reconstruction_loss(out.reconstruction, images, self.train.loss)
        loss = recon + out.commitment_loss
        terms = {"recon_loss": recon.detach(), "commitment_loss": out.commitment_loss.detach()}
        adversary = self.adversary if self.adversary and self.adversary.active(s.step) else None
        if adversary is not None:
            adversarial = adversary.generator_term(s, out.reconstruction)
            loss = loss + adversary.weight * adversarial
            terms["adversarial_loss"] = adversarial.detach()
        grad_norm = s.optimize(loss, images.shape[0])
        if adversary is not None:
            terms["discriminator_loss"] = adversary.step(s, images, out.reconstruction)
        means = s.whole_batch({"loss": loss.detach(), **terms}, images.shape[0])
        return {**means, "perplexity": out.perplexity, "codes_used": out.codes_used,
                "grad_norm": grad_norm}

    @torch.no_grad()
    def validate(self, s: Session) -> dict[str, float]:
        """Loss terms, mean PSNR / SSIM (data range 1) and code usage over every val volume.

        ``perplexity`` and ``codes_used`` come from the code histogram of all of them together.
        """
        model = self.model.eval()
        n = self.n_val
        counts = torch.zeros(self.model_config.codebook_size,  # type: ignore[attr-defined]
                             dtype=torch.long, device=s.device)
        sums = {"loss": 0.0, "recon_loss": 0.0, "commitment_loss": 0.0}
        psnrs: list[float] = []
        ssims: list[float] = []
        for start in range(0, n, self.train.batch_size):
            stop = min(n, start + self.train.batch_size)
            images = torch.stack([plain_volume(self.val_ds[i][IMAGE])
                                  for i in range(start, stop)]).to(s.device)
            with s.autocast():
                out = model(images)
            recon = reconstruction_loss(out.reconstruction, images, self.train.loss)
            b = images.shape[0]
            sums["recon_loss"] += float(recon) * b
            sums["commitment_loss"] += float(out.commitment_loss) * b
            sums["loss"] += float(recon + out.commitment_loss) * b
            psnrs += psnr(out.reconstruction, images).tolist()
            ssims += ssim(out.reconstruction, images).tolist()
            counts += torch.bincount(out.indices.reshape(-1), minlength=counts.numel())
        perplexity, used = usage(counts.float())
        model.train()
        result = {k: v / n for k, v in sums.items()}
        result.update(psnr=mean_of(psnrs), ssim=mean_of(ssims), perplexity=float(perplexity),
                      codes_used=int(used), num_cases=n)
        return result

    def describe(self, val: dict[str, float]) -> str:
        return (f"val psnr {val['psnr']:.2f} dB, ssim {val['ssim']:.4f}, "
                f"{val['codes_used']} codes used")

    def extra(self) -> dict[str, Any]:
        return {"manifest_digest": self.manifest_digest}

    def resume_state(self) -> dict[str, Any]:
        """The discriminator's weights and optimizer state, when there is one."""
        return {} if self.adversary is None else {"discriminator": self.adversary.state()}

    def load_resume_state(self, state: dict[str, Any], step: int) -> None:
        """The discriminator's state, when both the checkpoint and the config have one.

        A checkpoint without one (adversarial_weight was 0, or an older version) resumes with a
        fresh discriminator, exact when `step` has not passed ``adversarial_start_step``."""
        saved = state.get("discriminator")
        if self.adversary is None:
            if saved is not None:
                log.warning("checkpoints/last holds a discriminator, but train_vqvae."
                            "adversarial_weight is 0 now: training goes on without it")
        elif saved is not None:
            self.adversary.load(saved, "checkpoints/last")
        elif step > self.adversary.start_step:
            log.warning("checkpoints/last (step %d) holds no discriminator: a fresh one joins "
                        "now (adversarial_start_step %d has passed)", step,
                        self.adversary.start_step)

    def check_resume(self, run_dir: Path, extra: dict[str, Any]) -> None:
        """Anything goes: the manifest was checked by `recorded_manifest` or given anew."""

    def on_start(self, s: Session, fresh: bool) -> None:
        """DDP-wrap the discriminator, if any; the model learns everything by gradient."""
        if self.adversary is not None:
            self.adversary.wrap(s)

    def after_step(self, s: Session, step: int, last: bool) -> None:
        """previews/step_XXXXXXX.png when due."""
        if due(step, self.train.preview_every, last):
            assert s.recorder is not None
            self.write_preview(s, s.recorder.preview_path(f"step_{step:07d}.png"), f"step {step}")

    def on_complete(self, s: Session, reason: str) -> None:
        """Nothing beyond the checkpoints."""

    @torch.no_grad()
    def write_preview(self, s: Session, path: Path, title: str) -> Path:
        """Montage input | reconstruction | absolute error of the first val volume, 3 mid slices.

        All rows share the [0, 1] grey scale, so the error row shows errors at their true size.
        """
        image = plain_volume(self.val_ds[0][IMAGE])  # (1, D, H, W)
        self.model.eval()
        with s.autocast():
            recon = self.model(image[None].to(s.device)).reconstruction.float()[0, 0].cpu()
        self.model.train()
        vol = image[0].cpu()
        rows = [("input", vol.numpy()), ("reconstruction", recon.clamp(0, 1).numpy()),
                ("|error|", (recon - vol).abs().numpy())]
        return orthogonal_montage(rows, self.spacing, path, title=title, vmax=1.0)


def build_autoencoder_stage(
    config: ExperimentConfig, manifest: Manifest, device: torch.device,
    preprocessed: str | Path | None = None,
) -> AutoencoderStage:
    """Seeded model on `device` plus both datasets; raises before any folder is made.

    With `preprocessed` (a `preprocess` output folder) verified stored volumes replace the
    chain (`mri_vqvae.data.preprocessed`)."""
    tc = config.train_vqvae
    train_items = split_items(manifest, config, "train")
    val_items = split_items(manifest, config, "val")
    check_world_size(len(train_items), tc.batch_size, distributed.world_size(), "train_vqvae")
    seed_everything(config.seed)
    model = registry.build_model(config.autoencoder)
    model.latent_shape(config.data.spatial_size)  # SpatialShapeError: names the fix
    model.to(device)
    adversary = build_adversary(tc, config.data.spatial_size, config.seed, device)
    prep = with_store(build_transforms(config.data), preprocessed, config.data)
    log.info("preprocessing %d train and %d val case(s) once%s", len(train_items),
             len(val_items), "" if preprocessed is None else f" (or reading {preprocessed})")
    train_base = make_dataset(train_items, prep, tc.cache_dir)
    val_ds = make_dataset(val_items, prep, tc.cache_dir)
    train_ds = AugmentedDataset(train_base, augment_only(config.augment, seed=0), config.seed)
    return AutoencoderStage(train=tc, model_config=config.autoencoder, model=model,
                            train_ds=train_ds, val_ds=val_ds, manifest_digest=manifest.digest,
                            spacing=tuple(config.data.spacing), adversary=adversary)


def recorded_manifest(run_dir: str | Path) -> Path:
    """The manifest a VQ-VAE run recorded in its run.json, checked against its recorded digest
    (for ``train-vqvae --resume`` without ``--manifest``)."""
    info = recorded_info(run_dir)
    recorded, digest = info.get("manifest_path"), info.get("manifest_digest")
    if not recorded:
        raise TrainingError(f"{Path(run_dir) / 'run.json'} records no manifest_path: pass "
                            "--manifest M.json")
    manifest = Path(recorded)
    if not manifest.is_file():
        raise TrainingError(
            f"cannot resume {run_dir}: the manifest it was trained on, {manifest}, is gone; pass "
            f"--manifest with the same manifest (its copy is {Path(run_dir) / 'manifest.json'})"
        )
    found = manifest_digest(manifest)
    if digest and found != digest:
        raise TrainingError(
            f"cannot resume {run_dir}: {manifest} changed since the run started (digest "
            f"{str(found)[:12]} != recorded {str(digest)[:12]}); pass --manifest with the "
            f"manifest it was trained on"
        )
    return manifest


def train_vqvae(
    config: ExperimentConfig,
    manifest_path: str | Path | None,
    runs_root: str | Path = "runs",
    resume: str | Path | None = None,
    data_root: str | Path | None = None,
    argv: list[str] | None = None,
    preprocessed: str | Path | None = None,
) -> TrainResult:
    """Train (or, with `resume` = a run folder, continue) a VQ-VAE; returns where it went.

    With `resume` and no `manifest_path`, the manifest the run recorded is used (its digest
    checked). A fresh run makes ``runs_root/vqvae/<UTC>-<config.name>-s<seed>/``. Errors a user
    can cause (empty split, shape not divisible by ``2**levels``, nothing to resume) are raised
    before any folder is made or changed.
    """
    started = time.monotonic()
    manifest_path = training_input(resume, manifest_path, recorded_manifest,
                                   "train-vqvae needs --manifest M.json (or --resume RUN_DIR)")
    manifest = load_manifest(manifest_path, data_root=data_root)
    device = resolve_device(config.train_vqvae.device, "train_vqvae.device")
    stage = build_autoencoder_stage(config, manifest, device, preprocessed)
    s = Session.open(stage, config, device)
    return run_stage(s, started, runs_root, resume, manifest_path=manifest_path, argv=argv)
