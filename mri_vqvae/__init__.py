"""mri-vqvae: discrete latent models of 3D MRI (manifests, MONAI preprocessing, VQ-VAE, prior).

``mri_vqvae.load(path)`` opens a run or export folder and ``mri_vqvae.pretrained()`` the model
shipped in the package (`mri_vqvae.api`). They are imported on first use, so importing the package
(and ``mri-vqvae --help``) does not load torch or MONAI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load", "pretrained"]

if TYPE_CHECKING:
    from mri_vqvae.api import load, pretrained


def __getattr__(name: str) -> Any:
    if name in ("load", "pretrained"):
        from mri_vqvae import api

        return getattr(api, name)
    raise AttributeError(f"module 'mri_vqvae' has no attribute {name!r}")
