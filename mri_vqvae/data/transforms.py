"""The MONAI transform chain: the only module that builds MONAI transforms.

Deterministic chain (every split), on the key ``"image"``::

    LoadCased → EnsureChannelFirstd → Orientationd("RAS") → Spacingd(spacing)
    → CropForegroundd → ScaleIntensityRangePercentilesd(→ [0, 1]) → ResizeWithPadOrCropd(shape)

`LoadCased` takes the whole item, not just the path. For a manifest case (the item carries
``"root"`` and ``"sha256"``, see `mri_vqvae.data.datasets.case_items`) every source file must
resolve
inside the data root and the content must hash to the manifest's sha256, or the case fails with
a `ManifestError` naming the file. NIfTI is parsed from the very bytes that were hashed (one
read). DICOM (pydicom) and NRRD/MetaImage (SimpleITK) readers take paths, so those files are
verified and then read again from their paths: a second read, and a file swapped on disk between
the two reads would not be caught. An item without ``"sha256"`` / ``"root"`` (a user's single
scan) is read unverified. Before any voxel is read, the grid after `Spacingd` (estimated from the
header) must stay within ``data.max_voxels``; the header's shape must reach ``data.min_size`` on
every axis. The output equals MONAI's ``LoadImaged(reader=MriReader(...))``: a MetaTensor with
geometry-only metadata.

Intensity scaling runs before the final pad so padded voxels are exactly 0, the background value.
Training appends the named random steps of `AugmentConfig` (affine, elastic, bias_field, contrast,
noise, then the domain randomisation steps low_resolution, thick_slices, histogram_shift, gibbs,
kspace_spikes and the left-right mirror, off by default); `set_random_state(seed)` on the
returned Compose makes them replayable. With gibbs or kspace_spikes on, intensities are clipped
back to [0, 1] after them.
Output: ``data["image"]`` is a MetaTensor (1, D, H, W), float32, RAS, whose ``.affine`` is the
voxel-to-world (RAS mm) matrix of the output grid.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImage,
    MapTransform,
    Orientationd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    RandGibbsNoised,
    RandHistogramShiftd,
    RandKSpaceSpikeNoised,
    RandomizableTransform,
    RandSimulateLowResolutiond,
    Resize,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from monai.utils import convert_to_dst_type, convert_to_tensor

from mri_vqvae.config import AugmentConfig, DataConfig
from mri_vqvae.data.io import DEFAULT_MAX_SHEAR, DEFAULT_MAX_VOXELS, DEFAULT_MIN_SIZE, MriReader

IMAGE = "image"
LESION = "lesion_mask"  # an item's lesion label volume (path, then MetaTensor); nonzero = lesion
LESION_SHA256 = "lesion_sha256"  # its checksum (MONAI reads keys starting "lesion_mask_" as meta)
BRAIN = "brain_mask"  # an item's brain mask (path, then MetaTensor); nonzero = brain
BRAIN_SHA256 = "brain_sha256"
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # explicit: silences a MONAI default change


def foreground(x: torch.Tensor) -> torch.Tensor:
    """Foreground mask for cropping: voxels above 10% of the 99th intensity percentile.

    A relative threshold because MRI background holds Rician noise, not zeros.
    """
    flat = x.reshape(-1).float()
    if flat.numel() > 1_000_000:  # quantile() has an input-size limit; a strided subsample suffices
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    return x > 0.1 * torch.quantile(flat, 0.99)


class LoadCased(MapTransform):
    """Load the image of one dataset item, verified when the item is a manifest case.

    Reads ``item[key]`` (a path) through `MriReader`, made per item with the item's ``"root"``,
    ``"sha256"`` and ``"series_uid"`` (each may be absent): with root and sha256 the files are
    confined and verified (see the module docstring), else read as given. Header limits:
    `max_voxels`, `max_shear`, `min_size`, and with `spacing` (target mm, RAS order, as given to
    `Spacingd`) the resampled grid must stay within `max_voxels`. Every other key, ``"sha256"``
    included, passes through unchanged, so the digest recorded downstream is the verified one.
    Output: ``item[key]`` is the MetaTensor ``LoadImaged(key, reader=MriReader(...))`` gives.
    """

    def __init__(
        self,
        keys: KeysCollection = IMAGE,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        max_shear: float = DEFAULT_MAX_SHEAR,
        min_size: int = DEFAULT_MIN_SIZE,
        spacing: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
        sha256_key: str = "sha256",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.sha256_key = sha256_key
        self.max_voxels = int(max_voxels)
        self.max_shear = float(max_shear)
        self.min_size = int(min_size)
        self.spacing = None if spacing is None else tuple(float(v) for v in spacing)
        # MONAI's own loader does the array -> MetaTensor step, so the output is LoadImaged's
        self._loader = LoadImage(reader=MriReader(), image_only=True, dtype=np.float32)

    @classmethod
    def from_config(cls, data: DataConfig, keys: KeysCollection = IMAGE,
                    sha256_key: str = "sha256") -> LoadCased:
        """The limits of `data`: max_voxels, max_shear, min_size, and its target spacing;
        files are verified against ``item[sha256_key]``."""
        return cls(keys, data.max_voxels, data.max_shear, data.min_size, data.spacing,
                   sha256_key=sha256_key)

    def reader_for(self, item: Mapping[Hashable, Any]) -> MriReader:
        """The reader of one item: these limits plus the item's root, sha256 and series_uid."""
        root, sha256 = item.get("root"), item.get(self.sha256_key)
        return MriReader(
            self.max_voxels,
            self.max_shear,
            min_size=self.min_size,
            spacing=self.spacing,
            root=None if root is None else str(root),
            sha256=None if sha256 is None else str(sha256),
            series_uid=item.get("series_uid"),
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reader = self.reader_for(d)
        for key in self.key_iterator(d):
            d[key] = self._loader(d[key], reader)
        return d


def preprocessing_steps(data: DataConfig, masks: Mapping[str, str] | None = None
                        ) -> list[tuple[str, MapTransform]]:
    """The deterministic chain as (name, transform) pairs, in order.

    `masks` maps label keys to the keys of their checksums (e.g. ``{LESION: LESION_SHA256}``);
    each label is carried through every geometric step with nearest-neighbour resampling. The
    image's output is the same with or without them (the crop box comes from the image alone).
    """
    masks = dict(masks or {})
    keys = [IMAGE, *masks]
    steps: list[tuple[str, MapTransform]] = [
        ("load", LoadCased.from_config(data)),
        *[(f"load_{m}", LoadCased.from_config(data, m, digest)) for m, digest in masks.items()],
        ("channel_first", EnsureChannelFirstd(keys, channel_dim="no_channel")),
        ("orientation", Orientationd(keys, axcodes="RAS", labels=RAS_LABELS)),
        ("spacing", Spacingd(keys, pixdim=data.spacing,
                             mode=["bilinear", *["nearest"] * len(masks)], dtype=np.float32)),
    ]
    if data.crop_foreground:
        steps.append(
            (
                "crop_foreground",
                CropForegroundd(
                    keys, source_key=IMAGE, select_fn=foreground, margin=data.foreground_margin
                ),
            )
        )
    low, high = data.percentiles
    steps += [
        (
            "scale_intensity",
            ScaleIntensityRangePercentilesd(IMAGE, low, high, b_min=0.0, b_max=1.0, clip=True),
        ),
        ("pad_or_crop", ResizeWithPadOrCropd(keys, spatial_size=data.spatial_size)),
        ("float32", EnsureTyped(keys, dtype=torch.float32)),
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
    steps = [(name, t) for name, prob, t in candidates if prob > 0]
    steps += domain_randomisation_steps(aug)
    if aug.left_right_mirror.prob > 0:
        steps.append(("left_right_mirror", RandLeftRightMirrord(IMAGE, aug.left_right_mirror.prob)))
    return steps


class RandLeftRightMirrord(RandomizableTransform, MapTransform):
    """With probability `prob`, the head mirrored left to right on the same grid.

    Flips the first spatial axis of (C, D, H, W) (left-right on the chain's RAS grid) and keeps
    the metadata: the affine still maps the grid to RAS, so the image is a mirrored head, not the
    same head described by a flipped affine (what MONAI's `RandFlipd` would record).
    """

    def __init__(self, keys: KeysCollection, prob: float, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            for key in self.key_iterator(d):
                mirrored = convert_to_tensor(d[key], track_meta=False).flip(1)
                d[key] = convert_to_dst_type(mirrored, d[key])[0]
        return d


class RandThickSlicesd(RandomizableTransform, MapTransform):
    """Thick slices along one random axis: the anisotropic low resolution of clinical scans.

    With probability `prob` draws an axis of (C, D, H, W) and a factor f in `factor_range`,
    averages that axis down to ``round(n / f)`` slices (MONAI `Resize`, mode "area": each slice
    the mean of a slab f voxels thick) and resamples it back to n (linear). The other two axes
    are untouched; shape, dtype and metadata (affine) stay the input's.
    """

    def __init__(self, keys: KeysCollection, factor_range: tuple[float, float], prob: float,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.factor_range = factor_range
        self.axis, self.factor = 0, 1.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.axis = int(self.R.randint(3))
            self.factor = float(self.R.uniform(*self.factor_range))

    def thick(self, img: torch.Tensor) -> torch.Tensor:
        """(C, D, H, W) -> the same grid, `self.axis` averaged over slabs of `self.factor`."""
        shape = tuple(int(n) for n in img.shape[1:])
        slabs = list(shape)
        slabs[self.axis] = max(1, round(shape[self.axis] / self.factor))
        plain = convert_to_tensor(img, track_meta=False)
        down = Resize(slabs, mode="area")(plain)
        back = Resize(shape, mode="trilinear")(down)
        return convert_to_dst_type(convert_to_tensor(back, track_meta=False), img)[0]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = self.thick(d[key])
        return d


def domain_randomisation_steps(aug: AugmentConfig) -> list[tuple[str, MapTransform]]:
    """The enabled domain randomisation steps of `aug`, in order, clipped back to [0, 1] after
    the k-space ones (Gibbs ringing and spikes overshoot)."""
    low, thick, hist = aug.low_resolution, aug.thick_slices, aug.histogram_shift
    gibbs, spikes = aug.gibbs, aug.kspace_spikes
    candidates: list[tuple[str, float, MapTransform]] = [
        ("low_resolution", low.prob,
         RandSimulateLowResolutiond(IMAGE, prob=low.prob, zoom_range=low.zoom)),
        ("thick_slices", thick.prob, RandThickSlicesd(IMAGE, thick.factor, thick.prob)),
        ("histogram_shift", hist.prob,
         RandHistogramShiftd(IMAGE, num_control_points=hist.control_points, prob=hist.prob)),
        ("gibbs", gibbs.prob, RandGibbsNoised(IMAGE, prob=gibbs.prob, alpha=gibbs.alpha)),
        ("kspace_spikes", spikes.prob,
         RandKSpaceSpikeNoised(IMAGE, prob=spikes.prob, intensity_range=spikes.log_intensity)),
    ]
    steps = [(name, t) for name, prob, t in candidates if prob > 0]
    if gibbs.prob > 0 or spikes.prob > 0:
        steps.append(("clip_unit_range", ScaleIntensityRanged(IMAGE, 0.0, 1.0, 0.0, 1.0,
                                                              clip=True)))
    return steps


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


def with_masks(data: DataConfig, masks: Mapping[str, str] | None = None) -> Compose:
    """The deterministic chain carrying label volumes along (default the lesion mask; see
    `preprocessing_steps`): ``out[mask]`` is (1, D, H, W) on the image's output grid."""
    return Compose([t for _, t in preprocessing_steps(data, masks or {LESION: LESION_SHA256})])


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
            LoadCased(IMAGE, spacing=(spacing, spacing, spacing)),
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
