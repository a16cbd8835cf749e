"""Synthetic MRI from a trained prior run, and per-latent likelihood maps of a scan.

A prior run (``runs/prior/<run>/``) holds ``checkpoints/best`` and ``checkpoints/last`` (kind
``"prior"``); the checkpoint's ``extra`` records the VQ-VAE it was trained on::

    {"latents_dir", "vqvae_checkpoint" (absolute folder), "vqvae_sha256" (of its
     model.safetensors), "manifest_digest", "latent_shape" [d, h, w], "codebook_size",
     "data" (the DataConfig of the training chain)}

`load_prior_run` loads both models and refuses a VQ-VAE whose weights do not hash to
``vqvae_sha256`` (a retrained or edited checkpoint would decode codes the prior never saw).

Sampling (`sample_volumes`): one ``torch.Generator`` seeded with ``seed`` draws every batch in
turn, so ``(seed, num_samples, batch_size, device)`` fixes the output bit for bit; ``fast`` and
``naive`` give identical grids. Decoded volumes are written at the training spacing and
``spatial_size`` on a RAS grid centred on the world origin (`centred_affine`), one JSON sidecar
each (`sample_sidecar`), and one montage. No training-scan identifier is written anywhere: the
sidecars name only checkpoints, hashes and settings, and NIfTI headers are built fresh.

CPU threads: the cached sampler runs many tiny per-voxel kernels, where extra OpenMP threads only
add synchronisation. Measured on the shared 2-core box (default PixelCNNConfig, 8x10x8 grid): batch
1 0.22 s with 1 thread vs 26 s with 2; batch 8 0.47 s vs 2.6 s; decoding 2 default-VQ-VAE volumes
0.17 s vs 0.49 s. So sampling and decoding on CPU run with ``threads=1`` by default (restored
afterwards); pass a larger number on a quiet many-core machine.

Likelihood (`likelihood_map`): the scan goes through the deterministic training chain
(`mri_vqvae.data.transforms.build_transforms`), is encoded to indices, and ``prior.nll`` gives
``-log2 p(i_p | i_<p)`` per latent. Each latent stands for the ``2**levels`` voxel block it was
encoded from, so the map is upsampled by block replication (nearest): no detail is invented below
the latent scale and the map's mean equals the latent mean exactly. `resample_to_grid` (MONAI
``ResampleToMatch``, nearest, zeros outside) carries a map back onto the input file's own grid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor
from tqdm.auto import tqdm

from mri_vqvae import __version__
from mri_vqvae.artifacts.checkpoint import WEIGHTS, load_checkpoint, resolve_checkpoint
from mri_vqvae.artifacts.runs import (
    describe_device,
    package_versions,
    unique_dir,
    utc_iso,
    utc_stamp,
)
from mri_vqvae.config import DataConfig
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.errors import CheckpointError, MriVqvaeError
from mri_vqvae.core.finite import NonFiniteError, describe_nonfinite
from mri_vqvae.core.outputs import ensure_writable
from mri_vqvae.data.kit_sources import run_citations
from mri_vqvae.data.manifest import sha256_file
from mri_vqvae.data.writers import affine_spacing, write_nifti
from mri_vqvae.evaluation.report import orthogonal_montage
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D

log = logging.getLogger(__name__)

REQUIRED_EXTRA = (
    "latents_dir",
    "vqvae_checkpoint",
    "vqvae_sha256",
    "manifest_digest",
    "latent_shape",
    "codebook_size",
    "data",
)
SAMPLE_FORMAT = "mri-vqvae-sample"
LIKELIHOOD_FORMAT = "mri-vqvae-likelihood"
MONTAGE_ROWS = 8
_VERSIONED = ("torch", "monai", "numpy", "nibabel")


class SynthesisError(MriVqvaeError, ValueError):
    """Sampling or likelihood arguments a user can get wrong (says what and how to fix)."""


# --- loading a prior run -------------------------------------------------------------------------


@dataclass(frozen=True)
class PriorRunPaths:
    """Where a loaded prior run came from (all absolute)."""

    run_dir: Path
    prior_checkpoint: Path
    vqvae_checkpoint: Path


@dataclass(frozen=True)
class PriorRun:
    """A prior and the VQ-VAE whose codes it models, both in eval mode on one device.

    ``sha256s`` holds the sha256 of each checkpoint's model.safetensors (keys prior, vqvae);
    ``latent_shape`` is (d, h, w); ``data`` the training chain's config.
    """

    prior: GatedPixelCNN3D
    vqvae: VQVAE
    extra: dict[str, Any]
    paths: PriorRunPaths
    sha256s: dict[str, str]
    data: DataConfig
    latent_shape: tuple[int, int, int]

    @property
    def name(self) -> str:
        """The run folder's name (names the default sample folder)."""
        return self.paths.run_dir.name

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device


