"""The categorical draw of the PixelCNN samplers: one uniform per row, inverse CDF, finiteness.

Each draw consumes exactly one float64 uniform per batch row from the generator (inverse CDF), so
the random stream stays aligned whatever the logits are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mri_vqvae.core.finite import NonFiniteError, describe_nonfinite
from mri_vqvae.models.priors.base import PriorInputError


def draw(
    logits: Tensor,
    generator: torch.Generator,
    temperature: float,
    top_k: int | None,
    greedy: bool,
) -> tuple[Tensor, Tensor]:
    """`sample_categorical` without the host sync: (codes (B,) int64, 0-d bool "all finite").

    The flag covers the logits and, when sampling, ``logits / temperature``.
    """
    if logits.ndim != 2:
        raise PriorInputError(f"logits must be (B, K), received shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    check_draw_args(temperature, top_k, num_classes)
    u = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64, device=logits.device)
    if greedy or temperature == 0:
        return logits.argmax(dim=1), torch.isfinite(logits).all()
    scaled = logits.double() / temperature
    finite = torch.isfinite(scaled).all()
    if top_k is not None and top_k < num_classes:
        keep = torch.zeros_like(scaled, dtype=torch.bool)
        keep.scatter_(1, scaled.topk(top_k, dim=1).indices, True)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scaled, dim=1)
    cdf = probs.cumsum(dim=1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    # u * total < total, but rounding could still land on the end: never return a zero-mass class
    last_positive = num_classes - 1 - (probs > 0).flip(1).to(torch.int8).argmax(dim=1)
    return torch.minimum(drawn, last_positive), finite


def nonfinite_logits_error(where: str) -> NonFiniteError:
    """The error for logits (or logits / temperature) that are NaN/±Inf."""
    return NonFiniteError(
        f"the prior's logits hold NaN or Inf {where}, so any code drawn would be garbage: the "
        "prior's weights diverged or overflowed. Load checkpoints/best or an earlier checkpoint, "
        "or retrain with a lower learning rate / without bf16"
    )


def sample_categorical(
    logits: Tensor,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
) -> Tensor:
    """Draw one class per row of ``logits`` (B, K) -> (B,) int64 by inverse CDF.

    Exactly B uniforms are taken from ``generator`` on every call (also when greedy). With
    ``top_k`` only the k largest logits of a row can be drawn (ties broken by `torch.topk`);
    ``temperature == 0`` or ``greedy`` returns the argmax. Probabilities are formed in float64.
    Non-finite logits raise `NonFiniteError`.
    """
    codes, finite = draw(logits, generator, temperature, top_k, greedy)
    if not bool(finite):
        problem = describe_nonfinite(logits) or "values that overflow once divided by temperature"
        raise nonfinite_logits_error(f"({problem})")
    return codes


MIN_TEMPERATURE = 1e-200
"""Smallest temperature > 0: below it float32 logits / temperature could overflow float64."""


def check_draw_args(temperature: float, top_k: int | None, num_classes: int) -> None:
    if not temperature >= 0 or temperature == float("inf"):
        raise PriorInputError(
            f"temperature must be a finite number >= 0 (0 = argmax), received {temperature}"
        )
    if 0 < temperature < MIN_TEMPERATURE:
        raise PriorInputError(
            f"temperature {temperature} is too small (logits / temperature would overflow): use "
            f"temperature=0 for the argmax, or at least {MIN_TEMPERATURE}"
        )
    bad_k = not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_classes
    if top_k is not None and bad_k:
        raise PriorInputError(
            f"top_k must be None or an integer in [1, {num_classes}] (codebook_size), "
            f"received {top_k!r}"
        )
