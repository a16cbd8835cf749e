"""Resume state: what ``state.pt`` of a checkpoint holds beside the weights, and random states.

A resume state is a plain dict (tensors, numbers, strings, None, lists, dicts) so that it loads
with ``torch.load(weights_only=True)``: `check_resume_state` refuses anything else before a save,
`load_resume_state` never unpickles code. `capture_rng_state` / `restore_rng_state` carry the
torch (CPU and CUDA), numpy and python random states in that form.
"""

from __future__ import annotations

import logging
import pickle
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri_vqvae.artifacts.checkpoint_folder import STATE, read_meta, resolve_checkpoint, verify_file
from mri_vqvae.core.errors import CheckpointError

log = logging.getLogger(__name__)


def check_resume_state(obj: Any, where: str) -> None:
    """Raise unless `obj` holds only what torch.load(weights_only=True) accepts."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.Size)):
        return
    if isinstance(obj, (torch.dtype, torch.device)):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"resume state {where}: key {k!r} must be a str or int")
            check_resume_state(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_resume_state(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"resume state {where} is a {type(obj).__module__}.{type(obj).__name__}: the resume state "
        "must hold only tensors, numbers, strings, None, lists and dicts so that it loads with "
        "torch.load(weights_only=True); convert it (float(x), torch.as_tensor(a), "
        "capture_rng_state() for random states)"
    )


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
        meta = read_meta(folder)
        if STATE not in meta["files"]:
            raise CheckpointError(
                f"{folder} holds no resume state ({STATE}): it was saved for inference only; "
                "resume from checkpoints/last instead"
            )
        path = verify_file(folder, meta, STATE)
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
