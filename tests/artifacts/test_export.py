"""`mri-vqvae export` / `info`: an export loads alone, bit for bit; bad folders and --out are
refused; the card and info agree with the facts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import mri_vqvae as mv
from mri_vqvae.artifacts.export import ExportError, export_run, model_facts, open_models
from mri_vqvae.artifacts.model_card import info_lines
from mri_vqvae.core.provenance import sha256_file
from pipelines.cli import cli
from tests.support.paths import REPO
from tests.support.shared_runs import SharedRuns, make_shared_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SharedRuns:
    return make_shared_runs(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def exported(runs: SharedRuns, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_run(runs.prior, tmp_path_factory.mktemp("out") / "model")


def _metrics_json(path: Path, vqvae_sha: str, prior_sha: str) -> Path:
    summary = {"mean": 21.5, "std": 1.0, "ci": [20.5, 22.5], "ci_level": 0.95, "n": 3,
               "n_excluded_non_finite": 0}
    doc = {"format": "mri-vqvae-evaluation", "created_utc": "20260101T000000Z",
           "inputs": {"vqvae_sha256": vqvae_sha, "prior_sha256": prior_sha, "split": "test",
                      "manifest_digest": "ab" * 32},
           "reconstruction": {"num_cases": 3, "metrics": {"psnr": summary, "ssim": summary}},
           "likelihood": {"held_out": {**summary, "mean": 4.2}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_an_export_loads_alone_with_identical_tensors_and_outputs(
        runs: SharedRuns, tmp_path: Path) -> None:
    root = shutil.copytree(runs.root, tmp_path / "copy")
    prior_run = root / runs.prior.relative_to(runs.root)
    before = mv.load(prior_run)
    scan = root / runs.scan.name
    expected = (before.encode(scan), before.sample(2, seed=3), before.likelihood(scan))
    out = export_run(prior_run, tmp_path / "export")
    shutil.rmtree(root / "runs")
    after = mv.load(out)
    for ours, theirs in ((after.vqvae, before.vqvae), (after.prior.prior, before.prior.prior)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert after.prior.sha256s == before.prior.sha256s
    assert torch.equal(after.encode(scan), expected[0])
    for x, y in zip(after.sample(2, seed=3), expected[1], strict=True):
        assert np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj))
    assert np.array_equal(np.asarray(after.likelihood(scan).dataobj),
                          np.asarray(expected[2].dataobj))


def test_a_vqvae_export_holds_its_checkpoint_without_resume_state(
        runs: SharedRuns, tmp_path: Path) -> None:
    out = export_run(runs.vqvae, tmp_path / "vq")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "export.json", "manifest.json",
                                                     "vqvae"]
    weights = out / "vqvae" / "model.safetensors"
    assert sha256_file(weights) == sha256_file(runs.vqvae / "checkpoints/best/model.safetensors")
    assert json.loads((out / "vqvae" / "config.json").read_text())["files"].keys() == {
        "model.safetensors"}
    assert mv.load(out).prior is None


def test_an_export_records_no_folder_of_the_training_machine(exported: Path) -> None:
    extra = json.loads((exported / "prior" / "config.json").read_text())["extra"]
    assert extra["vqvae_checkpoint"] == "../vqvae"
    assert "/" not in extra["latents_dir"] and extra["latents_dir"]
    assert str(exported.parent) not in (exported / "prior" / "config.json").read_text()
    from mri_vqvae.artifacts.loading import open_prior_run
    run = open_prior_run(exported / "prior")  # the recorded ../vqvae, no override
    assert run.paths.vqvae_checkpoint == (exported / "vqvae").resolve()


def test_an_export_keeps_its_runs_training_summary_and_data_credits(
        runs: SharedRuns, exported: Path, tmp_path: Path) -> None:
    from mri_vqvae.artifacts.export import training_citations
    from mri_vqvae.artifacts.loading import open_prior_run
    from mri_vqvae.artifacts.run_summary import training_summary
    from mri_vqvae.data.kit_sources import run_citations
    from mri_vqvae.tasks.sample import SampleSettings, sample_volumes

    card = json.loads((exported / "export.json").read_text())
    assert training_summary(exported) == card["autoencoder"]["training"]
    assert training_summary(exported, "prior") == card["prior"]["training"]
    assert training_summary(exported, "prior") == training_summary(runs.prior)
    assert training_citations(exported) == run_citations(runs.vqvae)
    assert training_citations(runs.vqvae) == run_citations(runs.vqvae)
    sampled = sample_volumes(open_prior_run(exported / "prior"), SampleSettings(2, seed=0),
                             tmp_path / "s")
    sidecar = json.loads((sampled.montage.parent / "sample_0000.json").read_text())
    assert sidecar["training_data"] == run_citations(runs.vqvae)  # credited, not "unknown"


def test_the_facts_of_an_export_are_its_runs(runs: SharedRuns, exported: Path) -> None:
    assert model_facts(open_models(exported)) == model_facts(open_models(runs.prior))


def test_the_card_names_size_sources_licences_and_use(exported: Path) -> None:
    facts = json.loads((exported / "export.json").read_text())
    card = (exported / "README.md").read_text()
    assert f"{facts['autoencoder']['parameters']:,}" in card
    assert facts["manifest_digest"] in card
    assert "Fonov VS" in card and "BSD-3-Clause" in card
    assert "Research only" in card and "Not for diagnosis" in card
    assert facts["training_data"]["train_cases"] == 3
    assert facts["licences"] == ["BSD-3-Clause"]


def test_held_out_metrics_are_carried_with_n(runs: SharedRuns, tmp_path: Path) -> None:
    opened = open_models(runs.prior)
    metrics = _metrics_json(tmp_path / "eval" / "metrics.json",
                            opened.autoencoder.weights_sha256, opened.prior.sha256s["prior"])
    out = export_run(runs.prior, tmp_path / "out", metrics=metrics)
    held = json.loads((out / "export.json").read_text())["held_out_metrics"]
    assert held["num_cases"] == 3 and held["split"] == "test"
    assert held["reconstruction"]["psnr"]["n"] == 3 and held["bits_per_latent"]["mean"] == 4.2
    assert "| PSNR (dB) | 21.5 [20.5, 22.5] | 3 |" in (out / "README.md").read_text()


def test_metrics_found_under_the_runs_root_are_used(runs: SharedRuns) -> None:
    opened = open_models(runs.vqvae)
    found = runs.root / "runs" / "eval" / "20260101T000000Z-run" / "metrics.json"
    _metrics_json(found, opened.autoencoder.weights_sha256, "0" * 64)
    try:
        held = model_facts(open_models(runs.vqvae))["held_out_metrics"]
    finally:
        shutil.rmtree(found.parent.parent)
    assert held["evaluation"] == found.parent.name and held["bits_per_latent"] is None


def test_metrics_of_other_weights_are_refused(runs: SharedRuns, tmp_path: Path) -> None:
    metrics = _metrics_json(tmp_path / "metrics.json", "1" * 64, "2" * 64)
    with pytest.raises(ExportError, match="evaluates VQ-VAE weights 111111111111"):
        export_run(runs.vqvae, tmp_path / "out", metrics=metrics)
    assert not (tmp_path / "out").exists()


def test_an_incomplete_run_is_not_exported(runs: SharedRuns, tmp_path: Path) -> None:
    run = shutil.copytree(runs.vqvae, tmp_path / "run")
    (run / "checkpoints" / "best" / "COMPLETE").unlink()
    with pytest.raises(ExportError, match=r"incomplete run: .*no complete checkpoint"):
        export_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_is_kept_without_force(runs: SharedRuns, exported: Path) -> None:
    before = sha256_file(exported / "export.json")
    with pytest.raises(ExportError, match=r"is not empty .*pass --force"):
        export_run(runs.vqvae, exported)
    assert sha256_file(exported / "export.json") == before


def test_force_replaces_an_export_but_no_other_folder(runs: SharedRuns, tmp_path: Path) -> None:
    out = export_run(runs.prior, tmp_path / "out")
    export_run(runs.vqvae, out, force=True)
    assert json.loads((out / "export.json").read_text())["prior"] is None
    assert not (out / "prior").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old folder is left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an earlier export"):
        export_run(runs.vqvae, other, force=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_info_text_and_json_agree(exported: Path) -> None:
    runner = CliRunner()
    text = runner.invoke(cli, ["info", str(exported)])
    as_json = runner.invoke(cli, ["info", str(exported), "--json"])
    assert text.exit_code == 0 and as_json.exit_code == 0, text.output + as_json.output
    facts = json.loads(as_json.output)
    printed = dict(line.split(": ", 1) for line in text.output.splitlines())
    assert printed == dict(info_lines(facts))
    assert printed["kind"] == "vqvae + pixelcnn"
    assert printed["prior parameters"] == f"{facts['prior']['parameters']:,}"
    assert printed["manifest digest"] == facts["manifest_digest"]
    assert printed["licences"] == "BSD-3-Clause"


def test_the_export_command_writes_the_folder(runs: SharedRuns, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["export", str(runs.vqvae), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "README.md").is_file()


def test_a_legacy_prior_run_exports_and_loads(tmp_path: Path) -> None:
    legacy = REPO / "tests" / "fixtures" / "legacy_2055c4e" / "runs"
    vq_run = legacy / "vqvae" / "20261201T110509Z-smoke-s0"
    prior_run = legacy / "prior" / "20261201T110515Z-smoke-s0"
    out = export_run(prior_run, tmp_path / "legacy", vqvae=vq_run)
    loaded = mv.load(out)
    assert loaded.prior.sha256s == mv.load(prior_run, vqvae=vq_run).prior.sha256s
    facts = json.loads((out / "export.json").read_text())
    assert facts["kind"] == "vqvae + pixelcnn" and facts["prior"]["training_steps"] == 3


def _data_copy(runs: SharedRuns, dest: Path) -> Path:
    """A copy of the shared runs' case files only (the data a user holds), under `dest`."""
    from mri_vqvae.data.manifest import load_manifest
    manifest = load_manifest(runs.vqvae / "manifest.json")
    for case in manifest.cases:
        (dest / case.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.data_root / case.path, dest / case.path)
    return dest


