"""Configuration of the two-level prior (section ``prior:`` with ``kind: twolevel``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mri_vqvae.models.priors.absorbing.config import AbsorbingConfig
from mri_vqvae.models.priors.pixelcnn.config import PixelCNNConfig
from mri_vqvae.models.priors.settings import PriorSettings


def _coarse_stage() -> PixelCNNConfig:
    """Whole-grid reach on an 8x10x8 coarse grid (offsets 1..11 along each axis), with position."""
    return PixelCNNConfig(num_layers=6, dilations=(1, 1, 2, 4, 2, 1), position_embedding=True)


def _fine_stage() -> PixelCNNConfig:
    """The plain PixelCNN's size, with position (where in its coarse block a latent sits)."""
    return PixelCNNConfig(position_embedding=True, dropout=0.1)


class TwoLevelConfig(PriorSettings):
    """A coarse PixelCNN over a grid of code clusters and a fine PixelCNN conditioned on it
    (`mri_vqvae.models.priors.twolevel.model.TwoLevelPrior`).

    The coarse grid is a function of the fine one (each ``factor``^3 block of codes mapped to one
    of ``coarse_codes`` clusters, fitted on the train grids), so both stages are trained as one
    model on the same grids. In ``coarse`` and ``fine`` the fields ``codebook_size``,
    ``num_classes``, ``label_field`` and ``context_dim`` are set by the two-level prior. The
    coarse stage is a PixelCNN or, with ``coarse.kind: absorbing``, masked-token diffusion
    (`mri_vqvae.models.priors.absorbing`), trained on ``coarse_masks`` masks per grid per step.
    """

    kind: Literal["twolevel"] = "twolevel"
    factor: int = Field(2, ge=2, description="fine latents per coarse latent along each axis")
    coarse_codes: int = Field(
        64, ge=2, description="clusters of code blocks: the coarse grid's codebook size"
    )
    code_features: int = Field(
        16, ge=1, description="dimensions of the code features the blocks are clustered by"
    )
    context_dim: int = Field(
        32, ge=1, description="width of the coarse-grid context added to every fine gated layer"
    )
    coarse_masks: int = Field(
        1, ge=1, le=64, description="masks drawn per coarse grid in each training step when the "
        "coarse stage is absorbing (its loss averages them; the stage is small, so more masks "
        "cost little and train it on more of each grid); 1 for a PixelCNN coarse stage",
    )
    coarse: PixelCNNConfig | AbsorbingConfig = Field(
        default_factory=_coarse_stage, discriminator="kind",
        description="the coarse stage: a PixelCNN (kind: pixelcnn, exact) or masked-token "
        "diffusion (kind: absorbing, an ELBO; draws the whole layout in a few parallel steps)",
    )
    fine: PixelCNNConfig = Field(default_factory=_fine_stage,
                                 description="the fine stage (a PixelCNN with context)")

    @model_validator(mode="before")
    @classmethod
    def _coarse_kind_defaults_to_pixelcnn(cls, data: Any) -> Any:
        """A ``coarse:`` mapping without ``kind`` (configs before the absorbing stage) is a
        PixelCNN's."""
        coarse = data.get("coarse") if isinstance(data, dict) else None
        if isinstance(coarse, dict) and "kind" not in coarse:
            return {**data, "coarse": {"kind": "pixelcnn", **coarse}}
        return data

    @model_validator(mode="after")
    def _features_fit_the_codebook(self) -> TwoLevelConfig:
        if self.code_features > self.codebook_size:
            raise ValueError(
                f"code_features={self.code_features} exceeds codebook_size={self.codebook_size}: "
                "a code's features are at most one per code; use at most the codebook size"
            )
        return self

    @model_validator(mode="after")
    def _masks_need_an_absorbing_coarse_stage(self) -> TwoLevelConfig:
        if self.coarse_masks > 1 and not isinstance(self.coarse, AbsorbingConfig):
            raise ValueError(
                f"coarse_masks={self.coarse_masks} applies to an absorbing coarse stage only; "
                "set coarse.kind: absorbing or coarse_masks: 1"
            )
        return self

    def coarse_config(self) -> PixelCNNConfig | AbsorbingConfig:
        """The coarse stage's settings with what the two-level prior decides filled in."""
        update = {"codebook_size": self.coarse_codes, "num_classes": self.num_classes,
                  "label_field": self.label_field, "top_k": None}
        if isinstance(self.coarse, PixelCNNConfig):
            update["context_dim"] = 0
        return self.coarse.model_copy(update=update)

    def fine_config(self) -> PixelCNNConfig:
        """The fine stage's settings with what the two-level prior decides filled in."""
        return self.fine.model_copy(update={
            "codebook_size": self.codebook_size, "num_classes": self.num_classes,
            "label_field": self.label_field, "context_dim": self.context_dim, "top_k": None})
