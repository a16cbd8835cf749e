"""Training runs of the VQ-VAE and of the prior: one plain step loop with exact resume.

Both stages share the loop, the run folder, checkpoints and resume (`_Session` and `_run`); a
stage says what one step trains on, how it validates and what its checkpoints record.

VQ-VAE data. The deterministic preprocessing chain runs once per case (MONAI `CacheDataset` in
memory, or `PersistentDataset` on disk when ``train_vqvae.cache_dir`` is set). The random
augmentation steps then run per item with a seed derived from ``(config seed, epoch, dataset
index)``, so an augmented volume does not depend on the worker count or on what was drawn before.

Prior data. The uint16 code grids of a latents folder (`mri_vqvae.artifacts.latents`), held in
memory as
int64; no augmentation. The loss is the cross-entropy of each code given the codes before it,
reported in nats (``loss``) and bits per latent (nats / ln 2).

Batch order. Step ``s`` (0-based) trains on chunk ``s % steps_per_epoch`` of epoch
``s // steps_per_epoch``'s permutation, drawn from a `torch.Generator` seeded with
``(seed, epoch)``: the global step alone fixes the position in the data, so a resume restarts at
the exact batch.

Exact resume. ``checkpoints/last`` holds the weights and buffers (EMA codebook included),
the optimizer state, the step, the best validation metric and every random state, captured after
all the work of its step (validation, preview). Resuming rebuilds the model, loads that state,
restores the random states last and continues with the next batch; metrics.jsonl loses the lines
written after the checkpoint. On CPU the result is bit-identical to an uninterrupted run.

Several processes (DDP). Under ``torchrun`` (`mri_vqvae.core.distributed`) the model is wrapped in
DistributedDataParallel and ``batch_size`` is the global batch: each rank trains on its
contiguous share of the step's keys (`shard_bounds`), so the ranks together see exactly the
single-process batch; ``batch_size`` must divide by the world size. A share's loss is weighted
by ``share * world / batch`` so that DDP's gradient average is the gradient of the whole batch's
mean loss, even for the smaller last batch of an epoch. The EMA codebook is kept identical on every
rank by the quantizer (`mri_vqvae.models.autoencoders.vqvae.quantizer`). Logged train terms are
those of the whole batch. Only rank 0 writes (run folder, metrics, checkpoints, previews,
likelihood.json) and validates; the others wait for its validation result (a broadcast) and, after
each checkpoints/last save, at a barrier. Random states: the VQ-VAE step draws only from the global
RNG (k-means initialisation, code revival), which stays identical on every rank (same seed, same
draws), so rank 0's saved states are restored on every rank at a resume (the CUDA state of rank 0's
GPU onto each rank's GPU). The prior's dropout needs different draws per rank: under DDP each
step's forward/backward runs on a forked RNG seeded from ``(seed, step, rank)``, which a resume
reproduces without saving any per-rank state. A DDP run matches a single-process run with the same
global batch up to floating-point reduction order (tested), not bit for bit; a single-process run
and its resume stay bit-identical on CPU.

Run folders (`mri_vqvae.artifacts.runs`): config.yaml, run.json, metrics.jsonl, tb/, previews/,
checkpoints/{last,best}/. VQ-VAE runs add manifest.json and previews/step_XXXXXXX.png; best is
the highest mean validation PSNR. Prior runs add latents_index.json (a copy of the latents'
index.json) and, when a run stops (max_steps or time limit), likelihood.json; best is the
lowest val bits per latent. The prior's checkpoints and run.json record the latents'
provenance (`LatentIndex.provenance`).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import signal
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose
from pydantic import BaseModel
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mri_vqvae.artifacts.checkpoint import (
    build_resume_state,
    load_checkpoint,
    load_resume_state,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from mri_vqvae.artifacts.latents import INDEX as LATENTS_INDEX
from mri_vqvae.artifacts.latents import (
    LatentDataset,
    LatentIndex,
    load_latents,
    uniform_bits,
    unigram_bits,
)
from mri_vqvae.artifacts.runs import RunRecorder, new_run_dir, seed_everything
from mri_vqvae.config import ExperimentConfig, TrainConfig
from mri_vqvae.core import distributed
from mri_vqvae.core.atomic import atomic_write_bytes, atomic_write_text
from mri_vqvae.core.errors import CheckpointError, MriVqvaeError
from mri_vqvae.core.precision import Precision, resolve_precision
from mri_vqvae.data.datasets import case_items, make_dataset, plain_volume
from mri_vqvae.data.manifest import Manifest, load_manifest
from mri_vqvae.data.preprocessed import with_store
from mri_vqvae.data.transforms import IMAGE, augment_only, build_transforms
from mri_vqvae.evaluation.metrics import mean_of, psnr, ssim
from mri_vqvae.evaluation.report import orthogonal_montage
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.models.autoencoders.vqvae.quantizer import usage
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D
from mri_vqvae.training.progress import StepClock, StopControl, slow_step_message

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
LATENTS_COPY = "latents_index.json"  # a prior run's copy of its latents' index.json
LIKELIHOOD = "likelihood.json"
# Test-only hook: with this set to k, the process SIGKILLs itself right after step k's work
# (checkpoint included), so tests can interrupt a run at an exact point without polling; "k:NAME"
# sends signal NAME instead (e.g. "3:SIGTERM", a graceful stop request).
KILL_ENV = "MRI_VQVAE_TEST_KILL_AFTER_STEP"
# Test-only hook: with this set to a folder, every rank saves its final model state_dict and torch
# RNG state to <folder>/rank<r>.pt when the run ends, so tests can compare the ranks of a DDP run.
DUMP_ENV = "MRI_VQVAE_TEST_DUMP_DIR"
_PERM_STREAM, _ITEM_STREAM, _DROPOUT_STREAM = 0, 1, 2
PROGRESS_EVERY_S = 30.0  # seconds between progress lines in the log


class TrainingError(MriVqvaeError):
    """A training run that cannot start or go on: empty split, bad resume folder, NaN loss..."""


@dataclass(frozen=True)
class TrainResult:
    """Where a run went and how it ended (``stop_reason``: max_steps | time_limit | signal).

    ``best_metric`` is the best validation value of ``metric`` (VQ-VAE: psnr, prior:
    bits_per_latent); ``likelihood`` is the prior's likelihood.json.
    """

    run_dir: Path
    step: int
    stop_reason: str
    best_metric: float | None
    last_checkpoint: Path
    best_checkpoint: Path | None
    metric: str = "psnr"
    likelihood: dict[str, Any] | None = None

    @property
    def best_psnr(self) -> float | None:
        """The best validation PSNR of a VQ-VAE run (None for other stages)."""
        return self.best_metric if self.metric == "psnr" else None


# --- seeds and batch order (pure) ----------------------------------------------------------------


def _seed_words(*words: int) -> list[int]:
    return [int(w) & 0xFFFF_FFFF_FFFF_FFFF for w in words]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item `index` in `epoch`, in [0, 2**32)."""
    words = _seed_words(seed, _ITEM_STREAM, epoch, index)
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order (n,) int64 in which `epoch` visits the n train items (seeded by seed, epoch)."""
    words = _seed_words(seed, _PERM_STREAM, epoch)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1)[0]))
    return torch.randperm(n, generator=gen)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one pass over n items (the last one may be smaller)."""
    return math.ceil(n / batch_size)


