"""`mri-vqvae compare`: two priors evaluated on one VQ-VAE, side by side; bad inputs refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mri_vqvae.core.errors import EvaluationError
from mri_vqvae.data.manifest import load_manifest
from mri_vqvae.evaluation.compare import compare_evaluations, prior_row
from mri_vqvae.evaluation.evaluate import EvaluateSettings, evaluate_runs
from pipelines.cli import cli
from tests.support.runs import make_manifest, make_prior_run, make_unigram_run, make_vqvae_run

SETTINGS = EvaluateSettings(split="test", num_samples=2, seed=1, report_cases=1,
                            num_resamples=100, viewer=False)


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    manifest, path = make_manifest(root, bad=("te2",))
    vq = make_vqvae_run(root / "runs", manifest.digest)
    priors = {"pixelcnn": make_prior_run(root / "runs", vq, manifest.digest),
              "unigram": make_unigram_run(root / "uni", vq, manifest.digest)}
    out = {name: evaluate_runs(vq, load_manifest(path), root / f"eval_{name}", prior_run=run,
                               settings=SETTINGS).out_dir
           for name, run in priors.items()}
    return {**out, "root": root}


def test_each_row_holds_its_evaluations_numbers(evaluations: dict[str, Path],
                                                tmp_path: Path) -> None:
    page = compare_evaluations([evaluations["pixelcnn"], evaluations["unigram"]], tmp_path)
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert [r["prior_kind"] for r in doc["priors"]] == ["pixelcnn", "unigram"]
    for row, name in zip(doc["priors"], ("pixelcnn", "unigram"), strict=True):
        metrics = json.loads((evaluations[name] / "metrics.json").read_text())
        assert row["held_out_bits"] == metrics["likelihood"]["held_out"]["mean"]
        assert row["diversity"] == metrics["samples"]["diversity"]["samples"]
        assert row["memorised"] == metrics["samples"]["memorisation"]["num_flagged"]
        assert row["seconds_per_sample"] == metrics["samples"]["seconds_per_sample"] > 0
        assert row == json.loads(json.dumps(prior_row(evaluations[name], metrics)))
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 2 and "Priors side by side" in html


def test_the_command_writes_the_page(evaluations: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["compare", str(evaluations["pixelcnn"]),
                                      str(evaluations["unigram"]), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "compare.html").is_file()


def test_one_folder_or_a_folder_without_a_prior_is_refused(evaluations: dict[str, Path],
                                                           tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="at least two"):
        compare_evaluations([evaluations["pixelcnn"]], tmp_path)
    bare = tmp_path / "bare"
    shutil.copytree(evaluations["unigram"], bare)
    metrics = json.loads((bare / "metrics.json").read_text())
    (bare / "metrics.json").write_text(json.dumps({**metrics, "samples": None}))
    with pytest.raises(EvaluationError, match="no prior with samples"):
        compare_evaluations([evaluations["pixelcnn"], bare], tmp_path / "o")
    with pytest.raises(EvaluationError, match="cannot be read"):
        compare_evaluations([evaluations["pixelcnn"], tmp_path], tmp_path / "o")


def test_evaluations_of_another_split_or_model_are_refused(evaluations: dict[str, Path],
                                                           tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(evaluations["unigram"], other)
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["inputs"]["split"] = "val"
    (other / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(EvaluationError, match="split 'val'.*same held-out scans"):
        compare_evaluations([evaluations["pixelcnn"], other], tmp_path / "o")
