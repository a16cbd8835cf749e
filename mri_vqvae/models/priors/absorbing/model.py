"""Absorbing-state (masked-token) discrete diffusion prior over code grids (B, d, h, w).

Forward process: each code is replaced by the MASK token (index K); the network
(`network.BidirectionalNet3D` and a linear head over the K codes) predicts every masked code from
the unmasked ones, in any order.

* ``loss``: per grid a masking ratio from the cosine schedule (`masking.training_mask`), and the
  mean cross-entropy over the masked positions (nats per masked latent; MaskGIT's objective, a
  reweighting of the ELBO towards high masking ratios).
* ``bits`` / ``grid_bits``: the absorbing-diffusion ELBO. Revealing the n positions one at a time
  in a uniformly random order defines p(x) = E_order prod_t p(x_t | revealed); by Jensen,

      -log p(x) <= sum_{m=1..n} E_{|S|=m} [ (1/m) sum_{i in S} -log p(x_i | x outside S) ]
               = sum_i b_i,  b_i = (1/n) sum_{m=1..n} E_{S contains i, |S|=m} [-log p(x_i | ..)],

  so the bound per latent is the mean over positions of b_i: the cross-entropy of position i when
  masked, averaged over the number masked (uniform on 1..n) and over which others are masked.
  It decomposes per position, so `bits` returns the map b_i / ln 2 and ``grid_bits`` its mean.
  The estimate is deterministic: L = ``bound_levels`` mask sizes (midpoints of L equal shares of
  1..n) and, per size, a random partition into chunks drawn from a generator seeded by the grid
  (`masking.bound_masks`), each position scored exactly once per size: sum_m ceil(n / m)
  forwards per grid (25 for L = 6 on a large grid). It is exact for a model whose predictions
  ignore the context, and an unbiased estimate over the partitions otherwise (the midpoint rule
  over the mask size is the only approximation of the sum). The bound is on the likelihood of
  the one-at-a-time random-order model; `sample` decodes many positions per step, a faster
  approximation of that model.
* ``sample``: parallel decoding from the all-MASK grid (`sampling.decode`); ``complete`` decodes
  only the masked positions of given grids (inpainting; the coarse-to-fine experiment).
* ``prepare``: the head's bias starts at the log of the add-one smoothed code frequencies of the
  train grids (the first predictions are the unigram, not uniform).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mri_vqvae.models.priors.absorbing.config import AbsorbingConfig
from mri_vqvae.models.priors.absorbing.masking import (
    bound_masks,
    masked_cross_entropy,
    training_mask,
)
from mri_vqvae.models.priors.absorbing.network import BidirectionalNet3D
from mri_vqvae.models.priors.absorbing.sampling import Predict, check_sampling, decode
from mri_vqvae.models.priors.base import (
    PriorInputError,
    check_completion_mask,
    check_indices,
    check_labels,
)

LN2 = math.log(2.0)


class AbsorbingPrior(nn.Module):
    """The `Prior` of masked-token diffusion; ``likelihood = "bound"`` (an ELBO, see module doc)."""

    likelihood = "bound"
    sample_options = ("temperature", "top_k", "steps", "greedy")

    def __init__(self, config: AbsorbingConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else AbsorbingConfig()
        self.config = cfg
        self.codebook_size = cfg.codebook_size
        self.num_classes = cfg.num_classes
        self.mask_token = cfg.codebook_size
        self.net = BidirectionalNet3D(cfg)
        self.head = nn.Linear(cfg.channels, cfg.codebook_size)

    # ---- checks and logits --------------------------------------------------------------------

    def checked(self, indices: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Validated int64 codes (B, d, h, w) and labels (B,) or None; `PriorInputError` else."""
        indices = check_indices(indices, self.codebook_size)
        labels = check_labels(labels, indices.shape[0], self.num_classes)
        self.check_grid(indices.shape[1:])
        return indices, labels

    def check_grid(self, grid: Sequence[int]) -> None:
        """Raise `PriorInputError` for a grid (d, h, w) beyond the position tables."""
        self.net.position.check(grid)

    def forward(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits (B, K, d, h, w) over the codes for tokens (B, d, h, w) in [0, K] (K = MASK)."""
        return self.head(self.net(tokens, labels)).permute(0, 4, 1, 2, 3)

    # ---- the Prior protocol (mri_vqvae.models.priors.base) ------------------------------------

    @torch.no_grad()
    def prepare(self, train: Tensor, labels: Tensor | None) -> None:
        """Set the head's bias to the log add-one smoothed code frequencies of the train grids."""
        train = check_indices(train, self.codebook_size)
        counts = torch.bincount(train.flatten().cpu(), minlength=self.codebook_size).double() + 1
        self.head.bias.copy_((counts / counts.sum()).log().to(self.head.bias))

    def masked_loss(self, indices: Tensor, mask: Tensor, labels: Tensor | None = None) -> Tensor:
        """Mean cross-entropy (nats) over the masked positions of valid codes (B, d, h, w), the
        positions where `mask` (B, d, h, w) bool is True replaced by MASK in the input."""
        logits = self(indices.masked_fill(mask, self.mask_token), labels)
        return masked_cross_entropy(logits, indices, mask)

    def loss(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """Training objective: masked cross-entropy under a cosine-schedule mask (nats/latent)."""
        indices, labels = self.checked(indices, labels)
        mask = training_mask(indices.shape[0], math.prod(indices.shape[1:]), indices.device)
        return self.masked_loss(indices, mask.view(indices.shape), labels)

    @torch.no_grad()
    def bits(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """The ELBO per position in bits, b_i / ln 2 (module doc): (B, d, h, w) float32.

        Its mean over a grid is ``grid_bits``, an upper bound on -log2 p per latent (estimated
        deterministically: the same grid always gets the same map). No gradient.
        """
        indices, labels = self.checked(indices, labels)
        rows = [self._grid_bound(grid, None if labels is None else labels[b:b + 1])
                for b, grid in enumerate(indices)]
        return torch.stack(rows)

    def _grid_bound(self, grid: Tensor, label: Tensor | None) -> Tensor:
        """b_i / ln 2 of one grid (d, h, w) under an optional (1,) label."""
        flat = grid.flatten()
        total = torch.zeros(flat.shape[0], dtype=torch.float32, device=grid.device)
        levels = bound_masks(grid, self.config.bound_levels)
        for masks, scored in levels:
            masks, scored = masks.to(grid.device), scored.to(grid.device)
            tokens = flat.expand(masks.shape[0], -1).masked_fill(masks, self.mask_token)
            features = self.net(tokens.reshape(-1, *grid.shape),
                                None if label is None else label.expand(masks.shape[0]))
            chunk, position = scored.nonzero(as_tuple=True)
            logits = self.head(features.flatten(1, 3)[chunk, position])  # (n, K)
            ce = F.cross_entropy(logits.float(), flat[position], reduction="none")
            total.index_add_(0, position, ce)
        return (total / (len(levels) * LN2)).view(grid.shape)

    def grid_bits(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """The ELBO in bits per latent of each grid (an upper bound on -log2 p): (B,) float."""
        return self.bits(indices, labels).flatten(1).mean(1)

    @torch.no_grad()
    def sample(
        self,
        shape: Sequence[int],
        generator: torch.Generator,
        labels: Tensor | None = None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        steps: int | None = None,
        greedy: bool = False,
    ) -> Tensor:
        """Draw (B, d, h, w) int64 grids for ``shape = (B, d, h, w)`` by confidence-ordered
        parallel decoding in ``steps`` steps (default ``config.sample_steps``; see
        `mri_vqvae.models.priors.absorbing.sampling`). The same generator state gives the same
        grids; ``temperature=0`` or ``greedy`` takes the argmax. NaN/±Inf logits raise
        `mri_vqvae.core.finite.NonFiniteError`."""
        shape, steps = tuple(shape), self.config.sample_steps if steps is None else steps
        device = self.head.weight.device
        check_sampling(shape, generator, device, steps, temperature, top_k, self.codebook_size)
        self.check_grid(shape[1:])
        labels = check_labels(labels, shape[0], self.num_classes)
        labels = None if labels is None else labels.to(device)
        return decode(self._predictor(labels), shape, generator, self.mask_token, device,
                      temperature=temperature, top_k=top_k, steps=steps, greedy=greedy)

    @torch.no_grad()
    def complete(
        self,
        indices: Tensor,
        masked: Tensor,
        generator: torch.Generator,
        labels: Tensor | None = None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        steps: int | None = None,
        greedy: bool = False,
    ) -> Tensor:
        """Redraw the `masked` positions of code grids, keeping the others: (B, d, h, w) int64.

        indices (B, d, h, w) valid codes; masked (B, d, h, w) bool with the same number of True
        positions in every grid. The masked positions are decoded as `sample` decodes a whole
        grid, conditioned on the kept codes (with every position masked, `complete` draws what
        `sample` draws from the same generator state). `PriorInputError` for a bad mask.
        """
        indices, labels = self.checked(indices, labels)
        steps = self.config.sample_steps if steps is None else steps
        check_sampling(tuple(indices.shape), generator, indices.device, steps, temperature,
                       top_k, self.codebook_size)
        _check_mask(masked, tuple(indices.shape))
        labels = None if labels is None else labels.to(indices.device)
        start = indices.masked_fill(masked.to(indices.device), self.mask_token).flatten(1)
        return decode(self._predictor(labels), tuple(indices.shape), generator, self.mask_token,
                      indices.device, temperature=temperature, top_k=top_k, steps=steps,
                      greedy=greedy, start=start)

    def _predictor(self, labels: Tensor | None) -> Predict:
        """tokens (B, d, h, w), positions (B, c) -> logits (B, c, K) there (`sampling.Predict`)."""

        def predict(tokens: Tensor, where: Tensor) -> Tensor:
            features = self.net(tokens, labels).flatten(1, 3)  # (B, n, C)
            picked = features.gather(1, where[..., None].expand(-1, -1, features.shape[-1]))
            return self.head(picked)

        return predict


def _check_mask(masked: Tensor, shape: tuple[int, ...]) -> None:
    """`PriorInputError` unless `masked` is bool of `shape` with equal True counts per grid."""
    check_completion_mask(masked, shape)
    counts = masked.flatten(1).sum(1)
    if bool((counts != counts[0]).any()):
        raise PriorInputError("masked must mask the same number of positions in every grid "
                              f"(decoded together), received {counts.tolist()}; complete the "
                              "grids one at a time")