def batch_keys(step: int, n: int, batch_size: int, seed: int) -> list[tuple[int, int]]:
    """The (epoch, index) keys of the batch trained at 0-based global `step`."""
    epoch, position = divmod(step, steps_per_epoch(n, batch_size))
    order = epoch_permutation(n, seed, epoch)
    chunk = order[position * batch_size : (position + 1) * batch_size]
    return [(epoch, int(i)) for i in chunk]


def global_batch_size(step: int, n: int, batch_size: int) -> int:
    """Items in the (whole, all ranks) batch of 0-based `step`: batch_size, less at epoch end."""
    position = step % steps_per_epoch(n, batch_size)
    return min(batch_size, n - position * batch_size)


def rank_keys(
    step: int, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
) -> list[tuple[int, int]]:
    """Rank `rank`'s contiguous share of `batch_keys`; the shares of ranks 0..world-1 in order
    concatenate to the whole batch."""
    keys = batch_keys(step, n, batch_size, seed)
    start, stop = distributed.shard_bounds(len(keys), rank, world)
    return keys[start:stop]


def check_world_size(n: int, batch_size: int, world: int, section: str) -> None:
    """Raise `TrainingError` unless n train items in global batches of `batch_size` can be
    shared by `world` ranks: batch_size divisible by world, and every rank gets at least one item
    of every batch (also of the smaller last batch of an epoch)."""
    if world <= 1:
        return
    if batch_size % world:
        lower = batch_size - batch_size % world
        fits = [b for b in (lower, lower + world) if b > 0]
        raise TrainingError(
            f"{section}.batch_size={batch_size} is the global batch and must be divisible by the "
            f"number of processes ({world} = torchrun's nproc_per_node x nnodes): each rank "
            f"trains on batch_size / {world} items; set --set {section}.batch_size="
            f"{' or '.join(map(str, fits))}"
        )
    smallest = global_batch_size(steps_per_epoch(n, batch_size) - 1, n, batch_size)  # the last
    if smallest < world:
        raise TrainingError(
            f"{n} train items in batches of {section}.batch_size={batch_size} leave a last batch "
            f"of {smallest} per epoch, fewer than the {world} processes: some rank would have "
            f"nothing to train on; pick a batch_size that divides {n} (or leaves a remainder of "
            f"at least {world}), or use fewer processes"
        )


class StepBatchSampler:
    """Batches of (epoch, index) keys for global steps ``start_step .. stop_step - 1``.

    With ``world > 1`` each batch is rank `rank`'s share of it (`rank_keys`).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, stop_step: int,
                 rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.stop_step = start_step, stop_step
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.stop_step):
            yield rank_keys(step, self.n, self.batch_size, self.seed, self.rank, self.world)


# --- datasets ------------------------------------------------------------------------------------


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


def _val_images(ds: Dataset, start: int, stop: int) -> Tensor:
    """Validation volumes start..stop-1 stacked to (B, 1, D, H, W)."""
    return torch.stack([plain_volume(ds[i][IMAGE]) for i in range(start, stop)])


# --- model, loss, one step -----------------------------------------------------------------------


def resolve_device(name: str, section: str = "train_vqvae") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU raises.

    Under DDP a CUDA device is this rank's ``cuda:LOCAL_RANK``.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            f"{section}.device='cuda' but no CUDA GPU is visible; use device=cpu or auto"
        )
    return distributed.resolve_device(name)


def reconstruction_loss(recon: Tensor, target: Tensor, kind: str) -> Tensor:
    """Mean L1 or MSE between (B, 1, D, H, W) volumes -> scalar float32."""
    recon, target = recon.float(), target.float()
    return F.l1_loss(recon, target) if kind == "l1" else F.mse_loss(recon, target)


def _autocast(device: torch.device, enabled: bool) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _share_weight(local: int, total: int | None) -> float:
    """Loss weight of a rank's `local` items of a `total`-item batch: DDP averages the ranks'
    gradients, so ``local * world / total`` makes that average the whole batch's gradient."""
    if total is None:
        return 1.0
    return local * distributed.world_size() / total


def _whole_batch(terms: dict[str, Tensor], local: int, total: int | None) -> dict[str, Tensor]:
    """Batch means of a rank's per-share mean `terms`, summed over ranks (a no-op when the
    batch is not shared)."""
    if total is None or not distributed.is_distributed():
        return terms
    stacked = torch.stack([terms[k].float() for k in terms]) * (local / total)
    torch.distributed.all_reduce(stacked)
    return dict(zip(terms, stacked.unbind(), strict=True))


