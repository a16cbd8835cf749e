"""The prior stage: any `Prior` (models/priors/base.py) trained on the grids of a latents folder.

The prior is built by the registry from ``config.prior`` (its ``kind``: pixelcnn, unigram...),
with ``codebook_size`` taken from the latents (the source of truth: the config's autoencoder
section does not matter here) and ``num_classes`` from ``prior.label_field``
(`mri_vqvae.training.prior_data`). A fresh run calls ``prior.prepare`` on the train grids once
before the first step (not on a resume). A step minimises ``prior.loss`` (nats per latent,
logged also as bits per latent); validation and likelihood.json use ``prior.grid_bits``.

Under DDP the prior's random draws (dropout) must differ per rank: each step's forward/backward
runs on an RNG forked and seeded from ``(seed, step, rank)``, which a resume reproduces.

The run folder adds latents_index.json (a copy of the latents' index.json) and, when the run
stops (max_steps or time limit), likelihood.json (`mri_vqvae.training.likelihood`), scored with
checkpoints/best; best is the lowest val bits per latent. Checkpoints (``kind`` = the prior's
kind) and run.json record the latents' provenance (`LatentIndex.provenance`), ``label_field``
and ``label_names`` (label i is class ``label_names[i]``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from mri_vqvae.artifacts.checkpoint import load_checkpoint
from mri_vqvae.artifacts.latents import INDEX as LATENTS_INDEX
from mri_vqvae.artifacts.latents import LatentIndex, load_latents
from mri_vqvae.config import ExperimentConfig, TrainConfig
from mri_vqvae.core import distributed
from mri_vqvae.core.atomic import atomic_write_bytes, atomic_write_text
from mri_vqvae.core.device import resolve_device
from mri_vqvae.core.seeding import seed_everything
from mri_vqvae.models import registry
from mri_vqvae.models.priors.base import Prior
from mri_vqvae.models.priors.settings import PriorSettings
from mri_vqvae.training.batching import check_world_size, dropout_seed, rank_keys
from mri_vqvae.training.errors import TrainingError
from mri_vqvae.training.likelihood import LN2, likelihood_report, mean_scores
from mri_vqvae.training.loop import TrainResult, run_stage
from mri_vqvae.training.prior_data import PriorData, load_prior_data
from mri_vqvae.training.resume import recorded_info, training_input
from mri_vqvae.training.session import Session

log = logging.getLogger(__name__)

LATENTS_COPY = "latents_index.json"  # a prior run's copy of its latents' index.json
LIKELIHOOD = "likelihood.json"
_PROVENANCE_CHECKED = ("vqvae_sha256", "latent_shape", "codebook_size")


class PriorLoss(nn.Module):
    """``prior.loss`` as a forward pass, so that DistributedDataParallel's hooks fire."""

    def __init__(self, prior: nn.Module) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """Codes (B, d, h, w), labels (B,) or None -> mean nats per latent (scalar)."""
        return cast(Prior, self.prior).loss(indices, labels)


