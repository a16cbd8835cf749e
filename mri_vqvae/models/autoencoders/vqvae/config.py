"""Configuration of the 3D VQ-VAE (section ``autoencoder:`` with ``kind: vqvae``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from mri_vqvae.core.strict import StrictModel


class VQVAEConfig(StrictModel):
    """The 3D VQ-VAE (`mri_vqvae.models.autoencoders.vqvae.model.VQVAE`) and its EMA codebook
    (`mri_vqvae.models.autoencoders.vqvae.quantizer`).

    The latent grid is ``data.spatial_size // 2**levels`` per axis, so every axis of
    ``data.spatial_size`` must be a multiple of ``2**levels``.
    """

    kind: Literal["vqvae"] = "vqvae"
    levels: int = Field(
        3,
        ge=1,
        le=3,
        description="stride-2 downsamplings: 1 -> 2x, 2 -> 4x, 3 -> 8x smaller per axis",
    )
    channels: tuple[int, ...] = Field(
        (32, 64, 128),
        validate_default=True,
        description="feature channels of each level, finest first (one per level)",
    )
    num_res_layers: int = Field(2, ge=0, description="residual units after each downsampling")
    num_res_channels: tuple[int, ...] = Field(
        (32, 64, 128),
        validate_default=True,
        description="hidden channels inside the residual units of each level",
    )
    residual_kernels: tuple[int, int] = Field(
        (3, 1),
        description="kernel sizes of the two convolutions of a residual unit; (3, 1) is the "
        "original VQ-VAE unit and measured faster, (3, 3) is MONAI's",
    )
    activation: str = Field("relu", description="relu | leaky_relu | silu | gelu")
    norm: str = Field("none", description="none | group (GroupNorm with 8 groups)")
    upsample: str = Field(
        "transpose", description="transpose (4^3 transposed conv) | nearest (upsample + 3^3 conv)"
    )
    codebook_size: int = Field(512, ge=2, description="number of codes K")
    embedding_dim: int = Field(64, ge=1, description="length D of each code vector")
    commitment_cost: float = Field(0.25, ge=0, description="weight of ||z_e - sg(z_q)||^2")
    ema_decay: float = Field(
        0.99, ge=0, lt=1, description="EMA decay of code counts and sums (0: batch means)"
    )
    ema_epsilon: float = Field(1e-5, gt=0, description="Laplace smoothing of the EMA counts")
    dead_code_threshold: float = Field(
        0.03,
        ge=0,
        description="a code is dead when, over the last revival_interval steps, it was used "
        "fewer than this fraction of the average code's uses; 0 disables revival",
    )
    revival_interval: int = Field(
        50, ge=1, description="training steps between dead-code checks (the usage window)"
    )
    kmeans_init: bool = Field(
        True, description="initialise the codebook by k-means on the first training batch"
    )
    kmeans_iters: int = Field(10, ge=1, description="Lloyd iterations of the k-means init")
    gradient_checkpointing: bool = Field(
        False, description="recompute each level's activations in backward (less memory)"
    )
    channels_last: bool = Field(
        True, description="run convolutions in channels_last_3d (measured faster on CPU)"
    )

    @field_validator("channels", "num_res_channels")
    @classmethod
    def _match_levels(cls, v: tuple[int, ...], info: Any) -> tuple[int, ...]:
        levels = info.data.get("levels")
        if levels is not None and len(v) != levels:
            raise ValueError(
                f"needs one entry per level: levels={levels} but got {len(v)} entries {v}; "
                f"give {levels} values or change vqvae.levels"
            )
        if min(v, default=1) <= 0:
            raise ValueError(f"channel counts must be positive, got {v}")
        return v

    @field_validator("residual_kernels")
    @classmethod
    def _odd_kernels(cls, v: tuple[int, int]) -> tuple[int, int]:
        if any(k <= 0 or k % 2 == 0 for k in v):
            raise ValueError(f"residual kernels must be positive odd sizes, got {v}")
        return v

    @field_validator("activation", "norm", "upsample")
    @classmethod
    def _known_choice(cls, v: str, info: Any) -> str:
        choices = {
            "activation": ("relu", "leaky_relu", "silu", "gelu"),
            "norm": ("none", "group"),
            "upsample": ("transpose", "nearest"),
        }[info.field_name]
        if v not in choices:
            raise ValueError(f"{info.field_name} must be one of {choices}, got {v!r}")
        widths = info.data.get("channels", ()) + info.data.get("num_res_channels", ())
        if v == "group" and any(c % 8 for c in widths):
            raise ValueError(
                f"norm='group' uses 8 groups: every channel count must be a multiple of 8, "
                f"got {widths}"
            )
        return v
