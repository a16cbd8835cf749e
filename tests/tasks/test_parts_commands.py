"""``--part I/N`` then ``mri-vqvae merge`` on preprocess, encode, reconstruct and likelihood
--manifest: the merged folder is what one process writes (byte for byte where one process is
deterministic), failures of any part are merged, parts resume, and parts run at once safely."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mri_vqvae.artifacts.loading import open_prior_run
from mri_vqvae.data.manifest import load_manifest
from mri_vqvae.tasks.encode import encode_manifest
from mri_vqvae.tasks.likelihood import likelihood_map
from mri_vqvae.tasks.likelihood_batch import likelihood_manifest
from mri_vqvae.tasks.parts import PARTS, parse_part
from mri_vqvae.tasks.preprocess import preprocess_manifest
from mri_vqvae.tasks.reconstruct import reconstruct_manifest
from pipelines.cli import cli
from tests.support.runs import CFG, make_manifest, make_vqvae_run, save_vqvae_run, write_cases

CASES = {"a": "train", "b": "train", "c": "train", "d": "val", "e": "test"}


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five heads, case c unreadable (it falls in part 2 of 2 and part 2 of 3)."""
    return write_cases(tmp_path_factory.mktemp("heads"), CASES, bad=("c",))


def _merge(out: Path) -> str:
    result = CliRunner().invoke(cli, ["merge", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not (out / PARTS).exists()
    return result.output


def _bytes(out: Path, *names: str) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in names}


def _doc(path: Path, drop: tuple[str, ...] = ()) -> dict:
    doc = json.loads(path.read_text())
    for key in drop:
        doc.pop(key, None)
    for case in doc.get("cases", []):
        for key in drop:
            case.pop(key, None)
    return doc


def test_preprocess_parts_merge_byte_identical(heads: Path, tmp_path: Path) -> None:
    manifest = load_manifest(heads)
    preprocess_manifest(manifest, CFG, tmp_path / "one")
    for i in (2, 1):
        preprocess_manifest(manifest, CFG, tmp_path / "parts", part=parse_part(f"{i}/2"))
    assert not (tmp_path / "parts" / "index.json").exists()  # parts never write the tables
    assert "1 failure(s)" in _merge(tmp_path / "parts")
    names = ("index.json", "failures.csv")
    assert _bytes(tmp_path / "parts", *names) == _bytes(tmp_path / "one", *names)
    assert "c," in (tmp_path / "parts" / "failures.csv").read_text()


def test_encode_parts_resume_and_merge_like_one_process(heads: Path, tmp_path: Path) -> None:
    run = save_vqvae_run(tmp_path / "vq")
    manifest = load_manifest(heads)
    encode_manifest(run, manifest, tmp_path / "one", device="cpu")
    out = tmp_path / "parts"
    shares = {}
    for i in (1, 2, 3):
        shares[i] = encode_manifest(run, manifest, out, device="cpu", part=parse_part(f"{i}/3"))
    assert [r.encoded for r in shares.values()] == [["a", "b"], ["d"], ["e"]]
    assert [f.case_id for f in shares[2].failures] == ["c"]
    again = encode_manifest(run, manifest, out, device="cpu", part=parse_part("1/3"))
    assert (again.encoded, again.reused) == ([], ["a", "b"])  # the rerun resumes
    _merge(out)
    assert _doc(out / "index.json", ("updated_utc",)) == _doc(tmp_path / "one" / "index.json",
                                                              ("updated_utc",))
    names = ("failures.csv", "a.npy", "b.npy", "d.npy", "e.npy")
    assert _bytes(out, *names) == _bytes(tmp_path / "one", *names)


def test_two_encode_parts_at_once_into_one_folder(heads: Path, tmp_path: Path) -> None:
    run = save_vqvae_run(tmp_path / "vq")
    manifest = load_manifest(heads)
    encode_manifest(run, manifest, tmp_path / "one", device="cpu")
    out = tmp_path / "parts"
    errors: list[BaseException] = []

    def part(text: str) -> None:
        try:
            encode_manifest(run, manifest, out, device="cpu", part=parse_part(text))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=part, args=(t,)) for t in ("1/2", "2/2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _merge(out)
    assert _doc(out / "index.json", ("updated_utc",)) == _doc(tmp_path / "one" / "index.json",
                                                              ("updated_utc",))


def test_reconstruct_parts_merge_like_one_process(tmp_path: Path) -> None:
    manifest, path = make_manifest(tmp_path, {"a0": "test", "a1": "test", "a2": "test",
                                              "a3": "test"}, bad=("a1",))
    vq = make_vqvae_run(tmp_path / "runs", manifest.digest)
    reconstruct_manifest(vq, manifest, tmp_path / "one", threads=1)
    out = tmp_path / "parts"
    for i in (1, 2):
        reconstruct_manifest(vq, manifest, out, threads=1, part=parse_part(f"{i}/2"))
    _merge(out)
    names = ("metrics.csv", "failures.csv")
    assert _bytes(out, *names) == _bytes(tmp_path / "one", *names)
    assert _doc(out / "index.json", ("session",)) == _doc(tmp_path / "one" / "index.json",
                                                          ("session",))
    merged = (out / "index.json").read_bytes()
    again = reconstruct_manifest(vq, manifest, out, threads=1)  # one process over the folder
    assert again.computed == [] and (out / "index.json").read_bytes() == merged


def test_likelihood_manifest_equals_per_scan_maps(heads: Path, run_dir: Path,
                                                  tmp_path: Path) -> None:
    run = open_prior_run(run_dir)
    manifest = load_manifest(heads)
    one = likelihood_manifest(run, manifest, tmp_path / "one")
    assert [f.case_id for f in one.failures] == ["c"]
    for record in one.records:
        single = likelihood_map(run, manifest.data_root / f"{record['case_id']}.nii.gz")
        stored = nib.load(tmp_path / "one" / "maps" / record["map"]).get_fdata(dtype=np.float32)
        np.testing.assert_array_equal(stored, single.bits_map)
        assert record["mean_bits_per_latent"] == single.mean_bits
    out = tmp_path / "parts"
    for i in (1, 2):
        likelihood_manifest(run, manifest, out, part=parse_part(f"{i}/2"))
    _merge(out)
    names = ("likelihood.csv", "failures.csv")
    assert _bytes(out, *names) == _bytes(tmp_path / "one", *names)
    again = likelihood_manifest(run, manifest, out)
    assert again.computed == [] and len(again.reused) == 4


def test_likelihood_cli_manifest_needs_one_source(heads: Path, run_dir: Path,
                                                  tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["likelihood", "--prior", str(run_dir), "--out",
                                      str(tmp_path / "x")])
    assert result.exit_code != 0 and "--input SCAN" in result.output
    result = CliRunner().invoke(cli, ["likelihood", "--prior", str(run_dir), "--manifest",
                                      str(heads), "--out", str(tmp_path / "m"), "--part", "3/2"])
    assert result.exit_code != 0 and "--part" in result.output


def test_the_slurm_array_script_encodes_as_one_process(heads: Path, tmp_path: Path) -> None:
    """scripts/slurm_encode_array.sh run as sbatch would run three array tasks (the SLURM
    variables set, the commands on PATH), then merged: one process's latents."""
    import os
    import subprocess
    import sys

    from tests.support.paths import REPO

    run = save_vqvae_run(tmp_path / "vq")
    encode_manifest(run, load_manifest(heads), tmp_path / "one", device="cpu")
    out = tmp_path / "array"
    bin_dir = str(Path(sys.executable).parent)
    for task in range(3):
        env = dict(os.environ, VQVAE=str(run), MANIFEST=str(heads), OUT=str(out),
                   SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT="3",
                   SLURM_CPUS_PER_TASK="1", PATH=bin_dir + os.pathsep + os.environ["PATH"])
        proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm_encode_array.sh")],
                              env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / PARTS).iterdir()) == ["1-of-3", "2-of-3", "3-of-3"]
    _merge(out)
    drop = ("updated_utc", "manifest_path")  # the CLI records the manifest's path
    assert _doc(out / "index.json", drop) == _doc(tmp_path / "one" / "index.json", drop)
    missing = subprocess.run(["bash", str(REPO / "scripts" / "slurm_encode_array.sh")],
                             env={"PATH": os.environ["PATH"]}, capture_output=True, text=True,
                             timeout=60, check=False)
    assert missing.returncode != 0 and "set VQVAE" in missing.stderr