@dataclass(kw_only=True)
class PriorStage:
    """`Stage` of a prior: the grids (and labels) of a latents folder."""

    train: TrainConfig
    model_config: PriorSettings
    model: nn.Module
    module: nn.Module
    data: PriorData
    name: str = "prior"
    section: str = "train_prior"
    model_section: str = "prior"
    best_key: str = "bits_per_latent"
    maximize: bool = False
    bar_keys: tuple[str, ...] = ("bits_per_latent",)
    stop_work_factor: float = 3.0  # the stop also scores val and test for likelihood.json

    @property
    def kind(self) -> str:
        return self.model_config.kind

    @property
    def n_train(self) -> int:
        return len(self.data.train)

    @property
    def n_val(self) -> int:
        return len(self.data.val)

    def batches(self, s: Session) -> Iterable[tuple[Tensor, Tensor | None]]:
        """(B, d, h, w) int64 grids and (B,) labels or None of each step left, in order."""
        train = self.data.train
        for step in range(s.step, self.train.max_steps):
            keys = rank_keys(step, self.n_train, self.train.batch_size, s.config.seed,
                             s.rank, s.world)
            rows = [i for _, i in keys]
            yield train.grids[rows], None if train.labels is None else train.labels[rows]

    def train_step(self, s: Session, batch: tuple[Tensor, Tensor | None]) -> dict[str, Tensor]:
        """One step; under DDP random draws come from an RNG forked per (seed, step, rank)."""
        if s.world <= 1:
            return self._step(s, batch)
        cuda = s.device.type == "cuda"
        with torch.random.fork_rng(devices=[s.device] if cuda else []):
            seed = dropout_seed(s.config.seed, s.step, s.rank)
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)  # this rank's device only
            return self._step(s, batch)

    def _step(self, s: Session, batch: tuple[Tensor, Tensor | None]) -> dict[str, Tensor]:
        grids, labels = batch
        grids = grids.to(s.device)
        labels = None if labels is None else labels.to(s.device)
        s.net.train()
        with s.autocast():
            loss = s.net(grids, labels)
        grad_norm = s.optimize(loss, grids.shape[0])
        mean = s.whole_batch({"loss": loss.detach()}, grids.shape[0])["loss"]
        return {"loss": mean, "bits_per_latent": mean / LN2, "grad_norm": grad_norm}

    def validate(self, s: Session) -> dict[str, float]:
        """Val bits per latent (and each stage's, for a prior with stages)."""
        bits, stages = mean_scores(self.model, self.data.val, self.train.batch_size, s.device,
                                   s.bf16)
        return {"loss": bits * LN2, "bits_per_latent": bits, "num_cases": self.n_val,
                **{f"{name}_bits_per_latent": value for name, value in stages.items()}}

    def describe(self, val: dict[str, float]) -> str:
        return f"val {val['bits_per_latent']:.4f} bits/latent"

    def extra(self) -> dict[str, Any]:
        return {**self.data.index.provenance(), "label_field": self.data.label_field,
                "label_names": list(self.data.label_names)}

    def resume_state(self) -> dict[str, Any]:
        """Nothing beyond the session's fields."""
        return {}

    def load_resume_state(self, state: dict[str, Any], step: int) -> None:
        """Nothing beyond the session's fields."""

    def check_resume(self, run_dir: Path, extra: dict[str, Any]) -> None:
        """Refuse latents of another VQ-VAE, or classes other than the run's."""
        latents = self.data.index
        ours = latents.provenance()
        changed = [k for k in _PROVENANCE_CHECKED if extra.get(k) != ours[k]]
        if changed:
            raise TrainingError(
                f"cannot resume {run_dir}: it was trained on latents of another VQ-VAE "
                f"({changed} differ from {latents.root}); resume with the latents it used "
                f"({extra.get('latents_dir')}) or start a new run"
            )
        names = list(extra.get("label_names") or [])
        if names != list(self.data.label_names):
            raise TrainingError(
                f"cannot resume {run_dir}: it was trained on the classes {names} of "
                f"prior.label_field, the latents in {latents.root} give "
                f"{list(self.data.label_names)}; resume with the latents it used or start a new run"
            )

    def on_start(self, s: Session, fresh: bool) -> None:
        """A fresh run prepares the prior on the train grids; rank 0 records the latents."""
        if fresh:
            train = self.data.train
            cast(Prior, self.model).prepare(train.grids, train.labels)
        if not s.is_main:
            return
        copy = s.run_dir / LATENTS_COPY
        if not copy.exists():
            atomic_write_bytes(copy, (self.data.index.root / LATENTS_INDEX).read_bytes())
        assert s.recorder is not None
        s.recorder.update(**self.extra())

    def after_step(self, s: Session, step: int, last: bool) -> None:
        """Nothing beyond validation and checkpoints."""

    def on_complete(self, s: Session, reason: str) -> dict[str, Any]:
        """Write likelihood.json (best checkpoint, else the final weights) and return it.

        Also after a time-limit stop (the figures of the best checkpoint so far; a resumed run
        rewrites them). Under DDP rank 0 computes and writes it; every rank returns rank 0's.
        """
        return distributed.broadcast_object(self._likelihood(s, reason) if s.is_main else {})

    def _likelihood(self, s: Session, reason: str) -> dict[str, Any]:
        model, step, used = self.model, s.step, s.last_dir
        if s.best_step is not None:
            model = load_checkpoint(s.best_dir).model.to(s.device)
            step, used = s.best_step, s.best_dir
        report = likelihood_report(model, self.data, self.train.batch_size, s.device, s.bf16)
        report = {"run": s.run_dir.name, "checkpoint": str(used.resolve()), "step": step,
                  "stop_reason": reason, **report}
        atomic_write_text(s.run_dir / LIKELIHOOD, json.dumps(report, indent=2) + "\n")
        assert s.recorder is not None
        s.recorder.update(likelihood=report["splits"])
        log.info("likelihood written to %s", s.run_dir / LIKELIHOOD)
        return report


