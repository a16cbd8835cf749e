"""3D gated PixelCNN prior over VQ-VAE code grids (B, d, h, w), raster order over (d, h, w).

Three causal stacks per gated layer, each a convolution whose weight is multiplied by a registered
0/1 mask inside ``forward`` (weights are never edited in place):

* depth stack: sees every earlier slice (all rows and columns of slices ``< z``);
* height stack: sees earlier rows of the current slice (all columns), plus the depth stack;
* width stack: sees earlier voxels of the current row, plus the height (hence depth) stack.

The first layer uses mask A (a stack never sees its own position along its axis), later layers mask
B. Because the height stack spans the full row width and the depth stack the full slice, there is
no blind spot: with enough layers position ``(z, y, x)`` depends on every earlier position in
raster order, including later columns of earlier rows and later rows of earlier slices.

Each stack's weight is stored only over the bounding box of its mask-B taps (depth
``(k//2+1, k, k)``, height ``(1, k//2+1, k)``, width ``(1, 1, k//2+1)``), so no compute is spent
on taps that are always zero (`mri_vqvae.models.priors.pixelcnn.layers`; its ``causal_mask``
gives the masks in the full k x k x k window, the form the tests check against a golden pattern).

Options (`PixelCNNConfig`): ``dilations`` spreads a layer's taps r apart along all three axes (a
tap at offset o reads p + r * o), which keeps every mask causal and, with the first layer at
r = 1, leaves no blind spot; ``position_embedding`` adds learned tables of z, y and x (summed,
`AxialPosition`) projected into each stack of every gated layer, like the class conditioning.
``context_dim`` adds a given per-position feature map (B, d, h, w, E_c), e.g. the embedded
coarse grid of the two-level prior, projected the same way. None of the three depends on this
grid's codes, so causality is unchanged.

Sampling (naive and cached) lives in `mri_vqvae.models.priors.pixelcnn.sampling`;
`GatedPixelCNN3D.sample` is the entry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mri_vqvae.models.priors.base import (
    PositionwisePrior,
    PriorInputError,
    check_completion_mask,
    check_indices,
    check_labels,
)
from mri_vqvae.models.priors.pixelcnn.config import PixelCNNConfig
from mri_vqvae.models.priors.pixelcnn.layers import AxialPosition, CausalConv3d


def gate(x: Tensor, dim: int = 1) -> Tensor:
    """Gated activation ``tanh(f) * sigmoid(g)`` of the two halves of ``x`` along ``dim``.

    (..., 2C, ...) -> (..., C, ...).
    """
    f, g = x.chunk(2, dim=dim)
    return torch.tanh(f) * torch.sigmoid(g)


def _plus(x: Tensor, *offsets: Tensor | None) -> Tensor:
    """``x`` plus each offset that is not None (broadcast), left to right."""
    for offset in offsets:
        if offset is not None:
            x = x + offset
    return x


class GatedLayer3D(nn.Module):
    """One gated layer holding the depth, height and width stacks and their links.

    pre-activations (2C channels each; c = class offsets, q = position + context offsets):
        a = depth(D) + c_d + q_d
        b = height(H) + depth_to_height(a) + c_h + q_h
        e = width(W) + height_to_width(b) + c_w + q_w
    outputs: D' = gate(a) [+ D], H' = gate(b) [+ H], o = gate(e),
             [res, skip] = out(dropout(o)), W' = res [+ W].
    The residual terms in brackets exist only for mask-B layers (a mask-A layer's input holds the
    current position's own code, so a residual would leak it).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel_size: int,
        mask_type: str,
        num_classes: int,
        dropout: float,
        dilation: int = 1,
        position_dim: int = 0,
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        two = 2 * channels
        self.channels = channels
        self.dilation = dilation
        self.depth = CausalConv3d(in_channels, two, kernel_size, "depth", mask_type, dilation)
        self.height = CausalConv3d(in_channels, two, kernel_size, "height", mask_type, dilation)
        self.width = CausalConv3d(in_channels, two, kernel_size, "width", mask_type, dilation)
        self.depth_to_height = nn.Conv3d(two, two, 1)
        self.height_to_width = nn.Conv3d(two, two, 1)
        self.out = nn.Conv3d(channels, two, 1)
        self.cond = nn.Embedding(num_classes, 3 * two) if num_classes > 0 else None
        self.position = nn.Linear(position_dim, 3 * two, bias=False) if position_dim else None
        self.context = nn.Linear(context_dim, 3 * two, bias=False) if context_dim else None
        self.dropout = nn.Dropout(dropout)
        self.residual = mask_type == "B"
        if self.residual and in_channels != channels:
            raise PriorInputError(f"a mask-B layer needs in == out channels, got {in_channels}")

    def conditioning(self, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor] | None:
        """Per-stack class offsets, each (B, 2C), or None for an unconditional layer."""
        if self.cond is None or labels is None:
            return None
        cd, ch, cw = self.cond(labels).chunk(3, dim=1)
        return cd, ch, cw

    def place_offsets(
        self, position: Tensor | None, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """Per-stack offsets (..., 2C): position features (..., E) plus context (B, ..., E_c).

        Position and context are projected separately and summed (broadcast over the batch).
        """
        parts = [
            proj(features)
            for proj, features in ((self.position, position), (self.context, context))
            if proj is not None and features is not None
        ]
        if not parts:
            return None
        total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        qd, qh, qw = total.chunk(3, dim=-1)
        return qd, qh, qw

    def forward(
        self,
        d: Tensor,
        h: Tensor,
        w: Tensor,
        labels: Tensor | None = None,
        position: Tensor | None = None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Three (B, C_in, d, h, w) stack inputs -> three (B, C, d, h, w) outputs and a skip.

        ``labels`` (B,) or None; ``position`` (d, h, w, E) `AxialPosition` features or None;
        ``context`` (B, d, h, w, E_c) given features or None.
        """
        cond = self.conditioning(labels)
        classes = [None] * 3 if cond is None else [c[:, :, None, None, None] for c in cond]
        pos = self.place_offsets(position, context)
        places = [None] * 3 if pos is None else [q.movedim(-1, -4) for q in pos]
        a = _plus(self.depth(d), classes[0], places[0])
        b = _plus(self.height(h) + self.depth_to_height(a), classes[1], places[1])
        e = _plus(self.width(w) + self.height_to_width(b), classes[2], places[2])
        res, skip = self.out(self.dropout(gate(e))).chunk(2, dim=1)
        d_new, h_new = gate(a), gate(b)
        if self.residual:
            return d_new + d, h_new + h, res + w, skip
        return d_new, h_new, res, skip


class GatedPixelCNN3D(PositionwisePrior):
    """Autoregressive prior p(indices) = prod_p p(i_p | i_<p) over (B, d, h, w) code grids.

    ``forward`` gives logits (B, K, d, h, w); the logits at p depend only on codes before p in
    raster order over (d, h, w). ``bits`` gives exact bits per position; ``sample`` draws grids.
    """

    def __init__(self, config: PixelCNNConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else PixelCNNConfig()
        self.config = cfg
        self.codebook_size = cfg.codebook_size
        self.num_classes = cfg.num_classes
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.embedding_dim)
        pos_dim = cfg.embedding_dim if cfg.position_embedding else 0
        self.layers = nn.ModuleList(
            GatedLayer3D(
                cfg.embedding_dim if i == 0 else cfg.hidden_channels,
                cfg.hidden_channels,
                cfg.kernel_size,
                "A" if i == 0 else "B",
                cfg.num_classes,
                cfg.dropout,
                dilation,
                pos_dim,
                cfg.context_dim,
            )
            for i, dilation in enumerate(cfg.layer_dilations())
        )
        self.position = (
            AxialPosition(cfg.max_grid_size, cfg.embedding_dim) if cfg.position_embedding else None
        )
        self.head_hidden = nn.Conv3d(cfg.hidden_channels, cfg.head_channels, 1)
        self.head_out = nn.Conv3d(cfg.head_channels, cfg.codebook_size, 1)

    # ---- input checks -------------------------------------------------------------------------

    def check_indices(self, indices: Tensor) -> Tensor:
        """Validate a code grid and return it as int64 (B, d, h, w); raise `PriorInputError`."""
        return check_indices(indices, self.codebook_size)

    def check_labels(self, labels: Tensor | None, batch: int) -> Tensor | None:
        """Validate class labels (B,) against ``num_classes``; return int64 labels or None."""
        return check_labels(labels, batch, self.num_classes)

    def check_grid(self, grid: Sequence[int]) -> None:
        """Raise `PriorInputError` for a grid (d, h, w) beyond the position embedding's tables."""
        if self.position is not None:
            self.position.check(grid)

    def check_context(self, context: Tensor | None, batch: int, grid: Sequence[int]) -> None:
        """Raise `PriorInputError` unless ``context`` is (B, d, h, w, context_dim) float or None
        exactly when this prior takes no context."""
        dim = self.config.context_dim
        if dim == 0:
            if context is not None:
                raise PriorInputError("context was given but this prior has context_dim=0")
            return
        want = (batch, *grid, dim)
        if context is None or not context.is_floating_point() or tuple(context.shape) != want:
            got = None if context is None else (context.dtype, tuple(context.shape))
            raise PriorInputError(
                f"this prior is conditioned on a per-position context: pass a float tensor of "
                f"shape {want}, received {got}"
            )

    # ---- likelihood ---------------------------------------------------------------------------

    def forward_embedded(
        self, x: Tensor, labels: Tensor | None = None, context: Tensor | None = None
    ) -> Tensor:
        """Logits from already-embedded codes: (B, E, d, h, w) float -> (B, K, d, h, w).

        The float input path exists for gradient-based causality checks; ``labels`` are assumed
        valid (use `forward` for checked input). A grid larger than the position embedding's
        ``max_grid_size``, or a context (B, d, h, w, context_dim) of another shape, raises
        `PriorInputError`.
        """
        self.check_grid(x.shape[2:])
        self.check_context(context, x.shape[0], x.shape[2:])
        position = None if self.position is None else self.position(*x.shape[2:])
        d = h = w = x
        skip: Tensor | None = None
        for layer in self.layers:
            d, h, w, s = layer(d, h, w, labels, position, context)
            skip = s if skip is None else skip + s
        assert skip is not None
        return self.head_out(F.relu(self.head_hidden(F.relu(skip))))

    def forward(
        self, indices: Tensor, labels: Tensor | None = None, context: Tensor | None = None
    ) -> Tensor:
        """Logits (B, K, d, h, w) for codes (B, d, h, w) int64 in [0, K); labels (B,) or None;
        context (B, d, h, w, context_dim) or None."""
        indices = self.check_indices(indices)
        labels = self.check_labels(labels, indices.shape[0])
        x = self.embedding(indices).permute(0, 4, 1, 2, 3)
        return self.forward_embedded(x, labels, context)

    # ---- the Prior protocol (mri_vqvae.models.priors.base) ------------------------------------

    sample_options = ("temperature", "top_k", "method", "greedy")

    def prepare(self, train: Tensor, labels: Tensor | None) -> None:
        """Nothing to set up from data: the network learns everything by gradient."""

    def bits(
        self, indices: Tensor, labels: Tensor | None = None, context: Tensor | None = None
    ) -> Tensor:
        """``-log2 p(i_p | i_<p)`` at every position: (B, d, h, w) float."""
        logits = self(indices, labels, context)
        return F.cross_entropy(logits.float(), indices.long(), reduction="none") / math.log(2.0)

    @torch.no_grad()
    def sample(
        self,
        shape: Sequence[int],
        generator: torch.Generator,
        labels: Tensor | None = None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        method: str = "fast",
        greedy: bool = False,
        context: Tensor | None = None,
        kept: Tensor | None = None,
    ) -> Tensor:
        """Draw code grids (B, d, h, w) int64 for ``shape = (B, d, h, w)`` in raster order.

        One uniform per batch row and position comes from ``generator`` (inverse-CDF draw, see
        `mri_vqvae.models.priors.pixelcnn.draw.sample_categorical`). ``method="fast"``
        caches stack activations; ``"naive"`` recomputes everything each position depends on,
        from scratch, per position. Both return identical indices for the same seed.
        ``temperature=0`` or ``greedy`` takes the argmax (an ablation, not a sampler). NaN/±Inf
        logits raise `mri_vqvae.core.finite.NonFiniteError` instead of drawing garbage codes.
        ``context`` (B, d, h, w, context_dim) is required exactly when ``context_dim > 0``.
        ``kept`` (B, d, h, w): codes to place instead of drawing (-1: draw); see `complete`.
        """
        from mri_vqvae.models.priors.pixelcnn.sampling import sample_grid

        return sample_grid(
            self,
            tuple(shape),
            generator,
            temperature=temperature,
            top_k=top_k,
            labels=labels,
            method=method,
            greedy=greedy,
            context=context,
            kept=kept,
        )


    @torch.no_grad()
    def complete(self, indices: Tensor, masked: Tensor, generator: torch.Generator,
                 labels: Tensor | None = None, **options: Any) -> Tensor:
        """Redraw the `masked` positions of code grids, keeping the others: (B, d, h, w) int64.

        indices (B, d, h, w) valid codes; masked (B, d, h, w) bool. The grid is drawn in raster
        order as `sample` draws it, with every kept position taking its code, so a redrawn
        position is conditioned on the (kept or redrawn) codes before it, not on those after.
        With every position masked this is `sample` for the same generator state; with none,
        `indices`. ``options`` are `sample`'s.
        """
        indices = self.check_indices(indices)
        check_completion_mask(masked, tuple(indices.shape))
        return self.sample(
            tuple(indices.shape),
            generator,
            labels,
            kept=indices.masked_fill(masked.to(indices.device), -1),
            **options,
        )


# --- size without building -----------------------------------------------------------------------


def _layer_numel(in_channels: int, cfg: PixelCNNConfig) -> int:
    """Values of one `GatedLayer3D` (weights, biases, masks, class and position projections)."""
    two, k, c = 2 * cfg.hidden_channels, cfg.kernel_size, cfg.kernel_size // 2
    boxes = ((c + 1) * k * k, (c + 1) * k, c + 1)  # depth, height, width stacks
    stacks = sum(two * in_channels * box + two + box for box in boxes)
    links = 2 * (two * two + two) + (cfg.hidden_channels * two + two)
    cond = cfg.num_classes * 3 * two
    position = cfg.embedding_dim * 3 * two if cfg.position_embedding else 0
    return stacks + links + cond + position + cfg.context_dim * 3 * two


def state_numel(cfg: PixelCNNConfig) -> int:
    """Values (parameters + buffers) in the state_dict of ``GatedPixelCNN3D(cfg)``, not built."""
    total = cfg.codebook_size * cfg.embedding_dim + _layer_numel(cfg.embedding_dim, cfg)
    total += (cfg.num_layers - 1) * _layer_numel(cfg.hidden_channels, cfg)  # closed form: O(1)
    total += cfg.hidden_channels * cfg.head_channels + cfg.head_channels
    if cfg.position_embedding:
        total += 3 * cfg.max_grid_size * cfg.embedding_dim
    return total + cfg.head_channels * cfg.codebook_size + cfg.codebook_size
