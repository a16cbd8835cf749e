"""The README's main job, at toy sizes: kit → manifest → preprocess → montages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.kit]


def test_quick_demo_runs_end_to_end(tmp_path: Path) -> None:
    env = dict(os.environ, MRI_VQVAE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "demo", "--quick", "--out", str(tmp_path / "runs")],
        capture_output=True, text=True, env=env, check=False, timeout=900,
    )
    if proc.returncode != 0 and "no kit file could be fetched" in proc.stderr:
        pytest.skip(f"the kit cannot be downloaded here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    montages = list((tmp_path / "runs").glob("*/preprocessed/montages/*.png"))
    images = list((tmp_path / "runs").glob("*/preprocessed/images/*.nii.gz"))
    assert len(montages) == len(images) >= 6
    assert "montages in" in proc.stdout
