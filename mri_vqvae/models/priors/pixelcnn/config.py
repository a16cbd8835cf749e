"""Configuration of the 3D gated PixelCNN prior (section ``prior:`` with ``kind: pixelcnn``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mri_vqvae.models.priors.settings import PriorSettings


class PixelCNNConfig(PriorSettings):
    """The 3D gated PixelCNN (`mri_vqvae.models.priors.pixelcnn.model.GatedPixelCNN3D`).

    Each stack reaches ``(kernel_size // 2) * sum(dilations)`` latents back along its axis
    (``num_layers * (kernel_size // 2)`` without dilations), so the defaults cover a 16^3 latent
    grid with half its extent as context per axis. With k = 3 a stack reaches back exactly the
    offsets ``1 + (a subset sum of the later layers' dilations)``: ``[1, 1, 2, 4, 8, 4]`` (reach
    20, no gaps) is the shortest schedule under which every latent of a 16x20x16 grid sees every
    earlier one.
    """

    kind: Literal["pixelcnn"] = "pixelcnn"
    embedding_dim: int = Field(32, ge=1, description="width of the learned input-code embedding")
    hidden_channels: int = Field(64, ge=1, description="channels C of each causal stack")
    num_layers: int = Field(8, ge=1, description="gated layers; the first uses mask A")
    kernel_size: int = Field(3, ge=3, description="odd size k of the causal convolution window")
    head_channels: int = Field(128, ge=1, description="hidden width of the 1x1 output head")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the width-stack gate output")
    dilations: tuple[int, ...] | None = Field(
        None,
        description="dilation of each gated layer's causal stacks (num_layers entries, the first "
        "1), e.g. [1, 2, 4, 8, 1, 2, 4, 8]; null = all 1",
    )
    position_embedding: bool = Field(
        False,
        description="add a learned embedding of the absolute latent position (z, y, x) to every "
        "gated layer (grids up to max_grid_size per axis)",
    )
    max_grid_size: int = Field(
        64, ge=1, description="largest latent grid extent per axis the position embedding covers"
    )
    context_dim: int = Field(
        0, ge=0, description="width of a given per-position context map added to every gated "
        "layer (the two-level prior's coarse grid); 0 = none",
    )

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the window is centred), got {v}")
        return v

    @model_validator(mode="after")
    def _dilation_schedule(self) -> PixelCNNConfig:
        if self.dilations is None:
            return self
        if len(self.dilations) != self.num_layers:
            raise ValueError(
                f"dilations needs one entry per layer: num_layers={self.num_layers}, got "
                f"{len(self.dilations)} ({list(self.dilations)})"
            )
        if any(r < 1 for r in self.dilations):
            raise ValueError(f"dilations must be integers >= 1, got {list(self.dilations)}")
        if self.dilations[0] != 1:
            raise ValueError(
                f"the first (mask-A) layer's dilation must be 1, got {self.dilations[0]}: a "
                "dilated mask-A layer never sees the latents right before each position"
            )
        return self

    def layer_dilations(self) -> tuple[int, ...]:
        """The dilation of each gated layer (all 1 when ``dilations`` is null)."""
        return self.dilations if self.dilations is not None else (1,) * self.num_layers
