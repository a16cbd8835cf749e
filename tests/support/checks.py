"""Checks shared by several test folders: agreement with SimpleITK, opens that fail, a tampered
manifest file named by ``manifest verify``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from mri_vqvae.data.manifest import load_manifest
from pipelines.cli import cli


def assert_sitk_agrees(path: Path, affine: np.ndarray) -> None:
    """SimpleITK's LPS geometry, converted to RAS, equals nibabel's affine."""
    img = sitk.ReadImage(str(path))
    direction = np.array(img.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    np.testing.assert_allclose(ras, affine, atol=1e-4)


def fail_opens_under(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int) -> None:
    """`os.open` of a new file inside `folder` raises OSError(`code`), as a full/RO disk would."""
    real = os.open

    def fake(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & os.O_CREAT and Path(os.fsdecode(path)).is_relative_to(folder):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", fake)




def assert_flipped_byte_is_named(manifest_path: Path, case: int, offset: int) -> None:
    """Flip the byte at `offset` of case number `case` (same size); ``manifest verify`` then
    fails and names the case, its path and the digest mismatch."""
    manifest = load_manifest(manifest_path)
    victim = manifest.cases[case]
    with open(manifest.data_root / victim.path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    result = CliRunner().invoke(cli, ["manifest", "verify", str(manifest_path)])
    assert result.exit_code != 0
    assert victim.case_id in result.output and victim.path in result.output
    assert "does not match" in result.output
