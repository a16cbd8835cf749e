"""Each code's decoded intensity, for a two-level prior whose coarse grid is a layout of tissue
(``prior.coarse_features: intensity``): the train grids decoded by the VQ-VAE they were encoded
by (checked by sha256), averaged per code (`coarse_map.code_cell_sums`)."""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from mri_vqvae.artifacts.latents import LatentIndex
from mri_vqvae.artifacts.loading import open_autoencoder_run
from mri_vqvae.core.errors import MriVqvaeError
from mri_vqvae.models.priors.twolevel.coarse_map import code_cell_sums
from mri_vqvae.training.errors import TrainingError

log = logging.getLogger(__name__)


def measure_code_intensity(index: LatentIndex, grids: Tensor, device: torch.device,
                           batch_size: int = 8) -> Tensor:
    """Mean decoded intensity of each code's 2x2x2 sub-cells over ``grids`` (N, d, h, w): (K, 8)
    float64, decoded in fp32 with the VQ-VAE recorded in the latents' index.json. Leaves the
    global random state as it found it (building the VQ-VAE draws initial weights)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _measure(index, grids, device, batch_size)


def _measure(index: LatentIndex, grids: Tensor, device: torch.device, batch_size: int) -> Tensor:
    recorded = str(index.doc["vqvae_checkpoint"])
    try:
        run = open_autoencoder_run(recorded, device)
    except MriVqvaeError as exc:
        raise TrainingError(
            f"prior.coarse_features=intensity decodes the train grids with the VQ-VAE the latents "
            f"in {index.root} were encoded by ({recorded}, index.json vqvae_checkpoint), which "
            f"cannot be opened: {exc} Put that checkpoint back, re-encode the latents, or use "
            "prior.coarse_features=neighbours"
        ) from None
    if run.weights_sha256 != index.doc["vqvae_sha256"]:
        raise TrainingError(
            f"the VQ-VAE at {run.checkpoint} is not the one the latents in {index.root} were "
            f"encoded by (sha256 {run.weights_sha256[:16]}... against the recorded "
            f"{str(index.doc['vqvae_sha256'])[:16]}...); re-encode the latents with it, or use "
            "prior.coarse_features=neighbours"
        )
    k = index.codebook_size
    sums = torch.zeros(k, 8, dtype=torch.float64)
    counts = torch.zeros(k, dtype=torch.int64)
    start = time.monotonic()
    model = run.model
    with torch.no_grad():
        for i in range(0, len(grids), batch_size):
            batch = grids[i:i + batch_size].to(device)
            decoded = model.decode_indices(batch).float().cpu()
            s, c = code_cell_sums(decoded, batch.cpu(), k)
            sums += s
            counts += c
    log.info("code intensity: decoded %d train grid(s) with %s in %.0f s", len(grids),
             run.checkpoint, time.monotonic() - start)
    return sums / counts.clamp_min(1).double()[:, None]
