"""What a prior trains and is scored on: the code grids of each split and, when labelled, classes.

The grids come from a latents folder (`mri_vqvae.artifacts.latents`), held in memory as int64;
no augmentation. With ``prior.label_field`` set (``modality`` or ``source_id``), each grid's
class is that field of its case as `encode` recorded it; the classes are the sorted distinct
values over the train grids, and label ``i`` is ``label_names[i]``. A grid without the value, or
a val / test grid of a class no train grid has, is refused before any folder is made.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mri_vqvae.artifacts.latents import LatentIndex
from mri_vqvae.core.errors import listed
from mri_vqvae.training.errors import TrainingError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PriorSplit:
    """One split: grids (N, d, h, w) int64, labels (N,) int64 or None, and their case ids."""

    grids: Tensor
    labels: Tensor | None
    case_ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.case_ids)


@dataclass(frozen=True)
class PriorData:
    """The splits of a latents folder; ``label_names[i]`` is the class of label i (() = none)."""

    index: LatentIndex
    label_field: str | None
    label_names: tuple[str, ...]
    splits: dict[str, PriorSplit]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def train(self) -> PriorSplit:
        return self.splits["train"]

    @property
    def val(self) -> PriorSplit:
        return self.splits["val"]


def _label_values(index: LatentIndex, field: str) -> dict[str, str]:
    """``case_id -> value of field`` for the cases of every split; refuses cases that lack it."""
    cases = [c for split in SPLITS for c in index.split_cases(split)]
    missing = [c for c in cases if not getattr(c, field)]
    if missing:
        names = listed([c.case_id for c in missing])
        raise TrainingError(
            f"prior.label_field={field!r} but {len(missing)} case(s) of the latents in "
            f"{index.root} record no {field}: {names}; re-encode them with this version "
            f"(`mri-vqvae encode` records modality and source_id per case) or set "
            f"prior.label_field=null"
        )
    return {c.case_id: str(getattr(c, field)) for c in cases}


def class_labels(index: LatentIndex, field: str) -> tuple[tuple[str, ...], dict[str, int]]:
    """The classes of `field` (sorted distinct values over the train grids) and each case's
    label, its index among them.

    Raises `TrainingError` when a case lacks the value or a val / test case holds a class no
    train case has (a prior cannot score a class it never saw).
    """
    values = _label_values(index, field)
    names = tuple(sorted({values[c.case_id] for c in index.split_cases("train")}))
    unseen = [c for split in SPLITS[1:] for c in index.split_cases(split)
              if values[c.case_id] not in names]
    if unseen:
        found = sorted({values[c.case_id] for c in unseen})
        cases = listed([c.case_id for c in unseen])
        raise TrainingError(
            f"prior.label_field={field!r}: case(s) {cases} of val/test hold {field} "
            f"{found}, which no train case has (train classes {list(names)}); a prior cannot "
            f"score a class it never saw: move such cases to train, or set prior.label_field=null"
        )
    return names, {cid: names.index(v) for cid, v in values.items()}


def _split(index: LatentIndex, split: str, labels: dict[str, int] | None) -> PriorSplit:
    cases = index.split_cases(split)
    grids = torch.from_numpy(index.stack(split).astype(np.int64))
    ids = tuple(c.case_id for c in cases)
    label = None if labels is None else torch.tensor([labels[i] for i in ids], dtype=torch.long)
    return PriorSplit(grids=grids, labels=label, case_ids=ids)


def load_prior_data(index: LatentIndex, label_field: str | None) -> PriorData:
    """Every split of `index`, labelled by `label_field` (None: unlabelled).

    Raises `TrainingError` when train or val has no grids, or labels cannot be made.
    """
    for split in SPLITS[:2]:
        if not index.split_cases(split):
            counts = dict(Counter(c.split for c in index.cases))
            raise TrainingError(
                f"latents folder {index.root} has no {split!r} grids (cases per split {counts}): "
                "train-prior trains on 'train' and validates on 'val'; encode both splits "
                "(`mri-vqvae encode` without --split)"
            )
    names: tuple[str, ...] = ()
    labels = None
    if label_field is not None:
        names, labels = class_labels(index, label_field)
    splits = {split: _split(index, split, labels) for split in SPLITS}
    return PriorData(index=index, label_field=label_field, label_names=names, splits=splits)
