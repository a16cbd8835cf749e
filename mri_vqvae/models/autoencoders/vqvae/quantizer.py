"""Vector quantizer with an EMA codebook, dead-code revival and k-means initialisation.

Shapes: ``B`` batch, ``D`` embedding_dim, ``K`` codebook_size, ``(d, h, w)`` the latent grid,
``N = B * d * h * w`` latent vectors.

All codebook maths (distances, EMA statistics, k-means, revival) runs in float32 with autocast
switched off for the input's device type, so ``torch.autocast`` (bf16 on CPU, fp16/bf16 on GPU)
never changes which code is chosen or how the codebook moves. The forward pass returns a
`QuantizerOutput`; nothing about the last batch is kept on the module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mri_vqvae.core.finite import NonFiniteError, describe_nonfinite

# Rows of latent vectors scored against the codebook at once (bounds the (rows, K) score matrix).
_SEARCH_CHUNK = 65536


class QuantizerOutput(NamedTuple):
    """What one quantizer call produced.

    quantized: (B, D, d, h, w) float32; its value is exactly ``codebook[indices]``, its gradient
        flows straight through to the encoder output.
    indices: (B, d, h, w) int64 code of each latent position.
    commitment_loss: scalar float32, ``commitment_cost * mean((z_e - sg(z_q))**2)``.
    perplexity: scalar float32, ``exp(entropy)`` of this batch's code histogram (under DDP in
        training mode: of every rank's share together; codes_used likewise).
    codes_used: scalar int64, number of distinct codes in this batch.
    """

    quantized: Tensor
    indices: Tensor
    commitment_loss: Tensor
    perplexity: Tensor
    codes_used: Tensor


def nearest_code(flat: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest code (squared Euclidean) for each row.

    flat: (N, D) float32; codebook: (K, D) float32 -> (N,) int64.
    Uses ``argmin(||e||^2 - 2 x e^T)`` (``||x||^2`` is constant per row) via one fused addmm,
    in row chunks so the (N, K) score matrix stays bounded.
    """
    code_sq = codebook.pow(2).sum(1)  # (K,)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], _SEARCH_CHUNK):
        rows = flat[start : start + _SEARCH_CHUNK]
        scores = torch.addmm(code_sq, rows, codebook.t(), beta=1.0, alpha=-2.0)  # (n, K)
        out[start : start + rows.shape[0]] = scores.argmin(1)
    return out


