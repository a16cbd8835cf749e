"""Statistics over cases: mean, sample std and a seeded percentile bootstrap interval of the mean.

Inputs are per-case values, shape (n,) (one number per case, e.g. a metric of each held-out
scan). Non-finite values (PSNR of a perfect reconstruction is inf) are left out and counted;
2000 resamples and a 95 % level unless told otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    """Mean, sample std and bootstrap interval of the mean over the finite values."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int
    n_excluded: int = 0
    level: float = CI_LEVEL

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "ci": [self.ci_low, self.ci_high],
                "ci_level": self.level, "n": self.n, "n_excluded_non_finite": self.n_excluded}

    def text(self, digits: int = 4) -> str:
        """``mean ± std [low, high]``."""
        if not self.n:
            return "n/a"
        return (f"{self.mean:.{digits}f} ± {self.std:.{digits}f} "
                f"[{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]")


def bootstrap_ci(values: Sequence[float], num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                 level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (n,): the same seed, the same interval.

    `num_resamples` resamples of n values drawn with replacement by ``numpy.random.default_rng
    (seed)``; the interval is their means' (1 - level)/2 and (1 + level)/2 quantiles.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def summarise(values: Sequence[float], num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
              level: float = CI_LEVEL) -> Summary:
    """`Summary` of per-case `values`; non-finite ones (PSNR inf) are left out and counted."""
    x = np.asarray(values, dtype=np.float64)
    finite = x[np.isfinite(x)]
    excluded = int(x.size - finite.size)
    if finite.size == 0:
        return Summary(math.nan, math.nan, math.nan, math.nan, 0, excluded, level)
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    low, high = bootstrap_ci(finite, num_resamples, seed, level)
    return Summary(float(finite.mean()), std, low, high, int(finite.size), excluded, level)
