"""Augmented views of train cases (`mri-vqvae encode --augment N`): more grids for the prior.

Each train case is also encoded as N views: its preprocessed volume through the training
augmentation the VQ-VAE run's checkpoint recorded (every view a new pose; other steps at their
training probabilities unless overridden), reseeded per view from (seed, case_id, view) so a view
is replayable on any run, rank or machine. The augmentation's digest and seed go into the latents
header, so a rerun with other view settings is refused rather than mixed.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose
from pydantic import ValidationError

from mri_vqvae.artifacts.checkpoint_folder import read_meta
from mri_vqvae.artifacts.latents import LatentsError
from mri_vqvae.artifacts.loading import AutoencoderRun
from mri_vqvae.config import AugmentConfig, apply_overrides, config_digest
from mri_vqvae.data.datasets import plain_volume
from mri_vqvae.data.transforms import IMAGE, augment_only, augmentation_steps

_VIEW_STREAM = 3  # seed stream of views, apart from training's item / permutation / dropout ones


def view_seed(seed: int, case_id: str, view: int) -> int:
    """The augmentation seed of view `view` of case `case_id` under config `seed`, in [0, 2**32).

    A pure function of its arguments: every run, resume, rank and machine draws the same view.
    """
    case_word = int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "little")
    words = [int(seed) & 0xFFFF_FFFF_FFFF_FFFF, _VIEW_STREAM, case_word, int(view)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


@dataclass(frozen=True)
class Views:
    """N augmented views per train case (`count` 0: none), drawn by the random training steps
    `chain` of `augment`, reseeded per view from (`seed`, case_id, view)."""

    count: int = 0
    augment: AugmentConfig | None = None
    seed: int = 0
    chain: Compose | None = field(default=None, repr=False, compare=False)

    def of(self, item: Mapping[str, Any]) -> list[int]:
        """The views of a case item: [0] (itself), then 1..count when it is a train case."""
        return list(range(self.count + 1 if item["split"] == "train" else 1))

    def header(self) -> dict[str, Any]:
        """The index.json fields of the views (none without views)."""
        if self.augment is None:
            return {}
        return {"augment_views": self.count, "augment_digest": config_digest(self.augment),
                "augment_seed": self.seed}

    def volume(self, prepped: Mapping[str, Any], case_id: str, view: int) -> torch.Tensor:
        """View `view` >= 1 of a preprocessed item: a copy through the seeded steps.

        -> (1, D, H, W) float32.
        """
        if self.chain is None:
            raise ValueError(f"view {view} of {case_id!r} asked for without an augmentation")
        self.chain.set_random_state(seed=view_seed(self.seed, case_id, view))
        return plain_volume(self.chain(copy.deepcopy(dict(prepped)))[IMAGE])


def training_views(source: AutoencoderRun, count: int, overrides: Sequence[str] = ()) -> Views:
    """`count` views drawn with the augmentation and seed the run's checkpoint recorded.

    The affine step fires for every view (its probability set to 1): each view is a new pose of
    the case; the other steps keep their training probabilities unless `overrides` (``key=value``
    under the ``augment`` section, e.g. ``elastic.prob=1.0``) change them.

    Raises `LatentsError` when `count` > 0 and the checkpoint records no usable ``augment``
    section and ``seed``, or its augmentation draws nothing (every view would be the case).
    """
    if count == 0:
        if overrides:
            raise LatentsError(f"view settings {list(overrides)} change the augmented views: "
                               "they need --augment N with N > 0")
        return Views()
    where = source.checkpoint / "config.json"
    experiment = (read_meta(source.checkpoint).get("extra") or {}).get("experiment")
    try:
        augment = AugmentConfig.model_validate(experiment["augment"])  # type: ignore[index]
        seed = int(experiment["seed"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise LatentsError(
            f"{where} records no usable training augmentation (extra.experiment.augment and "
            f".seed: {str(exc)[:200]}); --augment needs a run saved by `mri-vqvae train-vqvae`"
        ) from None
    # every view draws a new pose (affine step always on): a view equal to its case is wasted
    augment = augment.model_copy(update={"affine": augment.affine.model_copy(update={"prob": 1.0})})
    augment = apply_overrides(augment, overrides, "the view settings (--view-set)")
    if not augmentation_steps(augment):
        raise LatentsError(
            f"{where}: the run's augmentation is switched off (augment.enabled false or every "
            "prob 0), so each view would equal its case; encode with --augment 0"
        )
    return Views(count, augment, seed, augment_only(augment, seed=0))
