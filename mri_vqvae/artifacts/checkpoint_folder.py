"""A checkpoint folder on disk: its files, the complete folder to read, and the checks made
before a model is built from it (the format: `mri_vqvae.artifacts.checkpoint`).

`resolve_checkpoint` sees through a save interrupted by a kill. `read_meta` parses
``config.json`` and refuses a wrong structure (missing keys, wrong JSON types, ``format_version``
not an integer, NaN / Infinity literals); `verify_file` checks a file against the sha256
``config.json`` records; `check_size` refuses, before anything is allocated, a config whose model
would hold more than `max_parameters()` values (parameters + buffers; env
``MRI_VQVAE_MAX_PARAMETERS``, default `MAX_PARAMETERS`) or more values than
``model.safetensors`` holds. Every refusal is a `CheckpointError` naming the folder or file, the
problem and the fix.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
from pydantic import BaseModel, ValidationError

from mri_vqvae.core.errors import CheckpointError
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.models.registry import KINDS, LEGACY_KINDS, ModelKind

log = logging.getLogger(__name__)

FORMAT = "mri-vqvae-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.pt"
MARKER = "COMPLETE"
OWN = frozenset({WEIGHTS, CONFIG, STATE, MARKER})
KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_CONFIG_BYTES = 16 * 2**20
MAX_PARAMETERS = 2_000_000_000
"""Default cap on the values (parameters + buffers) of a model rebuilt from a checkpoint: 2e9
float32 values are 8 GiB. Override with the environment variable `MAX_PARAMETERS_ENV`."""
MAX_PARAMETERS_ENV = "MRI_VQVAE_MAX_PARAMETERS"


def registered_kind(kind: str) -> ModelKind | None:
    """The registry's entry for a checkpoint kind (legacy names included), else None."""
    name = LEGACY_KINDS.get(kind, kind)
    return KINDS.get(name)


def siblings(folder: Path, tag: str) -> list[Path]:
    if not folder.parent.is_dir():
        return []
    return sorted(folder.parent.glob(f".{folder.name}.{tag}-*"))


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def alternatives(folder: Path) -> str:
    parent = folder.parent
    found = []
    if parent.is_dir():
        found = [str(p) for p in sorted(parent.iterdir()) if p != folder and is_complete(p)]
    hint = f" Complete checkpoints beside it: {', '.join(found)}." if found else ""
    return f"Load checkpoints/best or the previous checkpoint instead.{hint}"


def resolve_checkpoint(folder: str | Path) -> Path:
    """The complete folder to read for `folder` (read-only; sees through an interrupted swap)."""
    folder = Path(folder)
    if is_complete(folder):
        return folder
    if not folder.exists():
        olds = [p for p in siblings(folder, "old") if is_complete(p)]
        if olds:
            keep = max(olds, key=lambda p: p.stat().st_mtime)
            log.warning("%s is missing (a save was interrupted); reading %s", folder, keep)
            return keep
        raise CheckpointError(f"checkpoint folder {folder} does not exist. {alternatives(folder)}")
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is a file, not a checkpoint folder (model.safetensors + config.json)"
        )
    raise CheckpointError(
        f"checkpoint folder {folder} is incomplete (no {MARKER} marker): its save was interrupted "
        f"or it was copied partially. {alternatives(folder)}"
    )


# --- config.json ---------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer"}
    return names.get(type(value), "a number")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (mri-vqvae never writes NaN or Infinity)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_meta(doc: Any, path: Path) -> dict[str, Any]:
    """Validate the structure of a parsed config.json; raise `CheckpointError` naming the field."""
    fix = f"The file was edited, truncated or written by another tool. {alternatives(path.parent)}"
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: the top level is {_json_type(doc)}, not an object. {fix}")
    if doc.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an mri-vqvae checkpoint config (field 'format' is "
            f"{doc.get('format', 'missing')!r}, expected {FORMAT!r})"
        )
    for key in ("format_version", "kind", "config", "files"):
        if key not in doc:
            raise CheckpointError(f"{path} lacks the field {key!r}. {fix}")

    def wrong(key: str, expected: str) -> CheckpointError:
        value = doc[key]
        shown = repr(value) if not isinstance(value, (dict, list)) else _json_type(value)
        return CheckpointError(f"{path}: field {key!r} must be {expected}, got {shown}. {fix}")

    version = doc["format_version"]
    if not _is_int(version) or version < 1:
        raise wrong("format_version", "an integer >= 1")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version}, newer than this mri-vqvae understands "
            f"({FORMAT_VERSION}); upgrade mri-vqvae"
        )
    if not isinstance(doc["kind"], str) or not KIND_RE.match(doc["kind"]):
        raise wrong("kind", "a short lowercase model name such as 'vqvae' or 'prior'")
    if not isinstance(doc["config"], dict):
        raise wrong("config", "an object (the model's config)")
    files = doc["files"]
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise wrong("files", f"an object mapping {WEIGHTS!r} (and {STATE!r}) to sha256 digests")
    for name, digest in files.items():
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise CheckpointError(
                f"{path}: field 'files'[{name!r}] must be a 64-digit lowercase sha256, got "
                f"{digest!r}. {fix}"
            )
    optional: dict[str, tuple[Callable[[Any], bool], str]] = {
        "extra": (lambda v: v is None or isinstance(v, dict), "an object or null"),
        "step": (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0 or null"),
        "versions": (
            lambda v: v is None or (
                isinstance(v, dict) and all(x is None or isinstance(x, str) for x in v.values())
            ),
            "an object of version strings",
        ),
        "created_utc": (lambda v: isinstance(v, str), "a string"),
        "num_tensors": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "num_parameters": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    }
    for key, (ok, expected) in optional.items():
        if key in doc and not ok(doc[key]):
            raise wrong(key, expected)
    return doc


def read_meta(folder: Path) -> dict[str, Any]:
    """The parsed, structurally checked config.json of `folder`."""
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} is missing. {alternatives(folder)}")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise CheckpointError(
                f"{path} is {size} bytes, far more than a checkpoint config (limit "
                f"{MAX_CONFIG_BYTES}); it is not one. {alternatives(folder)}"
            )
        doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{path} is not readable JSON ({str(exc)[:200]}). {alternatives(folder)}"
        ) from None
    return _check_meta(doc, path)


