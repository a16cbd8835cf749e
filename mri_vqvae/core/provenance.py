"""Provenance: UTC timestamps, installed versions, the device, the git commit, file digests.

Every file the tool writes that records where it came from (run.json, checkpoint config.json,
latents index.json, sample sidecars, metrics.json) takes these values from here.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
import shutil
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

VERSIONED = ("torch", "monai", "numpy", "nibabel", "safetensors", "pydantic")
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def utc_stamp(now: _dt.datetime | None = None) -> str:
    """``YYYYmmddTHHMMSSZ`` in UTC (a naive `now` counts as UTC)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if now.tzinfo is not None:
        now = now.astimezone(_dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ")


def utc_iso() -> str:
    """Now in UTC as ``YYYY-mm-ddTHH:MM:SSZ`` (the timestamps in JSON files)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions(packages: Sequence[str] = VERSIONED) -> dict[str, str | None]:
    """Installed versions (None when absent) of `packages`, plus python and mri-vqvae."""
    from mri_vqvae import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "mri_vqvae": __version__}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def describe_device(device: str | torch.device | None = None) -> str:
    """A readable device name such as ``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu``."""
    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(dev)


def git_state(path: str | Path | None = None, git: str = "git") -> dict[str, Any]:
    """``{"commit": sha | None, "dirty": bool | None}`` of the repository holding `path`.

    Defaults to the package's own folder. None when git is absent or `path` is not in a repo.
    """
    cwd = Path(path) if path is not None else _PACKAGE_DIR
    exe = shutil.which(git)
    if exe is None or not cwd.is_dir():
        return {"commit": None, "dirty": None}

    def run(*args: str) -> str | None:
        try:
            done = subprocess.run(
                [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}
