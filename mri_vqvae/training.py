"""VQ-VAE training: one plain step loop (single process) with exact resume.

Data. The deterministic preprocessing chain runs once per case (MONAI `CacheDataset` in memory,
or `PersistentDataset` on disk when ``train_vqvae.cache_dir`` is set). The random augmentation
steps then run per item with a seed derived from ``(config seed, epoch, dataset index)``, so an
augmented volume does not depend on the worker count or on what was drawn before. Step ``s``
(0-based) trains on chunk ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``'s
permutation, drawn from a `torch.Generator` seeded with ``(seed, epoch)``: the global step alone
fixes the position in the data, so a resume restarts at the exact batch.

Exact resume. ``checkpoints/last`` holds the weights and buffers (EMA codebook included),
the optimizer state, the step, the best validation PSNR and every random state, captured after
all the work of its step (validation, preview). Resuming rebuilds the model, loads that state,
restores the random states last and continues with the next batch; metrics.jsonl loses the lines
written after the checkpoint. On CPU the result is bit-identical to an uninterrupted run.

Run folder (`mri_vqvae.runs`): config.yaml, manifest.json, run.json, metrics.jsonl, tb/,
previews/step_XXXXXXX.png, checkpoints/{last,best}/ (best = highest mean validation PSNR).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import CacheDataset, MetaTensor
from monai.transforms import Compose
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mri_vqvae.checkpoint import (
    build_resume_state,
    load_checkpoint,
    load_resume_state,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from mri_vqvae.config import ExperimentConfig, TrainConfig
from mri_vqvae.data import case_items, make_dataset
from mri_vqvae.errors import CheckpointError, MriVqvaeError
from mri_vqvae.manifest import Manifest, load_manifest
from mri_vqvae.metrics import mean_of, psnr, ssim
from mri_vqvae.quantizer import usage
from mri_vqvae.report import orthogonal_montage
from mri_vqvae.runs import RunRecorder, new_run_dir, seed_everything
from mri_vqvae.transforms import IMAGE, augment_only, build_transforms
from mri_vqvae.vqvae import VQVAE

log = logging.getLogger(__name__)

STAGE = "vqvae"
KIND = "vqvae"
# Test-only hook: with this set to k, the process SIGKILLs itself right after step k's work
# (checkpoint included), so tests can interrupt a run at an exact point without polling.
KILL_ENV = "MRI_VQVAE_TEST_KILL_AFTER_STEP"
_PERM_STREAM, _ITEM_STREAM = 0, 1


class TrainingError(MriVqvaeError):
    """A training run that cannot start or go on: empty split, bad resume folder, NaN loss..."""


@dataclass(frozen=True)
class TrainResult:
    """Where a run went and how it ended (``stop_reason``: max_steps | time_limit)."""

    run_dir: Path
    step: int
    stop_reason: str
    best_psnr: float | None
    last_checkpoint: Path
    best_checkpoint: Path | None


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


class StepBatchSampler:
    """Batches of (epoch, index) keys for global steps ``start_step .. stop_step - 1``."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, stop_step: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.stop_step = start_step, stop_step

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.stop_step):
            yield batch_keys(step, self.n, self.batch_size, self.seed)


# --- datasets ------------------------------------------------------------------------------------


def _plain(x: Any) -> Tensor:
    """A contiguous float32 torch.Tensor (MONAI's MetaTensor metadata dropped)."""
    t = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
    return t.float().contiguous()


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
        return {"image": _plain(out[IMAGE]), "index": index}


def preprocessed_dataset(
    items: list[dict[str, Any]], transform: Compose, cache_dir: str | Path | None
) -> Dataset:
    """`items` through the deterministic `transform`, cached once (disk or memory)."""
    if cache_dir is not None:
        return make_dataset(items, transform, cache_dir)
    return CacheDataset(items, transform, progress=sys.stderr.isatty(), num_workers=None)


