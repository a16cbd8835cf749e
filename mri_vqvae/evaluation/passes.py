"""The per-case passes of `mri-vqvae evaluate`: held-out scans, then training scans.

The held-out pass reconstructs each case once and keeps everything later steps use: its metrics
(`CaseQuality`), its volume (D, H, W) and code grid (d, h, w), pooled encoder features and, with
a prior, its bits per latent; for the first ``report_cases`` cases also the reconstruction and
the prior's bits map (each latent filling its voxel block), so the report needs no second pass.
The training pass scores the training grids under the prior, streams each training scan into
a `NearestScan` and sums the real scans (augmented copies left out when the evaluation says so),
in all and per group (their means are the plausibility checks' reference brains).

A conditional prior scores a case under the class named by its manifest field (``classes``:
case_id -> class index); a case whose class the prior does not know gets NaN bits (left out of
the statistics and counted). Under torchrun each rank takes a contiguous share of the sorted
cases; the shares are merged in rank order, so every rank ends with what one process computes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mri_vqvae.core import distributed
from mri_vqvae.core.errors import EvaluationError, MriVqvaeError, describe_error
from mri_vqvae.data.transforms import BRAIN, BRAIN_SHA256, LESION, LESION_SHA256, with_masks
from mri_vqvae.metrics.quality import CaseQuality, quality_of
from mri_vqvae.metrics.sets import FEATURE_GRID, NearestScan
from mri_vqvae.tasks.cases import Failure, iter_prepared, progress
from mri_vqvae.tasks.likelihood import block_upsample

if TYPE_CHECKING:
    from mri_vqvae.config import DataConfig
    from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
    from mri_vqvae.models.priors.base import Prior

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassSettings:
    """How the passes run: worker processes, a `preprocess` folder, strictness, views kept."""

    num_workers: int = 0
    preprocessed: str | None = None
    strict: bool = False
    report_cases: int = 4


@dataclass(frozen=True)
class Scorer:
    """A prior and the class index of each case it may score (None: an unconditional prior)."""

    prior: Prior
    classes: Mapping[str, int] | None = None

    def knows(self, case_id: str) -> bool:
        """Whether the prior can score `case_id` (always, when unconditional)."""
        return self.classes is None or case_id in self.classes

    def labels(self, case_id: str, device: torch.device) -> Tensor | None:
        """The (1,) class label of a case the prior knows; None when unconditional."""
        if self.classes is None:
            return None
        return torch.tensor([self.classes[case_id]], device=device)

    @torch.no_grad()
    def grid_bits(self, case_id: str, indices: Tensor) -> float:
        """Bits per latent of one grid (1, d, h, w); NaN when the case's class is unknown."""
        if not self.knows(case_id):
            log.warning("case %s has no class the prior knows: its bits are left out", case_id)
            return math.nan
        return float(self.prior.grid_bits(indices, self.labels(case_id, indices.device))[0])

    @torch.no_grad()
    def bits_map(self, case_id: str, indices: Tensor) -> np.ndarray | None:
        """-log2 p per latent (d, h, w) float32, or None (no map, or the class is unknown)."""
        if not self.knows(case_id):
            return None
        bits = self.prior.bits(indices, self.labels(case_id, indices.device))
        return None if bits is None else bits[0].float().cpu().numpy()


@dataclass(frozen=True)
class CaseView:
    """A held-out case shown in the report: volumes (X, Y, Z) on the preprocessed grid.

    ``bits_map`` is the prior's -log2 p per latent, each latent filling its voxel block (None
    without a prior, or when the prior has no per-latent map).
    """

    quality: CaseQuality
    image: np.ndarray
    reconstruction: np.ndarray
    bits_map: np.ndarray | None = None
    mean_bits: float | None = None


@dataclass(frozen=True)
class LesionCase:
    """A held-out case with a lesion mask: the mask (X, Y, Z) bool on the preprocessed grid,
    its code grid (d, h, w), the prior's -log2 p per latent (d, h, w; None: no map) and the
    brain mask (X, Y, Z) bool where the manifest records one."""

    case_id: str
    lesion: np.ndarray
    indices: Tensor
    latent_bits: np.ndarray | None
    brain: np.ndarray | None = None


@dataclass
class HeldOut:
    """What the held-out pass kept, one entry per evaluated case in case order (``views``: the
    first ``report_cases``); ``bits`` only with a prior."""

    cases: list[CaseQuality] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    volumes: list[np.ndarray] = field(default_factory=list)
    indices: list[Tensor] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    bits: list[float] = field(default_factory=list)
    views: list[CaseView] = field(default_factory=list)
    lesions: list[LesionCase] = field(default_factory=list)


