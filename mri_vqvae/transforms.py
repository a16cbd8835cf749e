"""The MONAI transform chain: the only module that builds MONAI transforms.

Deterministic chain (every split), on the key ``"image"``::

    LoadImaged(MriReader) → EnsureChannelFirstd → Orientationd("RAS") → Spacingd(spacing)
    → CropForegroundd → ScaleIntensityRangePercentilesd(→ [0, 1]) → ResizeWithPadOrCropd(shape)

Intensity scaling runs before the final pad so padded voxels are exactly 0, the background value.
Training appends the named random steps of `AugmentConfig` (affine, elastic, bias_field, contrast,
noise); `set_random_state(seed)` on the returned Compose makes them replayable.
Output: ``data["image"]`` is a MetaTensor (1, D, H, W), float32, RAS, whose ``.affine`` is the
voxel-to-world (RAS mm) matrix of the output grid.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from mri_vqvae.config import AugmentConfig, DataConfig
from mri_vqvae.io import MriReader

IMAGE = "image"
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # explicit: silences a MONAI default change


def foreground(x: torch.Tensor) -> torch.Tensor:
    """Foreground mask for cropping: voxels above 10% of the 99th intensity percentile.

    A relative threshold because MRI background holds Rician noise, not zeros.
    """
    flat = x.reshape(-1).float()
    if flat.numel() > 1_000_000:  # quantile() has an input-size limit; a strided subsample suffices
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    return x > 0.1 * torch.quantile(flat, 0.99)


def preprocessing_steps(data: DataConfig) -> list[tuple[str, MapTransform]]:
    """The deterministic chain as (name, transform) pairs, in order."""
    steps: list[tuple[str, MapTransform]] = [
        ("load", LoadImaged(IMAGE, reader=MriReader(data.max_voxels, data.max_shear))),
        ("channel_first", EnsureChannelFirstd(IMAGE, channel_dim="no_channel")),
        ("orientation", Orientationd(IMAGE, axcodes="RAS", labels=RAS_LABELS)),
        ("spacing", Spacingd(IMAGE, pixdim=data.spacing, mode="bilinear", dtype=np.float32)),
    ]
    if data.crop_foreground:
        steps.append(
            (
                "crop_foreground",
                CropForegroundd(
                    IMAGE, source_key=IMAGE, select_fn=foreground, margin=data.foreground_margin
                ),
            )
        )
    low, high = data.percentiles
    steps += [
        (
            "scale_intensity",
            ScaleIntensityRangePercentilesd(IMAGE, low, high, b_min=0.0, b_max=1.0, clip=True),
        ),
        ("pad_or_crop", ResizeWithPadOrCropd(IMAGE, spatial_size=data.spatial_size)),
        ("float32", EnsureTyped(IMAGE, dtype=torch.float32)),
    ]
    return steps


def augmentation_steps(aug: AugmentConfig) -> list[tuple[str, MapTransform]]:
    """The named random training steps enabled in `aug` (probability > 0), in order."""
    if not aug.enabled:
        return []
    a, e = aug.affine, aug.elastic
    candidates: list[tuple[str, float, MapTransform]] = [
        (
            "affine",
            a.prob,
            RandAffined(
                IMAGE,
                prob=a.prob,
                rotate_range=[np.deg2rad(a.rotate_deg)] * 3,
                scale_range=[a.scale] * 3,
                translate_range=[a.translate_vox] * 3,
                padding_mode="zeros",
            ),
        ),
        (
            "elastic",
            e.prob,
            Rand3DElasticd(
                IMAGE,
                sigma_range=e.sigma,
                magnitude_range=e.magnitude,
                prob=e.prob,
                padding_mode="zeros",
            ),
        ),
        (
            "bias_field",
            aug.bias_field.prob,
            RandBiasFieldd(
                IMAGE, coeff_range=(0.0, aug.bias_field.coeff), prob=aug.bias_field.prob
            ),
        ),
        (
            "contrast",
            aug.contrast.prob,
            RandAdjustContrastd(IMAGE, prob=aug.contrast.prob, gamma=aug.contrast.gamma),
        ),
        (
            "noise",
            aug.noise.prob,
            RandGaussianNoised(IMAGE, prob=aug.noise.prob, std=aug.noise.std),
        ),
    ]
    return [(name, t) for name, prob, t in candidates if prob > 0]


def build_transforms(
    data: DataConfig, augment: AugmentConfig | None = None, train: bool = False, seed: int = 0
) -> Compose:
    """The full chain for one split; `train=True` appends the random steps seeded with `seed`."""
    steps = preprocessing_steps(data)
    if train and augment is not None:
        steps += augmentation_steps(augment)
        steps.append(("float32_out", EnsureTyped(IMAGE, dtype=torch.float32)))
    chain = Compose([t for _, t in steps])
    chain.set_random_state(seed=seed)
    return chain


def augment_only(augment: AugmentConfig, seed: int) -> Compose:
    """Just the random steps, seeded: applied to an already preprocessed ``{"image": ...}``."""
    chain = Compose([t for _, t in augmentation_steps(augment)] + [EnsureTyped(IMAGE)])
    chain.set_random_state(seed=seed)
    return chain


def pseudo_subject_chain(spacing: float, augment: AugmentConfig, seed: int) -> Compose:
    """Load → RAS → isotropic `spacing` → percentile scaling to [0, 1] → the random steps.

    Used by the offline kit to write augmented templates; seeded, so each one is replayable.
    """
    chain = Compose(
        [
            LoadImaged(IMAGE, reader=MriReader()),
            EnsureChannelFirstd(IMAGE, channel_dim="no_channel"),
            Orientationd(IMAGE, axcodes="RAS", labels=RAS_LABELS),
            Spacingd(IMAGE, pixdim=spacing, mode="bilinear", dtype=np.float32),
            ScaleIntensityRangePercentilesd(IMAGE, 0.5, 99.5, b_min=0.0, b_max=1.0, clip=True),
        ]
        + [t for _, t in augmentation_steps(augment)]
        + [EnsureTyped(IMAGE, dtype=torch.float32)]
    )
    chain.set_random_state(seed=seed)
    return chain
