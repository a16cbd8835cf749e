"""The causal convolution of one PixelCNN stack and the learned position embedding.

`causal_mask` is the golden 0/1 pattern of each stack's taps; `CausalConv3d` stores only the
bounding box of those taps and multiplies the weight by the mask in ``forward``; `AxialPosition`
embeds the absolute latent position (z, y, x) as a sum of three learned tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mri_vqvae.models.priors.base import PriorInputError

STACKS = ("depth", "height", "width")
MASK_TYPES = ("A", "B")


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
