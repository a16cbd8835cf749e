"""Two-level prior over code grids: p(codes) via a coarse grid of code clusters.

The coarse grid ``c = coarse_map(codes)`` (one of ``coarse_codes`` clusters per factor^3 block,
`mri_vqvae.models.priors.twolevel.coarse_map`) is modelled by a whole-grid PixelCNN or by
masked-token diffusion (`AbsorbingPrior`, ``coarse.kind: absorbing``), and the codes by a fine
PixelCNN that also sees the embedded coarse grid at every position (a non-causal 3x3x3 network
over the coarse grid, then repeated over each block: the context of `GatedPixelCNN3D`). The
coarse stage draws the layout of a head over the whole field of view; the fine stage only fills
each block in.

Likelihood: ``bits(codes) = -log2 p(c) - log2 p(codes | c)`` with ``c`` the map of ``codes``. The
fine stage may put some mass on grids whose map is not ``c``, so these values sum to at most one
over all grids: a valid code length and an upper bound on the sampler's own ``-log2 p``, reported
as ``"bound"`` (with an absorbing coarse stage ``-log2 p(c)`` is its ELBO, itself a bound).
`bits` spreads each coarse position's bits evenly over its block, so the map's mean is the grid's
total bits per fine latent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mri_vqvae.models import registry
from mri_vqvae.models.priors.base import (
    PositionwisePrior,
    PriorInputError,
    check_completion_mask,
    check_indices,
    check_labels,
)
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D
from mri_vqvae.models.priors.twolevel import coarse_map
from mri_vqvae.models.priors.twolevel.config import TwoLevelConfig


class TwoLevelPrior(PositionwisePrior):
    """``coarse`` models the cluster grid (B, d/f, h/f, w/f), ``fine`` the codes given it."""

    likelihood = "bound"

    def __init__(self, config: TwoLevelConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else TwoLevelConfig()
        self.config = cfg
        self.codebook_size = cfg.codebook_size
        self.num_classes = cfg.num_classes
        self.factor = cfg.factor
        self.coarse = registry.build_model(cfg.coarse_config())
        self.fine = GatedPixelCNN3D(cfg.fine_config())
        self.sample_options = tuple(dict.fromkeys(
            self.fine.sample_options + self.coarse.sample_options))
        width = cfg.context_dim
        self.coarse_embedding = nn.Embedding(cfg.coarse_codes, width)
        self.context_in = nn.Conv3d(width, width, 3, padding=1)
        self.context_out = nn.Conv3d(width, width, 3, padding=1)
        self.register_buffer("code_features", torch.zeros(cfg.codebook_size, cfg.code_features))
        self.register_buffer("centres", torch.zeros(cfg.coarse_codes, cfg.code_features))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    # ---- the coarse map ------------------------------------------------------------------------

    def prepare(self, train: Tensor, labels: Tensor | None) -> None:
        """Fit the coarse map (code features, cluster centres) on the train grids (N, d, h, w)."""
        train = check_indices(train, self.codebook_size)
        coarse_map.check_divisible(train.shape[1:], self.factor)
        cfg = self.config
        features = coarse_map.fit_code_features(train, cfg.codebook_size, cfg.code_features)
        blocks = coarse_map.block_features(train, features, self.factor)
        centres = coarse_map.kmeans(blocks.reshape(-1, blocks.shape[-1]), cfg.coarse_codes)
        self.code_features.copy_(features.to(self.code_features))
        self.centres.copy_(centres.to(self.centres))
        self.fitted.fill_(True)

    def coarse_grid(self, indices: Tensor) -> Tensor:
        """The cluster of each block: codes (B, d, h, w) -> (B, d/f, h/f, w/f) int64."""
        if not bool(self.fitted):
            raise PriorInputError(
                "this two-level prior has no coarse map yet: call prepare(train_grids, labels) "
                "(train-prior does) or load a trained checkpoint"
            )
        indices = check_indices(indices, self.codebook_size)
        return coarse_map.coarse_codes(indices, self.code_features, self.centres, self.factor)

    def context(self, coarse: Tensor) -> Tensor:
        """Fine-stage context of a cluster grid: (B, d', h', w') -> (B, f d', f h', f w', E_c)."""
        x = self.coarse_embedding(coarse).permute(0, 4, 1, 2, 3)
        x = self.context_out(F.relu(self.context_in(x)))
        return coarse_map.repeat_blocks(x, self.factor, first_axis=2).permute(0, 2, 3, 4, 1)

    # ---- the Prior protocol ---------------------------------------------------------------------

    def stage_maps(self, indices: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Coarse bits (B, d/f, h/f, w/f) and fine bits given the coarse grid (B, d, h, w)."""
        coarse = self.coarse_grid(indices)
        labels = check_labels(labels, indices.shape[0], self.num_classes)
        fine_bits = self.fine.bits(indices, labels, self.context(coarse))
        return self.coarse.bits(coarse, labels), fine_bits

    def stage_bits(self, indices: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Each stage's bits per fine latent, (B,) each; they sum to `grid_bits`."""
        coarse, fine = self.stage_maps(indices, labels)
        per_latent = coarse.flatten(1).sum(1) / fine[0].numel()
        return {"coarse": per_latent, "fine": fine.flatten(1).mean(1)}

    def loss(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """Training objective in nats per fine latent: the coarse stage's loss on the map (per
        coarse latent, so weighted by coarse / fine latents) plus the fine stage's mean NLL.

        With a PixelCNN coarse stage this is ``bits(...).mean() * ln 2``; an absorbing one
        contributes its masked cross-entropy averaged over ``coarse_masks`` masks per grid.
        """
        coarse = self.coarse_grid(indices)
        labels = check_labels(labels, indices.shape[0], self.num_classes)
        fine = self.fine.bits(indices, labels, self.context(coarse)).mean() * math.log(2.0)
        repeats = self.config.coarse_masks
        rough = self.coarse.loss(coarse.repeat(repeats, 1, 1, 1),
                                 None if labels is None else labels.repeat(repeats))
        return fine + rough * (coarse[0].numel() / indices[0].numel())

    def bits(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """Fine bits plus each block's coarse bits spread evenly: (B, d, h, w) float."""
        coarse, fine = self.stage_maps(indices, labels)
        spread = coarse_map.repeat_blocks(coarse / self.factor**3, self.factor, first_axis=1)
        return fine + spread

    @torch.no_grad()
    def sample(
        self,
        shape: Sequence[int],
        generator: torch.Generator,
        labels: Tensor | None = None,
        **options: Any,
    ) -> Tensor:
        """Draw the coarse grid, then the codes given it: ``shape`` (B, d, h, w) -> int64 codes.

        ``options`` (`sample_options`) go to each stage that takes them: ``temperature``,
        ``top_k`` and ``greedy`` to both (``top_k`` capped at ``coarse_codes`` for the coarse
        one), ``method`` to the PixelCNNs, ``steps`` to an absorbing coarse stage.
        """
        coarse_opts, fine_opts = self._stage_options(options)
        if len(shape) != 4:
            raise PriorInputError(f"shape must be (B, d, h, w), received {tuple(shape)!r}")
        b, *grid = shape
        coarse_map.check_divisible(tuple(grid), self.factor)
        small = (b, *(n // self.factor for n in grid))
        coarse = self.coarse.sample(small, generator, labels, **coarse_opts)
        return self.fine.sample(shape, generator, labels, context=self.context(coarse),
                                **fine_opts)

    @torch.no_grad()
    def complete(self, indices: Tensor, masked: Tensor, generator: torch.Generator,
                 labels: Tensor | None = None, **options: Any) -> Tensor:
        """Redraw the `masked` positions of code grids, keeping the others: (B, d, h, w) int64.

        The coarse grid keeps the cluster of every block without a masked position and redraws
        the others (`GatedPixelCNN3D.complete`); the codes are then completed given it. With
        every position masked this is `sample` for the same generator state; with none,
        `indices`. ``options`` are `sample`'s.
        """
        coarse_opts, fine_opts = self._stage_options(options)
        indices = check_indices(indices, self.codebook_size)
        check_completion_mask(masked, tuple(indices.shape))
        masked = masked.to(indices.device)
        f = self.factor
        redraw = F.max_pool3d(masked[:, None].float(), f, f)[:, 0] > 0
        coarse = self._complete_coarse(self.coarse_grid(indices), redraw, generator, labels,
                                       coarse_opts)
        return self.fine.complete(
            indices, masked, generator, labels, context=self.context(coarse), **fine_opts
        )

    def _complete_coarse(self, coarse: Tensor, redraw: Tensor, generator: torch.Generator,
                         labels: Tensor | None, options: dict[str, Any]) -> Tensor:
        """Redraw the `redraw` blocks of cluster grids (B, d', h', w'), keeping the others.

        An absorbing stage decodes grids together only when they redraw as many blocks, so grids
        that differ are completed one at a time (in batch order, from the same generator).
        """
        counts = redraw.flatten(1).sum(1)
        if isinstance(self.coarse, GatedPixelCNN3D) or bool((counts == counts[0]).all()):
            return self.coarse.complete(coarse, redraw, generator, labels, **options)
        labels = check_labels(labels, coarse.shape[0], self.num_classes)
        rows = [self.coarse.complete(coarse[b:b + 1], redraw[b:b + 1], generator,
                                     None if labels is None else labels[b:b + 1], **options)
                for b in range(coarse.shape[0])]
        return torch.cat(rows)

    def _stage_options(self, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check sampling options and split them: (the coarse stage's, the fine stage's).

        The coarse stage's ``top_k`` is capped at ``coarse_codes``.
        """
        unknown = sorted(set(options) - set(self.sample_options))
        if unknown:
            raise PriorInputError(f"unknown sampling options {unknown}; use {self.sample_options}")
        coarse = {k: v for k, v in options.items() if k in self.coarse.sample_options}
        if coarse.get("top_k") is not None:
            coarse["top_k"] = min(coarse["top_k"], self.coarse.codebook_size)
        fine = {k: v for k, v in options.items() if k in self.fine.sample_options}
        return coarse, fine


def state_numel(cfg: TwoLevelConfig) -> int:
    """Values in the state_dict of ``TwoLevelPrior(cfg)``, without building it."""
    width = cfg.context_dim
    context = cfg.coarse_codes * width + 2 * (27 * width * width + width)
    tables = (cfg.codebook_size + cfg.coarse_codes) * cfg.code_features + 1
    stages = sum(registry.model_kind(c.kind).state_numel()(c)
                 for c in (cfg.coarse_config(), cfg.fine_config()))
    return stages + context + tables

