"""Configuration of the 3D gated PixelCNN prior (section ``prior:`` with ``kind: pixelcnn``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from mri_vqvae.models.priors.settings import PriorSettings


class PixelCNNConfig(PriorSettings):
    """The 3D gated PixelCNN (`mri_vqvae.models.priors.pixelcnn.model.GatedPixelCNN3D`).

    Each stack reaches ``num_layers * (kernel_size // 2)`` latents back along its axis, so the
    defaults cover a 16^3 latent grid with half its extent as context per axis.
    """

    kind: Literal["pixelcnn"] = "pixelcnn"
    embedding_dim: int = Field(32, ge=1, description="width of the learned input-code embedding")
    hidden_channels: int = Field(64, ge=1, description="channels C of each causal stack")
    num_layers: int = Field(8, ge=1, description="gated layers; the first uses mask A")
    kernel_size: int = Field(3, ge=3, description="odd size k of the causal convolution window")
    head_channels: int = Field(128, ge=1, description="hidden width of the 1x1 output head")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the width-stack gate output")

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the window is centred), got {v}")
        return v