def prior_config(config: ExperimentConfig, data: PriorData) -> PriorSettings:
    """``config.prior`` with codebook_size from the latents and num_classes from the labels."""
    cfg = config.prior
    k = data.index.codebook_size
    if cfg.codebook_size != k:
        log.info("prior.codebook_size=%d comes from the latents in %s (the config says %d)", k,
                 data.index.root, cfg.codebook_size)
    try:
        return type(cfg).model_validate(
            {**cfg.model_dump(), "codebook_size": k, "num_classes": data.num_classes})
    except ValidationError as exc:
        raise TrainingError(
            f"prior settings do not fit the latents in {data.index.root} (codebook_size={k}, "
            f"{data.num_classes} classes): {exc}"
        ) from None


def build_prior_stage(
    config: ExperimentConfig, index: LatentIndex, device: torch.device
) -> PriorStage:
    """Seeded prior on `device` plus the grids and labels; raises before any folder is made."""
    if config.data.model_dump(mode="json") != index.data:
        log.warning("config.data differs from the data config the latents were made with; the "
                    "prior records the latents' one (%s)", index.root / LATENTS_INDEX)
    data = load_prior_data(index, config.prior.label_field)
    tc = config.train_prior
    check_world_size(len(data.train), tc.batch_size, distributed.world_size(), "train_prior")
    model_config = prior_config(config, data)
    seed_everything(config.seed)
    model = registry.build_model(model_config).to(device)
    return PriorStage(train=tc, model_config=model_config, model=model, module=PriorLoss(model),
                      data=data)


def recorded_latents_dir(run_dir: str | Path) -> Path:
    """The latents folder a prior run recorded in its run.json (for a resume without one)."""
    recorded = recorded_info(run_dir).get("latents_dir")
    if not recorded:
        raise TrainingError(f"{Path(run_dir) / 'run.json'} records no latents_dir: is {run_dir} "
                            "a prior run?")
    return Path(recorded)


def train_prior(
    config: ExperimentConfig,
    latents_dir: str | Path | None,
    runs_root: str | Path = "runs",
    resume: str | Path | None = None,
    argv: list[str] | None = None,
) -> TrainResult:
    """Train (or continue) the prior of ``config.prior`` on the grids of a latents folder.

    Trains on the ``train`` grids, keeps checkpoints/best by the lowest val bits per latent and,
    when it stops, writes ``likelihood.json`` (val and test bits per latent beside the uniform
    and unigram baselines). With `resume` and no `latents_dir`, the run's own latents are used.
    A fresh run makes ``runs_root/prior/<UTC>-<config.name>-s<seed>/``; every error a user can
    cause (empty split, labels that cannot be made, tampered grids, nothing to resume) comes
    first.
    """
    started = time.monotonic()
    latents_dir = training_input(resume, latents_dir, recorded_latents_dir,
                                 "train-prior needs --latents DIR (made by `mri-vqvae encode`)")
    index = load_latents(latents_dir)
    device = resolve_device(config.train_prior.device, "train_prior.device")
    stage = build_prior_stage(config, index, device)
    s = Session.open(stage, config, device)
    return run_stage(s, started, runs_root, resume, argv=argv)