def verify_file(folder: Path, meta: dict[str, Any], name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing. {alternatives(folder)}")
    expected = meta["files"].get(name)
    actual = sha256_file(path)
    if expected != actual:
        raise CheckpointError(
            f"{path} is corrupted: its sha256 {actual[:12]}... does not match the "
            f"{str(expected)[:12]}... recorded in {CONFIG}. Copy the folder again. "
            f"{alternatives(folder)}"
        )
    return path


# --- size cap ------------------------------------------------------------------------------------


def max_parameters() -> int:
    """The cap on a rebuilt model's values: env `MAX_PARAMETERS_ENV`, else `MAX_PARAMETERS`."""
    raw = os.environ.get(MAX_PARAMETERS_ENV, "").strip()
    if not raw:
        return MAX_PARAMETERS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 1:
        raise CheckpointError(
            f"environment variable {MAX_PARAMETERS_ENV}={raw!r} must be a number of values >= 1 "
            f"such as 2e9 (the default {MAX_PARAMETERS:.0e}); fix or unset it"
        )
    return int(value)


def _file_numel(path: Path) -> int | None:
    """Values held by a safetensors file, from its header alone (None if unreadable)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            names = list(f.keys())  # noqa: SIM118 (safe_open is not iterable)
            return sum(math.prod(f.get_slice(k).get_shape()) for k in names)
    except Exception:  # safetensors raises its own errors; _load_weights reports them
        return None


def _blame(cfg: BaseModel, numel: Callable[[Any], int], cap: int) -> str:
    """The size fields of `cfg` that make `numel(cfg)` large, as ``field=value`` text."""
    total = numel(cfg)
    smallest = {"kernel_size": 3, "codebook_size": 2}
    shrink: list[tuple[float, str, bool]] = []
    for name, value in cfg.model_dump().items():
        if _is_int(value):
            small: Any = smallest.get(name, 1)
        elif isinstance(value, tuple) and value and all(_is_int(v) for v in value):
            small = tuple(1 for _ in value)
        else:
            continue
        try:
            reduced = numel(cfg.model_copy(update={name: small}))
        except Exception:  # a combination the formula cannot take: not this field's doing
            continue
        if reduced < total:
            shrink.append((total / max(reduced, 1), f"{name}={value}", reduced <= cap))
    shrink.sort(reverse=True)
    named = [text for _, text, enough in shrink if enough] or [text for _, text, _ in shrink[:2]]
    return ", ".join(named) or "the size fields together"


def validated_config(
    folder: Path, kind: str, meta: dict[str, Any], cls: type[BaseModel]
) -> BaseModel:
    try:
        return cls.model_validate(meta["config"])
    except ValidationError as exc:
        raise CheckpointError(
            f"{folder / CONFIG}: the stored {kind} config does not validate with this mri-vqvae "
            f"({(meta.get('versions') or {}).get('mri_vqvae')} saved it): {exc}"
        ) from None


def check_size(folder: Path, kind: str, meta: dict[str, Any], weights: Path) -> None:
    """Refuse, before anything is allocated, a config whose model is absurdly large."""
    registered = registered_kind(kind)
    if registered is None:
        return
    numel = registered.state_numel()
    cfg = validated_config(folder, kind, meta, registered.config)
    wanted, cap, held = numel(cfg), max_parameters(), _file_numel(weights)
    where = f"{folder / CONFIG}: its {kind} config describes a model of {wanted:,} values"
    held_text = "" if held is None else f" {WEIGHTS} holds {held:,} values."
    if wanted > cap:
        raise CheckpointError(
            f"{where} ({wanted * 4 / 2**30:,.1f} GiB as float32), above the limit of {cap:,} "
            f"({MAX_PARAMETERS_ENV}); responsible: {_blame(cfg, numel, cap)}.{held_text} If the "
            f"model really is that large, set {MAX_PARAMETERS_ENV} higher; if config.json was "
            f"edited, restore it. {alternatives(folder)}"
        )
    if held is not None and wanted > held:
        raise CheckpointError(
            f"{where}, but {WEIGHTS} holds only {held:,}; responsible: "
            f"{_blame(cfg, numel, held)}. config.json and the weights come from different "
            f"models (was config.json edited?). {alternatives(folder)}"
        )
