"""NaN / ±Inf guards: a result a user cannot trust is refused, never written or returned.

`NonFiniteError` is raised where a volume, encoder output, logits or decoded sample holds a
non-finite value. Stdlib and numpy at import; torch only when a tensor is passed in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mri_vqvae.core.errors import MriVqvaeError


class NonFiniteError(MriVqvaeError, ValueError):
    """NaN or ±Inf where a finite result is required (names where, how many, and the fix)."""


def _counts(values: Any) -> tuple[int, int, int, int]:
    """(NaN, +Inf, -Inf, total) counts of a numpy array or torch tensor."""
    if isinstance(values, np.ndarray):
        a = values
        return int(np.isnan(a).sum()), int(np.isposinf(a).sum()), int(np.isneginf(a).sum()), a.size
    import torch

    t = values.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    n_pos = int(torch.isposinf(t).sum()) if t.is_floating_point() else 0
    n_neg = int(torch.isneginf(t).sum()) if t.is_floating_point() else 0
    return int(torch.isnan(t).sum()), n_pos, n_neg, t.numel()


def describe_nonfinite(values: Any) -> str | None:
    """None when every value is finite, else e.g. ``"3 NaN and 1 +Inf of 4096 values"``.

    `values` is a numpy array or torch tensor; integer and bool data are always finite.
    """
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "fc" or np.isfinite(values).all():
            return None
    else:
        import torch

        if not (values.is_floating_point() or values.is_complex()):
            return None
        if bool(torch.isfinite(values).all()):
            return None
    nan, pos, neg, total = _counts(values)
    parts = [f"{n} {name}" for n, name in ((nan, "NaN"), (pos, "+Inf"), (neg, "-Inf")) if n]
    return f"{' and '.join(parts)} of {total} values"
