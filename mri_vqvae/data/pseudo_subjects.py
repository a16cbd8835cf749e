"""The kit's pseudo-subjects: seeded augmented copies of a template, written as NIfTI.

Each copy runs the training augmentation with every anatomy and contrast step switched on
(`kit_augmentation`) through `mri_vqvae.data.transforms.pseudo_subject_chain`, with a fixed
number of torch threads so that its bytes do not depend on the machine's core count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mri_vqvae.config import DOMAIN_RANDOMISATION, AugmentConfig, KitConfig
from mri_vqvae.core.device import cpu_threads
from mri_vqvae.data.transforms import pseudo_subject_chain
from mri_vqvae.data.writers import write_nifti


def kit_augmentation(augment: AugmentConfig) -> AugmentConfig:
    """The training augmentation with every anatomy and contrast step switched on (each
    pseudo-subject differs) and domain randomisation at its defaults (off): a training-time
    step, so configs differing only there share one kit."""
    return augment.model_copy(
        update={
            name: getattr(augment, name).model_copy(update={"prob": 1.0})
            for name in ("affine", "elastic", "bias_field", "contrast")
        }
        | {name: AugmentConfig.model_fields[name].default for name in DOMAIN_RANDOMISATION}
        | {"enabled": True}
    )


PSEUDO_SUBJECT_THREADS = 2
"""torch threads that compute every pseudo-subject, whatever the machine's core count: the
resampling and smoothing of the augmentation round differently with another thread count (with
1 thread all 32 copies differed in bytes from 2 threads), and 2 is what the kits of the shipped
model and of CI were built with. The bytes still depend on the CPU's instruction set (AVX2 against
AVX-512: 7 of 32 copies differ), which the manifest digest shows; real cases are pinned by
sha256."""


def make_pseudo_subject(source: Path, out: Path, kit: KitConfig, augment: AugmentConfig,
                        seed: int) -> None:
    """Write one augmented copy of `source` (RAS, `kit.spacing` mm, intensities in [0, 1])."""
    chain = pseudo_subject_chain(kit.spacing, kit_augmentation(augment), seed)
    with cpu_threads(torch.device("cpu"), PSEUDO_SUBJECT_THREADS):
        image = chain({"image": str(source)})["image"]  # MetaTensor (1, X, Y, Z)
    volume = image[0].detach().cpu().numpy().clip(0, None)
    write_nifti(out, volume, np.asarray(image.affine, dtype=np.float64))
