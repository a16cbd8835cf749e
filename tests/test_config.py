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