def find_prior_checkpoint(run_dir: str | Path) -> tuple[Path, Path]:
    """(run dir, complete checkpoint folder): ``checkpoints/best``, else ``checkpoints/last``.

    A checkpoint folder itself is accepted too (its run dir is two levels up).
    """
    path = Path(run_dir).resolve()
    if (path / "config.json").is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run, resolve_checkpoint(path)
    if not path.is_dir():
        raise CheckpointError(
            f"prior run {path} does not exist; pass a folder runs/prior/<run>/ made by "
            "`mri-vqvae train-prior` (or one of its checkpoint folders)"
        )
    problems = []
    for name in ("best", "last"):
        try:
            return path, resolve_checkpoint(path / "checkpoints" / name)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("no usable checkpoints/%s in %s", name, path)
    raise CheckpointError(
        f"{path} holds no usable prior checkpoint (tried checkpoints/best, then checkpoints/last): "
        + " | ".join(problems)
    )


def _check_extra(extra: dict[str, Any], where: Path) -> DataConfig:
    missing = [k for k in REQUIRED_EXTRA if k not in extra]
    if missing:
        raise CheckpointError(
            f"{where / 'config.json'} lacks extra keys {missing}: it was not saved by "
            "`mri-vqvae train-prior`, which records the VQ-VAE and data config it trained on"
        )
    try:
        return DataConfig.model_validate(extra["data"])
    except ValidationError as exc:
        raise CheckpointError(
            f"{where / 'config.json'}: extra.data is not a valid data config ({exc})"
        ) from None


def _vqvae_folder(recorded: str, override: str | Path | None, prior_folder: Path) -> Path:
    folder = Path(override if override is not None else recorded).expanduser().resolve()
    try:
        return resolve_checkpoint(folder)
    except CheckpointError as exc:
        raise CheckpointError(
            f"the VQ-VAE checkpoint {folder} (recorded in {prior_folder / 'config.json'} as "
            f"extra.vqvae_checkpoint) cannot be read: {exc} If the runs folder moved, pass the "
            "checkpoint's new location with --vqvae; its weights are still checked by sha256"
        ) from None


def _verify_vqvae_sha(folder: Path, expected: str, prior_folder: Path) -> str:
    actual = sha256_file(folder / WEIGHTS)
    if actual != expected:
        raise CheckpointError(
            f"VQ-VAE weights {folder / WEIGHTS} have sha256 {actual[:16]}..., but the prior "
            f"{prior_folder} was trained on codes of weights with sha256 {str(expected)[:16]}... "
            f"(extra.vqvae_sha256 in {prior_folder / 'config.json'}). The VQ-VAE checkpoint was "
            "retrained, replaced or edited; use the exact checkpoint the prior was trained on, or "
            "re-encode the latents and retrain the prior"
        )
    return actual


def _check_consistent(run: PriorRun) -> None:
    sizes = {
        "prior.codebook_size": run.prior.codebook_size,
        "vqvae.codebook_size": run.vqvae.config.codebook_size,
        "extra.codebook_size": int(run.extra["codebook_size"]),
    }
    if len(set(sizes.values())) != 1:
        raise CheckpointError(
            f"{run.paths.prior_checkpoint}: codebook sizes disagree {sizes}; the prior does not "
            f"belong to {run.paths.vqvae_checkpoint}"
        )
    expected = run.vqvae.latent_shape(run.data.spatial_size)
    if tuple(run.latent_shape) != expected:
        raise CheckpointError(
            f"{run.paths.prior_checkpoint}: extra.latent_shape {list(run.latent_shape)} differs "
            f"from the VQ-VAE's latent grid {list(expected)} for spatial_size "
            f"{list(run.data.spatial_size)}"
        )


