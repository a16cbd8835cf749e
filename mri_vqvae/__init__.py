"""mri-vqvae: discrete latent models of 3D MRI (manifests, MONAI preprocessing, VQ-VAE, prior).

``mri_vqvae.load(path)`` opens a run or export folder (`mri_vqvae.api`). It is imported on first
use, so importing the package (and ``mri-vqvae --help``) does not load torch or MONAI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]

if TYPE_CHECKING:
    from mri_vqvae.api import load


def __getattr__(name: str) -> Any:
    if name == "load":
        from mri_vqvae.api import load

        return load
    raise AttributeError(f"module 'mri_vqvae' has no attribute {name!r}")