def test_an_export_carries_its_training_manifest(runs: SharedRuns, exported: Path,
                                                 tmp_path: Path) -> None:
    from mri_vqvae.artifacts.export import training_manifest
    from mri_vqvae.data.manifest import load_manifest
    carried = exported / "manifest.json"
    assert carried.read_bytes() == (runs.vqvae / "manifest.json").read_bytes()
    manifest = training_manifest(exported, _data_copy(runs, tmp_path / "data"))
    assert manifest.digest == load_manifest(runs.vqvae / "manifest.json").digest
    assert manifest.data_root == (tmp_path / "data").resolve()


def test_training_manifest_refuses_a_changed_real_scan_and_names_it(
        runs: SharedRuns, exported: Path, tmp_path: Path) -> None:
    from mri_vqvae.artifacts.export import training_manifest
    data = _data_copy(runs, tmp_path / "data")
    victim = training_manifest(exported, data).cases[0]
    raw = bytearray((data / victim.path).read_bytes())
    raw[-1] ^= 0xFF
    (data / victim.path).write_bytes(bytes(raw))
    with pytest.raises(ExportError, match=victim.case_id):
        training_manifest(exported, data)


def test_training_manifest_does_not_check_augmented_bytes(runs: SharedRuns, exported: Path,
                                                          tmp_path: Path) -> None:
    """Augmented copies differ in bytes between instruction sets; they are not verified."""
    import dataclasses

    from mri_vqvae.artifacts.export import training_manifest
    from mri_vqvae.data.manifest import load_manifest, write_manifest
    copy = tmp_path / "export"
    shutil.copytree(exported, copy)
    manifest = load_manifest(runs.vqvae / "manifest.json")
    train = [c for c in manifest.cases if c.split == "train"]
    parent = train[0]
    child = dataclasses.replace(parent, case_id="copy-aug00", origin="augmented",
                                derived_from=parent.case_id, path="augmented/copy-aug00.nii.gz")
    write_manifest(dataclasses.replace(manifest, cases=(*manifest.cases, child)),
                   copy / "manifest.json")
    data = _data_copy(runs, tmp_path / "data")
    (data / "augmented").mkdir()
    raw = bytearray((data / parent.path).read_bytes())
    raw[-1] ^= 0xFF  # not the recorded sha256 (the parent's)
    (data / child.path).write_bytes(bytes(raw))
    assert "copy-aug00" in {c.case_id for c in training_manifest(copy, data).cases}
    (copy / "manifest.json").unlink()
    with pytest.raises(ExportError, match="no manifest.json"):
        training_manifest(copy, data)
