"""On-disk model format: a checkpoint is a folder that rebuilds its model with no YAML.

::

    <folder>/model.safetensors   weights and buffers (safetensors, no pickle)
    <folder>/config.json         {"kind", "config", "extra", "step", "versions", "files"}
    <folder>/state.pt            optional resume state; loads with torch.load(weights_only=True)
    <folder>/COMPLETE            written last: a folder without it is never loaded

A save writes a hidden sibling ``.<name>.tmp-XXXX/`` and swaps it in with two renames
(``<name>`` -> ``.<name>.old-XXXX``, tmp -> ``<name>``), so a kill at any moment leaves the
previous checkpoint loadable: the new one counts only once it is renamed into place. A kill between
the two renames leaves ``<name>`` missing; `load_checkpoint` then reads the ``.old`` sibling and
the next save moves it back. One writer per folder (rank 0).

Refusals (each a `CheckpointError` naming the folder or file, the problem and the fix):

* saving or loading weights or buffers that hold NaN / ±Inf (a diverged run): a save would
  replace the last good checkpoint, a load would yield garbage volumes and codes;
* a ``config.json`` whose structure is wrong (`_check_meta`: missing keys, wrong JSON types,
  ``format_version`` not an integer, NaN / Infinity literals);
* a config whose model would hold more than `max_parameters()` values (parameters + buffers,
  computed from the config before anything is allocated; env ``MRI_VQVAE_MAX_PARAMETERS``,
  default `MAX_PARAMETERS`), or more values than ``model.safetensors`` holds.

Folders are made readable as the umask allows (``0777 & ~umask``, like ``mkdir``), not 0700.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from mri_vqvae.artifacts.runs import package_versions, utc_iso
from mri_vqvae.core.atomic import atomic_path, atomic_write_text, make_temp_dir
from mri_vqvae.core.errors import CheckpointError
from mri_vqvae.core.finite import describe_nonfinite
from mri_vqvae.data.manifest import sha256_file
from mri_vqvae.models.registry import KINDS, LEGACY_KINDS, ModelKind

log = logging.getLogger(__name__)

FORMAT = "mri-vqvae-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.pt"
MARKER = "COMPLETE"
_OWN = frozenset({WEIGHTS, CONFIG, STATE, MARKER})
_KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_CONFIG_BYTES = 16 * 2**20
MAX_PARAMETERS = 2_000_000_000
"""Default cap on the values (parameters + buffers) of a model rebuilt from a checkpoint: 2e9
float32 values are 8 GiB. Override with the environment variable `MAX_PARAMETERS_ENV`."""
MAX_PARAMETERS_ENV = "MRI_VQVAE_MAX_PARAMETERS"

Builder = Callable[[dict[str, Any]], nn.Module]


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A rebuilt model (in eval mode) and what its folder recorded."""

    model: nn.Module
    kind: str
    config: dict[str, Any]
    extra: dict[str, Any]
    state_path: Path | None
    step: int | None = None
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# --- registered kinds (mri_vqvae.models.registry; model code imports only when built) ---------


def _registered(kind: str) -> ModelKind | None:
    """The registry's entry for a checkpoint kind (legacy names included), else None."""
    name = LEGACY_KINDS.get(kind, kind)
    return KINDS.get(name)


# --- small helpers -------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (best effort: not every OS can open a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> tuple[str, str, int] | None:
    """(first tensor name, what is wrong, number of bad tensors) or None when all are finite."""
    bad = [(k, p) for k, t in tensors.items() if (p := describe_nonfinite(t)) is not None]
    return None if not bad else (bad[0][0], bad[0][1], len(bad))


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def _config_dict(config: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    return json.loads(json.dumps(dict(config)))


def _jsonable(obj: Any) -> Any:
    """Numbers from tensors / numpy scalars; NaN and inf become None (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if (isinstance(obj, torch.Tensor) and obj.numel() == 1) or isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _tensors_for_disk(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict as dense, contiguous CPU tensors; tied or aliased tensors are copied."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor: safetensors "
                "stores tensors only; register it as a buffer or keep it in the config"
            )
        t = value.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _check_plain(obj: Any, where: str) -> None:
    """Raise unless `obj` holds only what torch.load(weights_only=True) accepts."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.Size)):
        return
    if isinstance(obj, (torch.dtype, torch.device)):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"resume state {where}: key {k!r} must be a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"resume state {where} is a {type(obj).__module__}.{type(obj).__name__}: the resume state "
        "must hold only tensors, numbers, strings, None, lists and dicts so that it loads with "
        "torch.load(weights_only=True); convert it (float(x), torch.as_tensor(a), "
        "capture_rng_state() for random states)"
    )


