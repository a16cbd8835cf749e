"""What every prior over code grids offers training, sampling and evaluation (`Prior`).

The training stage, ``sample``, ``likelihood`` and ``evaluate`` use only this protocol, so a new
prior (one folder, one config class, one line in `mri_vqvae.models.registry`) works everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mri_vqvae.core.errors import MriVqvaeError


class PriorInputError(MriVqvaeError, ValueError):
    """Indices, labels or sampling arguments a prior cannot accept (says what and how to fix)."""


@runtime_checkable
class Prior(Protocol):
    """A distribution over (B, d, h, w) grids of codes in [0, codebook_size), optionally per class.

    ``likelihood`` says what `grid_bits` means: ``"exact"`` (the model's exact -log2 p) or
    ``"bound"`` (an upper bound, e.g. an ELBO). ``sample_options`` names the keyword options
    `sample` accepts beyond ``labels`` (e.g. ``temperature``, ``top_k``).
    """

    codebook_size: int
    num_classes: int
    likelihood: Literal["exact", "bound"]
    sample_options: tuple[str, ...]

    def prepare(self, train: Tensor, labels: Tensor | None) -> None:
        """Set up from the train grids (N, d, h, w) before the first step (e.g. fit counts)."""
        ...

    def loss(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """Training objective: mean negative log-likelihood in nats per latent (scalar)."""
        ...

    def grid_bits(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """Bits per latent of each grid: (B, d, h, w) -> (B,) float."""
        ...

    def bits(self, indices: Tensor, labels: Tensor | None = None) -> Tensor | None:
        """-log2 p at each position (B, d, h, w), or None where the model has no such map."""
        ...

    def sample(
        self, shape: Sequence[int], generator: torch.Generator, labels: Tensor | None = None,
        **options: Any,
    ) -> Tensor:
        """Draw grids: ``shape`` = (B, d, h, w) -> int64 codes; the same generator state gives
        the same grids."""
        ...


@runtime_checkable
class CompletingPrior(Prior, Protocol):
    """A prior that can redraw some positions of given grids and keep the others."""

    def complete(
        self, indices: Tensor, masked: Tensor, generator: torch.Generator,
        labels: Tensor | None = None, **options: Any,
    ) -> Tensor:
        """Grids (B, d, h, w) int64 equal to `indices` where `masked` (bool, same shape) is
        False and redrawn by the prior where it is True; `sample`'s options."""
        ...


class PositionwisePrior(nn.Module):
    """Base of priors with an exact per-position likelihood: `loss` and `grid_bits` from `bits`.

    A subclass defines ``bits(indices, labels) -> (B, d, h, w)`` and `sample`; the training
    objective is then the mean of those bits in nats, and each grid's bits per latent their mean.
    """

    likelihood = "exact"

    def bits(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """``-log2 p`` at every position: (B, d, h, w) float."""
        raise NotImplementedError

    def loss(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """Mean negative log-likelihood in nats per latent (scalar, differentiable)."""
        return self.bits(indices, labels).mean() * math.log(2.0)

    def grid_bits(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """Exact bits per latent of each grid: (B, d, h, w) -> (B,)."""
        return self.bits(indices, labels).flatten(1).mean(1)


def check_indices(indices: Tensor, codebook_size: int) -> Tensor:
    """Validate a code grid and return it as int64 (B, d, h, w); raise `PriorInputError`."""
    if not isinstance(indices, Tensor):
        raise PriorInputError(
            f"indices must be a torch.Tensor (B, d, h, w), received {type(indices).__name__}"
        )
    dtype = indices.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise PriorInputError(
            f"indices must be an integer tensor, received dtype {indices.dtype}; pass the "
            "VQ-VAE's encode_indices output (or .long() it)"
        )
    if indices.ndim != 4 or min(indices.shape) < 1:
        raise PriorInputError(
            f"indices must have shape (B, d, h, w) with every size >= 1, received shape "
            f"{tuple(indices.shape)}; add a batch axis with indices[None] for one grid"
        )
    _check_range(indices, codebook_size, "indices", "the prior's codebook_size",
                 "; use a prior trained on the codes of this autoencoder")
    return indices.long()

def check_completion_mask(masked: Tensor, shape: tuple[int, ...]) -> None:
    """`PriorInputError` unless `masked` is a bool tensor of the grids' `shape` (B, d, h, w)."""
    if not isinstance(masked, Tensor) or masked.dtype != torch.bool or tuple(masked.shape) != shape:
        got = (masked.dtype, tuple(masked.shape)) if isinstance(masked, Tensor) else type(masked)
        raise PriorInputError(f"masked must be a bool tensor of the grids' shape {shape}, "
                              f"received {got}; True marks the positions to redraw")


def check_labels(labels: Tensor | None, batch: int, num_classes: int) -> Tensor | None:
    """Validate class labels (B,) against ``num_classes``; return int64 labels or None."""
    if num_classes == 0:
        if labels is not None:
            raise PriorInputError(
                "labels were given but this prior is unconditional (num_classes=0); drop the "
                "labels or train a prior with prior.label_field set"
            )
        return None
    if labels is None:
        raise PriorInputError(
            f"this prior is class-conditional (num_classes={num_classes}): pass labels, "
            f"an integer tensor of shape ({batch},)"
        )
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.ndim != 1:
        raise PriorInputError(
            f"labels must be an integer tensor of shape ({batch},), received "
            f"{getattr(labels, 'dtype', type(labels).__name__)} "
            f"{tuple(getattr(labels, 'shape', ()))}"
        )
    if labels.shape[0] != batch:
        raise PriorInputError(f"labels has {labels.shape[0]} entries for a batch of {batch}")
    _check_range(labels, num_classes, "labels", "prior.num_classes")
    return labels.long()


def _check_range(values: Tensor, size: int, what: str, bound: str, hint: str = "") -> None:
    """Raise `PriorInputError` unless every value of the integer tensor lies in [0, size)."""
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= size:
        raise PriorInputError(
            f"{what} must lie in [0, {size}) ({bound}), received values in [{lo}, {hi}]{hint}"
        )
