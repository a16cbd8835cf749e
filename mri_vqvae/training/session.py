"""What a training stage is (`Stage`) and the state of one run of it (`Session`).

A stage is an explicit object: its train config section, its model and model config, its
checkpoint kind, its data, one optimizer step and one validation, plus the outputs it adds to the
run folder. The shared loop (`mri_vqvae.training.loop`) drives any stage through a `Session`,
which holds what every run has: optimizer, device, precision, step, best metric, rank and world,
and under DDP the DistributedDataParallel wrapper. `mri_vqvae.training.resume` saves and restores
a session.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mri_vqvae.artifacts.runs import RunRecorder
from mri_vqvae.config import ExperimentConfig, TrainConfig
from mri_vqvae.core import distributed
from mri_vqvae.core.precision import Precision, resolve_precision
from mri_vqvae.training.batching import epoch_of, global_batch_size, share_weight, whole_batch
from mri_vqvae.training.schedule import lr_factor, set_lr


class Stage(Protocol):
    """One kind of training run, as the shared loop sees it.

    ``name`` names the run subfolder, run.json's stage and the command (``train-<name>``);
    ``train`` is its train config section, called ``section`` (e.g. ``train_prior``);
    ``model_config`` is the config its checkpoints record, from config section ``model_section``;
    ``kind`` is the checkpoint kind. ``model`` is the bare module (validation, checkpoints);
    ``module`` is what a training step runs and DDP wraps (``model`` itself or a wrapper of it).
    checkpoints/best keeps the best validation ``best_key`` (highest when ``maximize``);
    ``bar_keys`` are the train terms the progress bar shows; ``stop_work_factor`` is the cost of
    the work done at a stop, in validations.
    """

    name: str
    section: str
    train: TrainConfig
    model_section: str
    model_config: BaseModel
    kind: str
    model: nn.Module
    module: nn.Module
    best_key: str
    maximize: bool
    bar_keys: tuple[str, ...]
    stop_work_factor: float
    n_train: int
    n_val: int

    def batches(self, s: Session) -> Iterable[Any]:
        """The batches of steps ``s.step .. max_steps - 1`` in order (this rank's shares)."""
        ...

    def train_step(self, s: Session, batch: Any) -> dict[str, Tensor]:
        """One optimizer step (`Session.optimize`): detached scalar terms of the whole batch."""
        ...

    def validate(self, s: Session) -> dict[str, float]:
        """Validation values, ``best_key`` among them (rank 0 only)."""
        ...

    def describe(self, val: dict[str, float]) -> str:
        """One log line about a validation."""
        ...

    def extra(self) -> dict[str, Any]:
        """What its checkpoints record besides the common fields."""
        ...

    def resume_state(self) -> dict[str, Any]:
        """What checkpoints/last's resume state holds for it beyond the session's fields
        (tensors and plain values only)."""
        ...

    def load_resume_state(self, state: dict[str, Any], step: int) -> None:
        """Take back what `resume_state` saved (`state` is the whole resume state, at `step`)."""
        ...

    def check_resume(self, run_dir: Path, extra: dict[str, Any]) -> None:
        """Raise `TrainingError` when checkpoints/last (its `extra`) cannot continue here."""
        ...

    def on_start(self, s: Session, fresh: bool) -> None:
        """Once the run folder is open (`fresh`: not a resume); draws no random numbers."""
        ...

    def after_step(self, s: Session, step: int, last: bool) -> None:
        """Outputs due after `step` (rank 0, before checkpoints/last is saved)."""
        ...

    def on_complete(self, s: Session, reason: str) -> dict[str, Any] | None:
        """After the last step; returns a summary for `TrainResult.likelihood` (or None)."""
        ...


def _no_buffer_sync() -> dict[str, bool]:
    """DDP keyword that turns off the per-forward buffer broadcast (renamed in newer torch)."""
    params = inspect.signature(DistributedDataParallel).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {key: False}


@dataclass(kw_only=True)
class Session:
    """One run of `stage`; ``step`` counts completed optimizer steps.

    Under DDP ``stage.model`` stays the bare module and ``ddp`` wraps ``stage.module`` for the
    training steps; ``rank`` / ``world`` say where this process stands.
    """

    stage: Stage
    config: ExperimentConfig
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: Precision
    rank: int = 0
    world: int = 1
    run_dir: Path = Path()
    recorder: RunRecorder | None = None
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    ddp: DistributedDataParallel | None = None
    val_seconds: float | None = None  # measured duration of the last validation
    save_seconds: float | None = None  # measured duration of the last checkpoints/last save

    @classmethod
    def open(cls, stage: Stage, config: ExperimentConfig, device: torch.device) -> Session:
        """A session at step 0 with a fresh AdamW over ``stage.model`` (already on `device`)."""
        tc = stage.train
        optimizer = torch.optim.AdamW(stage.model.parameters(), lr=tc.lr, betas=tc.betas,
                                      weight_decay=tc.weight_decay)
        return cls(stage=stage, config=config, optimizer=optimizer, device=device,
                   precision=resolve_precision(tc.precision, device),
                   rank=distributed.rank(), world=distributed.world_size())

    @property
    def tc(self) -> TrainConfig:
        """The stage's train config section."""
        return self.stage.train

    @property
    def model(self) -> nn.Module:
        return self.stage.model

    @property
    def bf16(self) -> bool:
        """bfloat16 autocast in this run's steps and validations (`precision`)."""
        return self.precision.bf16

    @property
    def net(self) -> nn.Module:
        """The module a training step runs: the DDP wrapper under DDP, else ``stage.module``."""
        return self.ddp if self.ddp is not None else self.stage.module

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates and writes."""
        return self.rank == 0

    @property
    def last_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "last"

    @property
    def best_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "best"

    def autocast(self) -> Any:
        """bfloat16 autocast when `bf16`, else a context that changes nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def epoch_of(self, step: int) -> int:
        """Epoch of the batch trained as 1-based `step`."""
        return epoch_of(step, self.stage.n_train, self.tc.batch_size)

    def batch_total(self, step: int) -> int | None:
        """Items in the whole batch of 0-based `step` under DDP (None in one process)."""
        if self.world <= 1:
            return None
        return global_batch_size(step, self.stage.n_train, self.tc.batch_size)

    def optimize(self, loss: Tensor, local: int) -> Tensor:
        """`descend` with the run's optimizer over ``net``'s parameters at rate ``lr``."""
        return self.descend(self.optimizer, self.net, loss, local, self.tc.lr)

    def descend(self, optimizer: torch.optim.Optimizer, net: nn.Module, loss: Tensor,
                local: int, base_lr: float) -> Tensor:
        """Backward of `loss` (the mean over this rank's `local` items, weighted so that DDP's
        average is the whole batch's gradient), clip `net`'s gradients, one `optimizer` step at
        `base_lr` times the schedule's factor for this step; returns the gradient norm."""
        set_lr(optimizer, base_lr * lr_factor(self.tc, self.step))
        optimizer.zero_grad(set_to_none=True)
        weight = share_weight(local, self.batch_total(self.step))
        (loss if weight == 1.0 else loss * weight).backward()
        max_norm = self.tc.grad_clip if self.tc.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
        optimizer.step()
        return grad_norm.detach()

    def whole_batch(self, terms: dict[str, Tensor], local: int) -> dict[str, Tensor]:
        """The whole batch's means of this rank's share means `terms` (`local` items)."""
        return whole_batch(terms, local, self.batch_total(self.step))

    def wrap(self) -> None:
        """Wrap ``stage.module`` in DDP (a no-op in one process); after any resume has loaded it."""
        if self.world > 1:
            self.ddp = self.distributed(self.stage.module)

    def distributed(self, module: nn.Module) -> DistributedDataParallel:
        """`module` in DDP on this rank's device.

        Buffers are not broadcast at each forward: the only ones, the quantizer's, are kept
        identical by the quantizer itself (the discriminator has none).
        """
        ids = [self.device.index] if self.device.type == "cuda" else None
        # channels_last 1x1x1 conv weights: their size-1 dims give grads other (equivalent)
        # strides than DDP's bucket views, and DDP warns about it; the layout is the same.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return DistributedDataParallel(module, device_ids=ids, **_no_buffer_sync())

    def is_better(self, value: float) -> bool:
        """Whether validation `value` beats the best so far (NaN never does)."""
        if math.isnan(value):
            return False
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.stage.maximize else value < self.best_metric
