"""What every discrete autoencoder offers the rest of the tool (`DiscreteAutoencoder`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class DiscreteAutoencoder(Protocol):
    """Volumes to grids of discrete codes and back.

    ``factor`` is the downsampling per axis: a (D, H, W) volume becomes a
    (D/factor, H/factor, W/factor) grid of codes in [0, codebook_size).
    """

    codebook_size: int
    factor: int

    def encode_indices(self, x: Tensor) -> Tensor:
        """(B, 1, D, H, W) float volumes -> (B, d, h, w) int64 codes."""
        ...

    def decode_indices(self, indices: Tensor) -> Tensor:
        """(B, d, h, w) int codes -> (B, 1, D, H, W) float volumes."""
        ...

    def latent_shape(self, spatial_size: Sequence[int]) -> tuple[int, int, int]:
        """The (d, h, w) grid of a (D, H, W) volume; raises when the sizes do not divide."""
        ...
