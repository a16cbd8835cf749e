"""Batch order and its sharing among ranks: pure functions of (seed, step, items, batch size).

Step ``s`` (0-based) trains on chunk ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``'s
permutation, drawn from a `torch.Generator` seeded with ``(seed, epoch)``: the global step alone
fixes the position in the data, so a resume restarts at the exact batch. Under DDP
(`mri_vqvae.core.distributed`) ``batch_size`` is the global batch and each rank trains on its
contiguous share of the step's keys (`rank_keys`), so the ranks together see exactly the
single-process batch. A share's loss is weighted by ``share * world / batch`` (`share_weight`) so
that DDP's gradient average is the gradient of the whole batch's mean loss, even for the smaller
last batch of an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from mri_vqvae.core import distributed
from mri_vqvae.training.errors import TrainingError

_PERM_STREAM, _ITEM_STREAM, _DROPOUT_STREAM = 0, 1, 2


def _seed_words(*words: int) -> list[int]:
    return [int(w) & 0xFFFF_FFFF_FFFF_FFFF for w in words]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item `index` in `epoch`, in [0, 2**32)."""
    words = _seed_words(seed, _ITEM_STREAM, epoch, index)
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """Seed of rank `rank`'s random draws at 0-based `step` of a DDP prior run, in [0, 2**63)."""
    words = _seed_words(seed, _DROPOUT_STREAM, step, rank)
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order (n,) int64 in which `epoch` visits the n train items (seeded by seed, epoch)."""
    words = _seed_words(seed, _PERM_STREAM, epoch)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1)[0]))
    return torch.randperm(n, generator=gen)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one pass over n items (the last one may be smaller)."""
    return math.ceil(n / batch_size)


def epoch_of(step: int, n: int, batch_size: int) -> int:
    """Epoch of the batch trained as 1-based `step` (0 for step 0)."""
    return (step - 1) // steps_per_epoch(n, batch_size) if step else 0


def batch_keys(step: int, n: int, batch_size: int, seed: int) -> list[tuple[int, int]]:
    """The (epoch, index) keys of the batch trained at 0-based global `step`."""
    epoch, position = divmod(step, steps_per_epoch(n, batch_size))
    order = epoch_permutation(n, seed, epoch)
    chunk = order[position * batch_size : (position + 1) * batch_size]
    return [(epoch, int(i)) for i in chunk]


def global_batch_size(step: int, n: int, batch_size: int) -> int:
    """Items in the (whole, all ranks) batch of 0-based `step`: batch_size, less at epoch end."""
    position = step % steps_per_epoch(n, batch_size)
    return min(batch_size, n - position * batch_size)


def rank_keys(
    step: int, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
) -> list[tuple[int, int]]:
    """Rank `rank`'s contiguous share of `batch_keys`; the shares of ranks 0..world-1 in order
    concatenate to the whole batch."""
    keys = batch_keys(step, n, batch_size, seed)
    start, stop = distributed.shard_bounds(len(keys), rank, world)
    return keys[start:stop]


def check_world_size(n: int, batch_size: int, world: int, section: str) -> None:
    """Raise `TrainingError` unless n train items in global batches of `batch_size` can be
    shared by `world` ranks: batch_size divisible by world, and every rank gets at least one item
    of every batch (also of the smaller last batch of an epoch)."""
    if world <= 1:
        return
    if batch_size % world:
        lower = batch_size - batch_size % world
        fits = [b for b in (lower, lower + world) if b > 0]
        raise TrainingError(
            f"{section}.batch_size={batch_size} is the global batch and must be divisible by the "
            f"number of processes ({world} = torchrun's nproc_per_node x nnodes): each rank "
            f"trains on batch_size / {world} items; set --set {section}.batch_size="
            f"{' or '.join(map(str, fits))}"
        )
    smallest = global_batch_size(steps_per_epoch(n, batch_size) - 1, n, batch_size)  # the last
    if smallest < world:
        raise TrainingError(
            f"{n} train items in batches of {section}.batch_size={batch_size} leave a last batch "
            f"of {smallest} per epoch, fewer than the {world} processes: some rank would have "
            f"nothing to train on; pick a batch_size that divides {n} (or leaves a remainder of "
            f"at least {world}), or use fewer processes"
        )


class StepBatchSampler:
    """Batches of (epoch, index) keys for global steps ``start_step .. stop_step - 1``.

    With ``world > 1`` each batch is rank `rank`'s share of it (`rank_keys`).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, stop_step: int,
                 rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.stop_step = start_step, stop_step
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.stop_step):
            yield rank_keys(step, self.n, self.batch_size, self.seed, self.rank, self.world)


def share_weight(local: int, total: int | None) -> float:
    """Loss weight of a rank's `local` items of a `total`-item batch: DDP averages the ranks'
    gradients, so ``local * world / total`` makes that average the whole batch's gradient."""
    if total is None:
        return 1.0
    return local * distributed.world_size() / total


def whole_batch(terms: dict[str, Tensor], local: int, total: int | None) -> dict[str, Tensor]:
    """Batch means of a rank's per-share mean `terms`, summed over ranks (a no-op when the
    batch is not shared)."""
    if total is None or not distributed.is_distributed():
        return terms
    stacked = torch.stack([terms[k].float() for k in terms]) * (local / total)
    torch.distributed.all_reduce(stacked)
    return dict(zip(terms, stacked.unbind(), strict=True))
