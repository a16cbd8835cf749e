"""Training progress: rate, ETA, slow steps, and the stop decisions (time limit, signals)."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest

from mri_vqvae.core.clock import StepClock, format_duration
from mri_vqvae.training.progress import StopControl, slow_step_message


def test_clock_rate_eta_and_line() -> None:
    clock = StepClock(start_step=0, total_steps=10)
    assert clock.median is None and clock.rate == 0 and math.isinf(clock.eta)
    clock.durations.extend([5.0, 1.0, 1.0, 1.0])  # a slow first (warm-up) step is left out
    clock.step = 4
    assert clock.median == 1.0 and clock.rate == 1.0 and clock.eta == 6.0
    assert clock.line(0.5) == "step 4/10  1.00 steps/s  loss 0.5  ETA 6 s"


def test_a_progress_line_is_due_at_the_first_step_then_once_per_interval() -> None:
    clock = StepClock(0, 10)
    clock.durations.append(1.0)
    assert clock.line_due(30.0)       # the first step
    clock.durations.append(1.0)
    assert not clock.line_due(30.0)   # 30 s have not passed
    assert clock.line_due(0.0)


def test_slow_step_is_flagged_only_against_enough_history() -> None:
    clock = StepClock(0, 100)
    clock.durations.extend([9.0, 1.0, 1.0])
    assert not clock.is_slow(20.0)  # too few earlier steps to judge
    clock.durations.extend([1.0, 1.1, 20.0])
    assert clock.is_slow(20.0) and not clock.is_slow(3.0)


def test_slow_step_message_names_precision_and_threads() -> None:
    text = slow_step_message(12, 40.0, 1.0, "bf16", threads=8, cores=2)
    assert "step 12" in text and "40x" in text and "emulated" in text
    assert "8 torch thread(s) on 2 core(s)" in text and "oversubscribes" in text


def test_format_duration() -> None:
    assert [format_duration(s) for s in (42, 450, 7560, math.inf)] == [
        "42 s", "7.5 min", "2.1 h", "?"]


def test_time_limit_leaves_room_for_the_next_step_and_the_final_work() -> None:
    stop = StopControl(deadline=time.monotonic() + 100)
    assert stop.reason(next_step_s=10, final_work_s=10) is None
    assert stop.reason(next_step_s=60, final_work_s=50) == "time_limit"
    assert StopControl(None).reason(1e9, 1e9) is None


def test_sigterm_and_sigusr1_request_a_stop_and_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    for name in ("SIGTERM", "SIGUSR1"):
        with StopControl(None).signals() as stop:
            os.kill(os.getpid(), getattr(signal, name))
            assert stop.reason(0, 0) == "signal" and stop.signal_name == name
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_stops_at_once() -> None:
    with StopControl(None).signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.reason(0, 0) == "signal"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
