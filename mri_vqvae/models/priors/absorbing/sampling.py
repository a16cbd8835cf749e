"""Parallel decoding of the absorbing prior: from the all-MASK grid to codes in fixed steps.

Step s (0-based, of S) predicts every still-masked position from the current grid and reveals the
positions the model is most sure of (the largest maximum log-probability; ties go to the earlier
position) so that ``floor(n * cos(pi/2 * (s + 1) / S))`` stay masked (`masking.still_masked`: at
least one revealed per step, none left after the last). Each revealed position gets one code
drawn from its prediction (`mri_vqvae.models.priors.pixelcnn.draw.draw`: one uniform per position
from the generator, inverse CDF, temperature and top-k). Revealed codes are never redrawn, so
every position is filled exactly once. The same generator state gives the same grids;
``temperature=0`` or ``greedy`` takes the argmax (deterministic whatever the generator).

Which positions to reveal depends only on the prediction, not on the draw (MaskGIT ranks by the
probability of the drawn code): drawing only the revealed positions keeps a 16x20x16 grid's
categorical draws to n rows in all, not ~0.6 n per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mri_vqvae.models.priors.absorbing.masking import still_masked
from mri_vqvae.models.priors.base import PriorInputError
from mri_vqvae.models.priors.pixelcnn.draw import check_draw_args, draw, nonfinite_logits_error

Predict = Callable[[Tensor, Tensor], Tensor]
"""tokens (B, d, h, w) in [0, K], positions (B, c) flat indices -> logits (B, c, K) there."""


def check_sampling(shape: Sequence[int], generator: object, device: torch.device, steps: object,
                   temperature: float, top_k: int | None, codebook_size: int) -> None:
    """Raise `PriorInputError` for a bad shape, generator, step count or draw setting."""
    if len(shape) != 4 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise PriorInputError(f"shape must be (B, d, h, w) with sizes >= 1, received {shape}")
    if not isinstance(generator, torch.Generator):
        raise PriorInputError(
            "generator must be a seeded torch.Generator (torch.Generator().manual_seed(seed)), "
            f"received {type(generator).__name__}"
        )
    if generator.device != device:
        raise PriorInputError(
            f"generator is on {generator.device} but the model is on {device}; create it with "
            f"torch.Generator(device={str(device)!r})"
        )
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise PriorInputError(f"steps must be an integer >= 1, received {steps!r}")
    check_draw_args(temperature, top_k, codebook_size)


def decode(predict: Predict, shape: Sequence[int], generator: torch.Generator, mask_token: int,
           device: torch.device, *, temperature: float, top_k: int | None, steps: int,
           greedy: bool, start: Tensor | None = None) -> Tensor:
    """Grids (B, d, h, w) int64 in [0, mask_token) decoded in `steps` steps (module doc).

    `start` (B, n) int64, optional: the tokens to begin from instead of the all-MASK grid; only
    its `mask_token` positions (the same number in every row) are decoded, over the same cosine
    schedule scaled to that number; the others are kept. Raises `NonFiniteError` (no grid
    returned) when the logits are NaN/±Inf.
    """
    batch, grid = shape[0], tuple(shape[1:])
    if start is None:
        start = torch.full((batch, math.prod(grid)), mask_token, dtype=torch.long, device=device)
    tokens = start.clone()
    masked_now = total = int((tokens[0] == mask_token).sum())
    for step in range(steps):
        if masked_now == 0:
            break
        keep = still_masked(step, steps, total, masked_now)
        reveal = masked_now - keep
        if reveal == 0:
            continue
        where = (tokens == mask_token).nonzero(as_tuple=True)[1].view(batch, masked_now)
        logits = predict(tokens.view(batch, *grid), where).float()  # (B, masked_now, K)
        sure = logits.amax(dim=2) - logits.logsumexp(dim=2)  # max log-probability; NaN if +Inf
        chosen = sure.argsort(dim=1, descending=True, stable=True)[:, :reveal]
        picked = logits.gather(1, chosen[..., None].expand(-1, -1, logits.shape[2]))
        codes, finite = draw(picked.view(batch * reveal, -1), generator, temperature, top_k,
                             greedy)
        if not bool(finite & torch.isfinite(sure).all()):  # every position is drawn once
            raise nonfinite_logits_error(f"at decoding step {step + 1} of {steps}")
        tokens.scatter_(1, where.gather(1, chosen), codes.view(batch, reveal))
        masked_now = keep
    return tokens.view(batch, *grid)
