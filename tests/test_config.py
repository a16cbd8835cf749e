"""Config loading: defaults, YAML + overrides, unknown keys with suggestions, digests."""

from __future__ import annotations

from pathlib import Path

import pytest

from mri_vqvae.config import ExperimentConfig, config_digest, dump_config, load_config
from mri_vqvae.core.errors import ConfigError


def test_defaults_validate() -> None:
    cfg = load_config()
    assert cfg == ExperimentConfig()
    assert cfg.data.spacing == (2.5, 2.5, 2.5)


def test_shipped_configs_load() -> None:
    assert load_config("smoke").data.spatial_size == (16, 16, 16)
    assert load_config("brain64").data.spatial_size == (64, 80, 64)


def test_override_parses_yaml_values() -> None:
    cfg = load_config("smoke", ["data.spacing=[2, 2, 2]", "augment.enabled=false", "seed=7"])
    assert cfg.data.spacing == (2.0, 2.0, 2.0)
    assert cfg.augment.enabled is False
    assert cfg.seed == 7


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(ConfigError, match=r"'data.spacng'.*did you mean 'data.spacing'"):
        load_config(overrides=["data.spacng=2"])


def test_unknown_key_in_yaml_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  spatial_sise: [8, 8, 8]\n")
    with pytest.raises(ConfigError, match=r"(?s)bad.yaml.*did you mean 'data.spatial_size'"):
        load_config(path)


@pytest.mark.parametrize(
    "override",
    ["data.spacing=[0, 1, 1]", "data.percentiles=[90, 10]", "data.spatial_size=[8, -1, 8]",
     "augment.noise.prob=1.5"],
)
def test_invalid_values_rejected_with_received_value(override: str) -> None:
    with pytest.raises(ConfigError, match="received"):
        load_config(overrides=[override])


def test_malformed_override_and_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(overrides=["no-equals-sign"])
    bad = tmp_path / "broken.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-config")


def test_digest_tracks_every_value() -> None:
    a = load_config()
    b = load_config(overrides=["data.foreground_margin=3"])
    assert config_digest(a.data) == config_digest(load_config().data)
    assert config_digest(a.data) != config_digest(b.data)


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config("smoke", ["seed=3"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


# ---- model sections chosen by kind ------------------------------------------------------------


def test_a_legacy_vqvae_section_reads_as_the_autoencoder(tmp_path: Path) -> None:
    legacy = tmp_path / "old.yaml"
    legacy.write_text("vqvae:\n  levels: 2\n  channels: [8, 16]\n  num_res_channels: [8, 16]\n"
                      "  codebook_size: 64\nprior:\n  codebook_size: 64\n  num_layers: 3\n")
    cfg = load_config(legacy)
    assert cfg.autoencoder.kind == "vqvae" and cfg.autoencoder.channels == (8, 16)
    assert cfg.prior.kind == "pixelcnn" and cfg.prior.num_layers == 3
    assert cfg.prior.codebook_size == 64 == cfg.autoencoder.codebook_size
    both = ["vqvae.codebook_size=32", "prior.codebook_size=32"]  # as old configs needed
    assert load_config(legacy, both).prior.codebook_size == 32


def test_the_prior_codebook_is_filled_in_and_a_contradiction_is_refused() -> None:
    smoke = load_config("smoke")
    assert smoke.prior.codebook_size == smoke.autoencoder.codebook_size == 32
    with pytest.raises(ConfigError, match=r"prior.codebook_size=7 differs from autoencoder"):
        load_config("smoke", ["prior.codebook_size=7"])


def test_switching_the_prior_kind_keeps_only_its_settings() -> None:
    cfg = load_config("smoke", ["prior.kind=unigram", "prior.smoothing=0.5"])
    assert cfg.prior.kind == "unigram" and cfg.prior.smoothing == 0.5
    assert cfg.prior.codebook_size == cfg.autoencoder.codebook_size
    with pytest.raises(ConfigError, match="prior.smoothing is not a setting of prior kind"):
        load_config("smoke", ["prior.smoothing=0.5"])  # a pixelcnn has no smoothing


def test_switching_the_two_level_coarse_stage_keeps_only_its_settings() -> None:
    """``prior.coarse.kind=absorbing`` drops the PixelCNN settings set before it; the settings
    the absorbing stage has are kept, and a PixelCNN setting after the switch is refused."""
    base = ["prior.kind=twolevel", "prior.coarse.hidden_channels=4"]
    cfg = load_config("smoke", [*base, "prior.coarse.kind=absorbing", "prior.coarse.channels=8",
                                "prior.coarse_masks=4"])
    assert cfg.prior.coarse.kind == "absorbing" and cfg.prior.coarse.channels == 8
    assert cfg.prior.coarse_masks == 4
    assert load_config("smoke", base).prior.coarse.hidden_channels == 4
    with pytest.raises(ConfigError, match="hidden_channels"):
        load_config("smoke", [*base, "prior.coarse.kind=absorbing",
                              "prior.coarse.hidden_channels=4"])
    with pytest.raises(ConfigError, match="coarse_masks=4 applies to an absorbing coarse"):
        load_config("smoke", [*base, "prior.coarse_masks=4"])


def test_unknown_kind_and_label_field_are_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="pixelcnn.*unigram"):
        load_config("smoke", ["prior.kind=diffusion"])
    with pytest.raises(ConfigError, match="label_field must be one of"):
        load_config("smoke", ["prior.label_field=age"])
    assert load_config("smoke", ["prior.label_field=modality"]).prior.label_field == "modality"
