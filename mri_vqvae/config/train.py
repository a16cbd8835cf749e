"""The ``train_vqvae:`` and ``train_prior:`` sections: one training run each."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from mri_vqvae.config.fields import ADDED
from mri_vqvae.core.strict import StrictModel


class TrainConfig(StrictModel):
    """One training run (`mri_vqvae.training.loop`): ``train_vqvae`` and ``train_prior`` sections.

    Progress is counted in optimizer steps (one batch each): the run stops after ``max_steps``.
    An epoch is ``ceil(train cases / batch_size)`` steps, one pass over a seeded permutation of
    the train split; every ``*_every`` period is in steps. The VQ-VAE's loss is the
    reconstruction loss (``loss``) plus the model's commitment loss. The prior's loss is the
    cross-entropy of the code grids (``loss``, ``preview_every`` and ``cache_dir`` do not apply
    to it; ``batch_size`` counts code grids).
    """

    max_steps: int = Field(20_000, ge=1, description="optimizer steps to train for")
    batch_size: int = Field(2, ge=1, description="volumes per step")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate (the schedule's peak)")
    lr_schedule: Annotated[str, ADDED] = Field(
        "constant", description="constant | warmup_cosine (linear warm-up over warmup_steps, then "
        "cosine decay to lr * min_lr_ratio at max_steps; mri_vqvae.training.schedule)"
    )
    warmup_steps: Annotated[int, ADDED] = Field(
        0, ge=0, description="warm-up steps (warmup_cosine only)"
    )
    min_lr_ratio: Annotated[float, ADDED] = Field(
        0.0, ge=0, le=1, description="final lr / lr (warmup_cosine only)"
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    grad_clip: float | None = Field(
        1.0, gt=0, description="clip the global gradient norm to this; null = no clipping"
    )
    loss: str = Field("l1", description="reconstruction loss: l1 | mse")
    log_every: int = Field(10, ge=1, description="steps between train lines in metrics.jsonl")
    val_every: int = Field(500, ge=1, description="steps between validations (and at the end)")
    checkpoint_every: int = Field(
        500, ge=1, description="steps between checkpoints/last saves (and at the end)"
    )
    preview_every: int = Field(1000, ge=1, description="steps between preview montages")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: main process)")
    precision: str = Field(
        "auto",
        description="auto (bf16 autocast only where the device runs bf16 natively, else fp32; "
        "see mri_vqvae.core.precision) | fp32 | bf16 (forced; emulated and very slow on CPUs "
        "without native bf16)",
    )
    time_limit_minutes: float | None = Field(
        None,
        gt=0,
        description="wall-clock minutes from the command's start (data caching included); when "
        "exceeded, stop after the current step with a resumable checkpoint; null = no limit",
    )
    cache_dir: str | None = Field(
        None, description="PersistentDataset folder for preprocessed volumes; null = in memory"
    )
    device: str = Field("auto", description="auto (cuda when available) | cpu | cuda")

    @model_validator(mode="before")
    @classmethod
    def _bf16_alias(cls, data: Any) -> Any:
        """The former ``bf16: true|false`` key (older configs and run folders) -> precision."""
        if isinstance(data, dict) and "bf16" in data:
            data = dict(data)
            flag = data.pop("bf16")
            if isinstance(flag, bool):  # given explicitly, it wins (an override of old configs)
                data["precision"] = "bf16" if flag else "fp32"
            else:
                data["bf16"] = flag  # let validation name the bad value
        return data

    @field_validator("loss", "device", "precision", "lr_schedule")
    @classmethod
    def _known_choice(cls, v: str, info: Any) -> str:
        choices = {"loss": ("l1", "mse"), "device": ("auto", "cpu", "cuda"),
                   "precision": ("auto", "fp32", "bf16"),
                   "lr_schedule": ("constant", "warmup_cosine")}[info.field_name]
        if v not in choices:
            raise ValueError(f"{info.field_name} must be one of {choices}, got {v!r}")
        return v

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {v}")
        return v

    @field_validator("warmup_steps", "min_lr_ratio")
    @classmethod
    def _schedule_fits(cls, v: float, info: Any) -> float:
        if v and info.data.get("lr_schedule") == "constant":
            raise ValueError(f"{info.field_name} applies to lr_schedule=warmup_cosine only: set "
                             f"lr_schedule=warmup_cosine or leave {info.field_name} out")
        max_steps = info.data.get("max_steps")
        if info.field_name == "warmup_steps" and max_steps is not None and v >= max_steps:
            raise ValueError(f"warmup_steps must be below max_steps={max_steps}: the cosine "
                             "decay needs at least one step")
        return v


class AutoencoderTrainConfig(TrainConfig):
    """The ``train_vqvae`` section: `TrainConfig` plus an optional adversarial term.

    With ``adversarial_weight`` > 0 a 3D patch discriminator (MONAI ``PatchDiscriminator``,
    instance norm) joins at ``adversarial_start_step``: from then on the loss adds ``weight`` times
    the generator's ``PatchAdversarialLoss`` and the discriminator takes its own AdamW step
    (``discriminator_lr``, scaled by the same schedule); see mri_vqvae.training.adversarial.
    """

    adversarial_weight: Annotated[float, ADDED] = Field(
        0.0, ge=0, description="weight of the adversarial term; 0 = off (no discriminator)"
    )
    adversarial_start_step: Annotated[int, ADDED] = Field(
        0, ge=0, description="steps trained before the discriminator and its term join"
    )
    adversarial_loss: Annotated[str, ADDED] = Field(
        "least_squares", description="least_squares | hinge"
    )
    discriminator_lr: Annotated[float, ADDED] = Field(
        2e-4, gt=0, description="discriminator AdamW peak rate"
    )
    discriminator_channels: Annotated[int, ADDED] = Field(
        32, ge=1, description="first layer's channels"
    )
    discriminator_layers: Annotated[int, ADDED] = Field(
        3, ge=1, description="strided conv layers (patch size)"
    )

    @field_validator("adversarial_loss")
    @classmethod
    def _known_criterion(cls, v: str) -> str:
        if v not in ("least_squares", "hinge"):
            raise ValueError(f"adversarial_loss must be least_squares or hinge, got {v!r}")
        return v

    @field_validator("adversarial_start_step")
    @classmethod
    def _discriminator_joins(cls, v: int, info: Any) -> int:
        max_steps = info.data.get("max_steps")
        if info.data.get("adversarial_weight", 0) > 0 and max_steps is not None and v >= max_steps:
            raise ValueError(f"must be below max_steps={max_steps}, or the discriminator never "
                             "joins; lower it or set adversarial_weight=0")
        return v
