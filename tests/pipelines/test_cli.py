"""The console script: every subcommand has help; user errors exit 2 with a message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines.cli import cli
from tests.support.volumes import write_nifti

SUBCOMMANDS = ["demo", "data", "manifest", "preprocess", "sample", "likelihood", "encode",
               "train-prior", "reconstruct", "evaluate", "export", "info", "compare"]


def test_help_lists_subcommands() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output


@pytest.mark.parametrize(
    "args",
    [["demo"], ["data"], ["data", "kit"], ["manifest"], ["manifest", "build"],
     ["manifest", "verify"], ["manifest", "split"], ["manifest", "merge"], ["manifest", "fetch"],
     ["preprocess"], ["sample"], ["likelihood"], ["encode"], ["train-prior"], ["reconstruct"],
     ["evaluate"], ["export"], ["info"], ["compare"]],
)
def test_each_subcommand_has_help(args: list[str]) -> None:
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_user_error_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    import numpy as np

    from mri_vqvae.core.provenance import sha256_file
    from mri_vqvae.data.case import Case
    from mri_vqvae.data.manifest import Manifest, write_manifest

    write_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8, 8), np.float32))
    case = Case(case_id="flat", subject_id="s", source_id="x", path="flat.nii.gz",
                sha256=sha256_file(tmp_path / "flat.nii.gz"), bytes=1, modality="T1w",
                shape=(8, 8, 8), spacing=(1.0, 1.0, 1.0), split="train")
    write_manifest(Manifest(name="m", cases=(case,), data_root=tmp_path), tmp_path / "m.json")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "preprocess", "--manifest",
         str(tmp_path / "m.json"),
         "--out", str(tmp_path / "out"), "--config", "smoke", "--strict"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "flat.nii.gz" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_config_key_suggests(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "data", "kit", "--out", str(tmp_path),
         "--set", "kit.pseudo_subject=2"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "did you mean 'kit.pseudo_subjects'" in proc.stderr
