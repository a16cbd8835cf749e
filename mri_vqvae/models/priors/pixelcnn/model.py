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
``(k//2+1, k, k)``, height ``(1, k//2+1, k)``, width ``(1, 1, k//2+1)``), so no compute is spent on
taps that are always zero. ``causal_mask`` gives the same masks embedded in the full k x k x k
window, the form the tests check against a golden pattern.

Options (`PixelCNNConfig`): ``dilations`` spreads a layer's taps r apart along all three axes (a
tap at offset o reads p + r * o), which keeps every mask causal and, with the first layer at
r = 1, leaves no blind spot; ``position_embedding`` adds learned tables of z, y and x (summed,
`AxialPosition`) projected into each stack of every gated layer, like the class conditioning.
Neither depends on codes, so causality is unchanged.

Sampling (naive and cached) lives in `mri_vqvae.models.priors.pixelcnn.sampling`;
`GatedPixelCNN3D.sample` is the entry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mri_vqvae.models.priors.base import (
    PositionwisePrior,
    PriorInputError,
    check_indices,
    check_labels,
)
from mri_vqvae.models.priors.pixelcnn.config import PixelCNNConfig

STACKS = ("depth", "height", "width")
MASK_TYPES = ("A", "B")


def gate(x: Tensor, dim: int = 1) -> Tensor:
    """Gated activation ``tanh(f) * sigmoid(g)`` of the two halves of ``x`` along ``dim``.

    (..., 2C, ...) -> (..., C, ...).
    """
    f, g = x.chunk(2, dim=dim)
    return torch.tanh(f) * torch.sigmoid(g)


def causal_mask(kernel_size: int, stack: str, mask_type: str) -> Tensor:
    """The 0/1 taps a stack reads in a (k, k, k) window centred on the output, indexed [dz, dy, dx].

    Mask A excludes the tap at offset 0 along the stack's own axis (the current slice, row or
    voxel), mask B includes it. Returns a float32 tensor of shape (k, k, k).
    """
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise PriorInputError(f"kernel_size must be odd and >= 3, received {kernel_size}")
    if stack not in STACKS or mask_type not in MASK_TYPES:
        raise PriorInputError(
            f"unknown stack/mask {stack!r}/{mask_type!r}: use one of {STACKS} and one of "
            f"{MASK_TYPES}"
        )
    c = kernel_size // 2
    upto = c + 1 if mask_type == "B" else c
    mask = torch.zeros(kernel_size, kernel_size, kernel_size)
    if stack == "depth":
        mask[:upto] = 1
    elif stack == "height":
        mask[c, :upto] = 1
    else:
        mask[c, c, :upto] = 1
    return mask


def _support_box(kernel_size: int, stack: str) -> tuple[tuple[int, int], ...]:
    """Offsets (lo, hi) from the centre, per axis (d, h, w), of the stack's mask-B taps."""
    c = kernel_size // 2
    full = (-c, c)
    if stack == "depth":
        return ((-c, 0), full, full)
    if stack == "height":
        return ((0, 0), (-c, 0), full)
    return ((0, 0), (0, 0), (-c, 0))


class CausalConv3d(nn.Module):
    """A 3D convolution over one stack's causal taps; ``weight * mask`` is applied in forward.

    (B, C_in, d, h, w) -> (B, C_out, d, h, w); the output at p reads inputs at
    p + dilation * offset for the offsets where `causal_mask` is 1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stack: str,
        mask_type: str,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        full = causal_mask(kernel_size, stack, mask_type)
        self.kernel_size = kernel_size
        self.stack = stack
        self.mask_type = mask_type
        self.dilation = dilation
        c = kernel_size // 2
        self.box = _support_box(kernel_size, stack)
        index = tuple(slice(lo + c, hi + c + 1) for lo, hi in self.box)
        shape = tuple(hi - lo + 1 for lo, hi in self.box)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *shape))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("mask", full[index].reshape(1, 1, *shape).clone())
        (dl, dh), (hl, hh), (wl, wh) = self.box
        self.pads = tuple(dilation * v for v in (-wl, wh, -hl, hh, -dl, dh))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def masked_weight(self) -> Tensor:
        """The weight with forbidden taps zeroed: (C_out, C_in, *box)."""
        return self.weight * self.mask

    def full_mask(self) -> Tensor:
        """This layer's mask embedded in the (k, k, k) window (what `causal_mask` returns)."""
        k, c = self.kernel_size, self.kernel_size // 2
        out = torch.zeros(k, k, k, dtype=self.mask.dtype, device=self.mask.device)
        index = tuple(slice(lo + c, hi + c + 1) for lo, hi in self.box)
        out[index] = self.mask[0, 0]
        return out

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, d, h, w) -> (B, C_out, d, h, w), causal along this stack's axis."""
        return F.conv3d(
            F.pad(x, self.pads), self.masked_weight(), self.bias, dilation=self.dilation
        )


def _plus(x: Tensor, *offsets: Tensor | None) -> Tensor:
    """``x`` plus each offset that is not None (broadcast), left to right."""
    for offset in offsets:
        if offset is not None:
            x = x + offset
    return x


