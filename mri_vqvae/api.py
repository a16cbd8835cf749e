"""The Python API: ``model = mri_vqvae.load(path)`` on a run or export folder, then preprocess,
encode, decode, reconstruct and, with a prior, sample and likelihood (docs/api.md).

Every method goes through the code the commands use, so its output equals theirs: the training
chain (`mri_vqvae.tasks.likelihood.preprocess_scan`), `encode_indices` / `decode_indices`, the
clamped forward pass of `mri_vqvae.tasks.reconstruct.reconstruct_prepared` (without its metrics,
0.4 s a 64x80x64 case), the sampling helpers of `mri_vqvae.tasks.sample` and
`mri_vqvae.tasks.likelihood.likelihood_map`; tests/api checks each equality. Images are NIfTI
(nibabel) with a fresh header, sform = qform = the RAS affine: volumes of a scan lie on its
preprocessed grid (`preprocess`'s affine), sampled volumes on the grid `mri-vqvae sample` writes
(`centred_affine`: training spacing, centred on the world origin).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from mri_vqvae.artifacts.export import OpenedModels, export_run, model_facts, open_models
from mri_vqvae.artifacts.loading import PriorRun
from mri_vqvae.core.device import cpu_threads
from mri_vqvae.core.errors import MriVqvaeError
from mri_vqvae.data.writers import nifti_image
from mri_vqvae.tasks.likelihood import likelihood_map, preprocess_scan, resample_to_grid
from mri_vqvae.tasks.sample import (
    SampleSettings,
    centred_affine,
    class_labels,
    decode_volumes,
    draw_indices,
    sample_labels,
)
from mri_vqvae.tasks.sliding import field_of_view, reconstruct_volume

Volume = str | Path | nib.Nifti1Image


class ApiError(MriVqvaeError, ValueError):
    """A call the loaded model cannot serve (says what was passed and what to pass)."""


class Model:
    """A loaded VQ-VAE, and its prior when the folder held one (see the module doc)."""

    def __init__(self, opened: OpenedModels) -> None:
        self.opened = opened
        self.vqvae = opened.autoencoder.model
        self.data = opened.autoencoder.data
        self.device = next(self.vqvae.parameters()).device  # type: ignore[attr-defined]

    @property
    def prior(self) -> PriorRun | None:
        """The prior run (prior, VQ-VAE, labels), or None for a VQ-VAE folder."""
        return self.opened.prior

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(d, h, w) of the code grid of one preprocessed volume."""
        return self.opened.autoencoder.latent_shape

    def facts(self) -> dict[str, Any]:
        """What `mri-vqvae info --json` prints for this folder."""
        return model_facts(self.opened)

    def __repr__(self) -> str:
        kind = "VQ-VAE" if self.prior is None else f"VQ-VAE + {type(self.prior.prior).__name__}"
        return f"<mri_vqvae {kind} from {self.opened.source}, grid {list(self.latent_shape)}>"

    # --- volumes <-> codes -------------------------------------------------------------------

    def preprocess(self, path: str | Path) -> nib.Nifti1Image:
        """The training chain on one scan file: RAS, data.spacing, data.spatial_size, [0, 1]."""
        volume, affine = preprocess_scan(path, self.data)
        return nifti_image(volume, affine)

    def _preprocessed(self, volume: Volume) -> nib.Nifti1Image:
        if not isinstance(volume, nib.Nifti1Image):
            return self.preprocess(volume)
        if tuple(volume.shape) != tuple(self.data.spatial_size):
            raise ApiError(
                f"the image has shape {tuple(volume.shape)}, not the preprocessed "
                f"{tuple(self.data.spatial_size)}; pass the scan's path, or model.preprocess(path)"
            )
        return volume

    @torch.no_grad()
    def encode(self, volume: Volume) -> torch.Tensor:
        """Code indices (d, h, w) int64 on CPU of a scan path or a `preprocess`ed image."""
        image = self._preprocessed(volume)
        x = torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32))[None, None]
        return self.vqvae.encode_indices(x.to(self.device))[0].cpu()

    def decode(self, indices: torch.Tensor | np.ndarray,
               like: nib.Nifti1Image | np.ndarray | None = None) -> nib.Nifti1Image:
        """The volume of a code grid (d, h, w), float32 decoder output (not clamped).

        Its affine is `like`'s (a preprocessed image or a (4, 4) affine: the grid the codes were
        encoded from); None gives the grid `mri-vqvae sample` writes (`centred_affine`).
        """
        grid = torch.as_tensor(np.asarray(indices)).long()
        if grid.ndim != 3:
            raise ApiError(f"indices must be one (d, h, w) grid, received shape "
                           f"{tuple(grid.shape)}; decode grids one at a time")
        volume = decode_volumes(self.vqvae, grid[None].to(self.device))[0]  # type: ignore[arg-type]
        return nifti_image(volume, self._affine(like))

    def _affine(self, like: nib.Nifti1Image | np.ndarray | None) -> np.ndarray:
        if like is None:
            return centred_affine(self.data.spacing, self.data.spatial_size)
        return np.asarray(like.affine if isinstance(like, nib.Nifti1Image) else like, np.float64)

    @torch.no_grad()
    def reconstruct(self, path: str | Path, spatial_size: tuple[int, int, int] | None = None,
                    overlap: float = 0.5) -> nib.Nifti1Image:
        """The scan through the VQ-VAE, clamped to [0, 1], on its preprocessed grid: the image
        `mri-vqvae reconstruct` writes (its forward pass, without the metrics it also takes).

        `spatial_size`: a box larger than the training size to preprocess to, reconstructed by
        a sliding window sharing `overlap` (``reconstruct --spatial-size``; `tasks.sliding`).
        """
        data, window = field_of_view(self.data, spatial_size, overlap)
        volume, affine = preprocess_scan(path, data)
        x = torch.from_numpy(volume)[None, None]
        recon, _ = reconstruct_volume(self.vqvae, x.to(self.device), window)  # type: ignore
        return nifti_image(recon[0, 0].cpu(), affine)

    # --- the prior ---------------------------------------------------------------------------

    def _prior(self, what: str) -> PriorRun:
        if self.prior is None:
            raise ApiError(f"{what} needs a prior, but {self.opened.source} holds only a VQ-VAE; "
                           "load a prior run (runs/prior/<run>) or its export")
        return self.prior

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, temperature: float | None = None,
               top_k: int | None = None, label: str | None = None, batch_size: int = 8,
               threads: int | None = 1) -> list[nib.Nifti1Image]:
        """`n` synthetic volumes: the volumes `mri-vqvae sample` draws for the same seed,
        temperature (None: the prior config's), top_k, label (None: every class in turn for a
        conditional prior) and batch size. `threads`: CPU threads while sampling."""
        run = self._prior("sample")
        s = SampleSettings(num_samples=n, seed=seed, temperature=temperature, top_k=top_k,
                           batch_size=batch_size, label=label).resolved(run)
        classes = class_labels(run)
        if s.label is not None:
            classes.index(s.label)
        generator = torch.Generator(device=run.device).manual_seed(s.seed)
        affine = centred_affine(self.data.spacing, self.data.spatial_size)
        images: list[nib.Nifti1Image] = []
        with cpu_threads(run.device, threads):
            while len(images) < n:
                count = min(s.batch_size, n - len(images))
                labels = sample_labels(classes, s.label, len(images), count)
                grids = draw_indices(run, s, count, generator, labels)
                images += [nifti_image(v, affine) for v in decode_volumes(run.vqvae, grids)]
        return images

    def likelihood(self, path: str | Path, label: str | None = None,
                   native: bool = False) -> nib.Nifti1Image:
        """Bits per latent (-log2 p) of a scan, each latent filling its voxel block, on the
        preprocessed grid (`preprocess`'s affine), or with `native` on the file's own grid."""
        result = likelihood_map(self._prior("likelihood"), path, label)
        if not native:
            return nifti_image(result.bits_map, result.affine)
        from mri_vqvae.data.io import read_volume

        scan, scan_affine = read_volume(path, self.data.max_voxels, self.data.max_shear)
        return nifti_image(resample_to_grid(result.bits_map, result.affine, scan.shape,
                                            scan_affine), scan_affine)

    def export(self, out: str | Path, metrics: str | Path | None = None,
               force: bool = False) -> Path:
        """`mri-vqvae export` of the run this model was loaded from."""
        if self.opened.exported is not None:
            raise ApiError(f"{self.opened.source} is already an export; copy the folder")
        source = self.opened.source
        vqvae = None if self.prior is None else self.prior.paths.vqvae_checkpoint
        return export_run(source, out, metrics, force, vqvae)


def load(path: str | Path, device: str | torch.device = "cpu",
         vqvae: str | Path | None = None) -> Model:
    """A VQ-VAE run, a prior run (with the VQ-VAE it records; `vqvae` names it if it moved,
    sha256 still checked) or an export folder, loaded on `device` (``auto``, ``cpu``, ``cuda``).

    Raises `mri_vqvae.artifacts.export.ExportError` for a folder that is neither.
    """
    return Model(open_models(path, device, vqvae))



def pretrained(name: str = "brain64_cohort", device: str | torch.device = "cpu") -> Model:
    """The model shipped inside the package (`mri_vqvae.pretrained_models`; its model card is
    ``mri_vqvae/pretrained_models/<name>/README.md``), loaded on `device`."""
    from mri_vqvae.pretrained_models import pretrained_path

    return load(pretrained_path(name), device)
