"""`preprocess` on tiny volumes: RAS NIfTI that nibabel and SimpleITK agree on, montages."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from mri_vqvae.config import load_config
from mri_vqvae.manifest import Manifest, load_manifest, write_manifest
from mri_vqvae.preprocess import preprocess_manifest
from pipelines.cli import cli
from tests.conftest import make_head, write_nifti


def _manifest(root: Path, names: list[str]) -> Path:
    from mri_vqvae.manifest import Case, sha256_file

    cases = [
        Case(case_id=n, subject_id=n, source_id="synthetic", path=f"{n}.nii.gz",
             sha256=sha256_file(root / f"{n}.nii.gz"), bytes=(root / f"{n}.nii.gz").stat().st_size,
             modality="T1w", shape=(1, 1, 1), spacing=(1.0, 1.0, 1.0), split="train")
        for n in names
    ]
    path = root / "m.json"
    write_manifest(Manifest(name="t", cases=tuple(cases), data_root=root), path)
    return path


@pytest.fixture
def mixed_root(tmp_path: Path) -> Path:
    """Two good oblique-free heads (one with identifying header text) and one constant volume."""
    root = tmp_path / "data"
    root.mkdir()
    write_nifti(root / "good1.nii.gz", make_head(seed=1), descrip=b"Patient John Doe 1970")
    write_nifti(root / "good2.nii.gz", make_head(seed=2), np.diag([1.2, -1.5, 1.8, 1.0]))
    write_nifti(root / "flat.nii.gz", np.full((12, 12, 12), 7.0, np.float32))
    return root


def test_preprocess_writes_ras_nifti_montage_index(mixed_root: Path, tmp_path: Path) -> None:
    manifest = load_manifest(_manifest(mixed_root, ["good1", "good2", "flat"]))
    cfg = load_config("smoke")
    out = tmp_path / "out"
    done, failures = preprocess_manifest(manifest, cfg, out)
    assert [c.case_id for c in done] == ["good1", "good2"]
    assert [(f.case_id, "constant" in f.reason.lower()) for f in failures] == [("flat", True)]
    for case in done:
        path = out / case.image
        img = nib.load(path)
        assert img.shape == cfg.data.spatial_size
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(img.header.get_zooms(), cfg.data.spacing, atol=1e-5)
        np.testing.assert_allclose(img.get_sform(), img.get_qform(), atol=1e-5)
        assert img.header["descrip"].tobytes().strip(b"\0") == b""
        assert b"John" not in path.read_bytes()
        assert_sitk_agrees(path, img.affine)
        data = np.asarray(img.dataobj)
        assert data.min() >= 0 and data.max() <= 1
        assert (out / case.montage).stat().st_size > 1000
    index = json.loads((out / "index.json").read_text())
    assert index["manifest_digest"] == manifest.digest
    assert [c["case_id"] for c in index["cases"]] == ["good1", "good2"]
    assert "flat" in (out / "failures.csv").read_text()


def assert_sitk_agrees(path: Path, affine: np.ndarray) -> None:
    """SimpleITK's LPS geometry, converted to RAS, equals nibabel's affine."""
    img = sitk.ReadImage(str(path))
    direction = np.array(img.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    np.testing.assert_allclose(ras, affine, atol=1e-4)


def test_cli_preprocess_reports_and_strict_exits(mixed_root: Path, tmp_path: Path) -> None:
    manifest = _manifest(mixed_root, ["good1", "flat"])
    runner = CliRunner()
    args = ["preprocess", "--manifest", str(manifest), "--config", "smoke"]
    ok = runner.invoke(cli, [*args, "--out", str(tmp_path / "a")])
    assert ok.exit_code == 0, ok.output
    assert "flat.nii.gz" in ok.output and "1 case(s) failed" in ok.output
    strict = runner.invoke(cli, [*args, "--out", str(tmp_path / "b"), "--strict"])
    assert strict.exit_code != 0


def test_preprocess_is_deterministic(mixed_root: Path, tmp_path: Path) -> None:
    """Same config and input: voxel-identical outputs and identical indexes."""
    manifest = load_manifest(_manifest(mixed_root, ["good1", "good2"]))
    cfg = load_config("smoke")
    for name in ("a", "b"):
        preprocess_manifest(manifest, cfg, tmp_path / name)
    for case in ("good1", "good2"):
        a = np.asarray(nib.load(tmp_path / "a" / "images" / f"{case}.nii.gz").dataobj)
        b = np.asarray(nib.load(tmp_path / "b" / "images" / f"{case}.nii.gz").dataobj)
        assert np.array_equal(a, b)
    index_a = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index_a == json.loads((tmp_path / "b" / "index.json").read_text())
