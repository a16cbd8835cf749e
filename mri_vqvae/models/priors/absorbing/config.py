"""Configuration of the absorbing-state diffusion prior (``prior:`` with ``kind: absorbing``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mri_vqvae.models.priors.settings import PriorSettings


class AbsorbingConfig(PriorSettings):
    """Masked-token (absorbing-state) diffusion over code grids
    (`mri_vqvae.models.priors.absorbing.model.AbsorbingPrior`).

    A bidirectional 3D network reads the grid with some codes replaced by a MASK token and
    predicts every code; it works at the latent resolution (``channels``) and at half of it
    (``coarse_channels``, where the optional self-attention sees the whole grid).
    """

    kind: Literal["absorbing"] = "absorbing"
    channels: int = Field(64, ge=1, description="width at the latent resolution")
    coarse_channels: int = Field(128, ge=1, description="width at half the latent resolution")
    fine_blocks: int = Field(
        1, ge=0, description="residual 3x3x3 blocks at the latent resolution, before and after "
        "the coarse level (each)",
    )
    coarse_blocks: int = Field(2, ge=0, description="residual 3x3x3 blocks at the coarse level")
    attention_heads: int = Field(
        4, ge=0, description="heads of the self-attention over every coarse position; 0 = none"
    )
    max_grid_size: int = Field(
        64, ge=1, description="largest latent grid extent per axis the position tables cover"
    )
    sample_steps: int = Field(
        12, ge=1, description="default number of parallel decoding steps of `sample`"
    )
    bound_levels: int = Field(
        6, ge=1, description="masking ratios of the deterministic ELBO estimate (bits): more is "
        "closer to the bound and slower (about 4 forwards per level)",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> AbsorbingConfig:
        if self.attention_heads and self.coarse_channels % self.attention_heads:
            raise ValueError(
                f"attention_heads={self.attention_heads} must divide coarse_channels="
                f"{self.coarse_channels}; pick a divisor or set attention_heads: 0"
            )
        return self
