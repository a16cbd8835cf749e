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
* a ``config.json`` whose structure is wrong, a file whose sha256 differs from the recorded one,
  a config whose model would be absurdly large (`mri_vqvae.artifacts.checkpoint_folder`);
* a resume state holding more than plain values (`mri_vqvae.artifacts.resume`).

Folders are made readable as the umask allows (``0777 & ~umask``, like ``mkdir``), not 0700.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from pydantic import BaseModel
from torch import nn

from mri_vqvae.artifacts.checkpoint_folder import (
    CONFIG,
    FORMAT,
    FORMAT_VERSION,
    KIND_RE,
    MARKER,
    OWN,
    STATE,
    WEIGHTS,
    alternatives,
    check_size,
    is_complete,
    read_meta,
    registered_kind,
    resolve_checkpoint,
    siblings,
    validated_config,
    verify_file,
)
from mri_vqvae.artifacts.resume import check_resume_state
from mri_vqvae.core.atomic import (
    atomic_path,
    atomic_write_text,
    fsync_dir,
    make_temp_dir,
    swap_in_folder,
)
from mri_vqvae.core.errors import CheckpointError
from mri_vqvae.core.finite import describe_nonfinite
from mri_vqvae.core.jsonio import json_ready
from mri_vqvae.core.provenance import package_versions, sha256_file, utc_iso
from mri_vqvae.models.registry import KINDS

log = logging.getLogger(__name__)

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


# --- saving --------------------------------------------------------------------------------------


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


def _refuse_foreign(folder: Path) -> None:
    """Never replace a folder that holds more than checkpoint files (a run dir, say)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {folder}: a file of that name exists")
    temp_prefixes = tuple(f".{name}." for name in OWN)  # atomic_path leftovers
    names = [p.name for p in folder.iterdir()]
    foreign = sorted(n for n in names if n not in OWN and not n.startswith(temp_prefixes))
    if foreign:
        raise CheckpointError(
            f"refusing to replace {folder}: it is not a checkpoint folder (it holds "
            f"{foreign[:5]}); save checkpoints into their own folder such as <run>/checkpoints/last"
        )


def _settle(folder: Path) -> None:
    """Finish or roll back a swap that a kill interrupted, then drop leftover temp folders."""
    olds = [p for p in siblings(folder, "old") if is_complete(p)]
    if not folder.exists() and olds:
        keep = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(keep, folder)
        log.warning("restored %s from %s (a save was interrupted mid-swap)", folder, keep.name)
    for leftover in siblings(folder, "old") + siblings(folder, "tmp"):
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
    fsync_dir(tmp)


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
    if not isinstance(kind, str) or not KIND_RE.match(kind):
        raise CheckpointError(
            f"checkpoint kind must be a short lowercase name like 'vqvae', got {kind!r}"
        )
    if state is not None:
        if not isinstance(state, Mapping):
            raise CheckpointError(f"resume state must be a dict, got {type(state).__name__}")
        check_resume_state(state, "state")
    try:
        extra_doc = json.loads(json.dumps(json_ready(dict(extra or {})), allow_nan=False))
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
        swap_in_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s checkpoint (step %s) to %s", kind, step, folder)
    return folder


# --- loading -------------------------------------------------------------------------------------


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
        f"{alternatives(folder)} To keep training, resume from an earlier checkpoint with a "
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
    meta = read_meta(folder)
    weights = verify_file(folder, meta, WEIGHTS)
    kind = meta["kind"]
    registered = registered_kind(kind)
    extra_builders = dict(builders or {})
    if registered is None and kind not in extra_builders:
        raise CheckpointError(
            f"{folder / CONFIG}: unknown model kind {kind!r}; known kinds "
            f"{sorted({**KINDS, **extra_builders})} (pass builders={{kind: callable}} to load "
            "other models)"
        )
    if kind in extra_builders:
        model = extra_builders[kind](dict(meta["config"]))
    else:
        assert registered is not None
        check_size(folder, kind, meta, weights)
        model = registered.build(validated_config(folder, kind, meta, registered.config))
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
