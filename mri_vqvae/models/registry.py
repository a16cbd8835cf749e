"""Every model kind: its role, its config class and how to build it. Checkpoints ask here.

Adding a model is one folder under ``models/autoencoders`` or ``models/priors``, one config class
(a pydantic model with a ``kind`` literal) and one line in `KINDS`. Config classes are imported
eagerly (pydantic only); model code is imported only when a model is built, so reading a config
never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from mri_vqvae.core.errors import CheckpointError
from mri_vqvae.models.autoencoders.vqvae.config import VQVAEConfig
from mri_vqvae.models.priors.absorbing.config import AbsorbingConfig
from mri_vqvae.models.priors.pixelcnn.config import PixelCNNConfig
from mri_vqvae.models.priors.twolevel.config import TwoLevelConfig
from mri_vqvae.models.priors.unigram.config import UnigramConfig

Role = Literal["autoencoder", "prior"]


@dataclass(frozen=True)
class ModelKind:
    """One registered model: ``builder`` and ``numel`` are ``"module:attribute"`` paths."""

    name: str
    role: Role
    config: type[BaseModel]
    builder: str  # callable(config) -> nn.Module
    numel: str  # callable(config) -> int: values in the model's state_dict, without building it

    def build(self, config: BaseModel) -> Any:
        """The model for a validated `config` (an ``nn.Module``)."""
        return _attribute(self.builder)(config)

    def state_numel(self) -> Callable[[Any], int]:
        """The function that counts state_dict values from a config alone."""
        return _attribute(self.numel)


KINDS: dict[str, ModelKind] = {
    k.name: k
    for k in (
        ModelKind("vqvae", "autoencoder", VQVAEConfig,
                  "mri_vqvae.models.autoencoders.vqvae.model:VQVAE",
                  "mri_vqvae.models.autoencoders.vqvae.model:state_numel"),
        ModelKind("pixelcnn", "prior", PixelCNNConfig,
                  "mri_vqvae.models.priors.pixelcnn.model:GatedPixelCNN3D",
                  "mri_vqvae.models.priors.pixelcnn.model:state_numel"),
        ModelKind("unigram", "prior", UnigramConfig,
                  "mri_vqvae.models.priors.unigram.model:UnigramPrior",
                  "mri_vqvae.models.priors.unigram.model:state_numel"),
        ModelKind("absorbing", "prior", AbsorbingConfig,
                  "mri_vqvae.models.priors.absorbing.model:AbsorbingPrior",
                  "mri_vqvae.models.priors.absorbing.network:state_numel"),
        ModelKind("twolevel", "prior", TwoLevelConfig,
                  "mri_vqvae.models.priors.twolevel.model:TwoLevelPrior",
                  "mri_vqvae.models.priors.twolevel.model:state_numel"),
    )
}
LEGACY_KINDS = {"prior": "pixelcnn"}
"""Checkpoint kinds written before the registry existed, and the kind they are now."""


def _attribute(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def config_classes(role: Role) -> tuple[type[BaseModel], ...]:
    """The config classes of every kind with `role`, in registry order."""
    return tuple(k.config for k in KINDS.values() if k.role == role)


def model_kind(name: str) -> ModelKind:
    """The registered kind `name` (legacy checkpoint kinds included); `CheckpointError` if none."""
    kind = KINDS.get(LEGACY_KINDS.get(name, name))
    if kind is None:
        raise CheckpointError(
            f"unknown model kind {name!r}: this version knows {sorted(KINDS)}; the checkpoint "
            "was written by a newer or foreign tool"
        )
    return kind


def build_model(config: BaseModel) -> Any:
    """The model a validated config (with its ``kind``) describes."""
    return model_kind(config.kind).build(config)  # type: ignore[attr-defined]