def train_step(
    model: VQVAE | DistributedDataParallel,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    tc: TrainConfig,
    device: torch.device,
    batch_total: int | None = None,
    bf16: bool = False,
) -> dict[str, Tensor]:
    """One optimizer step on `images` (B, 1, D, H, W); returns detached scalar terms.

    `bf16` turns on bfloat16 autocast (see `mri_vqvae.core.precision` for when that pays).

    Under DDP `images` is this rank's share of a `batch_total`-item batch: the loss is weighted
    for DDP's gradient average (`_share_weight`) and the returned terms are the whole batch's.
    """
    model.train()
    with _autocast(device, bf16):
        out = model(images)
    recon = reconstruction_loss(out.reconstruction, images, tc.loss)
    loss = recon + out.commitment_loss
    optimizer.zero_grad(set_to_none=True)
    weight = _share_weight(images.shape[0], batch_total)
    (loss if weight == 1.0 else loss * weight).backward()
    max_norm = tc.grad_clip if tc.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    means = _whole_batch({"loss": loss.detach(), "recon_loss": recon.detach(),
                          "commitment_loss": out.commitment_loss.detach()},
                         images.shape[0], batch_total)
    return {**means, "perplexity": out.perplexity, "codes_used": out.codes_used,
            "grad_norm": grad_norm.detach()}


@torch.no_grad()
def validate(
    model: VQVAE, val_ds: Dataset, tc: TrainConfig, device: torch.device, bf16: bool = False
) -> dict[str, float]:
    """Loss terms, mean PSNR / SSIM (data range 1) and code usage over the whole `val_ds`.

    ``perplexity`` and ``codes_used`` come from the code histogram of every val volume together.
    """
    model.eval()
    n = len(val_ds)  # type: ignore[arg-type]
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long, device=device)
    sums = {"loss": 0.0, "recon_loss": 0.0, "commitment_loss": 0.0}
    psnrs: list[float] = []
    ssims: list[float] = []
    for start in range(0, n, tc.batch_size):
        images = _val_images(val_ds, start, min(n, start + tc.batch_size)).to(device)
        with _autocast(device, bf16):
            out = model(images)
        recon = reconstruction_loss(out.reconstruction, images, tc.loss)
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


@torch.no_grad()
def write_preview(
    model: VQVAE, image: Tensor, spacing: tuple[float, ...], path: Path, title: str,
    device: torch.device, bf16: bool = False,
) -> Path:
    """Montage input | reconstruction | absolute error of `image` (1, D, H, W), 3 mid slices.

    All rows share the [0, 1] grey scale, so the error row shows errors at their true size.
    """
    model.eval()
    with _autocast(device, bf16):
        recon = model(image[None].to(device)).reconstruction.float()[0, 0].cpu()
    model.train()
    vol = image[0].cpu()
    rows = [("input", vol.numpy()), ("reconstruction", recon.clamp(0, 1).numpy()),
            ("|error|", (recon - vol).abs().numpy())]
    return orthogonal_montage(rows, spacing, path, title=title, vmax=1.0)


# --- prior: one step, likelihood -----------------------------------------------------------------


def prior_train_step(
    model: GatedPixelCNN3D | DistributedDataParallel,
    optimizer: torch.optim.Optimizer,
    indices: Tensor,
    tc: TrainConfig,
    device: torch.device,
    batch_total: int | None = None,
    bf16: bool = False,
) -> dict[str, Tensor]:
    """One optimizer step on code grids `indices` (B, d, h, w) int64; detached scalar terms.

    ``loss`` is the mean cross-entropy in nats, ``bits_per_latent`` the same in bits. Under DDP
    `indices` is this rank's share of a `batch_total`-grid batch (see `train_step`).
    """
    model.train()
    with _autocast(device, bf16):
        logits = model(indices)
    loss = F.cross_entropy(logits.float(), indices)
    optimizer.zero_grad(set_to_none=True)
    weight = _share_weight(indices.shape[0], batch_total)
    (loss if weight == 1.0 else loss * weight).backward()
    max_norm = tc.grad_clip if tc.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    mean = _whole_batch({"loss": loss.detach()}, indices.shape[0], batch_total)["loss"]
    return {"loss": mean, "bits_per_latent": mean / LN2, "grad_norm": grad_norm.detach()}


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """Seed of rank `rank`'s dropout draws at 0-based `step` of a DDP prior run, in [0, 2**63)."""
    words = _seed_words(seed, _DROPOUT_STREAM, step, rank)
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


