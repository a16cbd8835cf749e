"""The step loop every training stage shares: run folder, resume, stops, progress, test hooks.

`run_stage` makes (or reopens) the run folder, trains the `Stage` from its step to
``max_steps``, validates and saves checkpoints on the stage's periods, and records how the run
ended. A run also stops cleanly after the current step at its time limit or on SIGTERM / SIGINT
(`mri_vqvae.training.progress.StopControl`): that step is validated and checkpointed, whatever
the periods say, so no trained step is thrown away.

Several processes (DDP, `mri_vqvae.core.distributed`): only rank 0 writes (run folder, metrics,
checkpoints, stage outputs) and validates; the others receive its validation result (a
broadcast) and wait at a barrier after each checkpoints/last save. A stop is agreed by every
rank. A DDP run matches a single-process run with the same global batch up to floating-point
reduction order (tested), not bit for bit; a single-process run and its resume stay bit-identical
on CPU.

Run folders (`mri_vqvae.artifacts.runs`): config.yaml, run.json, metrics.jsonl, tb/, previews/,
checkpoints/{last,best}/, plus what the stage adds.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mri_vqvae.artifacts.runs import RunRecorder, new_run_dir
from mri_vqvae.core import distributed
from mri_vqvae.core.clock import StepClock
from mri_vqvae.training.errors import TrainingError
from mri_vqvae.training.progress import StopControl, slow_step_message
from mri_vqvae.training.resume import restore, restore_rng, save_best_if_better, save_last
from mri_vqvae.training.session import Session

log = logging.getLogger(__name__)

# Test-only hook: with this set to k, the process SIGKILLs itself right after step k's work
# (checkpoint included), so tests can interrupt a run at an exact point without polling; "k:NAME"
# sends signal NAME instead (e.g. "3:SIGTERM", a graceful stop request).
KILL_ENV = "MRI_VQVAE_TEST_KILL_AFTER_STEP"
# Test-only hook: with this set to a folder, every rank saves its final model state_dict and torch
# RNG state to <folder>/rank<r>.pt when the run ends, so tests can compare the ranks of a DDP run.
DUMP_ENV = "MRI_VQVAE_TEST_DUMP_DIR"
PROGRESS_EVERY_S = 30.0  # seconds between progress lines in the log
_STOP_CODES = {None: 0, "time_limit": 1, "signal": 2}


@dataclass(frozen=True)
class TrainResult:
    """Where a run went and how it ended (``stop_reason``: max_steps | time_limit | signal).

    ``best_metric`` is the best validation value of ``metric`` (VQ-VAE: psnr, prior:
    bits_per_latent); ``likelihood`` is the prior's likelihood.json.
    """

    run_dir: Path
    step: int
    stop_reason: str
    best_metric: float | None
    last_checkpoint: Path
    best_checkpoint: Path | None
    metric: str = "psnr"
    likelihood: dict[str, Any] | None = None

    @property
    def best_psnr(self) -> float | None:
        """The best validation PSNR of a VQ-VAE run (None for other stages)."""
        return self.best_metric if self.metric == "psnr" else None


def due(step: int, every: int, last: bool) -> bool:
    """Whether a period of `every` steps falls on `step` (always at the `last` step)."""
    return last or step % every == 0


def _kill_after() -> tuple[int, signal.Signals] | None:
    """The `KILL_ENV` test hook: (step, signal) or None."""
    raw = os.environ.get(KILL_ENV)
    if not raw:
        return None
    step, _, name = raw.partition(":")
    return int(step), signal.Signals[name or "SIGKILL"]


def _after_step(s: Session, terms: dict[str, Tensor], stopping: bool, bar: Any) -> None:
    """Logging, validation, best/last checkpoints and stage outputs due after step `s.step`.

    Under DDP only rank 0 validates, writes stage outputs and logs; the other ranks receive its
    validation result (so every rank agrees on the best metric) and wait for checkpoints/last.
    """
    tc, step, stage, rec = s.tc, s.step, s.stage, s.recorder
    assert rec is not None
    last = step == tc.max_steps or stopping
    epoch = s.epoch_of(step)
    if due(step, tc.log_every, last):
        values = {k: v.item() for k, v in terms.items()}  # codes_used stays an int
        rec.log_metrics(step, epoch, "train", **values, lr=s.optimizer.param_groups[0]["lr"])
        bar.set_postfix({k: f"{values[k]:.4g}" for k in stage.bar_keys})
    if due(step, tc.val_every, last):
        started = time.monotonic()
        val = distributed.broadcast_object(stage.validate(s) if s.is_main else {})
        rec.log_metrics(step, epoch, "val", **val)
        if s.is_main:
            log.info("step %d: %s", step, stage.describe(val))
        save_best_if_better(s, val)
        s.val_seconds = time.monotonic() - started
    if s.is_main:
        stage.after_step(s, step, last)
    if due(step, tc.checkpoint_every, last):
        started = time.monotonic()
        save_last(s)  # last: its random states must be the ones the next step starts from
        s.save_seconds = time.monotonic() - started


def _final_work_estimate(s: Session, clock: StepClock) -> float:
    """Seconds the stop itself takes (validation + checkpoint + the stage's final outputs).

    Measured once a validation has run; before that, one training step per validation batch
    (a step is about 3 forward passes, so this errs on the safe side).
    """
    val = s.val_seconds
    if val is None:
        val = (clock.median or 0.0) * max(1, math.ceil(s.stage.n_val / s.tc.batch_size))
    return val * s.stage.stop_work_factor + (s.save_seconds or 0.0)


def _stop_reason(local: str | None, device: torch.device) -> str | None:
    """The stop reason agreed by every rank (a signal on any rank wins over a time limit)."""
    if not distributed.is_distributed():
        return local
    t = torch.tensor([_STOP_CODES[local]], device=device)  # nccl reduces GPU tensors only
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return {v: k for k, v in _STOP_CODES.items()}[int(t.item())]


def _report_progress(s: Session, clock: StepClock, duration: float, loss: float) -> None:
    """A progress line every `PROGRESS_EVERY_S` (and at the first step); warns on a slow step."""
    if not s.is_main:
        return
    median = clock.median
    if median is not None and clock.is_slow(duration):
        log.warning(slow_step_message(s.step, duration, median, s.precision.name,
                                      torch.get_num_threads(), os.cpu_count()))
    if clock.line_due(PROGRESS_EVERY_S):
        log.info("train-%s %s", s.stage.name, clock.line(loss))


def _loop(s: Session, stop: StopControl) -> str:
    """Train from s.step to max_steps, or until `stop` says so; returns the stop reason."""
    tc, stage = s.tc, s.stage
    kill_after = _kill_after()
    bar = tqdm(total=tc.max_steps, initial=s.step, desc=f"train-{stage.name}", unit="step",
               disable=not (sys.stderr.isatty() and s.is_main), dynamic_ncols=True)
    clock = StepClock(s.step, tc.max_steps)
    try:
        for batch in stage.batches(s):
            terms = stage.train_step(s, batch)
            s.step += 1
            duration = clock.tick(s.step)
            if not torch.isfinite(terms["loss"]):
                raise TrainingError(
                    f"loss became {float(terms['loss'])} at step {s.step}: lower "
                    f"{stage.section}.lr ({tc.lr}), set grad_clip, or use precision=fp32, then "
                    f"resume from {s.last_dir}"
                )
            _report_progress(s, clock, duration, float(terms["loss"]))
            reason = _stop_reason(stop.reason(clock.median, _final_work_estimate(s, clock)),
                                  s.device)
            _after_step(s, terms, reason is not None, bar)
            bar.update(1)
            clock.restart()
            if kill_after is not None and kill_after[0] == s.step:
                os.kill(os.getpid(), kill_after[1])
            if reason is not None and s.step < tc.max_steps:
                if s.is_main:
                    why = (f"time limit of {tc.time_limit_minutes} min" if reason == "time_limit"
                           else f"{stop.signal_name or 'a stop signal'}")
                    log.warning("%s: stopped at step %d of %d after validating it; resumable "
                                "checkpoint in %s", why, s.step, tc.max_steps, s.last_dir)
                return reason
    finally:
        bar.close()
    return "max_steps"


def _dump_for_tests(s: Session) -> None:
    """`DUMP_ENV` test hook: this rank's final state_dict and torch RNG state -> rank<r>.pt."""
    folder = os.environ.get(DUMP_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in s.model.state_dict().items()}
    torch.save({"model": state, "rng": torch.get_rng_state(), "step": s.step,
                "best_metric": s.best_metric, "world": s.world},
               Path(folder) / f"rank{s.rank}.pt")


def _open(s: Session, runs_root: str | Path, resume: str | Path | None,
          manifest_path: str | Path | None, argv: list[str] | None) -> dict[str, Any] | None:
    """Reopen `resume` (loading checkpoints/last on every rank) or make a new run folder (rank
    0, path broadcast); start its recorder. Returns the resume state, None for a new run."""
    state = None
    if resume is not None:
        s.run_dir = Path(resume)
        state = restore(s, s.run_dir)
    else:
        made = (new_run_dir(runs_root, s.stage.name, s.config.name, s.config.seed)
                if s.is_main else None)
        s.run_dir = Path(distributed.broadcast_object(str(made)))
    s.recorder = RunRecorder(
        s.run_dir, s.config, manifest=manifest_path, argv=argv, device=s.device, rank=s.rank,
        resume_step=None if state is None else s.step,
        resumed_from=None if state is None else s.last_dir,
    )
    s.recorder.start()
    s.recorder.update(precision=s.precision.as_dict(), torch_threads=torch.get_num_threads())
    if s.is_main:
        log.info("train-%s: precision %s (%s: %s), %d torch thread(s)", s.stage.name,
                 s.precision.name, s.precision.requested, s.precision.reason,
                 torch.get_num_threads())
    return state


def run_stage(
    s: Session,
    started: float,
    runs_root: str | Path,
    resume: str | Path | None,
    manifest_path: str | Path | None = None,
    argv: list[str] | None = None,
) -> TrainResult:
    """Make (or reopen) the run folder, train, record how it ended; shared by every stage.

    `started` is the command's start (``time.monotonic()``): the time limit counts from it.
    """
    tc = s.tc
    state = _open(s, runs_root, resume, manifest_path, argv)
    assert s.recorder is not None
    s.stage.on_start(s, fresh=state is None)
    s.wrap()
    deadline = None if tc.time_limit_minutes is None else started + 60 * tc.time_limit_minutes
    try:
        if state is not None:
            restore_rng(state, s.device)  # last: nothing may draw before the next step
        with StopControl(deadline).signals() as stop:
            reason = _loop(s, stop) if s.step < tc.max_steps else "max_steps"
        summary = s.stage.on_complete(s, reason)
    except KeyboardInterrupt as exc:
        s.recorder.finish("interrupted", exc)
        raise
    except BaseException as exc:
        s.recorder.finish("failed", exc)
        raise
    s.recorder.update(stop_reason=reason, steps_done=s.step, last_checkpoint=str(s.last_dir))
    s.recorder.finish("completed" if reason == "max_steps" else "interrupted")
    _dump_for_tests(s)
    distributed.barrier()  # rank 0's files are complete before any rank returns
    if s.is_main:
        log.info("run %s stopped at step %d (%s)", s.run_dir, s.step, reason)
    best = s.best_dir if s.best_step is not None else None
    return TrainResult(s.run_dir, s.step, reason, s.best_metric, s.last_dir, best,
                       metric=s.stage.best_key, likelihood=summary)
