"""checkpoints/last and checkpoints/best of a session, and exact resume from checkpoints/last.

checkpoints/last holds the weights and buffers (EMA codebook included), the optimizer state, the
step, the best validation metric and every random state, captured after all the work of its step
(validation, preview). Resuming rebuilds the model, loads that state, restores the random states
last and continues with the next batch; metrics.jsonl loses the lines written after the
checkpoint. On CPU the result is bit-identical to an uninterrupted run. A stage adds what else it
needs (`Stage.resume_state`: the VQ-VAE's discriminator and its optimizer); the learning rate is
a function of the step (`mri_vqvae.training.schedule`), so no schedule state is stored.

Under DDP only rank 0 writes; the others wait at a barrier after each checkpoints/last save.
Every rank loads checkpoints/last at a resume, and rank 0's saved random states are restored on
every rank (the CUDA state of rank 0's GPU onto each rank's GPU): the VQ-VAE step draws only from
the global RNG, which stays identical on every rank, and the prior's per-rank draws come from an
RNG forked per (seed, step, rank), which a resume reproduces without saving any per-rank state.
Resume states written before this version also hold ``epoch``, ``sampler_position`` and
``steps_per_epoch``; the global step alone fixes the batch order, so they are not read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mri_vqvae.artifacts.checkpoint import load_checkpoint, save_checkpoint
from mri_vqvae.artifacts.checkpoint_folder import resolve_checkpoint
from mri_vqvae.artifacts.resume import capture_rng_state, load_resume_state, restore_rng_state
from mri_vqvae.core import distributed
from mri_vqvae.core.errors import CheckpointError
from mri_vqvae.models import registry
from mri_vqvae.training.errors import TrainingError
from mri_vqvae.training.session import Session

log = logging.getLogger(__name__)


def _extra(s: Session, val: dict[str, float] | None = None) -> dict[str, Any]:
    return {"experiment": s.config.model_dump(mode="json"), "run": s.run_dir.name,
            **s.stage.extra(), f"best_{s.stage.best_key}": s.best_metric,
            "best_step": s.best_step, "val": val or {}}


def _cuda_index(device: torch.device) -> int:
    """The CUDA device whose random state a checkpoint's ``rng.cuda[i]`` is, -1 on CPU."""
    if device.type != "cuda":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


def save_last(s: Session) -> Path:
    """checkpoints/last with the full resume state; random states captured now.

    Under DDP rank 0 writes it and every rank waits at a barrier until it is on disk.
    """
    if s.is_main:
        state = {
            "optimizer": s.optimizer.state_dict(),
            "step": s.step,
            "best_metric": None if s.best_metric is None else float(s.best_metric),
            "best_step": -1 if s.best_step is None else s.best_step,
            "train_cases": s.stage.n_train,
            "rng_device": _cuda_index(s.device),
            "rng": capture_rng_state(),
            **s.stage.resume_state(),
        }
        save_checkpoint(s.last_dir, s.model, s.stage.kind, s.stage.model_config, _extra(s),
                        state, step=s.step)
    distributed.barrier()
    return s.last_dir


def save_best_if_better(s: Session, val: dict[str, float]) -> None:
    """checkpoints/best when validation `val` beats the best so far (every rank agrees)."""
    key = s.stage.best_key
    value = val[key]
    if not s.is_better(value):
        return
    s.best_metric, s.best_step = value, s.step
    if s.is_main:
        save_checkpoint(s.best_dir, s.model, s.stage.kind, s.stage.model_config,
                        _extra(s, val), step=s.step)
    if s.recorder is not None:
        s.recorder.update(best_checkpoint=str(s.best_dir), best_step=s.step,
                          **{f"best_val_{key}": value})