def split_items(manifest: Manifest, config: ExperimentConfig, split: str) -> list[dict[str, Any]]:
    """The `split` cases of `manifest` as dataset items; raises `TrainingError` when empty."""
    items = case_items(manifest, config.data, split)
    if not items:
        counts = manifest.split_counts
        raise TrainingError(
            f"manifest {manifest.name!r} has no {split!r} cases (split counts {counts}): "
            f"train-vqvae trains on 'train' and validates on 'val'; assign splits with "
            f"`mri-vqvae manifest split` or use a manifest with both splits"
        )
    return items


def _val_images(ds: Dataset, start: int, stop: int) -> Tensor:
    """Validation volumes start..stop-1 stacked to (B, 1, D, H, W)."""
    return torch.stack([_plain(ds[i][IMAGE]) for i in range(start, stop)])


# --- model, loss, one step -----------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU raises."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            "train_vqvae.device='cuda' but no CUDA GPU is visible; use device=cpu or auto"
        )
    return torch.device(name)


def reconstruction_loss(recon: Tensor, target: Tensor, kind: str) -> Tensor:
    """Mean L1 or MSE between (B, 1, D, H, W) volumes -> scalar float32."""
    recon, target = recon.float(), target.float()
    return F.l1_loss(recon, target) if kind == "l1" else F.mse_loss(recon, target)


def _autocast(device: torch.device, enabled: bool) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def train_step(
    model: VQVAE,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    tc: TrainConfig,
    device: torch.device,
) -> dict[str, Tensor]:
    """One optimizer step on `images` (B, 1, D, H, W); returns detached scalar terms."""
    model.train()
    with _autocast(device, tc.bf16):
        out = model(images)
    recon = reconstruction_loss(out.reconstruction, images, tc.loss)
    loss = recon + out.commitment_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = tc.grad_clip if tc.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    return {
        "loss": loss.detach(),
        "recon_loss": recon.detach(),
        "commitment_loss": out.commitment_loss.detach(),
        "perplexity": out.perplexity,
        "codes_used": out.codes_used,
        "grad_norm": grad_norm.detach(),
    }


