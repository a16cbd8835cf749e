"""`preprocess` on tiny volumes: RAS NIfTI that nibabel and SimpleITK agree on, montages."""

from __future__ import annotations

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

from mri_vqvae.config import load_config
from mri_vqvae.core.outputs import OutputError, output_lock
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data.manifest import Manifest, load_manifest, write_manifest
from mri_vqvae.tasks.preprocess import KILL_ENV, preprocess_manifest
from pipelines.cli import cli
from tests.support.checks import assert_sitk_agrees, fail_opens_under
from tests.support.volumes import make_head, write_nifti


def _manifest(root: Path, names: list[str]) -> Path:
    from mri_vqvae.core.provenance import sha256_file
    from mri_vqvae.data.case import Case

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


# --- output folders: writability, a full disk mid-run, resume after a kill, one run at a time ----

ROOT = Path(__file__).resolve().parents[2]


def count_computed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The case ids `preprocess_manifest` computes (not reuses) from now on."""
    import mri_vqvae.tasks.preprocess as prep

    computed: list[str] = []
    real = prep.preprocess_case

    def counting(item: dict, chain: object, out_dir: Path) -> prep.PreprocessedCase:
        computed.append(item["case_id"])
        return real(item, chain, out_dir)  # type: ignore[arg-type]

    monkeypatch.setattr(prep, "preprocess_case", counting)
    return computed


def outputs(out: Path) -> dict[str, bytes]:
    """Bytes of every result file that must not depend on interruptions or reruns."""
    files = [*(out / "images").glob("*"), *(out / "montages").glob("*"), out / "index.json",
             out / "failures.csv"]
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(files)}


def temp_files(out: Path) -> list[Path]:
    return sorted(out.rglob(".*.tmp*"))


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
             args: list[str]) -> tuple[int, str]:
    """`mri-vqvae ARGS` through the console script's `main` in this process: (exit code, stderr)."""
    from pipelines.cli import main

    monkeypatch.setattr(sys, "argv", ["mri-vqvae", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return int(info.value.code or 0), capsys.readouterr().err


def test_simulated_read_only_out_fails_before_any_case(
    mixed_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """EROFS (simulated: tests run as root) on creating any file in --out: OutputError first."""
    manifest = _manifest(mixed_root, ["good1", "good2"])
    out = tmp_path / "ro"
    computed = count_computed(monkeypatch)
    fail_opens_under(monkeypatch, out, errno.EROFS)
    with pytest.raises(OutputError, match="read-only") as info:
        preprocess_manifest(load_manifest(manifest), load_config("smoke"), out)
    assert f"output folder {out}" in str(info.value) and computed == []
    code, err = run_main(monkeypatch, capsys, ["preprocess", "--manifest", str(manifest),
                                               "--out", str(out), "--config", "smoke"])
    assert code == 2 and f"output folder {out}" in err and "read-only" in err
    assert "Traceback" not in err and computed == []
    assert not (out / "images").exists()


def test_out_under_a_file_exits_nonzero_without_traceback(mixed_root: Path,
                                                          tmp_path: Path) -> None:
    """A real unwritable --out (a path through a file: ENOTDIR), through the console script."""
    manifest = _manifest(mixed_root, ["good1"])
    (tmp_path / "file").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "preprocess", "--manifest", str(manifest),
         "--out", str(tmp_path / "file" / "out"), "--config", "smoke"],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"output folder {tmp_path / 'file' / 'out'}" in proc.stderr
    assert "Traceback" not in proc.stderr and "preprocessed" not in proc.stdout


def disk_full_at_save(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """nibabel's save writes part of the file, then fails with ENOSPC on its `call`-th call."""
    calls = []
    real = nib.save

    def save(img: object, filename: str) -> None:
        calls.append(filename)
        if len(calls) == call:
            Path(filename).write_bytes(b"\x1f\x8b partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real(img, filename)  # type: ignore[arg-type]

    monkeypatch.setattr(nib, "save", save)


def test_disk_full_at_the_second_case_fails_the_run_and_keeps_the_first(
    mixed_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    names = ["good1", "good2"]
    manifest, cfg = load_manifest(_manifest(mixed_root, names)), load_config("smoke")
    out = tmp_path / "out"
    disk_full_at_save(monkeypatch, call=2)
    with pytest.raises(OutputError, match="disk is full") as info:
        preprocess_manifest(manifest, cfg, out)
    assert str(out) in str(info.value)
    sidecar = json.loads((out / "cases" / "good1.json").read_text())
    assert sidecar["image_sha256"] == sha256_file(out / "images" / "good1.nii.gz")
    assert nib.load(out / "images" / "good1.nii.gz").shape == cfg.data.spatial_size
    assert not (out / "images" / "good2.nii.gz").exists() and not (out / "index.json").exists()
    assert temp_files(out) == []
    disk_full_at_save(monkeypatch, call=2)
    args = ["preprocess", "--manifest", str(mixed_root / "m.json"), "--out", str(tmp_path / "cli"),
            "--config", "smoke"]
    code, err = run_main(monkeypatch, capsys, args)
    assert code == 2 and "disk is full" in err and "Traceback" not in err
    monkeypatch.undo()
    computed = count_computed(monkeypatch)
    done, _ = preprocess_manifest(manifest, cfg, out)  # space freed: the rerun finishes the job
    assert computed == ["good2"] and [c.case_id for c in done] == names


def test_rerun_reuses_finished_cases_and_redoes_changed_ones(
    mixed_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, cfg = load_manifest(_manifest(mixed_root, ["good1", "good2"])), load_config("smoke")
    out = tmp_path / "out"
    first, _ = preprocess_manifest(manifest, cfg, out)
    before = outputs(out)
    computed = count_computed(monkeypatch)
    again, _ = preprocess_manifest(manifest, cfg, out)
    assert computed == [] and again == first and outputs(out) == before
    (out / "images" / "good1.nii.gz").write_bytes(b"corrupt")
    preprocess_manifest(manifest, cfg, out)
    assert computed == ["good1"] and outputs(out) == before
    computed.clear()
    other = load_config("smoke", ("data.percentiles=[1.0,99.0]",))
    preprocess_manifest(manifest, other, out)
    assert computed == ["good1", "good2"]
    computed.clear()
    write_nifti(mixed_root / "good2.nii.gz", make_head(seed=5))  # the source file changes
    preprocess_manifest(load_manifest(_manifest(mixed_root, ["good1", "good2"])), other, out)
    assert computed == ["good2"]


def test_kill_9_then_rerun_resumes_without_redoing_or_leaving_temp_files(
    mixed_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["flat", "good1", "good2"]
    manifest, cfg = load_manifest(_manifest(mixed_root, names)), load_config("smoke")
    preprocess_manifest(manifest, cfg, tmp_path / "reference")
    out = tmp_path / "killed"
    env = {**os.environ, KILL_ENV: "1"}
    killed = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "preprocess", "--manifest",
         str(mixed_root / "m.json"), "--out", str(out), "--config", "smoke"],
        capture_output=True, text=True, env=env, check=False, cwd=ROOT, timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.stem for p in (out / "cases").glob("*.json")) == ["good1"]
    assert not (out / "index.json").exists()
    # what a kill in the middle of the next write leaves behind
    (out / "images" / ".good2.nii.gz.k1ll3d.tmp.nii.gz").write_bytes(b"\x1f\x8b partial")
    (out / "montages" / ".good2.png.k1ll3d.tmp.png").write_bytes(b"\x89PNG partial")
    finished = [out / "images" / "good1.nii.gz", out / "montages" / "good1.png",
                out / "cases" / "good1.json"]
    mtimes = [p.stat().st_mtime_ns for p in finished]
    computed = count_computed(monkeypatch)
    done, failures = preprocess_manifest(manifest, cfg, out)
    assert computed == ["flat", "good2"]  # good1 reused; flat failed again
    assert [c.case_id for c in done] == ["good1", "good2"]
    assert [f.case_id for f in failures] == ["flat"]
    assert [p.stat().st_mtime_ns for p in finished] == mtimes
    assert temp_files(out) == []
    assert outputs(out) == outputs(tmp_path / "reference")


def test_second_run_into_a_locked_out_is_refused(mixed_root: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Another open of out/.lock holds the flock (as a concurrent run would)."""
    manifest = load_manifest(_manifest(mixed_root, ["good1"]))
    out = tmp_path / "out"
    computed = count_computed(monkeypatch)
    with output_lock(out), pytest.raises(OutputError, match=f"pid {os.getpid()} ") as info:
        preprocess_manifest(manifest, load_config("smoke"), out)
    assert f"output folder {out} is in use" in str(info.value) and computed == []
    assert not (out / "images").exists()
    done, _ = preprocess_manifest(manifest, load_config("smoke"), out)  # lock released
    assert [c.case_id for c in done] == ["good1"]