@dataclass
class TrainPass:
    """Bits per latent and code grid (d, h, w) of each scored training case, failures, and the
    running sums of the reference scans read: over all of them (key None) and per group (the
    value of the prior's label field, e.g. each contrast, when the pass was given groups)."""

    bits: list[float] = field(default_factory=list)
    grids: list[Tensor] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    sums: dict[str | None, tuple[np.ndarray, int]] = field(default_factory=dict)

    def add_volume(self, volume: np.ndarray, group: str | None = None) -> None:
        """Add a scan (D, H, W) to the sum of all scans and, with `group`, of its group."""
        v = np.asarray(volume, np.float64)
        for key in {None, group}:
            total, count = self.sums.get(key, (np.zeros_like(v), 0))
            self.sums[key] = (total + v, count + 1)

    def merge_sums(self, other: dict[str | None, tuple[np.ndarray, int]]) -> None:
        """Add another share's sums (same keys meaning the same groups)."""
        for key, (total, count) in other.items():
            mine, n = self.sums.get(key, (np.zeros_like(total), 0))
            self.sums[key] = (mine + total, n + count)

    @property
    def num_volumes(self) -> int:
        """How many training scans were read."""
        return self.sums.get(None, (None, 0))[1]

    def mean_volume(self, group: str | None = None) -> np.ndarray | None:
        """The mean (D, H, W) float32 of the training scans read (of `group`); None if none."""
        total, count = self.sums.get(group, (None, 0))
        return None if total is None or not count else (total / count).astype(np.float32)

    def group_means(self) -> dict[str, np.ndarray]:
        """The mean scan of every group read (empty when the pass had no groups)."""
        return {k: m for k in self.sums if k is not None
                and (m := self.mean_volume(k)) is not None}


def held_out_pass(model: VQVAE, data: DataConfig, items: list[dict[str, Any]],
                  scorer: Scorer | None, s: PassSettings, device: torch.device) -> HeldOut:
    """Metrics, grids, features, bits and report views of every held-out case (see module doc).

    A strict stop (`EvaluationError` naming the case) on any rank stops every rank.
    """
    if not distributed.is_distributed():
        return _held_out(model, data, items, scorer, s, device)
    error: str | None = None
    try:
        mine = _held_out(model, data, distributed.shard(items), scorer, s, device)
    except EvaluationError as exc:
        mine, error = HeldOut(), str(exc)
    log.info("rank %d of %d: evaluated %d held-out case(s), %d failed", distributed.rank(),
             distributed.world_size(), len(mine.cases), len(mine.failures))
    own = tuple(getattr(mine, f.name) for f in fields(mine))
    *parts, error = distributed.merge_shards((*own, error))
    if error is not None:
        raise EvaluationError(error)
    held = HeldOut(*parts)
    held.views = held.views[: s.report_cases]
    return held


@torch.no_grad()
def _held_out(model: VQVAE, data: DataConfig, items: list[dict[str, Any]],
              scorer: Scorer | None, s: PassSettings, device: torch.device) -> HeldOut:
    held = HeldOut()
    with progress(len(items), "evaluate held-out") as bar:
        for prepared in iter_prepared(items, data, s.num_workers, s.preprocessed):
            bar.update(1)
            item = prepared.item
            try:
                if prepared.error is not None:
                    raise EvaluationError(prepared.error)
                assert prepared.volume is not None
                target = torch.from_numpy(prepared.volume)[None, None].to(device)
                z_e = model.encode(target)
                q = model.quantize(z_e)
                recon = model.decode(q.quantized).float()
                quality = quality_of(recon.cpu(), target.cpu(), item, q.indices)
            except (MriVqvaeError, OSError, RuntimeError, ValueError) as exc:
                reason = describe_error(exc)
                if s.strict:
                    raise EvaluationError(f"case {item['case_id']} ({item['image']}): {reason}"
                                          ) from None
                log.warning("skipping %s: %s", item["case_id"], reason)
                held.failures.append(Failure(item["case_id"], item["image"], reason))
                continue
            held.cases.append(quality)
            held.volumes.append(prepared.volume)
            held.indices.append(q.indices[0].cpu())
            held.features.append(F.adaptive_avg_pool3d(z_e.float(), FEATURE_GRID)
                                 .flatten(1)[0].cpu().numpy())
            bits = math.nan if scorer is None else scorer.grid_bits(quality.case_id, q.indices)
            if scorer is not None:
                held.bits.append(bits)
            view = len(held.views) < s.report_cases
            lesion = scorer is not None and LESION in item
            latent = scorer.bits_map(quality.case_id, q.indices) \
                if scorer is not None and (view or lesion) else None  # one map for both uses
            if lesion:
                _add_lesion(held, item, data, latent, q.indices)
            if view:
                held.views.append(CaseView(
                    quality, prepared.volume, recon[0, 0].clamp(0, 1).cpu().numpy(),
                    None if latent is None else block_upsample(latent, model.factor),
                    None if scorer is None else bits))
    return held


