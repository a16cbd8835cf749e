"""How a training run ended, in words: for the demo's summary, `evaluate`'s metrics and the report.

Reads a run folder's run.json and config.yaml only (no torch), so anything holding a run path
can say whether the run trained every configured step, or stopped early (time limit, signal) and
which checkpoint the results come from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

_STAGE_SECTION = {"vqvae": "train_vqvae", "prior": "train_prior"}


def _read(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" \
            else yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def training_summary(run_dir: str | Path, role: str = "autoencoder") -> dict[str, Any]:
    """``{stage, run, steps_done, max_steps, stop_reason, complete, best_step, precision,
    time_limit_minutes}`` of a run folder; missing facts are None (an older run may lack some).
    An export folder (no run.json) gives the summary its export.json recorded for `role`
    (``autoencoder`` or ``prior``) when the run was exported."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        recorded = (_read(run_dir / "export.json").get(role) or {}).get("training")
        if isinstance(recorded, dict):
            return recorded
    info = _read(run_dir / "run.json")
    config = _read(run_dir / "config.yaml")
    stage = info.get("stage") or run_dir.parent.name
    train = config.get(_STAGE_SECTION.get(stage, ""), {}) or {}
    precision = info.get("precision") or {}
    reason = info.get("stop_reason")
    return {
        "stage": stage,
        "run": run_dir.name,
        "steps_done": info.get("steps_done"),
        "max_steps": train.get("max_steps"),
        "stop_reason": reason,
        "complete": reason == "max_steps",
        "best_step": info.get("best_step"),
        "precision": precision.get("precision") if isinstance(precision, dict) else None,
        "time_limit_minutes": train.get("time_limit_minutes"),
    }


def describe_stop(summary: dict[str, Any]) -> str:
    """One plain sentence: every step trained, or why and where the run stopped early."""
    done, total = summary.get("steps_done"), summary.get("max_steps")
    best = summary.get("best_step")
    best_text = f"best checkpoint: step {best}" if best is not None else "no best checkpoint"
    reason = summary.get("stop_reason")
    if reason == "max_steps":
        return f"trained all {done} steps ({best_text})"
    if reason == "time_limit":
        why = f"the time limit of {summary.get('time_limit_minutes')} min (a safety net) fired"
    elif reason == "signal":
        why = "a stop signal arrived"
    else:
        return f"stop reason unknown ({done} of {total} steps; {best_text})"
    return (f"STOPPED EARLY: {why} at step {done} of {total}; results use the {best_text} "
            f"(the last step was validated)")