@torch.no_grad()
def validate(
    model: VQVAE, val_ds: Dataset, tc: TrainConfig, device: torch.device
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
        with _autocast(device, tc.bf16):
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


# --- session -------------------------------------------------------------------------------------


@dataclass
class _Session:
    """Everything the loop touches; `step` counts completed optimizer steps."""

    config: ExperimentConfig
    run_dir: Path
    model: VQVAE
    optimizer: torch.optim.Optimizer
    train_ds: AugmentedDataset
    val_ds: Dataset
    device: torch.device
    recorder: RunRecorder | None = None
    step: int = 0
    best_psnr: float | None = None
    best_step: int | None = None
    manifest_digest: str = ""

    @property
    def tc(self) -> TrainConfig:
        return self.config.train_vqvae

    @property
    def n_train(self) -> int:
        return len(self.train_ds)

    @property
    def last_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "last"

    @property
    def best_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "best"

    def epoch_of(self, step: int) -> int:
        """Epoch of the batch trained as 1-based `step`."""
        return (step - 1) // steps_per_epoch(self.n_train, self.tc.batch_size) if step else 0


def _extra(s: _Session, val: dict[str, float] | None = None) -> dict[str, Any]:
    return {"experiment": s.config.model_dump(mode="json"), "run": s.run_dir.name,
            "manifest_digest": s.manifest_digest, "best_psnr": s.best_psnr,
            "best_step": s.best_step, "val": val or {}}


def save_last(s: _Session) -> Path:
    """checkpoints/last with the full resume state; random states captured now."""
    spe = steps_per_epoch(s.n_train, s.tc.batch_size)
    epoch, position = divmod(s.step, spe)
    state = build_resume_state(
        s.optimizer, s.step, epoch, position, s.best_psnr,
        best_step=-1 if s.best_step is None else s.best_step,
        steps_per_epoch=spe, train_cases=s.n_train,
    )
    return save_checkpoint(s.last_dir, s.model, KIND, s.config.vqvae, _extra(s), state,
                           step=s.step)


def _maybe_save_best(s: _Session, val: dict[str, float]) -> None:
    value = val["psnr"]
    if math.isnan(value) or (s.best_psnr is not None and value <= s.best_psnr):
        return
    s.best_psnr, s.best_step = value, s.step
    save_checkpoint(s.best_dir, s.model, KIND, s.config.vqvae, _extra(s, val), step=s.step)
    if s.recorder is not None:
        s.recorder.update(best_checkpoint=str(s.best_dir), best_val_psnr=value, best_step=s.step)


def _build_session(
    config: ExperimentConfig, manifest: Manifest, device: torch.device
) -> _Session:
    """Seeded model and optimizer plus both datasets; raises before any folder is made."""
    tc = config.train_vqvae
    train_items = split_items(manifest, config, "train")
    val_items = split_items(manifest, config, "val")
    seed_everything(config.seed)
    model = VQVAE(config.vqvae)
    model.latent_shape(config.data.spatial_size)  # SpatialShapeError: names the fix
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay
    )
    prep = build_transforms(config.data)
    log.info("preprocessing %d train and %d val case(s) once", len(train_items), len(val_items))
    train_base = preprocessed_dataset(train_items, prep, tc.cache_dir)
    val_ds = preprocessed_dataset(val_items, prep, tc.cache_dir)
    train_ds = AugmentedDataset(train_base, augment_only(config.augment, seed=0), config.seed)
    return _Session(config, Path(), model, optimizer, train_ds, val_ds, device,
                    manifest_digest=manifest.digest)


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
    wanted = s.config.vqvae.model_dump(mode="json")
    if loaded.config != wanted:
        changed = sorted(k for k in wanted if loaded.config.get(k) != wanted[k])
        raise TrainingError(
            f"cannot resume {run_dir}: its checkpoint holds a VQ-VAE with different "
            f"vqvae.{changed} than the config given; resume with the run's own config.yaml "
            "(drop --config/--set for vqvae.*)"
        )
    if state.get("train_cases") != s.n_train:
        log.warning("resuming with %d train cases, the run had %s: batch order changes",
                    s.n_train, state.get("train_cases"))
    s.model.load_state_dict(loaded.model.state_dict())
    s.optimizer.load_state_dict(state["optimizer"])
    s.step = int(state["step"])
    s.best_psnr = state.get("best_metric")
    best_step = int(state.get("best_step", -1))
    s.best_step = None if best_step < 0 else best_step
    return state


# --- the loop ------------------------------------------------------------------------------------


def _train_loader(s: _Session) -> DataLoader:
    """Batches for steps s.step .. max_steps-1; a private generator leaves global RNG alone."""
    sampler = StepBatchSampler(s.n_train, s.tc.batch_size, s.config.seed, s.step, s.tc.max_steps)
    return DataLoader(
        s.train_ds, batch_sampler=sampler, num_workers=s.tc.num_workers,
        generator=torch.Generator().manual_seed(s.config.seed),
        pin_memory=s.device.type == "cuda",
    )


def _kill_after() -> int | None:
    raw = os.environ.get(KILL_ENV)
    return int(raw) if raw else None


def _due(step: int, every: int, last: bool) -> bool:
    return last or step % every == 0


def _after_step(s: _Session, terms: dict[str, Tensor], timed_out: bool, bar: Any) -> None:
    """Logging, validation, best/last checkpoints and previews due after step `s.step`."""
    tc, step = s.tc, s.step
    rec = s.recorder
    assert rec is not None
    last = step == tc.max_steps
    epoch = s.epoch_of(step)
    if _due(step, tc.log_every, last):
        values = {k: v.item() for k, v in terms.items()}  # codes_used stays an int
        rec.log_metrics(step, epoch, "train", **values, lr=s.optimizer.param_groups[0]["lr"])
        bar.set_postfix(loss=f"{values['loss']:.4f}", ppl=f"{values['perplexity']:.1f}")
    if _due(step, tc.val_every, last):
        val = validate(s.model, s.val_ds, tc, s.device)
        rec.log_metrics(step, epoch, "val", **val)
        log.info("step %d: val psnr %.2f dB, ssim %.4f, %d codes used", step, val["psnr"],
                 val["ssim"], val["codes_used"])
        _maybe_save_best(s, val)
    if _due(step, tc.preview_every, last):
        image = _plain(s.val_ds[0][IMAGE])
        write_preview(s.model, image, s.config.data.spacing,
                      rec.preview_path(f"step_{step:07d}.png"), f"step {step}", s.device, tc.bf16)
    if _due(step, tc.checkpoint_every, last) or timed_out:
        save_last(s)  # last: its random states must be the ones the next step starts from


