"""Typed configuration models: the only place defaults live.

Every model forbids unknown keys. `load_config` reads YAML plus ``key=value`` overrides and turns
any validation failure into a `ConfigError` that names the key and suggests the closest valid one.
The model sections (``autoencoder:``, ``prior:``) are chosen by their ``kind`` field among the
config classes of `mri_vqvae.models.registry`. Stdlib, pydantic and PyYAML only: importing this
module never imports torch.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mri_vqvae.config.augment import (  # noqa: F401  (the package's public names)
    DOMAIN_RANDOMISATION,
    AugmentConfig,
)
from mri_vqvae.config.fields import ADDED
from mri_vqvae.config.train import AutoencoderTrainConfig, TrainConfig  # noqa: F401
from mri_vqvae.core.errors import ConfigError
from mri_vqvae.core.strict import StrictModel
from mri_vqvae.models import registry

Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


class DataConfig(StrictModel):
    """How volumes are loaded and normalised (see `mri_vqvae.data.transforms`)."""

    spacing: Triple = Field((2.5, 2.5, 2.5), description="target voxel size in mm, RAS order")
    spatial_size: IntTriple = Field((64, 80, 64), description="output (D, H, W) after pad/crop")
    percentiles: tuple[float, float] = Field((0.5, 99.5), description="intensity window, in %")
    crop_foreground: bool = True
    foreground_margin: int = Field(2, ge=0, description="voxels kept around the foreground box")
    max_voxels: int = Field(
        2**28, gt=0, description="largest header-declared volume accepted (checked before reading)"
    )
    max_shear: float = Field(
        1e-3, ge=0, description="largest |cos| between affine axes before a volume is sheared"
    )
    min_size: int = Field(
        12,
        ge=1,
        description="fewest voxels accepted along every axis of the stored volume (checked from "
        "the header): smaller ones are thumbnails, localisers or failed exports. 12 admits a "
        "thick-slab stack of 12 slices; lower it on purpose for smaller volumes",
    )

    @field_validator("spacing", "spatial_size")
    @classmethod
    def _positive_axes(cls, v: Triple | IntTriple, info: Any) -> Triple | IntTriple:
        if min(v) <= 0:
            raise ValueError(f"{info.field_name} must be positive in every axis, got {v}")
        return v

    @field_validator("percentiles")
    @classmethod
    def _ordered_percentiles(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {v}")
        return v


COHORT_MODALITIES = ("T1w", "T2w", "FLAIR")
"""Contrasts of the kit's real-patient cohort, in canonical order."""


class KitConfig(StrictModel):
    """The offline real-MRI kit (`mri-vqvae data kit`)."""

    pseudo_subjects: int = Field(
        8, ge=0, description="augmented templates made per training source (not patients)"
    )
    spacing: float = Field(1.5, gt=0, description="isotropic mm of the written pseudo-subjects")
    seed: int = 0
    cohort: bool = Field(
        True,
        description="include the real MS patients of the open_ms longitudinal source (downloaded "
        "from their pinned URLs, or copied from a mirror: --mirror / MRI_VQVAE_KIT_MIRROR); "
        "never augmented",
    )
    cohort_modalities: tuple[str, ...] = Field(
        COHORT_MODALITIES,
        description="contrasts of the cohort in the kit, any of T1w, T2w, FLAIR (kept in that "
        "order; e.g. [T1w] for a T1-only model)",
    )

    @field_validator("cohort_modalities")
    @classmethod
    def _known_modalities(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in v if m not in COHORT_MODALITIES]
        if unknown or not v or len(set(v)) != len(v):
            raise ValueError(
                f"cohort_modalities must be distinct values of {list(COHORT_MODALITIES)} (at "
                f"least one), got {list(v)}; to leave the cohort out set kit.cohort=false"
            )
        return tuple(m for m in COHORT_MODALITIES if m in v)


AutoencoderSection = Annotated[
    Union[registry.config_classes("autoencoder")],  # noqa: UP007 (a runtime tuple of classes)
    Field(discriminator="kind"),
]
PriorSection = Annotated[
    Union[registry.config_classes("prior")],  # noqa: UP007
    Field(discriminator="kind"),
]
_DEFAULT_KINDS = {"autoencoder": "vqvae", "prior": "pixelcnn"}


def _legacy_sections(data: dict[str, Any]) -> dict[str, Any]:
    """Configs written before model kinds: ``vqvae:`` is the autoencoder; kinds default."""
    data = dict(data)
    if "vqvae" in data:
        legacy = data.pop("vqvae")
        if not isinstance(legacy, dict):
            raise ValueError(f"vqvae must be a section (mapping), got {legacy!r}")
        # an override --set vqvae.x wins over the file's autoencoder: section
        data["autoencoder"] = {**dict(data.get("autoencoder") or {}), **legacy}
    for section, kind in _DEFAULT_KINDS.items():
        value = data.get(section)
        if value is None:
            data[section] = {"kind": kind}
        elif isinstance(value, dict) and "kind" not in value:
            data[section] = {"kind": kind, **value}
    return data