@torch.no_grad()
def prior_bits(
    model: GatedPixelCNN3D, grids: Tensor, batch_size: int, device: torch.device,
    bf16: bool = False,
) -> float:
    """Mean bits per latent of the prior over every position of `grids` (N, d, h, w), N > 0.

    The model runs in eval mode and is put back in its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, len(grids), batch_size):
            x = grids[start : start + batch_size].to(device)
            with _autocast(device, bf16):
                logits = model(x)
            total += float(F.cross_entropy(logits.float(), x, reduction="sum"))
    finally:
        model.train(was_training)
    return total / grids.numel() / LN2


def likelihood_report(
    model: GatedPixelCNN3D, index: LatentIndex, batch_size: int, device: torch.device,
    bf16: bool = False,
) -> dict[str, Any]:
    """Bits per latent of `model` on the val and test grids beside two baselines.

    ``uniform`` is log2 K; ``unigram`` the cross-entropy under the code frequencies of the train
    grids with add-one smoothing. A split without grids reports ``num_cases`` 0 and nulls.
    """
    k = index.codebook_size
    train = index.stack("train")
    splits: dict[str, Any] = {}
    for split in ("val", "test"):
        grids = LatentDataset(index, split).grids
        n = len(grids)
        splits[split] = {
            "num_cases": n,
            "prior_bits_per_latent": prior_bits(model, grids, batch_size, device, bf16)
            if n else None,
            "uniform_bits_per_latent": uniform_bits(k) if n else None,
            "unigram_bits_per_latent": unigram_bits(train, grids, k) if n else None,
        }
    return {"codebook_size": k, "latent_shape": list(index.latent_shape),
            "train_cases": len(train), "unigram": "add-one smoothed code frequencies of train",
            "splits": splits}


# --- session -------------------------------------------------------------------------------------


def _no_buffer_sync() -> dict[str, bool]:
    """DDP keyword that turns off the per-forward buffer broadcast (renamed in newer torch)."""
    params = inspect.signature(DistributedDataParallel).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {key: False}


@dataclass(kw_only=True)
class _Session:
    """Everything the shared loop touches; `step` counts completed optimizer steps.

    A stage subclasses it: what it trains on (`batches`), one step, one validation, the metric
    that picks checkpoints/best, and what its checkpoints record besides the common fields.
    ``stage`` names the run subfolder, the checkpoint kind and the config sections
    (``config.<stage>`` for the model, ``config.train_<stage>`` for training). Under DDP
    ``model`` stays the bare module (validation, previews, checkpoints) and ``ddp`` wraps it for
    the training steps; ``rank`` / ``world`` say where this process stands.
    """

    stage: ClassVar[str]
    best_key: ClassVar[str]
    maximize: ClassVar[bool]

    config: ExperimentConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    run_dir: Path = Path()
    recorder: RunRecorder | None = None
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    rank: int = 0
    world: int = 1
    ddp: DistributedDataParallel | None = None
    precision: Precision = Precision("fp32", "fp32", "default")
    val_seconds: float | None = None  # measured duration of the last validation
    save_seconds: float | None = None  # measured duration of the last checkpoints/last save
    # the final validation's cost, in validations (the prior also scores val and test grids
    # for likelihood.json when it stops)
    stop_work_factor: ClassVar[float] = 1.0

    @property
    def bf16(self) -> bool:
        """bfloat16 autocast in this run's steps and validations (`precision`)."""
        return self.precision.bf16

    @property
    def net(self) -> nn.Module:
        """The module a training step runs: the DDP wrapper under DDP, else the model."""
        return self.ddp if self.ddp is not None else self.model

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates and writes."""
        return self.rank == 0

    def batch_total(self, step: int) -> int | None:
        """Items in the whole batch of 0-based `step` under DDP (None in one process)."""
        if self.world <= 1:
            return None
        return global_batch_size(step, self.n_train, self.tc.batch_size)

    def wrap(self) -> None:
        """Wrap the model in DDP (a no-op in one process); after any resume has loaded it.

        Buffers are not broadcast at each forward: the only ones, the quantizer's, are kept
        identical by the quantizer itself.
        """
        if self.world <= 1:
            return
        ids = [self.device.index] if self.device.type == "cuda" else None
        # channels_last 1x1x1 conv weights: their size-1 dims give grads other (equivalent)
        # strides than DDP's bucket views, and DDP warns about it; the layout is the same.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.ddp = DistributedDataParallel(self.model, device_ids=ids, **_no_buffer_sync())

    @property
    def tc(self) -> TrainConfig:
        return getattr(self.config, f"train_{self.stage}")

    @property
    def model_config(self) -> BaseModel:
        return self.config.autoencoder if self.stage == "vqvae" else self.config.prior

    @property
    def n_train(self) -> int:
        raise NotImplementedError

    @property
    def n_val(self) -> int:
        raise NotImplementedError

    @property
    def last_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "last"

    @property
    def best_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "best"

    def epoch_of(self, step: int) -> int:
        """Epoch of the batch trained as 1-based `step`."""
        return (step - 1) // steps_per_epoch(self.n_train, self.tc.batch_size) if step else 0

    def batches(self) -> Iterable[Any]:
        """The batches of steps ``self.step .. max_steps - 1``, in order."""
        raise NotImplementedError

    def train_step(self, batch: Any) -> dict[str, Tensor]:
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        raise NotImplementedError

    def describe(self, val: dict[str, float]) -> str:
        """One log line about a validation."""
        return f"val {self.best_key} {val[self.best_key]:.4f}"

    def postfix(self, values: dict[str, Any]) -> dict[str, str]:
        """Progress bar fields from the logged train values."""
        return {"loss": f"{values['loss']:.4f}"}

    def stage_extra(self) -> dict[str, Any]:
        """Checkpoint metadata of this stage (merged into the common fields)."""
        return {}

    def check_resume(self, extra: dict[str, Any]) -> None:
        """Raise `TrainingError` when checkpoints/last (its `extra`) cannot continue here."""

    def after_step(self, step: int, last: bool) -> None:
        """Stage outputs due after `step` (before checkpoints/last is saved)."""

    def on_start(self) -> None:
        """After the run folder's provenance is written; must draw no random numbers."""

    def on_complete(self, reason: str) -> dict[str, Any] | None:
        """After the last step (max_steps or time_limit); returns a summary for the result."""
        return None

    def is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.maximize else value < self.best_metric


