"""3D VQ-VAE: strided-conv encoder -> EMA quantizer -> transposed-conv decoder.

Shapes: input ``(B, 1, D, H, W)`` in RAS order (after ``Orientationd``); with ``L = levels`` the
latent grid is ``(d, h, w) = (D, H, W) // 2**L`` and ``z_e``/``z_q`` are ``(B, embedding_dim, d,
h, w)``; ``indices`` are ``(B, d, h, w)`` int64 in ``[0, codebook_size)``.

Layout per level ``i`` (finest first)::

    encoder: Conv3d(k4, s2, p1) -> norm -> act -> num_res_layers x ResidualUnit
             ... then Conv3d(k1) to embedding_dim                    (pre-quant)
    decoder: Conv3d(k3) from embedding_dim                             (post-quant)
             ... per level, coarsest first: num_res_layers x ResidualUnit -> 2x upsample
             (ConvTranspose3d(k4, s2, p1), or nearest + Conv3d(k3)); the last one outputs 1 channel.

The residual unit is ``act(x + conv_b(act(conv_a(x))))`` with kernels ``residual_kernels``
(default (3, 1), the original VQ-VAE unit; MONAI's is (3, 3)). Why the model is our own and not
``monai.networks.nets.VQVAE``: docs/vqvae.md; measured by benchmarks/vqvae_throughput.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mri_vqvae.core.errors import MriVqvaeError
from mri_vqvae.core.finite import NonFiniteError, describe_nonfinite
from mri_vqvae.models.autoencoders.vqvae.config import VQVAEConfig
from mri_vqvae.models.autoencoders.vqvae.quantizer import EMAQuantizer, QuantizerOutput


class SpatialShapeError(MriVqvaeError, ValueError):
    """An input volume or latent grid whose shape the model cannot take."""


class CodeIndexError(MriVqvaeError, ValueError):
    """Latent indices that are not valid codes of this model's codebook."""


class VQVAEOutput(NamedTuple):
    """What `VQVAE.forward` produced.

    reconstruction: (B, 1, D, H, W) in the autocast dtype if any, else float32.
    quantized: (B, embedding_dim, d, h, w) float32, value ``codebook[indices]``.
    indices: (B, d, h, w) int64.
    commitment_loss: scalar float32 (already weighted by commitment_cost).
    perplexity: scalar float32, exp(entropy) of this batch's code histogram.
    codes_used: scalar int64, distinct codes in this batch.
    """

    reconstruction: Tensor
    quantized: Tensor
    indices: Tensor
    commitment_loss: Tensor
    perplexity: Tensor
    codes_used: Tensor


def _activation(name: str) -> nn.Module:
    """A fresh activation module; in-place where autograd allows it."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leaky_relu":
        return nn.LeakyReLU(0.2, inplace=True)
    if name == "silu":
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; use relu, leaky_relu, silu or gelu")


def _norm(kind: str, channels: int) -> list[nn.Module]:
    """The normalisation layer as a 0- or 1-element list (no Identity modules in the graph)."""
    if kind == "none":
        return []
    if kind == "group":
        return [nn.GroupNorm(8, channels)]
    raise ValueError(f"unknown norm {kind!r}; use none or group")


class ResidualUnit(nn.Module):
    """``act(x + norm(conv_b(act(norm(conv_a(x))))))``; (B, C, d, h, w) -> same shape."""

    def __init__(self, channels: int, hidden: int, kernels: Sequence[int], cfg: VQVAEConfig):
        super().__init__()
        ka, kb = kernels
        self.branch = nn.Sequential(
            nn.Conv3d(channels, hidden, ka, padding=ka // 2),
            *_norm(cfg.norm, hidden),
            _activation(cfg.activation),
            nn.Conv3d(hidden, channels, kb, padding=kb // 2),
            *_norm(cfg.norm, channels),
        )
        self.act = _activation(cfg.activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.branch(x))


def _residual_stack(channels: int, hidden: int, cfg: VQVAEConfig) -> list[nn.Module]:
    return [
        ResidualUnit(channels, hidden, cfg.residual_kernels, cfg) for _ in range(cfg.num_res_layers)
    ]


def _upsample(cin: int, cout: int, cfg: VQVAEConfig) -> nn.Module:
    """2x upsampling (B, cin, d, h, w) -> (B, cout, 2d, 2h, 2w)."""
    if cfg.upsample == "transpose":
        return nn.ConvTranspose3d(cin, cout, kernel_size=4, stride=2, padding=1)
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(cin, cout, 3, padding=1)
    )


class Encoder(nn.Module):
    """(B, 1, D, H, W) -> z_e (B, embedding_dim, D / 2**L, H / 2**L, W / 2**L)."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        stages = []
        cin = 1
        for cout, hidden in zip(cfg.channels, cfg.num_res_channels, strict=True):
            down = [nn.Conv3d(cin, cout, 4, stride=2, padding=1), *_norm(cfg.norm, cout)]
            down.append(_activation(cfg.activation))
            stages.append(nn.Sequential(*down, *_residual_stack(cout, hidden, cfg)))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.pre_quant = nn.Conv3d(cin, cfg.embedding_dim, 1)

    def forward(self, x: Tensor, use_checkpoint: bool = False) -> Tensor:
        return self.pre_quant(_run_stages(self.stages, x, use_checkpoint))