# --- random states -------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and python `random` states as tensors, ints and floats."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Undo `capture_rng_state`: later draws repeat the draws that followed the capture."""
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.as_tensor(s).cpu() for s in cuda])
        else:
            log.warning(
                "resume state holds %d CUDA random states but %d GPUs are visible: CUDA draws "
                "will differ from the original run", len(cuda), torch.cuda.device_count()
            )
    n = state["numpy"]
    keys = np.asarray(torch.as_tensor(n["keys"]).cpu().numpy(), dtype=np.uint32)
    np.random.set_state(
        (n["bit_generator"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
    )
    p = state["python"]
    internal = tuple(int(x) for x in torch.as_tensor(p["internal"]).tolist())
    random.setstate((int(p["version"]), internal, p["gauss_next"]))


def build_resume_state(
    optimizer: torch.optim.Optimizer | None,
    step: int,
    epoch: int,
    sampler_position: int = 0,
    best_metric: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The usual resume state (optimizer, counters, best metric, random states) as a plain dict.

    `extra` holds more plain values, e.g. ``scheduler=sched.state_dict()``.
    """
    return {
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "step": int(step),
        "epoch": int(epoch),
        "sampler_position": int(sampler_position),
        "best_metric": None if best_metric is None else float(best_metric),
        "rng": capture_rng_state(),
        **extra,
    }


# --- saving --------------------------------------------------------------------------------------


def _siblings(folder: Path, tag: str) -> list[Path]:
    if not folder.parent.is_dir():
        return []
    return sorted(folder.parent.glob(f".{folder.name}.{tag}-*"))


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _refuse_foreign(folder: Path) -> None:
    """Never replace a folder that holds more than checkpoint files (a run dir, say)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {folder}: a file of that name exists")
    temp_prefixes = tuple(f".{name}." for name in _OWN)  # atomic_path leftovers
    names = [p.name for p in folder.iterdir()]
    foreign = sorted(n for n in names if n not in _OWN and not n.startswith(temp_prefixes))
    if foreign:
        raise CheckpointError(
            f"refusing to replace {folder}: it is not a checkpoint folder (it holds "
            f"{foreign[:5]}); save checkpoints into their own folder such as <run>/checkpoints/last"
        )


def _settle(folder: Path) -> None:
    """Finish or roll back a swap that a kill interrupted, then drop leftover temp folders."""
    olds = [p for p in _siblings(folder, "old") if _is_complete(p)]
    if not folder.exists() and olds:
        keep = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(keep, folder)
        log.warning("restored %s from %s (a save was interrupted mid-swap)", folder, keep.name)
    for leftover in _siblings(folder, "old") + _siblings(folder, "tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def _write_files(
    tmp: Path,
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    kind: str,
    config: dict[str, Any],
    extra: dict[str, Any],
    state: Mapping[str, Any] | None,
    step: int | None,
) -> None:
    files: dict[str, str] = {}
    with atomic_path(tmp / WEIGHTS) as path:
        safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt", "kind": kind})
    files[WEIGHTS] = sha256_file(tmp / WEIGHTS)
    if state is not None:
        with atomic_path(tmp / STATE) as path:
            torch.save(dict(state), path)
        files[STATE] = sha256_file(tmp / STATE)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "extra": extra,
        "step": step,
        "created_utc": utc_iso(),
        "num_tensors": len(tensors),
        "num_parameters": sum(p.numel() for p in _unwrap(model).parameters()),
        "versions": package_versions(("torch", "safetensors", "numpy")),
        "files": files,
    }
    atomic_write_text(tmp / CONFIG, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic_write_text(tmp / MARKER, f"{utc_iso()}\n")
    _fsync_dir(tmp)


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    kind: str,
    config: BaseModel | Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
    *,
    step: int | None = None,
) -> Path:
    """Write `model` (+ its resolved `config`, optional resume `state`) as the folder `folder`.

    An existing checkpoint at `folder` is replaced only once the new one is complete on disk.
    `extra` is JSON metadata (metrics, data digest...); `step` defaults to ``state["step"]``.
    Weights or buffers holding NaN / ±Inf are refused (`CheckpointError`, nothing written), so a
    diverged run never replaces its last good checkpoint. Returns `folder`.
    """
    folder = Path(folder)
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise CheckpointError(
            f"checkpoint kind must be a short lowercase name like 'vqvae', got {kind!r}"
        )
    if state is not None:
        if not isinstance(state, Mapping):
            raise CheckpointError(f"resume state must be a dict, got {type(state).__name__}")
        _check_plain(state, "state")
    try:
        extra_doc = json.loads(json.dumps(_jsonable(dict(extra or {})), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint extra for {folder} is not plain JSON ({exc})") from None
    if step is None and state is not None and isinstance(state.get("step"), int):
        step = int(state["step"])
    tensors = _tensors_for_disk(_unwrap(model))
    bad = _first_nonfinite(tensors)
    if bad is not None:
        name, problem, count = bad
        raise CheckpointError(
            f"refusing to save {folder}: the model's tensor {name!r} holds {problem} ({count} of "
            f"{len(tensors)} tensors hold NaN/Inf). The run diverged; the previous checkpoint "
            "there is kept unchanged. Resume from it (or checkpoints/best) with a lower learning "
            "rate (train_*.lr), grad_clip set, or bf16: false"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    _settle(folder)
    _refuse_foreign(folder)
    tmp = make_temp_dir(folder.parent, f".{folder.name}.tmp-")
    try:
        _write_files(tmp, model, tensors, kind, _config_dict(config), extra_doc, state, step)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            _fsync_dir(folder.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s checkpoint (step %s) to %s", kind, step, folder)
    return folder


# --- loading -------------------------------------------------------------------------------------


def _alternatives(folder: Path) -> str:
    parent = folder.parent
    found = []
    if parent.is_dir():
        found = [str(p) for p in sorted(parent.iterdir()) if p != folder and _is_complete(p)]
    hint = f" Complete checkpoints beside it: {', '.join(found)}." if found else ""
    return f"Load checkpoints/best or the previous checkpoint instead.{hint}"


def resolve_checkpoint(folder: str | Path) -> Path:
    """The complete folder to read for `folder` (read-only; sees through an interrupted swap)."""
    folder = Path(folder)
    if _is_complete(folder):
        return folder
    if not folder.exists():
        olds = [p for p in _siblings(folder, "old") if _is_complete(p)]
        if olds:
            keep = max(olds, key=lambda p: p.stat().st_mtime)
            log.warning("%s is missing (a save was interrupted); reading %s", folder, keep)
            return keep
        raise CheckpointError(f"checkpoint folder {folder} does not exist. {_alternatives(folder)}")
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is a file, not a checkpoint folder (model.safetensors + config.json)"
        )
    raise CheckpointError(
        f"checkpoint folder {folder} is incomplete (no {MARKER} marker): its save was interrupted "
        f"or it was copied partially. {_alternatives(folder)}"
    )


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
    fix = f"The file was edited, truncated or written by another tool. {_alternatives(path.parent)}"
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
    if not isinstance(doc["kind"], str) or not _KIND_RE.match(doc["kind"]):
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


def _read_meta(folder: Path) -> dict[str, Any]:
    """The parsed, structurally checked config.json of `folder`."""
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} is missing. {_alternatives(folder)}")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise CheckpointError(
                f"{path} is {size} bytes, far more than a checkpoint config (limit "
                f"{MAX_CONFIG_BYTES}); it is not one. {_alternatives(folder)}"
            )
        doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{path} is not readable JSON ({str(exc)[:200]}). {_alternatives(folder)}"
        ) from None
    return _check_meta(doc, path)


def _verify(folder: Path, meta: dict[str, Any], name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing. {_alternatives(folder)}")
    expected = meta["files"].get(name)
    actual = sha256_file(path)
    if expected != actual:
        raise CheckpointError(
            f"{path} is corrupted: its sha256 {actual[:12]}... does not match the "
            f"{str(expected)[:12]}... recorded in {CONFIG}. Copy the folder again. "
            f"{_alternatives(folder)}"
        )
    return path


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


def _validated_config(
    folder: Path, kind: str, meta: dict[str, Any], cls: type[BaseModel]
) -> BaseModel:
    try:
        return cls.model_validate(meta["config"])
    except ValidationError as exc:
        raise CheckpointError(
            f"{folder / CONFIG}: the stored {kind} config does not validate with this mri-vqvae "
            f"({(meta.get('versions') or {}).get('mri_vqvae')} saved it): {exc}"
        ) from None


def _check_size(folder: Path, kind: str, meta: dict[str, Any], weights: Path) -> None:
    """Refuse, before anything is allocated, a config whose model is absurdly large."""
    registered = _registered(kind)
    if registered is None:
        return
    numel = registered.state_numel()
    cfg = _validated_config(folder, kind, meta, registered.config)
    wanted, cap, held = numel(cfg), max_parameters(), _file_numel(weights)
    where = f"{folder / CONFIG}: its {kind} config describes a model of {wanted:,} values"
    held_text = "" if held is None else f" {WEIGHTS} holds {held:,} values."
    if wanted > cap:
        raise CheckpointError(
            f"{where} ({wanted * 4 / 2**30:,.1f} GiB as float32), above the limit of {cap:,} "
            f"({MAX_PARAMETERS_ENV}); responsible: {_blame(cfg, numel, cap)}.{held_text} If the "
            f"model really is that large, set {MAX_PARAMETERS_ENV} higher; if config.json was "
            f"edited, restore it. {_alternatives(folder)}"
        )
    if held is not None and wanted > held:
        raise CheckpointError(
            f"{where}, but {WEIGHTS} holds only {held:,}; responsible: "
            f"{_blame(cfg, numel, held)}. config.json and the weights come from different "
            f"models (was config.json edited?). {_alternatives(folder)}"
        )


def _refuse_nonfinite(model: nn.Module, folder: Path) -> None:
    """Raise `CheckpointError` if a loaded weight or buffer holds NaN / ±Inf."""
    state = model.state_dict()
    bad = _first_nonfinite(state)
    if bad is None:
        return
    name, problem, count = bad
    raise CheckpointError(
        f"checkpoint {folder} holds diverged weights: tensor {name!r} holds {problem} ({count} of "
        f"{len(state)} tensors hold NaN/Inf), so it would produce garbage volumes and codes. "
        f"{_alternatives(folder)} To keep training, resume from an earlier checkpoint with a "
        "lower learning rate (train_*.lr) or bf16: false"
    )


def _load_weights(model: nn.Module, path: Path) -> None:
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path} does not fit the model its config builds: {exc}. The config and weights "
            "come from different models; re-save the checkpoint"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not match the model built from its config: "
            f"missing keys {sorted(result.missing_keys)}, unexpected keys "
            f"{sorted(result.unexpected_keys)}. The checkpoint was made by another version of "
            "the model code; use the matching mri-vqvae version or re-save it"
        )


def load_checkpoint(
    folder: str | Path,
    builders: Mapping[str, Builder] | None = None,
    map_location: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Rebuild the model stored in `folder` from its files alone (no YAML), in eval mode.

    Kinds come from `mri_vqvae.models.registry` (checkpoints of older versions included);
    `builders` maps other kinds -> callable(config dict) -> nn.Module (models outside the tool).
    Raises `CheckpointError` for an incomplete folder, a malformed config.json, a checksum
    mismatch, a config above `max_parameters()` (checked before building), weights that do not
    fit the rebuilt model (missing / unexpected keys, wrong shapes) or hold NaN / ±Inf.
    """
    folder = resolve_checkpoint(folder)
    meta = _read_meta(folder)
    weights = _verify(folder, meta, WEIGHTS)
    kind = meta["kind"]
    registered = _registered(kind)
    extra_builders = dict(builders or {})
    if registered is None and kind not in extra_builders:
        raise CheckpointError(
            f"{folder / CONFIG}: unknown model kind {kind!r}; known kinds "
            f"{sorted({**KINDS, **extra_builders})} (pass builders={{kind: callable}} to load "
            "other models)"
        )
    try:
        if kind in extra_builders:
            model = extra_builders[kind](dict(meta["config"]))
        else:
            _check_size(folder, kind, meta, weights)
            model = registered.build(registered.config.model_validate(meta["config"]))
    except ValidationError as exc:
        raise CheckpointError(
            f"{folder / CONFIG}: the stored {kind} config does not validate with this mri-vqvae "
            f"({(meta.get('versions') or {}).get('mri_vqvae')} saved it): {exc}"
        ) from None
    _load_weights(model, weights)
    _refuse_nonfinite(model, folder)
    model.to(map_location).eval()
    state_path = folder / STATE if STATE in meta["files"] else None
    return LoadedCheckpoint(
        model=model,
        kind=kind,
        config=dict(meta["config"]),
        extra=dict(meta.get("extra") or {}),
        state_path=state_path,
        step=meta.get("step"),
        path=folder,
        meta=meta,
    )


def load_resume_state(
    folder: str | Path, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """The resume state of a checkpoint folder (or a ``state.pt`` path), loaded weights-only.

    Never unpickles code: a file that needs more than tensors and plain containers is refused
    with `CheckpointError`.
    """
    folder = Path(folder)
    if folder.is_file():
        path = folder
    else:
        folder = resolve_checkpoint(folder)
        meta = _read_meta(folder)
        if STATE not in meta["files"]:
            raise CheckpointError(
                f"{folder} holds no resume state ({STATE}): it was saved for inference only; "
                "resume from checkpoints/last instead"
            )
        path = _verify(folder, meta, STATE)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused: it holds more than tensors and plain values, so loading it could "
            f"run code ({str(exc).splitlines()[0]}). Do not load files of unknown origin; re-save "
            "the resume state with save_checkpoint"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a readable resume state ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a resume-state dict")
    return state
