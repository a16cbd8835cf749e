"""The pretrained model shipped in the package: it loads, its files are the ones its card names,
and (with the kit) it reproduces the held-out figures of its model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mri_vqvae as mv
from mri_vqvae.artifacts.export import MANIFEST, ExportError, training_manifest
from mri_vqvae.config import load_config
from mri_vqvae.core.errors import DownloadError, MriVqvaeError
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data.kit import build_kit
from mri_vqvae.evaluation.evaluate import EvaluateSettings, evaluate_runs
from mri_vqvae.pretrained_models import NAMES, pretrained_path
from tests.support.paths import MIRROR

FOLDER = pretrained_path()
CARD = json.loads((FOLDER / "export.json").read_text())


def test_the_shipped_model_loads_with_the_weights_its_card_names() -> None:
    model = mv.pretrained()
    assert model.prior is not None and model.opened.exported is not None
    for role, folder in (("autoencoder", "vqvae"), ("prior", "prior")):
        assert CARD[role]["weights_sha256"] == sha256_file(FOLDER / folder / "model.safetensors")
    assert model.prior.sha256s["vqvae"] == sha256_file(FOLDER / "vqvae" / "model.safetensors")
    assert model.prior.extra["label_field"] == "modality"
    assert model.latent_shape == (16, 20, 16)
    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert size < 13 * 2**20  # the size the docs state: about 12 MB


def test_the_shipped_model_records_no_machine_folder() -> None:
    for file in FOLDER.rglob("*"):
        if file.suffix in (".json", ".md", ".yaml"):
            text = file.read_text()
            assert "/tmp/" not in text and "/work/" not in text and "/root/" not in text, file


def test_an_unknown_pretrained_name_is_refused_naming_the_shipped_ones() -> None:
    with pytest.raises(MriVqvaeError, match="shipped: " + ", ".join(NAMES)):
        pretrained_path("brain256")


@pytest.mark.slow
@pytest.mark.kit
def test_the_shipped_model_reproduces_its_card_on_the_kit_test_split(tmp_path: Path) -> None:
    config = load_config(FOLDER / "configs" / "vqvae.yaml")
    try:
        build_kit(tmp_path / "kit", config.kit, config.augment,
                  MIRROR if (MIRROR / "SHA256SUMS").is_file() else None)
    except DownloadError as exc:
        pytest.skip(f"the kit cannot be downloaded here: {exc}")
    try:
        manifest = training_manifest(FOLDER, tmp_path / "kit")
    except ExportError as exc:
        pytest.skip(f"the kit here lacks the cohort (no open_ms mirror): {exc}")
    assert manifest.matches(CARD["manifest_digest"])  # the manifest the model was trained on
    result = evaluate_runs(FOLDER / "vqvae", manifest, tmp_path / "eval",
                           prior_run=FOLDER / "prior",
                           settings=EvaluateSettings(num_samples=2, max_train_cases=2,
                                                     report_cases=0, viewer=False),
                           manifest_path=FOLDER / MANIFEST)
    card = CARD["held_out_metrics"]
    measured = result.metrics["reconstruction"]["metrics"]
    for name, tolerance in (("psnr", 0.05), ("ssim", 0.002), ("ms_ssim", 0.002)):
        assert measured[name]["n"] == card["reconstruction"][name]["n"] == 10
        assert measured[name]["mean"] == pytest.approx(card["reconstruction"][name]["mean"],
                                                       abs=tolerance)
    assert result.metrics["training"] == [CARD["autoencoder"]["training"],
                                          CARD["prior"]["training"]]
    trained_on = result.metrics["inputs"]["data_citations"]["trained_on"]
    assert trained_on == CARD["training_data"]["citations"]  # credited through the export
    bits = result.metrics["likelihood"]["held_out"]
    assert bits["mean"] == pytest.approx(card["bits_per_latent"]["mean"], abs=0.02)