def _fill_codebook(data: dict[str, Any]) -> dict[str, Any]:
    """The prior models the autoencoder's codes: its codebook_size is the autoencoder's."""
    auto, prior = data.get("autoencoder"), data.get("prior")
    if not isinstance(auto, dict) or not isinstance(prior, dict):
        return data
    size = auto.get("codebook_size", 512)
    given = prior.get("codebook_size")
    if given is not None and given != size:
        raise ValueError(
            f"prior.codebook_size={given} differs from autoencoder.codebook_size={size}: the "
            "prior models the autoencoder's codes; leave prior.codebook_size out (it is filled "
            "in) or set both to the same value"
        )
    data["prior"] = {**prior, "codebook_size": size}
    return data


class ExperimentConfig(StrictModel):
    """One experiment: everything a run needs besides the manifest.

    ``vqvae:`` (configs written before model kinds) is read as ``autoencoder:`` with kind vqvae.
    """

    name: str = "default"
    seed: int = 0
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    kit: KitConfig = KitConfig()
    autoencoder: AutoencoderSection = Field(
        default_factory=lambda: registry.KINDS["vqvae"].config()
    )
    prior: PriorSection = Field(default_factory=lambda: registry.KINDS["pixelcnn"].config())
    train_vqvae: AutoencoderTrainConfig = AutoencoderTrainConfig()
    train_prior: TrainConfig = TrainConfig()

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = _fill_codebook(_legacy_sections(data))
        return data


_Section = TypeVar("_Section", bound=BaseModel)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _apply_override(tree: dict[str, Any], item: str, where: str) -> str:
    """Set ``key.sub=value`` (`item`, value read as YAML) in `tree`; returns the key.
    `ConfigError` (prefixed with `where`) when there is no ``=``."""
    if "=" not in item:
        raise ConfigError(f"{where}override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return key.strip()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _member_models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation allows (itself, or the members of a union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    members = getattr(annotation, "__args__", ())
    return [m for a in members for m in _member_models(a)]


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        for ann in _member_models(field.annotation):
            keys.extend(_valid_keys(ann, prefix + name + "."))
    return keys


def _explain(err: ValidationError, source: str, schema: type[BaseModel] | None = None) -> str:
    lines = [f"invalid configuration in {source}:"]
    valid = _valid_keys(schema or ExperimentConfig)
    tags = set(registry.KINDS)
    for e in err.errors():
        loc, kind = list(e["loc"]), None
        if len(loc) > 1 and loc[0] in ("autoencoder", "prior") and loc[1] in tags:
            kind = loc.pop(1)  # the union member pydantic tried: the section names it already
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden" and kind is not None and key in valid:
            lines.append(f"  {key} is not a setting of {loc[0]} kind {kind!r}; remove it")
            continue
        if not key:  # a check across sections (model_validator): the message says it all
            lines.append(f"  {str(e['msg']).removeprefix('Value error, ')}")
        elif e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"  unknown key {key!r}{hint}")
        else:
            lines.append(f"  {key}: {e['msg']} (received {e.get('input')!r})")
    return "\n".join(lines)


def _keep_settings_of_kind(tree: dict[str, Any], key: str) -> None:
    """After ``--set prior.kind=...`` (or a nested model's, ``prior.coarse.kind=...``): drop the
    settings the new kind does not have."""
    *path, name = key.split(".")[:-1]
    parent: Any = tree
    for part in path:
        parent = parent.get(part) if isinstance(parent, dict) else None
    node = parent.get(name) if isinstance(parent, dict) else None
    kind = registry.KINDS.get(node.get("kind")) if isinstance(node, dict) else None
    if kind is not None and (path or kind.role == name):
        parent[name] = {k: v for k, v in node.items() if k in kind.config.model_fields}


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
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded
    for item in overrides:
        key = _apply_override(tree, item, "")
        if key.endswith(".kind") and key.split(".")[0] in ("autoencoder", "prior"):
            _keep_settings_of_kind(tree, key)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def apply_overrides(model: _Section, overrides: Sequence[str], where: str) -> _Section:
    """`model` (any config section) with ``key.sub=value`` overrides applied, keys relative to it,
    validated; `ConfigError` naming `where` and the key for a bad one."""
    tree = model.model_dump(mode="python")
    for item in overrides:
        _apply_override(tree, item, f"{where}: ")
    try:
        return type(model).model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, where, type(model))) from None


def _digest_tree(model: BaseModel) -> dict[str, Any]:
    """``model.model_dump(mode="json")`` less the `ADDED` fields that hold their default."""
    tree = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        added = any(m is ADDED for m in field.metadata)
        if added and value == field.get_default(call_default_factory=True):
            del tree[name]
        elif isinstance(value, BaseModel):
            tree[name] = _digest_tree(value)
    return tree


def config_digest(model: BaseModel) -> str:
    """sha256 of the canonical JSON of a config model: changes whenever any value changes.

    Settings marked `ADDED` count only once they differ from their default.
    """
    canon = json.dumps(_digest_tree(model), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (what a run directory stores)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
