"""Per-latent likelihood maps of a scan under a trained prior (`mri-vqvae likelihood`).

The scan goes through the deterministic training chain
(`mri_vqvae.data.transforms.build_transforms`), is encoded to indices, and ``prior.bits`` gives
``-log2 p`` per latent (for an autoregressive prior ``-log2 p(i_p | i_<p)``); a prior whose
``bits`` is None has no per-latent map and is refused (`SynthesisError`). A conditional prior
scores the scan under the class ``label`` names. Each latent stands for the ``2**levels`` voxel
block it was encoded from, so the map is upsampled by block replication (nearest): no detail is
invented below the latent scale and the map's mean equals the latent mean exactly.
`resample_to_grid` (MONAI ``ResampleToMatch``, nearest, zeros outside) carries a map back onto
the input file's own grid.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mri_vqvae.config import DataConfig, config_digest
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.errors import MriVqvaeError, innermost_error
from mri_vqvae.core.figures import orthogonal_montage
from mri_vqvae.core.finite import NonFiniteError, describe_nonfinite
from mri_vqvae.data import bids as bids_view
from mri_vqvae.data.writers import affine_spacing, write_nifti
from mri_vqvae.tasks.sample import SynthesisError, class_labels, grid_sha256, run_provenance

if TYPE_CHECKING:
    from mri_vqvae.artifacts.loading import PriorRun

log = logging.getLogger(__name__)

LIKELIHOOD_FORMAT = "mri-vqvae-likelihood"


@dataclass(frozen=True)
class LikelihoodResult:
    """A scan's per-latent NLL on the preprocessed (training) grid.

    bits: (d, h, w) float32, ``-log2 p`` per latent; bits_map: (D, H, W) the same, each latent
    filling its block; image: (D, H, W) the preprocessed scan; affine: (4, 4) its RAS voxel ->
    world matrix; indices: (d, h, w) int64; label: the class scored under (None: unconditional).
    """

    bits: np.ndarray
    bits_map: np.ndarray
    image: np.ndarray
    affine: np.ndarray
    indices: np.ndarray
    label: str | None = None

    @property
    def mean_bits(self) -> float:
        return float(self.bits.mean(dtype=np.float64))


@dataclass(frozen=True)
class LikelihoodOutputs:
    """Files `write_likelihood` wrote and the map's mean bits per latent."""

    map: Path
    input: Path
    montage: Path
    sidecar: Path
    mean_bits: float