def load_prior_run(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    vqvae_checkpoint: str | Path | None = None,
) -> PriorRun:
    """Load a prior run's prior (best, else last) and the VQ-VAE recorded in its extra.

    `vqvae_checkpoint` overrides the recorded folder (e.g. after moving runs); either way the
    weights must hash to ``extra.vqvae_sha256``, else `CheckpointError` naming both paths.
    """
    run, prior_folder = find_prior_checkpoint(run_dir)
    loaded = load_checkpoint(prior_folder, map_location=device)
    if loaded.kind != "prior":
        raise CheckpointError(
            f"{prior_folder} holds a {loaded.kind!r} checkpoint, not a prior; pass a prior run"
        )
    data = _check_extra(loaded.extra, prior_folder)
    vq_folder = _vqvae_folder(loaded.extra["vqvae_checkpoint"], vqvae_checkpoint, prior_folder)
    vq_sha = _verify_vqvae_sha(vq_folder, loaded.extra["vqvae_sha256"], prior_folder)
    vq = load_checkpoint(vq_folder, map_location=device)
    if vq.kind != "vqvae":
        raise CheckpointError(f"{vq_folder} holds a {vq.kind!r} checkpoint, not a VQ-VAE")
    assert isinstance(loaded.model, GatedPixelCNN3D) and isinstance(vq.model, VQVAE)
    d, h, w = (int(s) for s in loaded.extra["latent_shape"])
    result = PriorRun(
        prior=loaded.model,
        vqvae=vq.model,
        extra=loaded.extra,
        paths=PriorRunPaths(run, prior_folder.resolve(), vq_folder),
        sha256s={"prior": loaded.meta["files"][WEIGHTS], "vqvae": vq_sha},
        data=data,
        latent_shape=(d, h, w),
    )
    _check_consistent(result)
    log.info("loaded prior %s and VQ-VAE %s", prior_folder, vq_folder)
    return result


# --- geometry and small helpers ------------------------------------------------------------------