@dataclass(kw_only=True)
class _VQVAESession(_Session):
    stage: ClassVar[str] = "vqvae"
    best_key: ClassVar[str] = "psnr"
    maximize: ClassVar[bool] = True

    model: VQVAE
    train_ds: AugmentedDataset
    val_ds: Dataset
    manifest_digest: str = ""

    @property
    def n_train(self) -> int:
        return len(self.train_ds)

    @property
    def n_val(self) -> int:
        return len(self.val_ds)  # type: ignore[arg-type]

    def batches(self) -> Iterable[Any]:
        """A DataLoader over the steps left; a private generator leaves global RNG alone."""
        sampler = StepBatchSampler(self.n_train, self.tc.batch_size, self.config.seed,
                                   self.step, self.tc.max_steps, self.rank, self.world)
        return DataLoader(
            self.train_ds, batch_sampler=sampler, num_workers=self.tc.num_workers,
            generator=torch.Generator().manual_seed(self.config.seed),
            pin_memory=self.device.type == "cuda",
        )

    def train_step(self, batch: Any) -> dict[str, Tensor]:
        images = batch["image"].to(self.device)
        return train_step(self.net, self.optimizer, images, self.tc, self.device,
                          self.batch_total(self.step), self.bf16)

    def validate(self) -> dict[str, float]:
        return validate(self.model, self.val_ds, self.tc, self.device, self.bf16)

    def describe(self, val: dict[str, float]) -> str:
        return (f"val psnr {val['psnr']:.2f} dB, ssim {val['ssim']:.4f}, "
                f"{val['codes_used']} codes used")

    def postfix(self, values: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{values['loss']:.4f}", "ppl": f"{values['perplexity']:.1f}"}

    def stage_extra(self) -> dict[str, Any]:
        return {"manifest_digest": self.manifest_digest}

    def after_step(self, step: int, last: bool) -> None:
        if _due(step, self.tc.preview_every, last):
            assert self.recorder is not None
            image = plain_volume(self.val_ds[0][IMAGE])
            write_preview(self.model, image, self.config.data.spacing,
                          self.recorder.preview_path(f"step_{step:07d}.png"), f"step {step}",
                          self.device, self.bf16)


@dataclass(kw_only=True)
class _PriorSession(_Session):
    stage: ClassVar[str] = "prior"
    best_key: ClassVar[str] = "bits_per_latent"
    maximize: ClassVar[bool] = False
    stop_work_factor: ClassVar[float] = 3.0

    model: GatedPixelCNN3D
    latents: LatentIndex
    train_grids: Tensor
    val_grids: Tensor

    @property
    def n_train(self) -> int:
        return len(self.train_grids)

    @property
    def n_val(self) -> int:
        return len(self.val_grids)

    def batches(self) -> Iterable[Any]:
        """(B, d, h, w) int64 grids of each step left, in the seeded per-epoch order."""
        for step in range(self.step, self.tc.max_steps):
            keys = rank_keys(step, self.n_train, self.tc.batch_size, self.config.seed,
                             self.rank, self.world)
            yield self.train_grids[[i for _, i in keys]]

    def train_step(self, batch: Any) -> dict[str, Tensor]:
        """One step; under DDP dropout draws from an RNG forked per (seed, step, rank)."""
        args = (self.net, self.optimizer, batch.to(self.device), self.tc, self.device,
                self.batch_total(self.step), self.bf16)
        if self.world <= 1:
            return prior_train_step(*args)
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            seed = dropout_seed(self.config.seed, self.step, self.rank)
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)  # this rank's device only
            return prior_train_step(*args)

    def validate(self) -> dict[str, float]:
        bits = prior_bits(self.model, self.val_grids, self.tc.batch_size, self.device,
                          self.bf16)
        return {"loss": bits * LN2, "bits_per_latent": bits, "num_cases": len(self.val_grids)}

    def describe(self, val: dict[str, float]) -> str:
        return f"val {val['bits_per_latent']:.4f} bits/latent"

    def postfix(self, values: dict[str, Any]) -> dict[str, str]:
        return {"bits": f"{values['bits_per_latent']:.3f}"}

    def stage_extra(self) -> dict[str, Any]:
        return self.latents.provenance()

    def check_resume(self, extra: dict[str, Any]) -> None:
        ours = self.latents.provenance()
        changed = [k for k in ("vqvae_sha256", "latent_shape", "codebook_size")
                   if extra.get(k) != ours[k]]
        if changed:
            raise TrainingError(
                f"cannot resume {self.run_dir}: it was trained on latents of another VQ-VAE "
                f"({changed} differ from {self.latents.root}); resume with the latents it used "
                f"({extra.get('latents_dir')}) or start a new run"
            )

    def on_start(self) -> None:
        if not self.is_main:
            return
        copy = self.run_dir / LATENTS_COPY
        if not copy.exists():
            atomic_write_bytes(copy, (self.latents.root / LATENTS_INDEX).read_bytes())
        assert self.recorder is not None
        self.recorder.update(**self.latents.provenance())

    def on_complete(self, reason: str) -> dict[str, Any]:
        """Write likelihood.json (best checkpoint, else the final weights) and return it.

        Also after a time-limit stop (the figures of the best checkpoint so far; a resumed run
        rewrites them). Under DDP rank 0 computes and writes it; every rank returns rank 0's.
        """
        return distributed.broadcast_object(self._likelihood(reason) if self.is_main else {})

    def _likelihood(self, reason: str) -> dict[str, Any]:
        model: nn.Module = self.model
        step = self.step
        if self.best_step is not None:
            loaded = load_checkpoint(self.best_dir)
            model, step = loaded.model.to(self.device), self.best_step
        assert isinstance(model, GatedPixelCNN3D)
        report = likelihood_report(model, self.latents, self.tc.batch_size, self.device,
                                   self.bf16)
        used = self.best_dir if self.best_step is not None else self.last_dir
        report = {"run": self.run_dir.name, "checkpoint": str(used.resolve()), "step": step,
                  "stop_reason": reason, **report}
        atomic_write_text(self.run_dir / LIKELIHOOD, json.dumps(report, indent=2) + "\n")
        assert self.recorder is not None
        self.recorder.update(likelihood=report["splits"])
        log.info("likelihood written to %s", self.run_dir / LIKELIHOOD)
        return report


def _extra(s: _Session, val: dict[str, float] | None = None) -> dict[str, Any]:
    return {"experiment": s.config.model_dump(mode="json"), "run": s.run_dir.name,
            **s.stage_extra(), f"best_{s.best_key}": s.best_metric, "best_step": s.best_step,
            "val": val or {}}


def save_last(s: _Session) -> Path:
    """checkpoints/last with the full resume state; random states captured now.

    Under DDP rank 0 writes it and every rank waits at a barrier until it is on disk.
    """
    if s.is_main:
        spe = steps_per_epoch(s.n_train, s.tc.batch_size)
        epoch, position = divmod(s.step, spe)
        state = build_resume_state(
            s.optimizer, s.step, epoch, position, s.best_metric,
            best_step=-1 if s.best_step is None else s.best_step,
            steps_per_epoch=spe, train_cases=s.n_train, rng_device=_cuda_index(s.device),
        )
        save_checkpoint(s.last_dir, s.model, s.stage, s.model_config, _extra(s), state,
                        step=s.step)
    distributed.barrier()
    return s.last_dir


def _cuda_index(device: torch.device) -> int:
    """The CUDA device whose random state a checkpoint's ``rng.cuda[i]`` is, -1 on CPU."""
    if device.type != "cuda":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


