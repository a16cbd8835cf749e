"""Checks shared by the training tests of both stages: killed runs and exact resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from mri_vqvae.artifacts.checkpoint import load_checkpoint
from mri_vqvae.artifacts.resume import load_resume_state
from mri_vqvae.artifacts.runs import read_metrics
from mri_vqvae.training.loop import KILL_ENV
from pipelines.cli import cli
from tests.support.paths import REPO


def assert_same_weights(a: Path, b: Path) -> None:
    """The checkpoint folders `a` and `b` hold bit-identical model tensors."""
    sa, sb = load_checkpoint(a).model.state_dict(), load_checkpoint(b).model.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors differ after resume: {different}"


def timeless_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl of `run_dir` without the wall-clock field."""
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run_dir)]


def train_in_process(args: list[str], runs: Path, kind: str) -> tuple[Path, str]:
    """Run ``mri-vqvae args --runs-root runs`` to completion in-process; (run folder, output)."""
    result = CliRunner().invoke(cli, [*args, "--runs-root", str(runs)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = (runs / kind).iterdir()
    return run_dir, result.output


def kill_mid_epoch(module: str, args: list[str], runs: Path, kind: str) -> Path:
    """Run ``python -m module args --runs-root runs``, SIGKILLed after step 5; its run folder.

    The last checkpoint of the killed run is at step 4, mid-epoch (the smoke epochs are 3 steps).
    """
    env = {**os.environ, KILL_ENV: "5", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, "--runs-root", str(runs)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (run_dir,) = (runs / kind).iterdir()
    assert load_resume_state(run_dir / "checkpoints" / "last")["step"] == 4
    return run_dir


def assert_resumed_exactly(reference: Path, run_dir: Path) -> dict:
    """`run_dir`, killed at step 4 and resumed, equals the uninterrupted `reference` run:
    weights, optimizer state and metrics; returns its run.json."""
    for name in ("last", "best"):
        assert_same_weights(reference / "checkpoints" / name, run_dir / "checkpoints" / name)
    opt_a = load_resume_state(reference / "checkpoints" / "last")["optimizer"]["state"]
    opt_b = load_resume_state(run_dir / "checkpoints" / "last")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    assert timeless_metrics(run_dir) == timeless_metrics(reference)
    run = json.loads((run_dir / "run.json").read_text())
    (entry,) = run["resumed_from"]
    assert (entry["step"], entry["dropped_metric_lines"]) == (4, 1)
    return run