def centred_affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """RAS voxel -> world (mm) affine (4, 4): ``diag(spacing)``, volume centre at the origin."""
    sp = np.asarray(spacing, dtype=np.float64)
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = -sp * (np.asarray(shape, dtype=np.float64) - 1) / 2
    return affine


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` on CPU; restore the count after.

    No-op on other devices or when `threads` is None or 0.
    """
    if device.type != "cpu" or not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _grid_sha256(grid: np.ndarray) -> str:
    """sha256 of an index grid (d, h, w) as little-endian int64 bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(grid, dtype="<i8").tobytes()).hexdigest()


def _provenance(run: PriorRun) -> dict[str, Any]:
    return {
        "prior_checkpoint": str(run.paths.prior_checkpoint),
        "prior_sha256": run.sha256s["prior"],
        "vqvae_checkpoint": str(run.paths.vqvae_checkpoint),
        "vqvae_sha256": run.sha256s["vqvae"],
        "manifest_digest": run.extra["manifest_digest"],
        "latent_shape": list(run.latent_shape),
        "codebook_size": int(run.extra["codebook_size"]),
        "mri_vqvae_version": __version__,
        "versions": package_versions(_VERSIONED),
        "device": describe_device(run.device),
        "created_utc": utc_iso(),
    }


def _require_unconditional(run: PriorRun) -> None:
    if run.prior.num_classes:
        raise SynthesisError(
            f"the prior {run.paths.prior_checkpoint} is class-conditional "
            f"(num_classes={run.prior.num_classes}); sampling and likelihood maps support "
            "unconditional priors only so far"
        )


# --- sampling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSettings:
    """What to draw. ``temperature``/``top_k`` None take the prior config's defaults."""

    num_samples: int
    seed: int
    temperature: float | None = None
    top_k: int | None = None
    method: str = "fast"
    batch_size: int = 8
    greedy: bool = False

    def resolved(self, run: PriorRun) -> SampleSettings:
        """These settings with the prior's default temperature / top_k filled in, checked."""
        if self.num_samples < 1 or self.batch_size < 1:
            raise SynthesisError(
                f"num_samples and batch_size must be >= 1, received {self.num_samples} and "
                f"{self.batch_size}"
            )
        cfg = run.prior.config
        temperature = cfg.temperature if self.temperature is None else float(self.temperature)
        top_k = cfg.top_k if self.top_k is None else int(self.top_k)
        return SampleSettings(
            self.num_samples, int(self.seed), temperature, top_k, self.method,
            min(self.batch_size, self.num_samples), self.greedy,
        )


@dataclass(frozen=True)
class SampleOutputs:
    """What `sample_volumes` wrote; ``indices`` is (N, d, h, w) int64 on CPU."""

    out_dir: Path
    images: list[Path]
    sidecars: list[Path]
    montage: Path
    indices: Tensor


def default_sample_dir(runs_root: str | Path, run_name: str, seed: int) -> Path:
    """``runs_root/samples/<prior-run>/<UTC>-s<seed>/``, created (``-2``... on a clash)."""
    return unique_dir(Path(runs_root) / "samples" / run_name, f"{utc_stamp()}-s{int(seed)}")


def _prepare_out_dir(out_dir: Path) -> Path:
    ensure_writable(out_dir)
    old = sorted(p.name for p in out_dir.glob("sample_*"))
    if old:
        raise SynthesisError(
            f"{out_dir} already holds samples ({old[:3]}...); choose a new --out folder (or leave "
            "--out out for a fresh runs/samples/<run>/<UTC>-s<seed>/)"
        )
    return out_dir


def sample_sidecar(
    run: PriorRun, settings: SampleSettings, index: int, grid: np.ndarray, affine: np.ndarray
) -> dict[str, Any]:
    """The provenance record of sample `index` (grid (d, h, w)); names no training scan."""
    return {
        "format": SAMPLE_FORMAT,
        "format_version": 1,
        "synthetic": True,
        "image": f"sample_{index:04d}.nii.gz",
        "sample_index": index,
        **asdict(settings),
        "indices_sha256": _grid_sha256(grid),
        "spatial_size": list(run.data.spatial_size),
        "spacing": list(run.data.spacing),
        "affine": np.asarray(affine).tolist(),
        **_provenance(run),
        "training_data": run_citations(run.paths.vqvae_checkpoint.parent.parent),
    }


def draw_indices(run: PriorRun, settings: SampleSettings, generator: torch.Generator) -> Tensor:
    """One batch of code grids (B, d, h, w) int64 drawn with `generator`.

    Raises `NonFiniteError` naming the prior checkpoint when its logits are NaN/±Inf.
    """
    shape = (settings.batch_size, *run.latent_shape)
    try:
        return run.prior.sample(
            shape,
            generator,
            temperature=float(settings.temperature or 0.0),
            top_k=settings.top_k,
            method=settings.method,
            greedy=settings.greedy,
        )
    except NonFiniteError as exc:
        raise NonFiniteError(f"prior {run.paths.prior_checkpoint}: {exc}") from None


@torch.no_grad()
def decode_volumes(vqvae: VQVAE, indices: Tensor, where: str = "the VQ-VAE") -> np.ndarray:
    """Decode code grids (B, d, h, w) -> volumes (B, D, H, W) float32 numpy (RAS).

    Raises `NonFiniteError` (naming `where` and the bad samples) if a voxel is NaN/±Inf.
    """
    volumes = vqvae.decode_indices(indices).float()[:, 0].cpu().numpy()
    problem = describe_nonfinite(volumes)
    if problem is not None:
        bad = [i for i, v in enumerate(volumes) if not np.isfinite(v).all()]
        raise NonFiniteError(
            f"{where} decoded {len(bad)} of {len(volumes)} volumes (batch rows {bad[:8]}) with "
            f"non-finite voxels ({problem}); nothing of this batch was written. The decoder "
            "diverged or overflowed: use the VQ-VAE's checkpoints/best or an earlier checkpoint"
        )
    return volumes


def sample_volumes(
    run: PriorRun,
    settings: SampleSettings,
    out_dir: str | Path,
    threads: int | None = 1,
    progress: bool = True,
) -> SampleOutputs:
    """Draw ``settings.num_samples`` grids, decode them, write NIfTI + sidecar each + a montage.

    Files: ``sample_0000.nii.gz`` (float32 decoder output, (D, H, W) = data.spatial_size, RAS at
    data.spacing), ``sample_0000.json`` (`sample_sidecar`) and ``samples.png`` (first
    `MONTAGE_ROWS` samples). Every write is atomic. `threads`: see the module docstring.
    NaN/±Inf logits or decoded voxels raise `NonFiniteError` before that batch is written
    (earlier batches, all finite, stay).
    """
    _require_unconditional(run)
    s = settings.resolved(run)
    out = _prepare_out_dir(Path(out_dir))
    affine = centred_affine(run.data.spacing, run.data.spatial_size)
    generator = torch.Generator(device=run.device).manual_seed(s.seed)
    images: list[Path] = []
    sidecars: list[Path] = []
    grids: list[Tensor] = []
    shown: list[tuple[str, np.ndarray]] = []
    bar = tqdm(total=s.num_samples, desc="sample", unit="sample",
               disable=not progress or not sys.stderr.isatty())
    with bar, cpu_threads(run.device, threads):
        while len(images) < s.num_samples:
            b = min(s.batch_size, s.num_samples - len(images))
            batch = draw_indices(run, SampleSettings(**{**asdict(s), "batch_size": b}), generator)
            volumes = decode_volumes(run.vqvae, batch, f"VQ-VAE {run.paths.vqvae_checkpoint}")
            for grid, volume in zip(batch.cpu(), volumes, strict=True):
                i = len(images)
                images.append(write_nifti(out / f"sample_{i:04d}.nii.gz", volume, affine))
                doc = sample_sidecar(run, s, i, grid.numpy(), affine)
                sidecars.append(out / f"sample_{i:04d}.json")
                atomic_write_text(sidecars[-1], json.dumps(doc, indent=2) + "\n")
                grids.append(grid)
                if len(shown) < MONTAGE_ROWS:
                    shown.append((f"sample {i}", volume))
            bar.update(b)
    title = f"{run.name}: T={s.temperature} top_k={s.top_k} seed={s.seed}"
    montage = orthogonal_montage(shown, run.data.spacing, out / "samples.png", title=title)
    log.info("wrote %d samples, sidecars and a montage to %s", len(images), out)
    return SampleOutputs(out, images, sidecars, montage, torch.stack(grids))


# --- likelihood maps -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LikelihoodResult:
    """A scan's per-latent NLL on the preprocessed (training) grid.

    bits: (d, h, w) float32, ``-log2 p(i_p | i_<p)`` per latent; bits_map: (D, H, W) the same,
    each latent filling its block; image: (D, H, W) the preprocessed scan; affine: (4, 4) its
    RAS voxel -> world matrix; indices: (d, h, w) int64.
    """

    bits: np.ndarray
    bits_map: np.ndarray
    image: np.ndarray
    affine: np.ndarray
    indices: np.ndarray

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
        inner: BaseException = exc
        while inner.__cause__ is not None and not isinstance(inner, MriVqvaeError):
            inner = inner.__cause__
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
def likelihood_map(run: PriorRun, input_path: str | Path) -> LikelihoodResult:
    """Preprocess `input_path`, encode it and score its latents with the prior (see module doc)."""
    _require_unconditional(run)
    volume, affine = preprocess_scan(input_path, run.data)
    x = torch.from_numpy(volume)[None, None].to(run.device)
    try:
        indices = run.vqvae.encode_indices(x)  # (1, d, h, w)
    except NonFiniteError as exc:
        raise NonFiniteError(f"{input_path} (VQ-VAE {run.paths.vqvae_checkpoint}): {exc}") from None
    bits = run.prior.bits(indices)[0].float().cpu().numpy()
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
) -> LikelihoodOutputs:
    """Write the bits map at `out_path`, the scan beside it (``<stem>_input``), a montage, a JSON.

    Default grid: the preprocessed one (`result.affine`), and ``<stem>_input`` is the preprocessed
    scan. With `native`, the map is resampled (`resample_to_grid`) onto the input file's own grid
    and affine, and ``<stem>_input`` is the input's voxels on that grid (a NIfTI copy).
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
        "units": "bits (-log2 p of the latent's code given the codes before it)",
        "mean_bits_per_latent": result.mean_bits,
        "max_bits_per_latent": float(result.bits.max()),
        "indices_sha256": _grid_sha256(result.indices),
        **_provenance(run),
    }
    sidecar = folder / f"{stem}.json"
    atomic_write_text(sidecar, json.dumps(doc, indent=2) + "\n")
    log.info("wrote likelihood map %s (mean %.3f bits/latent)", out_path, result.mean_bits)
    return LikelihoodOutputs(out_path, input_out, montage, sidecar, result.mean_bits)