def _restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Restore the random states of a resume state; under DDP on CUDA, the saving rank's GPU
    state goes onto this rank's GPU (the ranks' states are identical by construction)."""
    rng = state["rng"]
    saved_index = int(state.get("rng_device", 0))
    if not distributed.is_distributed() or device.type != "cuda":
        restore_rng_state(rng)
        return
    cuda = list(rng.get("cuda") or [])
    restore_rng_state({**rng, "cuda": []})
    if 0 <= saved_index < len(cuda):
        torch.cuda.set_rng_state(torch.as_tensor(cuda[saved_index]).cpu(), device)


def _maybe_save_best(s: _Session, val: dict[str, float]) -> None:
    value = val[s.best_key]
    if not s.is_better(value):
        return
    s.best_metric, s.best_step = value, s.step
    if s.is_main:
        save_checkpoint(s.best_dir, s.model, s.stage, s.model_config, _extra(s, val),
                        step=s.step)
    if s.recorder is not None:
        s.recorder.update(best_checkpoint=str(s.best_dir), best_step=s.step,
                          **{f"best_val_{s.best_key}": value})


def _build_session(
    config: ExperimentConfig, manifest: Manifest, device: torch.device,
    preprocessed: str | Path | None = None,
) -> _VQVAESession:
    """Seeded model and optimizer plus both datasets; raises before any folder is made.

    With `preprocessed` (a `preprocess` output folder) verified stored volumes replace the
    chain (`mri_vqvae.data.preprocessed`)."""
    tc = config.train_vqvae
    train_items = split_items(manifest, config, "train")
    val_items = split_items(manifest, config, "val")
    world = distributed.world_size()
    check_world_size(len(train_items), tc.batch_size, world, "train_vqvae")
    seed_everything(config.seed)
    model = VQVAE(config.autoencoder)
    model.latent_shape(config.data.spatial_size)  # SpatialShapeError: names the fix
    model.to(device)
    optimizer = _adamw(model, tc)
    prep = with_store(build_transforms(config.data), preprocessed, config.data)
    log.info("preprocessing %d train and %d val case(s) once%s", len(train_items),
             len(val_items), "" if preprocessed is None else f" (or reading {preprocessed})")
    train_base = make_dataset(train_items, prep, tc.cache_dir)
    val_ds = make_dataset(val_items, prep, tc.cache_dir)
    train_ds = AugmentedDataset(train_base, augment_only(config.augment, seed=0), config.seed)
    return _VQVAESession(config=config, model=model, optimizer=optimizer, device=device,
                         train_ds=train_ds, val_ds=val_ds, manifest_digest=manifest.digest,
                         rank=distributed.rank(), world=world,
                         precision=resolve_precision(tc.precision, device))


def _adamw(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay
    )


def _split_grids(index: LatentIndex, split: str) -> Tensor:
    """The `split` grids (N, d, h, w) int64; raises `TrainingError` when there are none."""
    grids = LatentDataset(index, split).grids
    if not len(grids):
        counts = dict(Counter(c.split for c in index.cases))
        raise TrainingError(
            f"latents folder {index.root} has no {split!r} grids (cases per split {counts}): "
            "train-prior trains on 'train' and validates on 'val'; encode both splits "
            "(`mri-vqvae encode` without --split)"
        )
    return grids


def _build_prior_session(
    config: ExperimentConfig, index: LatentIndex, device: torch.device
) -> _PriorSession:
    """Seeded prior and optimizer plus the train/val grids; raises before any folder is made."""
    if config.prior.codebook_size != index.codebook_size:
        raise TrainingError(
            f"prior.codebook_size={config.prior.codebook_size} but the latents in {index.root} "
            f"hold codes of a VQ-VAE with codebook_size={index.codebook_size} (index.json): set "
            f"--set vqvae.codebook_size={index.codebook_size} --set "
            f"prior.codebook_size={index.codebook_size}, or use the VQ-VAE run's config.yaml"
        )
    if config.data.model_dump(mode="json") != index.data:
        log.warning("config.data differs from the data config the latents were made with; the "
                    "prior records the latents' one (%s)", index.root / LATENTS_INDEX)
    train_grids = _split_grids(index, "train")
    val_grids = _split_grids(index, "val")
    world = distributed.world_size()
    check_world_size(len(train_grids), config.train_prior.batch_size, world, "train_prior")
    seed_everything(config.seed)
    model = GatedPixelCNN3D(config.prior).to(device)
    return _PriorSession(config=config, model=model, optimizer=_adamw(model, config.train_prior),
                         device=device, latents=index, train_grids=train_grids,
                         val_grids=val_grids, rank=distributed.rank(), world=world,
                         precision=resolve_precision(config.train_prior.precision, device))


def _resumable(run_dir: Path) -> Path:
    """The complete checkpoints/last folder of `run_dir`, or a `TrainingError` saying why not."""
    if not (run_dir / "run.json").is_file():
        raise TrainingError(f"cannot resume {run_dir}: not a run folder (no run.json)")
    try:
        return resolve_checkpoint(run_dir / "checkpoints" / "last")
    except CheckpointError as exc:
        raise TrainingError(
            f"cannot resume {run_dir}: {exc} (a run stopped before its first checkpoint has "
            "nothing to resume; start a new run)"
        ) from None


def _restore(s: _Session, run_dir: Path) -> dict[str, Any]:
    """Load checkpoints/last of `run_dir` into the session; returns its resume state."""
    folder = _resumable(run_dir)
    try:
        loaded = load_checkpoint(folder)
        state = load_resume_state(folder)
    except CheckpointError as exc:
        raise TrainingError(f"cannot resume {run_dir}: {exc}") from None
    if loaded.kind != s.stage:
        raise TrainingError(
            f"cannot resume {run_dir}: it holds a {loaded.kind!r} run, not a {s.stage!r} run; "
            f"resume it with `mri-vqvae train-{loaded.kind}`"
        )
    wanted = s.model_config.model_dump(mode="json")
    if loaded.config != wanted:
        changed = sorted(k for k in wanted if loaded.config.get(k) != wanted[k])
        raise TrainingError(
            f"cannot resume {run_dir}: its checkpoint holds a {s.stage} model with different "
            f"{s.stage}.{changed} than the config given; resume with the run's own config.yaml "
            f"(drop --config/--set for {s.stage}.*)"
        )
    s.check_resume(loaded.extra)
    if state.get("train_cases") != s.n_train:
        log.warning("resuming with %d train cases, the run had %s: batch order changes",
                    s.n_train, state.get("train_cases"))
    s.model.load_state_dict(loaded.model.state_dict())
    s.optimizer.load_state_dict(state["optimizer"])
    s.step = int(state["step"])
    s.best_metric = state.get("best_metric")
    best_step = int(state.get("best_step", -1))
    s.best_step = None if best_step < 0 else best_step
    return state


# --- the loop ------------------------------------------------------------------------------------


def _kill_after() -> tuple[int, signal.Signals] | None:
    """The `KILL_ENV` test hook: (step, signal) or None."""
    raw = os.environ.get(KILL_ENV)
    if not raw:
        return None
    step, _, name = raw.partition(":")
    return int(step), signal.Signals[name or "SIGKILL"]


def _due(step: int, every: int, last: bool) -> bool:
    return last or step % every == 0


def _after_step(s: _Session, terms: dict[str, Tensor], stopping: bool, bar: Any) -> None:
    """Logging, validation, best/last checkpoints and stage outputs due after step `s.step`.

    A step the run stops after (`stopping`: max_steps, time limit, signal) is validated,
    previewed and checkpointed whatever the periods say, so no trained step is thrown away.
    Under DDP only rank 0 validates, writes previews and logs; the other ranks receive its
    validation result (so every rank agrees on the best metric) and wait for checkpoints/last.
    """
    tc, step = s.tc, s.step
    rec = s.recorder
    assert rec is not None
    last = step == tc.max_steps or stopping
    epoch = s.epoch_of(step)
    if _due(step, tc.log_every, last):
        values = {k: v.item() for k, v in terms.items()}  # codes_used stays an int
        rec.log_metrics(step, epoch, "train", **values, lr=s.optimizer.param_groups[0]["lr"])
        bar.set_postfix(s.postfix(values))
    if _due(step, tc.val_every, last):
        started = time.monotonic()
        val = distributed.broadcast_object(s.validate() if s.is_main else {})
        rec.log_metrics(step, epoch, "val", **val)
        if s.is_main:
            log.info("step %d: %s", step, s.describe(val))
        _maybe_save_best(s, val)
        s.val_seconds = time.monotonic() - started
    if s.is_main:
        s.after_step(step, last)
    if _due(step, tc.checkpoint_every, last):
        started = time.monotonic()
        save_last(s)  # last: its random states must be the ones the next step starts from
        s.save_seconds = time.monotonic() - started


def _final_work_estimate(s: _Session, clock: StepClock) -> float:
    """Seconds the stop itself takes (validation + checkpoint; the prior adds likelihood.json).

    Measured once a validation has run; before that, one training step per validation batch
    (a step is about 3 forward passes, so this errs on the safe side).
    """
    val = s.val_seconds
    if val is None:
        val = (clock.median or 0.0) * max(1, math.ceil(s.n_val / s.tc.batch_size))
    return val * s.stop_work_factor + (s.save_seconds or 0.0)


_STOP_CODES = {None: 0, "time_limit": 1, "signal": 2}


def _stop_reason(local: str | None, device: torch.device) -> str | None:
    """The stop reason agreed by every rank (a signal on any rank wins over a time limit)."""
    if not distributed.is_distributed():
        return local
    t = torch.tensor([_STOP_CODES[local]], device=device)  # nccl reduces GPU tensors only
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return {v: k for k, v in _STOP_CODES.items()}[int(t.item())]


def _report_progress(s: _Session, clock: StepClock, duration: float, loss: float) -> None:
    """A progress line every `PROGRESS_EVERY_S` (and at the first step); warns on a slow step."""
    if not s.is_main:
        return
    median = clock.median
    if median is not None and clock.is_slow(duration):
        log.warning(slow_step_message(s.step, duration, median, s.precision.name,
                                      torch.get_num_threads(), os.cpu_count()))
    if clock.line_due(PROGRESS_EVERY_S):
        log.info("train-%s %s", s.stage, clock.line(loss))


def _loop(s: _Session, stop: StopControl) -> str:
    """Train from s.step to max_steps, or until `stop` says so; returns the stop reason."""
    tc = s.tc
    kill_after = _kill_after()
    bar = tqdm(total=tc.max_steps, initial=s.step, desc=f"train-{s.stage}", unit="step",
               disable=not (sys.stderr.isatty() and s.is_main), dynamic_ncols=True)
    clock = StepClock(s.step, tc.max_steps)
    try:
        for batch in s.batches():
            terms = s.train_step(batch)
            s.step += 1
            duration = clock.tick(s.step)
            if not torch.isfinite(terms["loss"]):
                raise TrainingError(
                    f"loss became {float(terms['loss'])} at step {s.step}: lower "
                    f"train_{s.stage}.lr ({tc.lr}), set grad_clip, or use precision=fp32, then "
                    f"resume from {s.last_dir}"
                )
            _report_progress(s, clock, duration, float(terms["loss"]))
            reason = _stop_reason(stop.reason(clock.median, _final_work_estimate(s, clock)),
                                  s.device)
            _after_step(s, terms, reason is not None, bar)
            bar.update(1)
            clock.restart()
            if kill_after is not None and kill_after[0] == s.step:
                os.kill(os.getpid(), kill_after[1])
            if reason is not None and s.step < tc.max_steps:
                if s.is_main:
                    why = (f"time limit of {tc.time_limit_minutes} min" if reason == "time_limit"
                           else f"{stop.signal_name or 'a stop signal'}")
                    log.warning("%s: stopped at step %d of %d after validating it; resumable "
                                "checkpoint in %s", why, s.step, tc.max_steps, s.last_dir)
                return reason
    finally:
        bar.close()
    return "max_steps"


def _dump_for_tests(s: _Session) -> None:
    """`DUMP_ENV` test hook: this rank's final state_dict and torch RNG state -> rank<r>.pt."""
    folder = os.environ.get(DUMP_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in s.model.state_dict().items()}
    torch.save({"model": state, "rng": torch.get_rng_state(), "step": s.step,
                "best_metric": s.best_metric, "world": s.world},
               Path(folder) / f"rank{s.rank}.pt")


