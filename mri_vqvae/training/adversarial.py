"""The VQ-VAE's optional adversarial term: a 3D patch discriminator and its own optimizer.

Built only when ``train_vqvae.adversarial_weight`` > 0 (otherwise nothing here runs and training
is what it was without it). The discriminator is MONAI's ``PatchDiscriminator`` (3D, one input
channel, ``discriminator_channels`` doubling over ``discriminator_layers`` strided convolutions,
instance norm: each volume is normalised alone, so a DDP rank's share of the batch scores as it
would in the whole batch), initialised from an RNG forked off the run's seed, which leaves the
global RNG, and so the autoencoder's draws, untouched. The loss is MONAI's
``PatchAdversarialLoss`` (``adversarial_loss``: least_squares or hinge) over every patch.

Before ``adversarial_start_step`` neither the term nor the discriminator trains, so those steps
are bit-identical to a run without one. From then on one step is

1. generator: loss += weight * adv(D(reconstruction), real), D's parameters frozen;
2. discriminator: one AdamW step (``discriminator_lr`` times the run's schedule factor, the run's
   betas, weight decay and gradient clipping) on (adv(D(x), real) + adv(D(recon), fake)) / 2,
   real and detached reconstructed volumes in one forward (DDP-wrapped under torchrun).

Its weights and optimizer state live in checkpoints/last's resume state (key ``discriminator``),
never in model.safetensors: published VQ-VAE checkpoints keep their format, and encode,
reconstruct and evaluate never need a discriminator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import Tensor, nn

from mri_vqvae.config import AutoencoderTrainConfig
from mri_vqvae.training.errors import TrainingError
from mri_vqvae.training.session import Session

KERNEL, PADDING = 4, 1  # PatchDiscriminator's defaults: each conv maps n -> (n - 2) // stride + 1


def patch_grid(spatial_size: Sequence[int], layers: int) -> list[list[int]]:
    """The (D, H, W) sizes after each convolution of a ``layers``-layer discriminator: the first
    and ``layers - 1`` more at stride 2, the last layer and the output conv at stride 1."""
    sizes, size = [], list(spatial_size)
    for stride in [2] * layers + [1, 1]:
        size = [(n + 2 * PADDING - KERNEL) // stride + 1 for n in size]
        sizes.append(size)
    return sizes


def check_patch_grid(spatial_size: Sequence[int], layers: int) -> None:
    """Raise `TrainingError` unless every convolution sees at least a kernel's width (4 voxels)
    on every axis. A smaller input is mostly padding, and PyTorch's bf16 CPU convolution returns
    garbage weight gradients for it (seen on torch 2.13: values near 1e30, differing per run)."""
    sizes = patch_grid(spatial_size, layers)
    inputs = [list(spatial_size), *sizes[:-1]]
    if min(min(size) for size in inputs) < KERNEL:
        raise TrainingError(
            f"train_vqvae.discriminator_layers={layers} is too deep for data.spatial_size="
            f"{list(spatial_size)}: its convolutions would see {inputs}, and each needs at least "
            f"{KERNEL} voxels per axis; use fewer layers (each halves every axis) or a larger "
            "spatial_size"
        )


@dataclass(kw_only=True)
class Adversary:
    """The discriminator, its optimizer and loss; ``net`` is its DDP wrapper under torchrun."""

    discriminator: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: PatchAdversarialLoss
    weight: float
    start_step: int
    lr: float
    net: nn.Module | None = None

    def active(self, step: int) -> bool:
        """Whether the step after `step` completed ones trains with the adversarial term."""
        return step >= self.start_step

    def wrap(self, s: Session) -> None:
        """DDP-wrap the discriminator under torchrun (after any resume has loaded it)."""
        self.net = s.distributed(self.discriminator) if s.world > 1 else self.discriminator

    def generator_term(self, s: Session, reconstruction: Tensor) -> Tensor:
        """Adversarial loss of (B, 1, D, H, W) reconstructions scored as real -> scalar fp32;
        gradients reach the reconstructions, not the discriminator."""
        self.discriminator.requires_grad_(False)
        try:
            with s.autocast():
                logits = self.discriminator(reconstruction)[-1]
        finally:
            self.discriminator.requires_grad_(True)
        return self.criterion(logits.float(), target_is_real=True, for_discriminator=False)

    def step(self, s: Session, images: Tensor, reconstruction: Tensor) -> Tensor:
        """One discriminator step on real (B, 1, D, H, W) `images` and their detached
        reconstructions; returns its loss (this rank's share mean, detached)."""
        n = images.shape[0]
        both = torch.cat([images, reconstruction.detach().to(images.dtype)])
        assert self.net is not None, "wrap() first"
        with s.autocast():
            logits = self.net(both)[-1].float()
        real = self.criterion(logits[:n], target_is_real=True, for_discriminator=True)
        fake = self.criterion(logits[n:], target_is_real=False, for_discriminator=True)
        loss = (real + fake) / 2
        s.descend(self.optimizer, self.net, loss, n, self.lr)
        return loss.detach()

    def state(self) -> dict[str, Any]:
        """Weights and optimizer state, as a resume state holds them."""
        weights = {k: v.detach().cpu() for k, v in self.discriminator.state_dict().items()}
        return {"weights": weights, "optimizer": self.optimizer.state_dict()}

    def load(self, state: dict[str, Any], where: str) -> None:
        """Take back `state` (from `state`); `where` names the checkpoint in errors."""
        try:
            self.discriminator.load_state_dict(state["weights"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            first = str(exc).splitlines()[0]
            raise TrainingError(
                f"cannot resume {where}: its discriminator does not fit train_vqvae."
                f"discriminator_channels / discriminator_layers ({first}); resume with the run's "
                "own config (drop --config/--set for them)"
            ) from None


def build_adversary(tc: AutoencoderTrainConfig, spatial_size: Sequence[int], seed: int,
                    device: torch.device) -> Adversary | None:
    """The adversary of `tc` on `device` (None when ``adversarial_weight`` is 0); raises
    `TrainingError` when the discriminator is too deep for `spatial_size`."""
    if tc.adversarial_weight == 0:
        return None
    check_patch_grid(spatial_size, tc.discriminator_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        discriminator = PatchDiscriminator(
            spatial_dims=3, channels=tc.discriminator_channels, in_channels=1,
            num_layers_d=tc.discriminator_layers, kernel_size=KERNEL, padding=PADDING,
            norm="INSTANCE",
        )
    discriminator.to(device)
    optimizer = torch.optim.AdamW(discriminator.parameters(), lr=tc.discriminator_lr,
                                  betas=tc.betas, weight_decay=tc.weight_decay)
    return Adversary(discriminator=discriminator, optimizer=optimizer,
                     criterion=PatchAdversarialLoss(criterion=tc.adversarial_loss),
                     weight=tc.adversarial_weight, start_step=tc.adversarial_start_step,
                     lr=tc.discriminator_lr)