def resumable(run_dir: Path) -> Path:
    """The complete checkpoints/last folder of `run_dir`, or a `TrainingError` saying why not."""
    if not (run_dir / "run.json").is_file():
        raise TrainingError(f"cannot resume {run_dir}: not a run folder (no run.json)")
    try:
        return resolve_checkpoint(run_dir / "checkpoints" / "last")
    except CheckpointError as exc:
        raise TrainingError(
            f"cannot resume {run_dir}: {exc} (a run stopped before its first checkpoint has "
            "nothing to resume; start a new run)"
        ) from None


def recorded_info(run_dir: str | Path) -> dict[str, Any]:
    """The run.json of a run to resume, or a `TrainingError` when it cannot be read."""
    path = Path(run_dir) / "run.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"cannot resume {run_dir}: {path} is unreadable ({exc})") from None
    if not isinstance(info, dict):
        raise TrainingError(f"cannot resume {run_dir}: {path} is unreadable (not an object)")
    return info


def training_input(
    resume: str | Path | None,
    given: str | Path | None,
    recorded: Callable[[str | Path], Path],
    missing: str,
) -> str | Path:
    """What a stage trains on: `given`, else (resuming) what the run recorded, `recorded(resume)`.

    `resume` is checked resumable first; neither one is a `TrainingError` saying `missing`.
    """
    if resume is not None:
        resumable(Path(resume))
        if given is None:
            given = recorded(resume)
    if given is None:
        raise TrainingError(missing)
    return given


def _stored_config(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model config as this version writes it (defaults of newer fields filled)."""
    return registry.model_kind(kind).config.model_validate(config).model_dump(mode="json")


def restore(s: Session, run_dir: Path) -> dict[str, Any]:
    """Load checkpoints/last of `run_dir` into the session; returns its resume state.

    Checkpoint kinds of older versions count as the kind they are now (``prior``: pixelcnn).
    """
    folder = resumable(run_dir)
    stage = s.stage
    try:
        loaded = load_checkpoint(folder)
        state = load_resume_state(folder)
        kind = registry.model_kind(loaded.kind).name
        stored = _stored_config(loaded.kind, loaded.config)
    except CheckpointError as exc:
        raise TrainingError(f"cannot resume {run_dir}: {exc}") from None
    if kind != stage.kind:
        raise TrainingError(
            f"cannot resume {run_dir}: it holds a {kind!r} model, not the {stage.kind!r} model "
            f"that {stage.model_section}.kind asks for; resume it with its own config "
            f"(--resume without --config/--set reads its config.yaml) and the command that made "
            f"it"
        )
    wanted = stage.model_config.model_dump(mode="json")
    if stored != wanted:
        changed = sorted(k for k in wanted if stored.get(k) != wanted[k])
        raise TrainingError(
            f"cannot resume {run_dir}: its checkpoint holds a {kind} model with different "
            f"{stage.model_section}.{changed} than the config given; resume with the run's own "
            f"config.yaml (drop --config/--set for {stage.model_section}.*)"
        )
    stage.check_resume(run_dir, loaded.extra)
    if state.get("train_cases") != stage.n_train:
        log.warning("resuming with %d train cases, the run had %s: batch order changes",
                    stage.n_train, state.get("train_cases"))
    s.model.load_state_dict(loaded.model.state_dict())
    s.optimizer.load_state_dict(state["optimizer"])
    s.step = int(state["step"])
    stage.load_resume_state(state, s.step)
    s.best_metric = state.get("best_metric")
    best_step = int(state.get("best_step", -1))
    s.best_step = None if best_step < 0 else best_step
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Restore the random states of a resume state; under DDP on CUDA, the saving rank's GPU
    state goes onto this rank's GPU (the ranks' states are identical by construction)."""
    rng = state["rng"]
    saved_index = int(state.get("rng_device", 0))
    if not distributed.is_distributed() or device.type != "cuda":
        restore_rng_state(rng)
        return
    cuda = list(rng.get("cuda") or [])
    restore_rng_state({**rng, "cuda": []})
    if 0 <= saved_index < len(cuda):
        torch.cuda.set_rng_state(torch.as_tensor(cuda[saved_index]).cpu(), device)
