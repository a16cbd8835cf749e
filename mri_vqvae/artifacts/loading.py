"""Opening trained runs: one best-else-last rule, an autoencoder run, a prior run and its VQ-VAE.

A run folder (``runs/<stage>/<run>/``) holds ``checkpoints/best`` and ``checkpoints/last``;
`find_checkpoint` takes ``best``, else ``last`` (the first complete one), and accepts a
checkpoint folder itself. Every command that reads a trained model goes through it.

A prior checkpoint's ``extra`` records the VQ-VAE it was trained on::

    {"latents_dir", "vqvae_checkpoint" (absolute folder; in an export ``../vqvae``, relative
     to the prior's folder), "vqvae_sha256" (of its model.safetensors), "manifest_digest",
     "latent_shape" [d, h, w], "codebook_size", "data" (the DataConfig of the training chain)}

`open_prior_run` loads both models and refuses a VQ-VAE whose weights do not hash to
``vqvae_sha256`` (a retrained or edited checkpoint would decode codes the prior never saw).
Priors of every registered kind load (``pixelcnn``, ``unigram`` and the legacy ``prior``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from mri_vqvae.artifacts.checkpoint import LoadedCheckpoint, load_checkpoint
from mri_vqvae.artifacts.checkpoint_folder import WEIGHTS, resolve_checkpoint
from mri_vqvae.config import DataConfig
from mri_vqvae.core.device import resolve_device
from mri_vqvae.core.errors import CheckpointError
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.models.autoencoders.base import DiscreteAutoencoder
from mri_vqvae.models.priors.base import Prior
from mri_vqvae.models.registry import Role, model_kind

log = logging.getLogger(__name__)

CHECKPOINT_ORDER = ("best", "last")
REQUIRED_EXTRA = (
    "latents_dir",
    "vqvae_checkpoint",
    "vqvae_sha256",
    "manifest_digest",
    "latent_shape",
    "codebook_size",
    "data",
)
_MADE_BY = {"autoencoder": "mri-vqvae train-vqvae", "prior": "mri-vqvae train-prior"}
_A = {"autoencoder": "an autoencoder (VQ-VAE)", "prior": "a prior"}


def find_checkpoint(path: str | Path, role: Role) -> tuple[Path, Path]:
    """(run folder, complete checkpoint folder), both absolute, for a run or checkpoint folder.

    A run folder gives ``checkpoints/best``, else ``checkpoints/last`` (a save interrupted by a
    kill is seen through); a checkpoint folder is used as it is, its run folder two levels up
    (one when it is not inside ``checkpoints/``). `role` only words the errors.
    """
    path = Path(path).resolve()
    hint = f"pass a run folder made by `{_MADE_BY[role]}` (or one of its checkpoint folders)"
    if (path / "config.json").is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run, resolve_checkpoint(path)
    if not path.is_dir():
        raise CheckpointError(f"{role} run {path} does not exist; {hint}")
    problems = []
    for name in CHECKPOINT_ORDER:
        try:
            folder = resolve_checkpoint(path / "checkpoints" / name)
        except CheckpointError as exc:
            problems.append(f"checkpoints/{name}: {exc}")
            continue
        if problems:
            log.warning("no usable checkpoints/best in %s; using %s", path, folder)
        return path, folder
    raise CheckpointError(
        f"{path} holds no complete checkpoints/best or checkpoints/last: {hint}. "
        + " | ".join(problems)
    )


def _load_role(folder: Path, role: Role, device: torch.device) -> LoadedCheckpoint:
    """`load_checkpoint` of `folder`, refused unless its kind has `role`."""
    loaded = load_checkpoint(folder, map_location=device)
    if model_kind(loaded.kind).role != role:
        raise CheckpointError(
            f"{folder} holds a {loaded.kind!r} checkpoint, not {_A[role]}; pass a run made by "
            f"`{_MADE_BY[role]}`"
        )
    return loaded


def _data_config(doc: Any, where: Path, field: str) -> DataConfig:
    try:
        return DataConfig.model_validate(doc)
    except ValidationError as exc:
        raise CheckpointError(
            f"{where / 'config.json'}: {field} is not a valid data config ({exc})"
        ) from None


# --- autoencoder runs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoencoderRun:
    """A trained autoencoder in eval mode, with the data config it was trained with.

    ``latent_shape`` is the (d, h, w) code grid of one ``data.spatial_size`` volume.
    """

    run_dir: Path
    checkpoint: Path
    model: DiscreteAutoencoder
    weights_sha256: str
    step: int | None
    data: DataConfig
    latent_shape: tuple[int, int, int]
    codebook_size: int


def open_autoencoder_run(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> AutoencoderRun:
    """The autoencoder of a run (best, else last; or a checkpoint folder) on `device`."""
    run, folder = find_checkpoint(run_dir, "autoencoder")
    loaded = _load_role(folder, "autoencoder", resolve_device(device))
    experiment = loaded.extra.get("experiment")
    if not isinstance(experiment, dict) or "data" not in experiment:
        raise CheckpointError(
            f"{folder}/config.json records no data config (extra.experiment.data): it was not "
            "saved by `mri-vqvae train-vqvae`, so the preprocessing it expects is unknown"
        )
    data = _data_config(experiment["data"], folder, "extra.experiment.data")
    model: DiscreteAutoencoder = loaded.model  # type: ignore[assignment]
    return AutoencoderRun(
        run_dir=run,
        checkpoint=folder,
        model=model,
        weights_sha256=str(loaded.meta["files"][WEIGHTS]),
        step=loaded.step,
        data=data,
        latent_shape=model.latent_shape(data.spatial_size),
        codebook_size=int(loaded.config["codebook_size"]),
    )


# --- prior runs ----------------------------------------------------------------------------------


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

    prior: Prior
    vqvae: DiscreteAutoencoder
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
        return next(self.vqvae.parameters()).device  # type: ignore[attr-defined]


def _check_extra(extra: dict[str, Any], where: Path) -> DataConfig:
    missing = [k for k in REQUIRED_EXTRA if k not in extra]
    if missing:
        raise CheckpointError(
            f"{where / 'config.json'} lacks extra keys {missing}: it was not saved by "
            "`mri-vqvae train-prior`, which records the VQ-VAE and data config it trained on"
        )
    return _data_config(extra["data"], where, "extra.data")


def _vqvae_folder(recorded: str, override: str | Path | None, prior_folder: Path) -> Path:
    """The VQ-VAE checkpoint: `override` (a run or checkpoint folder), else the recorded one (a
    relative one, as exports record it, is relative to the prior's checkpoint folder)."""
    folder = Path(override if override is not None else recorded).expanduser()
    folder = (folder if folder.is_absolute() else prior_folder / folder).resolve()
    try:
        return find_checkpoint(folder, "autoencoder")[1]
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


def _check_consistent(run: PriorRun, vqvae_codebook: int) -> None:
    sizes = {
        "prior.codebook_size": run.prior.codebook_size,
        "vqvae.codebook_size": vqvae_codebook,
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


def open_prior_run(
    run_dir: str | Path,
    vqvae: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> PriorRun:
    """A prior run's prior (best, else last) and the VQ-VAE recorded in its extra, on `device`.

    `vqvae` (a VQ-VAE run or checkpoint folder) overrides the recorded folder, e.g. after moving
    runs; either way the weights must hash to ``extra.vqvae_sha256``, else `CheckpointError`
    naming both paths.
    """
    dev = resolve_device(device)
    run, prior_folder = find_checkpoint(run_dir, "prior")
    loaded = _load_role(prior_folder, "prior", dev)
    data = _check_extra(loaded.extra, prior_folder)
    vq_folder = _vqvae_folder(loaded.extra["vqvae_checkpoint"], vqvae, prior_folder)
    vq_sha = _verify_vqvae_sha(vq_folder, loaded.extra["vqvae_sha256"], prior_folder)
    vq = _load_role(vq_folder, "autoencoder", dev)
    d, h, w = (int(s) for s in loaded.extra["latent_shape"])
    result = PriorRun(
        prior=loaded.model,  # type: ignore[arg-type]
        vqvae=vq.model,  # type: ignore[arg-type]
        extra=loaded.extra,
        paths=PriorRunPaths(run, prior_folder, vq_folder),
        sha256s={"prior": loaded.meta["files"][WEIGHTS], "vqvae": vq_sha},
        data=data,
        latent_shape=(d, h, w),
    )
    _check_consistent(result, int(vq.config["codebook_size"]))
    log.info("loaded prior %s and VQ-VAE %s", prior_folder, vq_folder)
    return result