def preprocess_scan(path: str | Path, data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The deterministic training chain on one file: ((D, H, W) float32 RAS, (4, 4) affine)."""
    from mri_vqvae.data.transforms import build_transforms

    try:
        image = build_transforms(data)({"image": str(path)})["image"]
    except Exception as exc:  # MONAI wraps the reader's InvalidImageError in a RuntimeError
        inner = innermost_error(exc)
        if isinstance(inner, MriVqvaeError):
            raise inner from None
        raise
    volume = image[0].detach().cpu().numpy().astype(np.float32)
    return volume, np.asarray(image.affine, dtype=np.float64)


def block_upsample(bits: np.ndarray, factor: int) -> np.ndarray:
    """(d, h, w) -> (d*f, h*f, w*f): every latent's value fills its f x f x f voxel block."""
    out = bits
    for axis in range(3):
        out = np.repeat(out, factor, axis=axis)
    return out


@torch.no_grad()
def likelihood_map(run: PriorRun, input_path: str | Path, label: str | None = None
                   ) -> LikelihoodResult:
    """Preprocess `input_path`, encode it and score its latents with the prior (see module doc).

    `label` names the class of a conditional prior (required there, refused otherwise).
    """
    volume, affine = preprocess_scan(input_path, run.data)
    return score_volume(run, volume, affine, input_path, label)


@torch.no_grad()
def score_volume(run: PriorRun, volume: np.ndarray, affine: np.ndarray, input_path: str | Path,
                 label: str | None = None) -> LikelihoodResult:
    """Encode a preprocessed scan (`volume` (D, H, W) float32, `affine` (4, 4) RAS) and score
    its latents with the prior; `input_path` names the scan in errors."""
    classes = class_labels(run)
    if classes.names and label is None:
        raise SynthesisError(
            f"the prior {run.paths.prior_checkpoint} is conditioned on {classes.field}: name the "
            f"scan's class with --label, one of {list(classes.names)}"
        )
    labels = None if label is None else torch.tensor([classes.index(label)],
                                                      device=run.device)
    x = torch.from_numpy(volume)[None, None].to(run.device)
    try:
        indices = run.vqvae.encode_indices(x)  # (1, d, h, w)
    except NonFiniteError as exc:
        raise NonFiniteError(f"{input_path} (VQ-VAE {run.paths.vqvae_checkpoint}): {exc}") from None
    scored = run.prior.bits(indices, labels)
    if scored is None:
        raise SynthesisError(
            f"the prior {run.paths.prior_checkpoint} ({type(run.prior).__name__}) gives no "
            f"per-latent -log2 p, so it has no likelihood map; its bits per latent of this scan "
            f"are {float(run.prior.grid_bits(indices, labels)[0]):.4f} "
            f"({run.prior.likelihood})"
        )
    bits = scored[0].float().cpu().numpy()
    problem = describe_nonfinite(bits)
    if problem is not None:
        raise NonFiniteError(
            f"{input_path}: the prior {run.paths.prior_checkpoint} gives non-finite bits per "
            f"latent ({problem}); its weights diverged or overflowed. Use the prior's "
            "checkpoints/best or an earlier checkpoint"
        )
    return LikelihoodResult(
        bits=bits,
        bits_map=block_upsample(bits, run.vqvae.factor),
        image=volume,
        affine=affine,
        indices=indices[0].cpu().numpy(),
        label=label,
    )


def resample_to_grid(
    volume: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    dst_affine: np.ndarray,
    mode: str = "nearest",
) -> np.ndarray:
    """Resample `volume` (X, Y, Z) with voxel->world `affine` onto a grid (`shape`, `dst_affine`).

    MONAI ``ResampleToMatch`` in world (RAS mm) space; voxels outside the source are 0.
    Returns (shape) float32.
    """
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    src = MetaTensor(torch.from_numpy(np.asarray(volume, np.float32))[None],
                     affine=torch.from_numpy(np.asarray(affine, np.float64)))
    dst = MetaTensor(torch.zeros((1, *(int(s) for s in shape))),
                     affine=torch.from_numpy(np.asarray(dst_affine, np.float64)))
    out = ResampleToMatch(mode=mode, padding_mode="zeros", dtype=np.float32)(src, dst)
    return np.asarray(out[0].detach().cpu().numpy(), dtype=np.float32)


def _out_stem(out_path: Path) -> str:
    name = out_path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    raise SynthesisError(
        f"--out must name a NIfTI file ending in .nii.gz or .nii, received {out_path}"
    )


def write_likelihood(
    run: PriorRun,
    result: LikelihoodResult,
    input_path: str | Path,
    out_path: str | Path,
    native: bool = False,
    extra: dict[str, Any] | None = None,
) -> LikelihoodOutputs:
    """Write the bits map at `out_path`, the scan beside it (``<stem>_input``), a montage, a JSON.

    Default grid: the preprocessed one (`result.affine`), and ``<stem>_input`` is the preprocessed
    scan. With `native`, the map is resampled (`resample_to_grid`) onto the input file's own grid
    and affine, and ``<stem>_input`` is the input's voxels on that grid (a NIfTI copy).
    `extra` fields join the JSON sidecar (written last).
    """
    out_path = Path(out_path)
    stem = _out_stem(out_path)
    folder = out_path.parent
    input_out = folder / f"{stem}_input.nii.gz"
    if native:
        from mri_vqvae.data.io import read_volume

        scan, scan_affine = read_volume(input_path, run.data.max_voxels, run.data.max_shear)
        bits = resample_to_grid(result.bits_map, result.affine, scan.shape, scan_affine)
        write_nifti(out_path, bits, scan_affine)
        write_nifti(input_out, scan, scan_affine)
    else:
        write_nifti(out_path, result.bits_map, result.affine)
        write_nifti(input_out, result.image, result.affine)
    montage = orthogonal_montage(
        [("preprocessed scan", result.image), ("bits / latent", result.bits_map)],
        affine_spacing(result.affine),
        folder / f"{stem}.png",
        title=f"mean {result.mean_bits:.3f} bits/latent",
    )
    doc = {
        "format": LIKELIHOOD_FORMAT,
        "format_version": 1,
        "map": out_path.name,
        "input_copy": input_out.name,
        "input": str(Path(input_path).resolve()),
        "grid": "native" if native else "preprocessed",
        "upsampling": f"nearest: each latent fills its {run.vqvae.factor}^3 voxel block",
        "native_resampling": "monai ResampleToMatch, nearest, zeros outside" if native else None,
        "units": "bits (-log2 p of the latent's code under the prior)",
        "bits_are": run.prior.likelihood,
        "label": result.label,
        "mean_bits_per_latent": result.mean_bits,
        "max_bits_per_latent": float(result.bits.max()),
        "indices_sha256": grid_sha256(result.indices),
        **run_provenance(run),
        **(extra or {}),
    }
    sidecar = folder / f"{stem}.json"
    atomic_write_text(sidecar, json.dumps(doc, indent=2) + "\n")
    log.info("wrote likelihood map %s (mean %.3f bits/latent)", out_path, result.mean_bits)
    return LikelihoodOutputs(out_path, input_out, montage, sidecar, result.mean_bits)


def write_scan_map(run: PriorRun, result: LikelihoodResult, input_path: str | Path,
                   out_path: str | Path, native: bool = False, bids: bool = False
                   ) -> LikelihoodOutputs:
    """`write_likelihood` of one scan; with `bids` its folder also gets the BIDS view.

    The map's BIDS name comes from the scan's name (`bids_view.scan_name`: subject, session,
    contrast); the folder's view is started (or, without `bids`, a view there is refused) and
    the name checked free before anything is written; a folder holding a view keeps it in step
    even without `bids`.
    """
    out_path = Path(out_path)
    folder, stem = out_path.parent, _out_stem(out_path)
    description = bids_view.dataset_description(
        "likelihood", config_digest(run.data), None, None,
        {"prior": run.sha256s["prior"], "VQ-VAE": run.sha256s["vqvae"]})
    owner = str(Path(input_path).resolve())
    name, ids = bids_view.scan_name(input_path, "bitsmap")
    bids = bids or bids_view.has_view(folder)  # a view there is kept in step
    if bids:
        bids_view.check_owner(folder, name, owner)
    bids_view.start_view(folder, bids, description, ignored=(
        out_path.name, f"{stem}_input.nii.gz", f"{stem}.png", f"{stem}.json"))
    done = write_likelihood(run, result, input_path, out_path, native=native)
    if bids:
        doc = json.loads(done.sidecar.read_text(encoding="utf-8"))
        sidecar = {"CaseID": owner, **ids, "Units": "bits", "Image": out_path.name,
                   "Description": f"bits per latent (-log2 p) under the prior, {doc['grid']} "
                                  "grid", "mri_vqvae": doc}
        bids_view.publish(folder, name, out_path, sidecar)
        bids_view.write_participants(folder)
    return done
