"""`mri-vqvae reconstruct`: outputs, grids, failures, resume after a kill (no case done twice)."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mri_vqvae.core.outputs import OutputError
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data.manifest import load_manifest
from mri_vqvae.metrics.image import CASE_METRICS
from mri_vqvae.tasks.reconstruct import KILL_ENV, ReconstructError, reconstruct_manifest
from pipelines.cli import cli
from tests.support.runs import CFG, make_manifest, make_vqvae_run

CASES = {"a0": "test", "a1": "test", "a2": "test", "a3": "test", "b0": "train"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recon")
    manifest, path = make_manifest(root, CASES)
    return {"root": root, "manifest": path, "vqvae": make_vqvae_run(root / "runs",
                                                                    manifest.digest)}


@pytest.fixture(scope="module")
def bad_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recon_bad")
    manifest, path = make_manifest(root, {"a0": "test", "a1": "test", "a2": "test"},
                                   bad=("a1",))
    return {"root": root, "manifest": path, "vqvae": make_vqvae_run(root / "runs",
                                                                    manifest.digest)}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _outputs(out: Path) -> dict[str, bytes]:
    """Bytes of every result file that must not depend on interruptions."""
    files = sorted((out / "images").glob("*.nii.gz")) + [out / "metrics.csv"]
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


def test_outputs_on_the_preprocessed_grid(world: dict[str, Path], tmp_path: Path) -> None:
    manifest = load_manifest(world["manifest"])
    result = reconstruct_manifest(world["vqvae"], manifest, tmp_path / "r", split="test",
                                  threads=1)
    assert result.computed == ["a0", "a1", "a2", "a3"] and not result.reused
    rows = _rows(tmp_path / "r" / "metrics.csv")
    assert list(rows[0]) == ["case_id", *CASE_METRICS, "codes_used"]
    assert [r["case_id"] for r in rows] == ["a0", "a1", "a2", "a3"]
    for cid in result.computed:
        img = nib.load(str(tmp_path / "r" / "images" / f"{cid}.nii.gz"))
        doc = json.loads((tmp_path / "r" / "cases" / f"{cid}.json").read_text())
        assert img.shape == CFG.data.spatial_size
        np.testing.assert_allclose(img.header.get_zooms(), CFG.data.spacing)
        np.testing.assert_allclose(img.affine, doc["affine"], atol=1e-5)
        data = img.get_fdata()
        assert data.min() >= 0.0 and data.max() <= 1.0
        assert doc["image_sha256"] == sha256_file(tmp_path / "r" / doc["image"])
        assert doc["grid"] == "preprocessed"
        row = rows[result.computed.index(cid)]
        for key in (*CASE_METRICS, "codes_used"):  # the CSV holds the sidecar's values
            assert float(row[key]) == pytest.approx(doc["metrics"][key], rel=1e-12), key
    index = json.loads((tmp_path / "r" / "index.json").read_text())
    assert [c["case_id"] for c in index["cases"]] == result.computed
    assert _rows(tmp_path / "r" / "failures.csv") == []
    workers = reconstruct_manifest(world["vqvae"], manifest, tmp_path / "w", split="test",
                                   threads=1, num_workers=2)
    assert workers.computed == result.computed
    assert _outputs(tmp_path / "w") == _outputs(tmp_path / "r")


def test_native_space_matches_the_input_grid(world: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["reconstruct", "--vqvae", str(world["vqvae"]),
                                      "--manifest", str(world["manifest"]), "--split", "train",
                                      "--out", str(tmp_path / "n"), "--native-space",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    src = nib.load(str(world["root"] / "data" / "b0.nii.gz"))
    rec = nib.load(str(tmp_path / "n" / "images" / "b0.nii.gz"))
    assert rec.shape == src.shape
    np.testing.assert_allclose(rec.affine, src.affine, atol=1e-5)
    assert json.loads((tmp_path / "n" / "cases" / "b0.json").read_text())["grid"] == "native"
    again = CliRunner().invoke(cli, ["reconstruct", "--vqvae", str(world["vqvae"]), "--manifest",
                                     str(world["manifest"]), "--split", "train", "--out",
                                     str(tmp_path / "n")])
    assert isinstance(again.exception, ReconstructError) and "grid" in str(again.exception)


def test_bad_case_goes_to_failures_or_stops_strict(bad_world: dict[str, Path],
                                                   tmp_path: Path) -> None:
    args = ["reconstruct", "--vqvae", str(bad_world["vqvae"]), "--manifest",
            str(bad_world["manifest"]), "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "lax")])
    assert result.exit_code == 0, result.output
    (failure,) = _rows(tmp_path / "lax" / "failures.csv")
    assert failure["case_id"] == "a1" and failure["path"].endswith("a1.nii.gz")
    assert "constant" in failure["reason"]
    assert [r["case_id"] for r in _rows(tmp_path / "lax" / "metrics.csv")] == ["a0", "a2"]
    strict = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "strict"), "--strict"])
    assert isinstance(strict.exception, ReconstructError) and "a1" in str(strict.exception)
    assert (tmp_path / "strict" / "cases" / "a0.json").is_file()
    assert not (tmp_path / "strict" / "cases" / "a2.json").exists()


def test_disk_full_mid_run_fails_the_run_not_the_case(world: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = nib.save, []

    def save(img: object, filename: str) -> None:  # the 2nd image write finds the disk full
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real(img, filename)  # type: ignore[arg-type]

    monkeypatch.setattr(nib, "save", save)
    out = tmp_path / "r"
    with pytest.raises(OutputError, match="disk is full") as info:
        reconstruct_manifest(world["vqvae"], load_manifest(world["manifest"]), out,
                             split="test", threads=1)
    assert str(out) in str(info.value)
    assert not (out / "failures.csv").exists()  # not listed as a bad case


def test_rerun_skips_verified_cases_and_redoes_changed_ones(world: dict[str, Path],
                                                            tmp_path: Path) -> None:
    manifest = load_manifest(world["manifest"])
    out = tmp_path / "r"
    first = reconstruct_manifest(world["vqvae"], manifest, out, split="test", threads=1)
    before = _outputs(out)
    again = reconstruct_manifest(world["vqvae"], manifest, out, split="test", threads=1)
    assert again.computed == [] and again.reused == first.computed
    (out / "images" / "a1.nii.gz").write_bytes(b"corrupt")
    (out / "cases" / "a2.json").unlink()  # image written, kill before its sidecar
    third = reconstruct_manifest(world["vqvae"], manifest, out, split="test", threads=1)
    assert third.computed == ["a1", "a2"] and third.reused == ["a0", "a3"]
    assert _outputs(out) == before


def _cli(world: dict[str, Path], out: Path, kill_after: int | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    if kill_after is not None:
        env[KILL_ENV] = str(kill_after)
    args = [sys.executable, "-m", "pipelines.cli", "reconstruct", "--vqvae", str(world["vqvae"]),
            "--manifest", str(world["manifest"]), "--split", "test", "--out", str(out),
            "--device", "cpu", "--threads", "1"]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300,
                          check=False, cwd=Path(__file__).resolve().parents[2])


def test_killed_batch_resumes_without_repeating_or_losing_a_case(
    world: dict[str, Path], tmp_path: Path
) -> None:
    manifest = load_manifest(world["manifest"])
    reference = tmp_path / "uninterrupted"
    reconstruct_manifest(world["vqvae"], manifest, reference, split="test", threads=1)
    out = tmp_path / "killed"
    killed = _cli(world, out, kill_after=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = sorted(p.stem for p in (out / "cases").glob("*.json"))
    assert done == ["a0", "a1"] and not (out / "metrics.csv").exists()
    first_session = {json.loads((out / "cases" / f"{c}.json").read_text())["session"]
                     for c in done}
    mtimes = {c: (out / "images" / f"{c}.nii.gz").stat().st_mtime_ns for c in done}
    resumed = _cli(world, out, kill_after=None)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "reconstructed 2 case(s), reused 2" in resumed.stdout
    sessions = {c: json.loads((out / "cases" / f"{c}.json").read_text())["session"]
                for c in ("a0", "a1", "a2", "a3")}
    assert {sessions["a0"], sessions["a1"]} == first_session
    assert sessions["a2"] == sessions["a3"] and sessions["a2"] not in first_session
    assert {c: (out / "images" / f"{c}.nii.gz").stat().st_mtime_ns for c in done} == mtimes
    assert not list(out.rglob(".*.tmp*")), "a temp file was left behind"
    assert _outputs(out) == _outputs(reference)
