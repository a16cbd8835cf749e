"""The independent-codes prior: every position drawn from the same smoothed code frequencies.

p(grid) = prod_p q[c][i_p], with q[c] the add-alpha smoothed frequencies of the codes in the
train grids of class c (one table when unconditional). It knows how often each code occurs and
nothing about where, so it is the floor every prior result is shown beside. `prepare` fits the
table in closed form; its log-probabilities are parameters, so the training loop may refine them
by gradient like any prior (the optimum of the train NLL is the unsmoothed frequency).
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
from mri_vqvae.models.priors.unigram.config import UnigramConfig


class UnigramPrior(PositionwisePrior):
    """Log-probabilities ``logits`` (max(1, num_classes), K): one code distribution per class."""

    sample_options = ("temperature", "top_k")

    def __init__(self, config: UnigramConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else UnigramConfig()
        self.config = cfg
        self.codebook_size = cfg.codebook_size
        self.num_classes = cfg.num_classes
        rows = max(1, cfg.num_classes)
        uniform = torch.full((rows, cfg.codebook_size), -math.log(cfg.codebook_size))
        self.logits = nn.Parameter(uniform)

    def _rows(self, labels: Tensor | None, batch: int) -> Tensor:
        """Log-probabilities per grid: (B, K), normalised."""
        labels = check_labels(labels, batch, self.num_classes)
        table = F.log_softmax(self.logits.float(), dim=1)
        if labels is None:
            return table[0].expand(batch, -1)
        return table[labels]

    @torch.no_grad()
    def prepare(self, train: Tensor, labels: Tensor | None) -> None:
        """Set the table to the add-alpha smoothed code counts of the train grids (N, d, h, w)."""
        train = check_indices(train, self.codebook_size)
        labels = check_labels(labels, train.shape[0], self.num_classes)
        groups = torch.zeros(train.shape[0], dtype=torch.long) if labels is None else labels.cpu()
        counts = torch.zeros(self.logits.shape, dtype=torch.float64)
        flat = train.flatten(1).cpu()
        for row in range(self.logits.shape[0]):
            codes = flat[groups == row].flatten()
            counts[row] = torch.bincount(codes, minlength=self.codebook_size).double()
        counts += self.config.smoothing
        self.logits.copy_((counts / counts.sum(1, keepdim=True)).log().to(self.logits.dtype))

    def bits(self, indices: Tensor, labels: Tensor | None = None) -> Tensor:
        """``-log2 q[c][i_p]`` at every position: (B, d, h, w) float."""
        indices = check_indices(indices, self.codebook_size)
        rows = self._rows(labels, indices.shape[0])  # (B, K)
        logp = torch.gather(rows, 1, indices.flatten(1)).view(indices.shape)
        return -logp / math.log(2.0)

    @torch.no_grad()
    def sample(
        self,
        shape: Sequence[int],
        generator: torch.Generator,
        labels: Tensor | None = None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> Tensor:
        """Draw (B, d, h, w) int64 grids, every position independently, from ``generator``."""
        if len(shape) != 4 or min(shape) < 1:
            raise PriorInputError(f"shape must be (B, d, h, w) with sizes >= 1, received {shape}")
        if temperature < 0 or (top_k is not None and not 1 <= top_k <= self.codebook_size):
            raise PriorInputError(
                f"temperature must be >= 0 and top_k in [1, {self.codebook_size}], received "
                f"temperature={temperature}, top_k={top_k}"
            )
        batch, positions = shape[0], math.prod(shape[1:])
        rows = self._rows(labels, batch).cpu()
        if top_k is not None:
            cut = rows.topk(top_k, dim=1).values[:, -1:]
            rows = rows.masked_fill(rows < cut, -math.inf)
        if temperature == 0:
            return rows.argmax(1)[:, None].expand(batch, positions).reshape(*shape).clone()
        probs = F.softmax(rows / temperature, dim=1)
        codes = torch.multinomial(probs, positions, replacement=True, generator=generator)
        return codes.reshape(*shape).to(self.logits.device)


def state_numel(cfg: UnigramConfig) -> int:
    """Values in the state_dict of ``UnigramPrior(cfg)``, without building it."""
    return max(1, cfg.num_classes) * cfg.codebook_size