def _add_lesion(held: HeldOut, item: dict[str, Any], data: DataConfig,
                latent: np.ndarray | None, indices: Tensor) -> None:
    """Keep the case's lesion mask (and brain mask, if any), preprocessed onto its grid, with the
    prior's map `latent` (d, h, w); a lesion mask that cannot be read is logged and left out, a
    brain mask that cannot be read is logged and the head region used (the case itself was
    evaluated either way)."""
    masks = _preprocessed_masks(item, data)
    if masks is None:
        return
    lesion, brain = masks
    held.lesions.append(LesionCase(
        str(item["case_id"]), np.asarray(lesion[0].detach().cpu()) > 0.5, indices[0].cpu(),
        latent, None if brain is None else np.asarray(brain[0].detach().cpu()) > 0.5))


def _preprocessed_masks(item: dict[str, Any], data: DataConfig
                        ) -> tuple[Tensor, Tensor | None] | None:
    """(lesion, brain or None) masks (1, D, H, W) of a case in one pass of the preprocessing
    chain; the lesion alone when the brain mask fails; None (logged) when the lesion fails."""
    case_id = str(item["case_id"])
    brain_error = None
    if BRAIN in item:
        try:
            both = with_masks(data, {LESION: LESION_SHA256, BRAIN: BRAIN_SHA256})(dict(item))
            return both[LESION], both[BRAIN]
        except Exception as exc:  # a bad annotation never fails the case it annotates
            brain_error = describe_error(exc)
    try:
        lesion = with_masks(data)(dict(item))[LESION]
    except Exception as exc:  # likewise
        log.warning("lesion mask of %s left out: %s", case_id, describe_error(exc))
        return None
    if brain_error is not None:
        log.warning("brain mask of %s left out (its lesion is scored against the head): %s",
                    case_id, brain_error)
    return lesion, None


def train_pass(model: VQVAE, scorer: Scorer, data: DataConfig, items: list[dict[str, Any]],
               nearest: NearestScan, s: PassSettings, device: torch.device,
               groups: Mapping[str, str] | None = None,
               reference_cases: Collection[str] | None = None) -> TrainPass:
    """Bits per latent and grids of each training case; streams every scan into `nearest` and
    the scans of `reference_cases` (None: all) into the sums (per group: ``groups`` maps
    case_id -> group).

    Under torchrun each rank streams its share into its copy of `nearest`; the copies merge in
    rank order with the same strict ``>`` as one stream, so ties keep the earliest training case.
    """
    if not distributed.is_distributed():
        return _train(model, scorer, data, items, nearest, s, device, groups or {},
                      reference_cases)
    mine = _train(model, scorer, data, distributed.shard(items), nearest, s, device,
                  groups or {}, reference_cases)
    bits, grids, failures, found, sums = distributed.merge_shards(
        (mine.bits, mine.grids, mine.failures, [(nearest.best, nearest.best_id)],
         [mine.sums]))
    nearest.best = np.full(len(nearest.queries), -np.inf)
    nearest.best_id = [None] * len(nearest.queries)
    for best, best_id in found:  # one (best, best_id) per rank, in rank order
        for i in np.flatnonzero(best > nearest.best):
            nearest.best[i] = float(best[i])
            nearest.best_id[i] = best_id[i]
    merged = TrainPass(bits, grids, failures)
    for share in sums:  # one dict of sums per rank
        merged.merge_sums(share)
    return merged


@torch.no_grad()
def _train(model: VQVAE, scorer: Scorer, data: DataConfig, items: list[dict[str, Any]],
           nearest: NearestScan, s: PassSettings, device: torch.device,
           groups: Mapping[str, str], reference_cases: Collection[str] | None) -> TrainPass:
    done = TrainPass()
    with progress(len(items), "train grids") as bar:
        for prepared in iter_prepared(items, data, s.num_workers, s.preprocessed):
            bar.update(1)
            item = prepared.item
            if prepared.error is not None or prepared.volume is None:
                log.warning("skipping training case %s: %s", item["case_id"], prepared.error)
                done.failures.append(Failure(item["case_id"], item["image"], str(prepared.error)))
                continue
            x = torch.from_numpy(prepared.volume)[None, None].to(device)
            indices = model.encode_indices(x)
            done.bits.append(scorer.grid_bits(str(item["case_id"]), indices))
            done.grids.append(indices[0].cpu())
            nearest.update(str(item["case_id"]), prepared.volume)
            if reference_cases is None or str(item["case_id"]) in reference_cases:
                done.add_volume(prepared.volume, groups.get(str(item["case_id"])))
    return done
