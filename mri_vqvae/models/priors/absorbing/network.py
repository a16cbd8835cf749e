"""The bidirectional 3D network of the absorbing prior: partly masked codes -> features.

Input: tokens (B, d, h, w) in [0, K], K the MASK token. Each token's embedding, the learned
per-axis position tables (`AxialPosition`, as the PixelCNN's) and the class embedding are summed;
then residual 3x3x3 blocks at the latent resolution, a stride-2 step to half the resolution
(odd extents padded by one), residual blocks and an optional multi-head self-attention over every
coarse position there, a transposed convolution back (cropped to the grid) added to the fine
features, and residual blocks again. Every layer sees both sides of a position: nothing is causal.
LayerNorm over channels (never BatchNorm) keeps each grid's output independent of its batch.
The prior's head (`AbsorbingPrior.head`) turns features into logits over the K codes only: the
MASK token is never predicted.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mri_vqvae.models.priors.absorbing.config import AbsorbingConfig
from mri_vqvae.models.priors.pixelcnn.layers import AxialPosition


class ResidualBlock3D(nn.Module):
    """``x + project(gelu(expand(norm(spatial(x)))))``: a depthwise 3x3x3 convolution, a
    LayerNorm over channels, then C -> 2C -> C per position (a ConvNeXt block; a dense 3x3x3
    convolution costs ~10x more on a CPU). (B, d, h, w, C) channel-last -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.spatial = nn.Conv3d(channels, channels, 3, padding=1, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.expand = nn.Linear(channels, 2 * channels)
        self.project = nn.Linear(2 * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.spatial(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        return x + self.project(F.gelu(self.expand(self.norm(h))))


class GridAttention(nn.Module):
    """Residual multi-head self-attention over every position of (B, d, h, w, C)."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, *grid, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, -1, 3, self.heads, c // self.heads).permute(
            2, 0, 3, 1, 4)  # each (B, heads, n, C / heads)
        mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, *grid, c)
        return x + self.out(mixed)


def merge_patches(x: Tensor) -> Tensor:
    """(B, d, h, w, C) -> (B, ceil(d/2), ceil(h/2), ceil(w/2), 8C): each 2x2x2 block's features
    side by side (odd extents padded with zeros), so a Linear on them is a stride-2 convolution."""
    b, d, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
    x = x.view(b, (d + 1) // 2, 2, (h + 1) // 2, 2, (w + 1) // 2, 2, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).flatten(4)


def split_patches(y: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """The inverse of `merge_patches`: (B, d', h', w', 8C) -> (B, d, h, w, C), cropped to grid."""
    b, dc, hc, wc, c8 = y.shape
    y = y.view(b, dc, hc, wc, 2, 2, 2, c8 // 8).permute(0, 1, 4, 2, 5, 3, 6, 7)
    d, h, w = grid
    return y.reshape(b, 2 * dc, 2 * hc, 2 * wc, c8 // 8)[:, :d, :h, :w]


class BidirectionalNet3D(nn.Module):
    """Tokens (B, d, h, w) in [0, K] and labels (B,) or None -> features (B, d, h, w, C)."""

    def __init__(self, cfg: AbsorbingConfig) -> None:
        super().__init__()
        width, coarse = cfg.channels, cfg.coarse_channels
        self.embedding = nn.Embedding(cfg.codebook_size + 1, width)  # row K: the MASK token
        self.position = AxialPosition(cfg.max_grid_size, width)
        self.label = nn.Embedding(cfg.num_classes, width) if cfg.num_classes else None
        self.fine_in = nn.Sequential(*(ResidualBlock3D(width) for _ in range(cfg.fine_blocks)))
        self.down = nn.Linear(8 * width, coarse)  # on merge_patches: a 2x2x2 stride-2 conv
        self.coarse = nn.Sequential(*(ResidualBlock3D(coarse) for _ in range(cfg.coarse_blocks)))
        self.attention = (
            GridAttention(coarse, cfg.attention_heads) if cfg.attention_heads else None
        )
        self.up = nn.Linear(coarse, 8 * width)  # then split_patches: a 2x2x2 transposed conv
        self.fine_out = nn.Sequential(*(ResidualBlock3D(width) for _ in range(cfg.fine_blocks)))
        self.norm_out = nn.LayerNorm(width)

    def forward(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, d, h, w) int64 tokens, (B,) labels or None -> (B, d, h, w, C) float features.

        Inputs are assumed valid (the prior checks them); the grid must fit ``max_grid_size``.
        """
        d, h, w = tokens.shape[1:]
        x = self.embedding(tokens) + self.position(d, h, w)
        if self.label is not None and labels is not None:
            x = x + self.label(labels)[:, None, None, None]
        x = self.fine_in(x)
        y = self.coarse(self.down(merge_patches(x)))
        if self.attention is not None:
            y = self.attention(y)
        x = x + split_patches(self.up(y), (d, h, w))
        return F.gelu(self.norm_out(self.fine_out(x)))


def state_numel(cfg: AbsorbingConfig) -> int:
    """Values in the state_dict of ``AbsorbingPrior(cfg)`` (network and head), not built."""
    width, coarse, k = cfg.channels, cfg.coarse_channels, cfg.codebook_size

    def block(c: int) -> int:
        return 28 * c + 2 * c + (2 * c * c + 2 * c) + (2 * c * c + c)  # spatial, norm, MLP

    total = (k + 1) * width + 3 * cfg.max_grid_size * width + cfg.num_classes * width
    total += 2 * cfg.fine_blocks * block(width) + cfg.coarse_blocks * block(coarse)
    total += 2 * (8 * width * coarse) + coarse + 8 * width  # down and up, their biases
    if cfg.attention_heads:
        total += 2 * coarse + 3 * coarse * coarse + 3 * coarse + coarse * coarse + coarse
    return total + 2 * width + width * k + k  # output norm, head