def _loop(s: _Session, deadline: float | None) -> str:
    """Train from s.step to max_steps (or the deadline); returns the stop reason."""
    tc = s.tc
    kill_after = _kill_after()
    bar = tqdm(total=tc.max_steps, initial=s.step, desc="train-vqvae", unit="step",
               disable=not sys.stderr.isatty(), dynamic_ncols=True)
    try:
        for batch in _train_loader(s):
            terms = train_step(s.model, s.optimizer, batch["image"].to(s.device), tc, s.device)
            s.step += 1
            if not torch.isfinite(terms["loss"]):
                raise TrainingError(
                    f"loss became {float(terms['loss'])} at step {s.step}: lower "
                    f"train_vqvae.lr ({tc.lr}), set grad_clip, or turn off bf16, then resume "
                    f"from {s.last_dir}"
                )
            timed_out = deadline is not None and time.monotonic() >= deadline
            _after_step(s, terms, timed_out, bar)
            bar.update(1)
            if kill_after == s.step:
                os.kill(os.getpid(), signal.SIGKILL)
            if timed_out and s.step < tc.max_steps:
                log.warning("time limit of %s min reached at step %d: stopped with a resumable "
                            "checkpoint in %s", tc.time_limit_minutes, s.step, s.last_dir)
                return "time_limit"
    finally:
        bar.close()
    return "max_steps"


def train_vqvae(
    config: ExperimentConfig,
    manifest_path: str | Path,
    runs_root: str | Path = "runs",
    resume: str | Path | None = None,
    data_root: str | Path | None = None,
    argv: list[str] | None = None,
) -> TrainResult:
    """Train (or, with `resume` = a run folder, continue) a VQ-VAE; returns where it went.

    A fresh run makes ``runs_root/vqvae/<UTC>-<config.name>-s<seed>/``. Errors a user can cause
    (empty split, shape not divisible by ``2**levels``, nothing to resume) are raised before any
    folder is made or changed.
    """
    started = time.monotonic()
    tc = config.train_vqvae
    manifest = load_manifest(manifest_path, data_root=data_root)
    device = resolve_device(tc.device)
    if resume is not None:
        _resumable(Path(resume))
    s = _build_session(config, manifest, device)
    state = None
    if resume is not None:
        s.run_dir = Path(resume)
        state = _restore(s, s.run_dir)
    else:
        s.run_dir = new_run_dir(runs_root, STAGE, config.name, config.seed)
    s.recorder = RunRecorder(
        s.run_dir, config, manifest=manifest_path, argv=argv, device=device,
        resume_step=None if state is None else s.step,
        resumed_from=None if state is None else s.last_dir,
    )
    s.recorder.start()
    deadline = None if tc.time_limit_minutes is None else started + 60 * tc.time_limit_minutes
    try:
        if state is not None:
            restore_rng_state(state["rng"])  # last: nothing may draw before the next step
        reason = _loop(s, deadline) if s.step < tc.max_steps else "max_steps"
    except KeyboardInterrupt as exc:
        s.recorder.finish("interrupted", exc)
        raise
    except BaseException as exc:
        s.recorder.finish("failed", exc)
        raise
    s.recorder.update(stop_reason=reason, steps_done=s.step, last_checkpoint=str(s.last_dir))
    s.recorder.finish("completed" if reason == "max_steps" else "interrupted")
    log.info("run %s stopped at step %d (%s)", s.run_dir, s.step, reason)
    best = s.best_dir if s.best_step is not None else None
    return TrainResult(s.run_dir, s.step, reason, s.best_psnr, s.last_dir, best)