def _run(
    s: _Session,
    started: float,
    runs_root: str | Path,
    resume: str | Path | None,
    manifest_path: str | Path | None = None,
    argv: list[str] | None = None,
) -> TrainResult:
    """Make (or reopen) the run folder, train, record how it ended; shared by every stage.

    Under DDP every rank loads checkpoints/last at a resume; rank 0 alone makes a new run folder
    (its path is broadcast) and writes into it.
    """
    tc = s.tc
    state = None
    if resume is not None:
        s.run_dir = Path(resume)
        state = _restore(s, s.run_dir)
    else:
        made = new_run_dir(runs_root, s.stage, s.config.name, s.config.seed) if s.is_main else None
        s.run_dir = Path(distributed.broadcast_object(str(made)))
    s.recorder = RunRecorder(
        s.run_dir, s.config, manifest=manifest_path, argv=argv, device=s.device, rank=s.rank,
        resume_step=None if state is None else s.step,
        resumed_from=None if state is None else s.last_dir,
    )
    s.recorder.start()
    s.recorder.update(precision=s.precision.as_dict(), torch_threads=torch.get_num_threads())
    if s.is_main:
        log.info("train-%s: precision %s (%s: %s), %d torch thread(s)", s.stage,
                 s.precision.name, s.precision.requested, s.precision.reason,
                 torch.get_num_threads())
    s.on_start()
    s.wrap()
    deadline = None if tc.time_limit_minutes is None else started + 60 * tc.time_limit_minutes
    summary = None
    try:
        if state is not None:
            _restore_rng(state, s.device)  # last: nothing may draw before the next step
        with StopControl(deadline).signals() as stop:
            reason = _loop(s, stop) if s.step < tc.max_steps else "max_steps"
        summary = s.on_complete(reason)
    except KeyboardInterrupt as exc:
        s.recorder.finish("interrupted", exc)
        raise
    except BaseException as exc:
        s.recorder.finish("failed", exc)
        raise
    s.recorder.update(stop_reason=reason, steps_done=s.step, last_checkpoint=str(s.last_dir))
    s.recorder.finish("completed" if reason == "max_steps" else "interrupted")
    _dump_for_tests(s)
    distributed.barrier()  # rank 0's files are complete before any rank returns
    if s.is_main:
        log.info("run %s stopped at step %d (%s)", s.run_dir, s.step, reason)
    best = s.best_dir if s.best_step is not None else None
    return TrainResult(s.run_dir, s.step, reason, s.best_metric, s.last_dir, best,
                       metric=s.best_key, likelihood=summary)


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
    checked).
    A fresh run makes ``runs_root/vqvae/<UTC>-<config.name>-s<seed>/``. Errors a user can cause
    (empty split, shape not divisible by ``2**levels``, nothing to resume) are raised before any
    folder is made or changed.
    """
    started = time.monotonic()
    if resume is not None:
        _resumable(Path(resume))
        if manifest_path is None:
            manifest_path = recorded_manifest(resume)
    if manifest_path is None:
        raise TrainingError("train-vqvae needs --manifest M.json (or --resume RUN_DIR)")
    manifest = load_manifest(manifest_path, data_root=data_root)
    device = resolve_device(config.train_vqvae.device)
    s = _build_session(config, manifest, device, preprocessed)
    return _run(s, started, runs_root, resume, manifest_path=manifest_path, argv=argv)


def recorded_manifest(run_dir: str | Path) -> Path:
    """The manifest a VQ-VAE run recorded in its run.json, checked against its recorded digest
    (for ``train-vqvae --resume`` without ``--manifest``)."""
    from mri_vqvae.artifacts.runs import _manifest_digest

    path = Path(run_dir) / "run.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        recorded, digest = info.get("manifest_path"), info.get("manifest_digest")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise TrainingError(f"cannot resume {run_dir}: {path} is unreadable ({exc})") from None
    if not recorded:
        raise TrainingError(f"{path} records no manifest_path: pass --manifest M.json")
    manifest = Path(recorded)
    if not manifest.is_file():
        raise TrainingError(
            f"cannot resume {run_dir}: the manifest it was trained on, {manifest}, is gone; pass "
            f"--manifest with the same manifest (its copy is {Path(run_dir) / 'manifest.json'})"
        )
    found = _manifest_digest(manifest)
    if digest and found != digest:
        raise TrainingError(
            f"cannot resume {run_dir}: {manifest} changed since the run started (digest "
            f"{str(found)[:12]} != recorded {str(digest)[:12]}); pass --manifest with the "
            f"manifest it was trained on"
        )
    return manifest


def recorded_latents_dir(run_dir: str | Path) -> Path:
    """The latents folder a prior run recorded in its run.json (for a resume without one)."""
    path = Path(run_dir) / "run.json"
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("latents_dir")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise TrainingError(f"cannot resume {run_dir}: {path} is unreadable ({exc})") from None
    if not recorded:
        raise TrainingError(f"{path} records no latents_dir: is {run_dir} a prior run?")
    return Path(recorded)


def train_prior(
    config: ExperimentConfig,
    latents_dir: str | Path | None,
    runs_root: str | Path = "runs",
    resume: str | Path | None = None,
    argv: list[str] | None = None,
) -> TrainResult:
    """Train (or continue) the gated PixelCNN prior on the grids of a latents folder.

    Trains on the ``train`` grids, keeps checkpoints/best by the lowest val bits per latent and,
    when it stops, writes ``likelihood.json`` (val and test bits per latent beside the uniform
    and unigram baselines). With `resume` and no `latents_dir`, the run's own latents are used.
    A fresh run makes ``runs_root/prior/<UTC>-<config.name>-s<seed>/``; every error a user can
    cause (codebook mismatch, empty split, tampered grids, nothing to resume) comes first.
    """
    started = time.monotonic()
    if resume is not None:
        _resumable(Path(resume))
        if latents_dir is None:
            latents_dir = recorded_latents_dir(resume)
    if latents_dir is None:
        raise TrainingError("train-prior needs --latents DIR (made by `mri-vqvae encode`)")
    index = load_latents(latents_dir)
    device = resolve_device(config.train_prior.device, "train_prior")
    s = _build_prior_session(config, index, device)
    return _run(s, started, runs_root, resume, argv=argv)