class Decoder(nn.Module):
    """z_q (B, embedding_dim, d, h, w) -> (B, 1, d * 2**L, h * 2**L, w * 2**L)."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        widths = list(reversed(cfg.channels))
        hiddens = list(reversed(cfg.num_res_channels))
        self.post_quant = nn.Conv3d(cfg.embedding_dim, widths[0], 3, padding=1)
        stages = []
        for i, (cin, hidden) in enumerate(zip(widths, hiddens, strict=True)):
            last = i == len(widths) - 1
            cout = 1 if last else widths[i + 1]
            layers = [*_residual_stack(cin, hidden, cfg), _upsample(cin, cout, cfg)]
            if not last:
                layers += [*_norm(cfg.norm, cout), _activation(cfg.activation)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(self, z: Tensor, use_checkpoint: bool = False) -> Tensor:
        return _run_stages(self.stages, self.post_quant(z), use_checkpoint)


def _run_stages(stages: nn.ModuleList, x: Tensor, use_checkpoint: bool) -> Tensor:
    """Apply each stage in turn, recomputing each one in backward when ``use_checkpoint``."""
    for stage in stages:
        x = checkpoint(stage, x, use_reentrant=False) if use_checkpoint else stage(x)
    return x


def _contiguous_state(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: channels_last weights are returned packed (safetensors needs it)."""
    for key, value in state.items():
        if isinstance(value, Tensor) and not value.is_contiguous():
            state[key] = value.contiguous()


