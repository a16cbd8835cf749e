"""Training progress and stopping: step timing, ETA, slow-step warnings, time limit and signals.

`StepClock` (`mri_vqvae.core.clock`, shared with the per-case commands) turns step durations
into steps/s and an ETA for the log line and the bar, and flags a step many times slower than the
run's median with its likely causes. `StopControl` decides when
a run stops early: on SIGTERM / SIGUSR1 (cluster pre-emption) or a first Ctrl-C, and *before* the
time limit, leaving room for one more step and the final validation and checkpoint, so the
limit is kept and the last steps are validated instead of lost.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

_STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


def slow_step_message(step: int, duration: float, median: float, precision: str,
                      threads: int, cores: int | None) -> str:
    """Why a step may have been slow: names precision and threads, the usual causes."""
    causes = [f"precision {precision}"]
    if precision == "bf16":
        causes[0] += " (emulated on CPUs without native bf16: set precision=fp32 or auto)"
    causes.append(f"{threads} torch thread(s) on {cores or '?'} core(s)"
                  + (" — more threads than cores oversubscribes" if cores and threads > cores
                     else ""))
    causes.append("other processes competing for the CPU, or swapping")
    return (f"step {step} took {duration:.1f} s, {duration / median:.0f}x the median "
            f"{median:.2f} s; likely causes: " + "; ".join(causes))


class StopControl:
    """Early-stop decisions of one run: the time limit (anticipated) and stop signals."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.signal_name: str | None = None

    def request(self, name: str) -> None:
        """Ask the run to stop after its current step (what a signal handler does)."""
        if self.signal_name is None:
            log.warning("%s received: stopping after this step, with a validation and a "
                        "resumable checkpoint (a second Ctrl-C stops at once)", name)
        self.signal_name = name

    def reason(self, next_step_s: float | None, final_work_s: float) -> str | None:
        """``"signal"``, ``"time_limit"`` or None: stop when a signal came, or when one more step
        plus the final work (validation, checkpoint) would end past the deadline."""
        if self.signal_name is not None:
            return "signal"
        if self.deadline is None:
            return None
        needed = (next_step_s or 0.0) + final_work_s
        return "time_limit" if time.monotonic() + needed >= self.deadline else None

    @contextmanager
    def signals(self) -> Iterator[StopControl]:
        """Route SIGTERM, SIGUSR1 and a first SIGINT to `request` while the run trains.

        Only in the main thread (where Python allows handlers); previous handlers come back after.
        """
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        names = [n for n in (*_STOP_SIGNALS, "SIGINT") if hasattr(signal, n)]
        previous = {n: signal.getsignal(getattr(signal, n)) for n in names}

        def handler(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if name == "SIGINT" and self.signal_name is not None:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self.request(name)

        for n in names:
            signal.signal(getattr(signal, n), handler)
        try:
            yield self
        finally:
            for n, old in previous.items():
                signal.signal(getattr(signal, n), old)