def code_statistics(flat: Tensor, indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """Per-code counts (K,) and vector sums (K, D) of ``flat`` (N, D) assigned to ``indices`` (N,).

    bincount + index_add: measured faster than a one-hot matmul (benchmarks/vqvae_throughput.py).
    """
    counts = torch.bincount(indices, minlength=codebook_size).to(flat.dtype)
    sums = flat.new_zeros(codebook_size, flat.shape[1]).index_add_(0, indices, flat)
    return counts, sums


def usage(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Perplexity ``exp(-sum p log p)`` and number of used codes from a (K,) count histogram."""
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum()
    return entropy.exp(), (counts > 0).sum()


def kmeans(flat: Tensor, k: int, iters: int) -> Tensor:
    """Lloyd's k-means on the rows of ``flat`` (N, D) float32 -> centres (k, D).

    Centres start on distinct random rows (with repeats only when N < k); an empty cluster keeps
    its previous centre. Uses the global torch RNG.
    """
    n = flat.shape[0]
    if n >= k:
        pick = torch.randperm(n, device=flat.device)[:k]
    else:
        pick = torch.randint(n, (k,), device=flat.device)
    centres = flat[pick].clone()
    for _ in range(iters):
        counts, sums = code_statistics(flat, nearest_code(flat, centres), k)
        filled = counts > 0
        means = sums / counts.clamp(min=1).unsqueeze(1)
        centres = torch.where(filled.unsqueeze(1), means, centres)
    return centres


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_rows(flat: Tensor) -> Tensor:
    """Every rank's rows of ``flat`` (n_r, D), concatenated in rank order -> (sum n_r, D).

    Ranks may hold different row counts (a ragged last batch): rows are padded to the largest
    count for the all-gather and trimmed after. Outside ``torch.distributed`` returns ``flat``.
    """
    if not _distributed():
        return flat
    world = dist.get_world_size()
    n = torch.tensor([flat.shape[0]], dtype=torch.long, device=flat.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    padded = flat.new_zeros(max(counts), flat.shape[1])
    padded[: flat.shape[0]] = flat
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:c] for part, c in zip(parts, counts, strict=True)])


class EMAQuantizer(nn.Module):
    """Nearest-code quantizer whose codebook follows an exponential moving average of its inputs.

    Training-mode forward (and only that) moves the codebook:

    1. first call: k-means (optional) on the batch, EMA statistics set to a uniform share;
    2. EMA of per-code counts and sums, Laplace-smoothed counts, codebook = sums / counts for the
       codes used in this batch (unused codes keep their vectors bit-identical);
    3. every ``revival_interval`` steps, codes used fewer than ``dead_code_threshold`` x the
       average code's uses over those steps are re-seeded from random vectors of the batch.
       (A window, not the EMA counts: with decay 0.99 an abandoned code needs ~350 steps to fall
       to 3 % of the uniform share, long after a collapse has set in.)

    Under ``torch.distributed`` (DDP, each rank holding a share of the batch) the update is the
    one a single process would make on the whole batch: counts and sums are all-reduced; k-means
    and revival draw from every rank's vectors gathered in rank order (with the global RNG,
    identical on every rank) and rank 0's result is broadcast, so every rank keeps the same
    codebook; perplexity and codes_used describe the whole batch.

    Buffers (all in the state dict): ``codebook`` (K, D), ``ema_count`` (K,), ``ema_sum`` (K, D),
    ``recent_count`` (K,) uses since the last revival check, ``initialised`` (bool), ``steps``.
    """

    codebook: Tensor
    ema_count: Tensor
    ema_sum: Tensor
    recent_count: Tensor
    initialised: Tensor
    steps: Tensor

    def __init__(
        self,
        codebook_size: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
        dead_code_threshold: float = 0.03,
        revival_interval: int = 50,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        self.dead_code_threshold = dead_code_threshold
        self.revival_interval = revival_interval
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.register_buffer("codebook", torch.randn(codebook_size, embedding_dim))
        self.register_buffer("ema_count", torch.zeros(codebook_size))
        self.register_buffer("ema_sum", torch.zeros(codebook_size, embedding_dim))
        self.register_buffer("recent_count", torch.zeros(codebook_size))
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, embedding_dim={self.embedding_dim}, "
            f"ema_decay={self.ema_decay}, dead_code_threshold={self.dead_code_threshold}"
        )

    def _flatten(self, z: Tensor) -> Tensor:
        """(B, D, d, h, w) any float dtype -> (N, D) float32 (free view for channels_last)."""
        if z.ndim != 5 or z.shape[1] != self.embedding_dim:
            raise ValueError(
                f"quantizer expects (B, {self.embedding_dim}, d, h, w) encoder output, got shape "
                f"{tuple(z.shape)}; check that the encoder ends in embedding_dim channels"
            )
        return z.float().movedim(1, -1).reshape(-1, self.embedding_dim)

    def embed(self, indices: Tensor) -> Tensor:
        """Code vectors of ``indices`` (B, d, h, w) int64 -> (B, D, d, h, w) float32.

        The result has channels_last_3d strides (a view of the (B, d, h, w, D) lookup).
        """
        return F.embedding(indices, self.codebook.float()).movedim(-1, 1)

    def require_finite(self, z: Tensor) -> None:
        """Raise `NonFiniteError` if ``z`` or the codebook holds NaN/±Inf (argmin over NaN
        distances would silently pick code 0 or the NaN code)."""
        problem = describe_nonfinite(z)
        if problem is not None:
            raise NonFiniteError(
                f"the encoder output holds {problem}, so its codes would be meaningless: the "
                "input volume holds NaN/Inf voxels or overflowed the encoder (bf16). Check the "
                "input (mri-vqvae preprocess refuses non-finite scans) or run in float32"
            )
        problem = describe_nonfinite(self.codebook)
        if problem is not None:
            raise NonFiniteError(
                f"the quantizer codebook holds {problem}: the checkpoint diverged; load "
                "checkpoints/best or an earlier checkpoint"
            )

    def indices(self, z: Tensor) -> Tensor:
        """Nearest codes of ``z`` (B, D, d, h, w) -> (B, d, h, w) int64; codebook untouched.

        Raises `NonFiniteError` when ``z`` or the codebook is not finite.
        """
        with torch.autocast(device_type=z.device.type, enabled=False), torch.no_grad():
            flat = self._flatten(z)
            self.require_finite(flat)
            idx = nearest_code(flat, self.codebook.float())
        return idx.view(z.shape[0], *z.shape[2:])

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` (B, D, d, h, w); training mode also updates the codebook.

        In eval mode a non-finite ``z`` raises `NonFiniteError`; in training mode the loss turns
        non-finite and the training loop stops (no per-step host sync here).
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()
            flat = self._flatten(z32)
            if not self.training:
                self.require_finite(flat.detach())
            if self.training:
                self._check_float32()
                with torch.no_grad():
                    if not bool(self.initialised):
                        self._initialise(flat.detach())
            idx = nearest_code(flat.detach(), self.codebook)
            indices = idx.view(z.shape[0], *z.shape[2:])
            q = self.embed(indices)  # looked up before this step's EMA update
            if self.training:
                with torch.no_grad():
                    counts = self._update(flat.detach(), idx)
            else:
                counts = torch.bincount(idx, minlength=self.codebook_size)
            commitment = self.commitment_cost * F.mse_loss(z32, q)
            # q + (z - sg(z)) has exactly q's value and the identity gradient w.r.t. z.
            quantized = q + (z32 - z32.detach()) if z32.requires_grad else q
            perplexity, used = usage(counts.float())
        return QuantizerOutput(quantized, indices, commitment, perplexity.detach(), used)

    def _check_float32(self) -> None:
        for name in ("codebook", "ema_count", "ema_sum", "recent_count"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                raise TypeError(
                    f"quantizer buffer {name} is {buf.dtype}; the EMA codebook must stay float32 "
                    "to train. Use torch.autocast for mixed precision instead of "
                    "model.to(dtype)/model.half()"
                )

    def _initialise(self, flat: Tensor) -> None:
        """First training batch: k-means codebook (optional) and uniform EMA statistics."""
        flat = _gather_rows(flat)  # the whole batch under DDP
        if self.kmeans_init:
            self.codebook.copy_(kmeans(flat, self.codebook_size, self.kmeans_iters))
        if _distributed():
            dist.broadcast(self.codebook, src=0)
        share = flat.shape[0] / self.codebook_size
        self.ema_count.fill_(share)
        self.ema_sum.copy_(self.codebook * share)
        self.initialised.fill_(True)

    def _update(self, flat: Tensor, idx: Tensor) -> Tensor:
        """EMA step on (N, D) vectors assigned to ``idx`` (N,); returns the batch's counts (K,).

        Under DDP the counts are those of every rank's share together.
        """
        counts, sums = code_statistics(flat, idx, self.codebook_size)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        keep = self.ema_decay
        self.ema_count.mul_(keep).add_(counts, alpha=1 - keep)
        self.ema_sum.mul_(keep).add_(sums, alpha=1 - keep)
        total = self.ema_count.sum()
        smoothed = (
            (self.ema_count + self.ema_epsilon)
            / (total + self.codebook_size * self.ema_epsilon)
            * total
        )
        moved = self.ema_sum / smoothed.unsqueeze(1)
        self.codebook.copy_(torch.where((counts > 0).unsqueeze(1), moved, self.codebook))
        self.recent_count.add_(counts)
        self.steps += 1
        if self.dead_code_threshold > 0 and int(self.steps) % self.revival_interval == 0:
            self._revive(flat)
        return counts

    def dead_codes(self) -> Tensor:
        """(K,) bool: codes used fewer than ``dead_code_threshold`` x the average code's uses
        since the last revival check."""
        return self.recent_count < self.dead_code_threshold * self.recent_count.mean()

    def _revive(self, flat: Tensor) -> None:
        """Re-seed dead codes with random rows of ``flat`` (N, D); give them a uniform share."""
        dead = self.dead_codes()
        self.recent_count.zero_()
        n_dead = int(dead.sum())
        if n_dead == 0:  # the same on every rank: dead codes come from all-reduced counts
            return
        flat = _gather_rows(flat)
        n = flat.shape[0]
        if n >= n_dead:
            pick = torch.randperm(n, device=flat.device)[:n_dead]
        else:
            pick = torch.randint(n, (n_dead,), device=flat.device)
        seeds = flat[pick]
        if _distributed():
            dist.broadcast(seeds, src=0)
        share = self.ema_count.sum() / self.codebook_size
        self.codebook[dead] = seeds
        self.ema_sum[dead] = seeds * share
        self.ema_count[dead] = share