class AxialPosition(nn.Module):
    """Learned embedding of the absolute latent position: ``depth[z] + height[y] + width[x]``.

    One (max_grid_size, E) table per axis; grids up to ``max_grid_size`` per axis.
    """

    def __init__(self, max_grid_size: int, dim: int) -> None:
        super().__init__()
        self.max_grid_size = max_grid_size
        self.depth = nn.Embedding(max_grid_size, dim)
        self.height = nn.Embedding(max_grid_size, dim)
        self.width = nn.Embedding(max_grid_size, dim)

    def check(self, grid: Sequence[int]) -> None:
        """Raise `PriorInputError` for a grid (d, h, w) larger than the tables."""
        if max(grid) > self.max_grid_size:
            raise PriorInputError(
                f"latent grid {tuple(grid)} exceeds max_grid_size={self.max_grid_size} of this "
                "prior's position embedding: use a grid of at most that extent per axis, or "
                "train a prior with a larger max_grid_size"
            )

    def slice(self, z: int, h: int, w: int) -> Tensor:
        """Features of slice z of an (any, h, w) grid: (h, w, E)."""
        return self.depth.weight[z] + self.height.weight[:h, None] + self.width.weight[None, :w]

    def forward(self, d: int, h: int, w: int) -> Tensor:
        """Features of every position of a (d, h, w) grid: (d, h, w, E)."""
        zy = self.depth.weight[:d, None, None] + self.height.weight[None, :h, None]
        return zy + self.width.weight[None, None, :w]


class GatedLayer3D(nn.Module):
    """One gated layer holding the depth, height and width stacks and their links.

    pre-activations (2C channels each; c = class offsets, q = position offsets):
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

    def position_offsets(self, position: Tensor | None) -> tuple[Tensor, Tensor, Tensor] | None:
        """Per-stack position offsets, each (..., 2C), of `AxialPosition` features (..., E)."""
        if self.position is None or position is None:
            return None
        qd, qh, qw = self.position(position).chunk(3, dim=-1)
        return qd, qh, qw

    def forward(
        self,
        d: Tensor,
        h: Tensor,
        w: Tensor,
        labels: Tensor | None = None,
        position: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Three (B, C_in, d, h, w) stack inputs -> three (B, C, d, h, w) outputs and a skip.

        ``labels`` (B,) or None; ``position`` (d, h, w, E) `AxialPosition` features or None.
        """
        cond = self.conditioning(labels)
        classes = [None] * 3 if cond is None else [c[:, :, None, None, None] for c in cond]
        pos = self.position_offsets(position)
        places = [None] * 3 if pos is None else [q.permute(3, 0, 1, 2) for q in pos]
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

    # ---- likelihood ---------------------------------------------------------------------------

    def forward_embedded(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits from already-embedded codes: (B, E, d, h, w) float -> (B, K, d, h, w).

        The float input path exists for gradient-based causality checks; ``labels`` are assumed
        valid (use `forward` for checked input). A grid larger than the position embedding's
        ``max_grid_size`` raises `PriorInputError`.
        """
        self.check_grid(x.shape[2:])
        position = None if self.position is None else self.position(*x.shape[2:])
        d = h = w = x
        skip: Tensor | None = None
        for layer in self.layers:
            d, h, w, s = layer(d, h, w, labels, position)
            skip = s if skip is None else skip + s
        assert skip is not None
        return self.head_out(F.relu(self.head_hidden(F.relu(skip))))

    def forward(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits (B, K, d, h, w) for codes (B, d, h, w) int64 in [0, K); labels (B,) or None."""
        indices = self.check_indices(indices)
        labels = self.check_labels(labels, indices.shape[0])
        x = self.embedding(indices).permute(0, 4, 1, 2, 3)
        return self.forward_embedded(x, labels)

    # ---- the Prior protocol (mri_vqvae.models.priors.base) ------------------------------------

    sample_options = ("temperature", "top_k", "method", "greedy")

    def prepare(self, train: Tensor, labels: Tensor | None) -> None:
        """Nothing to set up from data: the network learns everything by gradient."""

    def bits(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """``-log2 p(i_p | i_<p)`` at every position: (B, d, h, w) float."""
        logits = self(indices, labels)
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
    ) -> Tensor:
        """Draw code grids (B, d, h, w) int64 for ``shape = (B, d, h, w)`` in raster order.

        One uniform per batch row and position comes from ``generator`` (inverse-CDF draw, see
        `mri_vqvae.models.priors.pixelcnn.draw.sample_categorical`). ``method="fast"``
        caches stack activations; ``"naive"`` recomputes everything each position depends on,
        from scratch, per position. Both return identical indices for the same seed.
        ``temperature=0`` or ``greedy`` takes the argmax (an ablation, not a sampler). NaN/±Inf
        logits raise `mri_vqvae.core.finite.NonFiniteError` instead of drawing garbage codes.
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
    return stacks + links + cond + position


def state_numel(cfg: PixelCNNConfig) -> int:
    """Values (parameters + buffers) in the state_dict of ``GatedPixelCNN3D(cfg)``, not built."""
    total = cfg.codebook_size * cfg.embedding_dim + _layer_numel(cfg.embedding_dim, cfg)
    total += (cfg.num_layers - 1) * _layer_numel(cfg.hidden_channels, cfg)  # closed form: O(1)
    total += cfg.hidden_channels * cfg.head_channels + cfg.head_channels
    if cfg.position_embedding:
        total += 3 * cfg.max_grid_size * cfg.embedding_dim
    return total + cfg.head_channels * cfg.codebook_size + cfg.codebook_size
