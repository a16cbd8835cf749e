"""Typed configuration models: the only place defaults live.

Every model forbids unknown keys. `load_config` reads YAML plus ``key=value`` overrides and turns
any validation failure into a `ConfigError` that names the key and suggests the closest valid one.
Stdlib, pydantic and PyYAML only: importing this module never imports torch.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mri_vqvae.errors import ConfigError

Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """How volumes are loaded and normalised (see `mri_vqvae.transforms`)."""

    spacing: Triple = Field((2.5, 2.5, 2.5), description="target voxel size in mm, RAS order")
    spatial_size: IntTriple = Field((64, 80, 64), description="output shape (D, H, W) after pad/crop")
    percentiles: tuple[float, float] = Field((0.5, 99.5), description="intensity window, in %")
    crop_foreground: bool = True
    foreground_margin: int = Field(2, ge=0, description="voxels kept around the foreground box")
    max_voxels: int = Field(
        2**28, gt=0, description="largest header-declared volume accepted (checked before reading)"
    )
    max_shear: float = Field(
        1e-3, ge=0, description="largest |cos| between affine axes before a volume counts as sheared"
    )

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, v: Triple) -> Triple:
        if min(v) <= 0:
            raise ValueError(f"spacing must be positive in every axis, got {v}")
        return v

    @field_validator("spatial_size")
    @classmethod
    def _positive_size(cls, v: IntTriple) -> IntTriple:
        if min(v) <= 0:
            raise ValueError(f"spatial_size must be positive in every axis, got {v}")
        return v

    @field_validator("percentiles")
    @classmethod
    def _ordered_percentiles(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {v}")
        return v


class AffineAugment(_Strict):
    prob: float = Field(0.5, ge=0, le=1)
    rotate_deg: float = Field(8.0, ge=0, description="max rotation about each axis")
    scale: float = Field(0.08, ge=0, description="max relative zoom per axis")
    translate_vox: float = Field(3.0, ge=0, description="max shift per axis in voxels")


class ElasticAugment(_Strict):
    prob: float = Field(0.2, ge=0, le=1)
    sigma: tuple[float, float] = (5.0, 7.0)
    magnitude: tuple[float, float] = (20.0, 60.0)


class BiasFieldAugment(_Strict):
    prob: float = Field(0.3, ge=0, le=1)
    coeff: float = Field(0.3, ge=0, description="max polynomial coefficient of the log bias field")


class ContrastAugment(_Strict):
    prob: float = Field(0.3, ge=0, le=1)
    gamma: tuple[float, float] = (0.7, 1.5)


class NoiseAugment(_Strict):
    prob: float = Field(0.2, ge=0, le=1)
    std: float = Field(0.02, ge=0, description="Gaussian noise std on the [0, 1] intensity scale")


class AugmentConfig(_Strict):
    """Named random steps added to the training chain, applied in this order."""

    enabled: bool = True
    affine: AffineAugment = AffineAugment()
    elastic: ElasticAugment = ElasticAugment()
    bias_field: BiasFieldAugment = BiasFieldAugment()
    contrast: ContrastAugment = ContrastAugment()
    noise: NoiseAugment = NoiseAugment()


class KitConfig(_Strict):
    """The offline real-MRI kit (`mri-vqvae data kit`)."""

    pseudo_subjects: int = Field(
        8, ge=0, description="augmented templates made per training source (not patients)"
    )
    seed: int = 0


class ExperimentConfig(_Strict):
    """One experiment: everything a run needs besides the manifest."""

    name: str = "default"
    seed: int = 0
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    kit: KitConfig = KitConfig()


CONFIG_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "configs"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, prefix + name + "."))
    return keys


def _explain(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    valid = _valid_keys(ExperimentConfig)
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"  unknown key {key!r}{hint}")
        else:
            lines.append(f"  {key}: {e['msg']} (received {e.get('input')!r})")
    return "\n".join(lines)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a shipped config such as ``smoke`` or ``brain64``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {str(name_or_path)!r} not found: give a YAML path or one of {names}")


def load_config(
    name_or_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Read a YAML experiment file (or the defaults) and apply ``key.sub=value`` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc}); fix the syntax") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at top level, got {type(loaded).__name__}")
        tree = loaded
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def config_digest(model: BaseModel) -> str:
    """sha256 of the canonical JSON of a config model: changes whenever any value changes."""
    canon = json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (what a run directory stores)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