class VQVAE(nn.Module):
    """3D VQ-VAE built from a `VQVAEConfig`; verbs encode / quantize / decode / *_indices."""

    def __init__(self, config: VQVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else VQVAEConfig()
        cfg = self.config
        self.factor = 2**cfg.levels
        self.encoder = Encoder(cfg)
        self.quantizer = EMAQuantizer(
            codebook_size=cfg.codebook_size,
            embedding_dim=cfg.embedding_dim,
            commitment_cost=cfg.commitment_cost,
            ema_decay=cfg.ema_decay,
            ema_epsilon=cfg.ema_epsilon,
            dead_code_threshold=cfg.dead_code_threshold,
            revival_interval=cfg.revival_interval,
            kmeans_init=cfg.kmeans_init,
            kmeans_iters=cfg.kmeans_iters,
        )
        self.decoder = Decoder(cfg)
        self.memory_format = (
            torch.channels_last_3d if cfg.channels_last else torch.contiguous_format
        )
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last_3d)
        self.register_state_dict_post_hook(_contiguous_state)

    def _checkpointing(self) -> bool:
        return self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def latent_shape(self, spatial_size: Sequence[int]) -> tuple[int, int, int]:
        """Latent grid (d, h, w) of a (D, H, W) volume; raises `SpatialShapeError` if invalid."""
        size = tuple(int(s) for s in spatial_size)
        if len(size) != 3:
            raise SpatialShapeError(
                f"spatial size must be (D, H, W), got {size}; pass the three spatial axes only"
            )
        bad = [f"{axis}={s}" for axis, s in zip("DHW", size, strict=True) if s % self.factor]
        if bad or min(size) <= 0:
            fixed = tuple(max(self.factor, round(s / self.factor) * self.factor) for s in size)
            raise SpatialShapeError(
                f"VQ-VAE with levels={self.config.levels} needs every spatial axis to be a "
                f"positive multiple of {self.factor}, but received spatial shape {size} "
                f"(not divisible: {', '.join(bad) or 'non-positive axis'}). Fix: set "
                f"data.spatial_size to multiples of {self.factor}, e.g. {fixed}, or pad/crop "
                f"the volume"
            )
        d, h, w = (s // self.factor for s in size)
        return d, h, w

    def _check_volume(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != 1:
            raise SpatialShapeError(
                f"VQ-VAE input must be (B, 1, D, H, W), received shape {tuple(x.shape)}; add the "
                "batch and channel axes (e.g. x[None, None]) or select one channel"
            )
        self.latent_shape(x.shape[2:])

    def encode(self, x: Tensor) -> Tensor:
        """x (B, 1, D, H, W) -> z_e (B, embedding_dim, d, h, w), before quantization."""
        self._check_volume(x)
        x = x.contiguous(memory_format=self.memory_format)
        return self.encoder(x, self._checkpointing())

    def quantize(self, z_e: Tensor) -> QuantizerOutput:
        """z_e (B, embedding_dim, d, h, w) -> `QuantizerOutput` (training mode moves the codes)."""
        return self.quantizer(z_e)

    def decode(self, z_q: Tensor) -> Tensor:
        """z_q (B, embedding_dim, d, h, w) -> reconstruction (B, 1, D, H, W)."""
        z_q = z_q.contiguous(memory_format=self.memory_format)
        return self.decoder(z_q, self._checkpointing())

    def encode_indices(self, x: Tensor) -> Tensor:
        """x (B, 1, D, H, W) -> indices (B, d, h, w) int64; never moves the codebook.

        Raises `NonFiniteError` when ``x`` or the encoder output holds NaN/±Inf.
        """
        self._check_volume(x)
        problem = describe_nonfinite(x)
        if problem is not None:
            raise NonFiniteError(
                f"the input volume holds {problem}, so its codes would be meaningless; "
                "preprocess the scan with mri-vqvae preprocess (which refuses NaN/Inf voxels)"
            )
        with torch.no_grad():
            return self.quantizer.indices(self.encode(x))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """indices (B, d, h, w) integer codes -> reconstruction (B, 1, D, H, W)."""
        if indices.ndim != 4 or indices.is_floating_point() or indices.is_complex():
            raise CodeIndexError(
                f"indices must be an integer (B, d, h, w) grid, received {indices.dtype} of shape "
                f"{tuple(indices.shape)}; add a batch axis or cast with .long()"
            )
        k = self.config.codebook_size
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
            raise CodeIndexError(
                f"indices must lie in [0, {k}) for codebook_size={k}, received values in "
                f"[{int(indices.min())}, {int(indices.max())}]; were they made by another model?"
            )
        return self.decode(self.quantizer.embed(indices.long()))

    def forward(self, x: Tensor) -> VQVAEOutput:
        """x (B, 1, D, H, W) -> `VQVAEOutput` (reconstruction plus the quantizer's fields)."""
        q = self.quantize(self.encode(x))
        return VQVAEOutput(self.decode(q.quantized), *q)


# --- size without building -----------------------------------------------------------------------


def _conv(cin: int, cout: int, kernel: int) -> int:
    """Values of a Conv3d / ConvTranspose3d with bias and a cubic kernel."""
    return cin * cout * kernel**3 + cout


def _norm_numel(kind: str, channels: int) -> int:
    return 2 * channels if kind == "group" else 0


def _residual_numel(channels: int, hidden: int, cfg: VQVAEConfig) -> int:
    ka, kb = cfg.residual_kernels
    unit = _conv(channels, hidden, ka) + _conv(hidden, channels, kb)
    unit += _norm_numel(cfg.norm, hidden) + _norm_numel(cfg.norm, channels)
    return cfg.num_res_layers * unit


def state_numel(cfg: VQVAEConfig) -> int:
    """Values (parameters + buffers) in the state_dict of ``VQVAE(cfg)``, computed, not built."""
    total, cin = 0, 1
    for cout, hidden in zip(cfg.channels, cfg.num_res_channels, strict=True):
        total += _conv(cin, cout, 4) + _norm_numel(cfg.norm, cout)
        total += _residual_numel(cout, hidden, cfg)
        cin = cout
    total += _conv(cin, cfg.embedding_dim, 1)
    widths = list(reversed(cfg.channels))
    hiddens = list(reversed(cfg.num_res_channels))
    total += _conv(cfg.embedding_dim, widths[0], 3)
    for i, (w, hidden) in enumerate(zip(widths, hiddens, strict=True)):
        last = i == len(widths) - 1
        cout = 1 if last else widths[i + 1]
        total += _residual_numel(w, hidden, cfg)
        total += _conv(w, cout, 4 if cfg.upsample == "transpose" else 3)
        total += 0 if last else _norm_numel(cfg.norm, cout)
    k, d = cfg.codebook_size, cfg.embedding_dim
    return total + 2 * k * d + 2 * k + 2  # codebook, ema_sum, ema_count, recent_count, flags
