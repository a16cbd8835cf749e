"""The pretrained model that ships inside the package: an `mri-vqvae export` folder.

``brain64_cohort``: the brain64 VQ-VAE (64x80x64 at 2.5 mm -> 16x20x16 codes of 512) trained
8,800 steps on the offline kit with the MS cohort (T1w, T2w, FLAIR), and a 3D gated PixelCNN prior
over its codes conditioned on the contrast. Its README.md is the model card (training data,
licences, held-out metrics with n, intended use, limits); its manifest.json the training manifest
(`mri_vqvae.artifacts.export.training_manifest` opens it over a local kit);
``scripts/train_pretrained.sh`` is the command that made it. About 12 MB (fp32 safetensors).
"""

from __future__ import annotations

from pathlib import Path

from mri_vqvae.core.errors import MriVqvaeError

NAMES = ("brain64_cohort",)
DEFAULT = "brain64_cohort"


def pretrained_path(name: str = DEFAULT) -> Path:
    """The export folder of the shipped model `name` (one of `NAMES`)."""
    if name not in NAMES:
        raise MriVqvaeError(f"no pretrained model {name!r}; shipped: {', '.join(NAMES)}")
    folder = Path(__file__).resolve().parent / name
    if not (folder / "export.json").is_file():
        raise MriVqvaeError(
            f"the pretrained model {name!r} is missing from {folder}: this installation was built "
            "without its package data; reinstall mri-vqvae from the repository or a wheel"
        )
    return folder
