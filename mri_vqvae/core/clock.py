"""Timing of repeated work (training steps, batch cases): rate, ETA and when a log line is due.

`StepClock` turns step durations into steps/s and an ETA for training's log line and bar, and for
the per-case commands' periodic progress line (`mri_vqvae.tasks.cases.CaseProgress`); `clock`
(default ``time.monotonic``) can be replaced by a fake one in tests. Stdlib only.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable

SLOW_FACTOR = 5.0  # a step this many times the median step is reported
_WINDOW = 50  # recent steps the median and rate are taken over


def format_duration(seconds: float) -> str:
    """``42 s``, ``7.5 min`` or ``2.1 h``."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class StepClock:
    """Durations of the steps of one run: rate, ETA and slow-step detection."""

    def __init__(self, start_step: int, total_steps: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.step, self.total = start_step, total_steps
        self.durations: deque[float] = deque(maxlen=_WINDOW)
        self._clock = clock
        self._last = clock()
        self._last_line = -math.inf

    def restart(self) -> None:
        """Start timing the next step now (after validation, checkpoints, previews)."""
        self._last = self._clock()

    def tick(self, step: int) -> float:
        """Record that `step` just finished; returns its duration in seconds."""
        now = self._clock()
        duration, self._last, self.step = now - self._last, now, step
        self.durations.append(duration)
        return duration

    @property
    def median(self) -> float | None:
        """Median duration of the recent steps (the first one, with warm-up, once others exist)."""
        values = list(self.durations)[1:] or list(self.durations)
        return statistics.median(values) if values else None

    @property
    def rate(self) -> float:
        """Steps per second over the recent steps (0 before the first)."""
        median = self.median
        return 1.0 / median if median else 0.0

    @property
    def eta(self) -> float:
        """Seconds until ``total_steps`` at the current rate (inf before the first step)."""
        median = self.median
        return (self.total - self.step) * median if median is not None else math.inf

    def is_slow(self, duration: float) -> bool:
        """True for a step over `SLOW_FACTOR` x the median of at least 3 earlier steps."""
        earlier = list(self.durations)[1:-1]
        return len(earlier) >= 3 and duration > SLOW_FACTOR * statistics.median(earlier)

    def line_due(self, every_s: float) -> bool:
        """True at the first step and then once every `every_s` seconds (marks it written)."""
        now = self._clock()
        if now - self._last_line < every_s and len(self.durations) != 1:
            return False
        self._last_line = now
        return True

    def line(self, loss: float) -> str:
        """``step 120/400  0.62 steps/s  loss 0.0412  ETA 7.5 min``."""
        return (f"step {self.step}/{self.total}  {self.rate:.2f} steps/s  loss {loss:.4g}  "
                f"ETA {format_duration(self.eta)}")
