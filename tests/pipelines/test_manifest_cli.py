"""`mri-vqvae manifest ...` through click's test runner, on real (tiny) NIfTI files."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import pytest
from click.testing import CliRunner, Result

from mri_vqvae.core.errors import DownloadError, ManifestError
from mri_vqvae.data.manifest import load_manifest
from pipelines import manifest_cmd
from pipelines.cli import cli
from tests.support.volumes import make_head, write_nifti


def nib_describe(path: Path) -> dict:
    img = nib.load(str(path))
    return {"shape": img.shape, "spacing": img.header.get_zooms()}


@pytest.fixture(autouse=True)
def _describer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_cmd, "_describer", lambda: nib_describe)


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["manifest", *args])


@pytest.fixture
def built(head_folder: Path, tmp_path: Path) -> Path:
    (head_folder / "broken.nii.gz").write_bytes(b"this is not a gzip stream")
    out = tmp_path / "m.json"
    result = run("build", str(head_folder), "--source-id", "ixi", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("sub", ["", "build", "verify", "split", "merge", "fetch"])
def test_help(sub: str) -> None:
    result = run(*([sub] if sub else []), "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_build_lists_bad_file_and_exits_zero(built: Path, head_folder: Path) -> None:
    m = load_manifest(built, verify_checksums=True)
    assert sorted(c.path for c in m.cases) == ["subA_T1.nii.gz", "subA_T2.nii.gz",
                                               "subB_T1.nii.gz", "subC_T1.nii.gz"]
    assert {c.subject_id for c in m.cases} == {"subA", "subB", "subC"}
    assert {c.split for c in m.cases} == {"train", "val", "test"} and m.frozen
    assert m.cases[0].shape == (24, 28, 20) and m.cases[0].spacing == (1.5, 1.5, 1.5)
    result = run("build", str(head_folder), "--source-id", "ixi", "--out", str(built))
    assert result.exit_code == 0
    assert "broken.nii.gz" in result.output and "file" in result.output


def test_build_strict_exits_nonzero(head_folder: Path, tmp_path: Path) -> None:
    (head_folder / "broken.nii.gz").write_bytes(b"garbage")
    out = tmp_path / "strict.json"
    result = run("build", str(head_folder), "--source-id", "ixi", "--out", str(out), "--strict")
    assert result.exit_code == 1
    assert "broken.nii.gz" in result.output
    assert len(load_manifest(out).cases) == 4


def test_rebuild_keeps_frozen_splits(built: Path, head_folder: Path) -> None:
    before = {c.case_id: c.split for c in load_manifest(built).cases}
    write_nifti(head_folder / "subD_T1.nii.gz", make_head(seed=9))
    result = run("build", str(head_folder), "--source-id", "ixi", "--out", str(built),
                 "--seed", "123")
    assert result.exit_code == 0, result.output
    assert "keeping the splits of 3 subject(s)" in result.output
    after = {c.case_id: c.split for c in load_manifest(built).cases}
    assert {k: after[k] for k in before} == before and len(after) == 5
    doc = json.loads(built.read_text())
    doc["name"] = "edited"
    built.write_text(json.dumps(doc))
    result = run("build", str(head_folder), "--source-id", "ixi", "--out", str(built))
    assert result.exit_code == 1 and "--force" in result.output
    result = run("build", str(head_folder), "--source-id", "ixi", "--out", str(built), "--force")
    assert result.exit_code == 0 and load_manifest(built).name == "ixi"


def test_build_rejects_bad_options(head_folder: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "m.json")
    result = run("build", str(head_folder), "--source-id", "ixi", "--out", out,
                 "--fractions", "0.9,0.9,0.1")
    assert result.exit_code == 2 and "fractions" in result.output
    result = run("build", str(head_folder), "--source-id", "nowhere", "--out", out,
                 "--catalog", str(manifest_cmd_catalog()))
    assert result.exit_code == 2 and "nowhere" in result.output


def manifest_cmd_catalog() -> Path:
    from mri_vqvae.data.catalog import CATALOG_PATH

    return CATALOG_PATH


def test_verify_names_the_altered_file(built: Path, head_folder: Path) -> None:
    ok = run("verify", str(built), "--catalog", str(manifest_cmd_catalog()))
    assert ok.exit_code == 0 and "ok" in ok.output
    target = head_folder / "subB_T1.nii.gz"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    bad = run("verify", str(built))
    assert bad.exit_code == 1
    assert "ixi_subB_T1" in bad.output and "subB_T1.nii.gz" in bad.output
    assert "sha256" in bad.output
    (head_folder / "subC_T1.nii.gz").unlink()
    bad = run("verify", str(built), "--quick")
    assert bad.exit_code == 1 and "ixi_subC_T1" in bad.output and "missing" in bad.output
    assert "ixi_subB_T1" not in bad.output  # --quick skips checksums


def test_verify_reports_a_hand_edited_manifest(built: Path) -> None:
    doc = json.loads(built.read_text())
    doc["cases"][0]["modality"] = "T2w"
    built.write_text(json.dumps(doc))
    result = run("verify", str(built))
    assert result.exit_code == 1 and "digest" in result.output


def test_split_needs_force(built: Path) -> None:
    result = run("split", str(built), "--seed", "5")
    assert isinstance(result.exception, ManifestError) and "frozen" in str(result.exception)
    result = run("split", str(built), "--seed", "5", "--force", "--fix", "subA=test")
    assert result.exit_code == 0, result.output
    m = load_manifest(built)
    assert m.split_seed == 5
    assert {c.split for c in m.cases if c.subject_id == "subA"} == {"test"}


def test_merge(built: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    write_nifti(other / "subZ_T1.nii.gz", make_head(seed=5))
    second = tmp_path / "b.json"
    assert run("build", str(other), "--source-id", "nfbs", "--out", str(second)).exit_code == 0
    out = tmp_path / "merged.json"
    result = run("merge", str(built), str(second), "--out", str(out), "--name", "both")
    assert result.exit_code == 0, result.output
    merged = load_manifest(out, verify_checksums=True)
    assert merged.name == "both" and len(merged.cases) == 5
    assert {c.source_id for c in merged.cases} == {"ixi", "nfbs"}
    clash = run("merge", str(built), str(built), "--out", str(out), "--name", "twice")
    assert isinstance(clash.exception, ManifestError) and "ixi_subA_T1" in str(clash.exception)


def test_fetch(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    payload = b"volume bytes" * 1000
    (served / "vol.nii.gz").write_bytes(payload)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/vol.nii.gz"
        sha = hashlib.sha256(payload).hexdigest()
        out = tmp_path / "got" / "vol.nii.gz"
        result = run("fetch", url, "--out", str(out), "--sha256", sha)
        assert result.exit_code == 0, result.output
        assert out.read_bytes() == payload
        bad = run("fetch", url, "--out", str(tmp_path / "bad.nii.gz"), "--sha256", "1" * 64)
        assert isinstance(bad.exception, DownloadError) and url in str(bad.exception)
        assert not (tmp_path / "bad.nii.gz").exists()
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)
