"""Multi-process runs under ``torchrun``: the process group, who this rank is, small collectives.

``torchrun`` starts one process per device and tells each where it stands through environment
variables: ``RANK`` (0 .. WORLD_SIZE-1 over every node), ``WORLD_SIZE``, ``LOCAL_RANK`` (the
process's index on its node, which picks its GPU) and ``MASTER_ADDR`` / ``MASTER_PORT`` (the
rendezvous). `init` reads them and starts the default process group: ``gloo`` on CPU, ``nccl``
on CUDA (device ``cuda:LOCAL_RANK``). Without those variables, or with ``WORLD_SIZE=1``, nothing
is started and every helper answers as the one and only process: rank 0 of a world of 1, so
single-process code paths stay exactly as they are.

The helpers (`rank`, `world_size`, `is_main`, `barrier`, `all_gather_object`, `broadcast_object`,
`shard`, `merge_shards`) read the live process group, so library code needs no handle passed
around.
``MRI_VQVAE_DIST_TIMEOUT_MINUTES`` (default 60) bounds how long a collective waits, e.g. the
other ranks while rank 0 validates.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mri_vqvae.core.errors import MriVqvaeError

log = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_ENV = "MRI_VQVAE_DIST_TIMEOUT_MINUTES"
_REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(MriVqvaeError):
    """A multi-process launch that cannot start (incomplete torchrun environment, no GPU...)."""


def launched_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when absent): how many processes torchrun started."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={raw!r} is not an integer") from None


def is_distributed() -> bool:
    """True inside a started process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``; 0 when not distributed)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """True on rank 0, the only process that writes run files."""
    return rank() == 0


def _wants_cuda(device: str) -> bool:
    """Whether the ``auto | cpu | cuda`` device name resolves to CUDA here."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _timeout() -> _dt.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "60")
    try:
        return _dt.timedelta(minutes=float(raw))
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of minutes") from None


def init(device: str = "auto") -> bool:
    """Start the default process group from torchrun's environment; returns True when started.

    `device` (``auto | cpu | cuda``) picks the backend: ``nccl`` (and ``cuda:LOCAL_RANK`` as
    the current device) when it resolves to CUDA, else ``gloo``. A no-op returning False when
    ``WORLD_SIZE`` is absent or 1, or when a group already exists.
    """
    if launched_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    missing = [name for name in _REQUIRED if name not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set: start multi-process "
            "runs with torchrun (e.g. torchrun --standalone --nproc_per_node=2 -m "
            "pipelines.train_vqvae ...), which sets them"
        )
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run one process")
    backend = "gloo"
    extra: dict[str, Any] = {}
    if _wants_cuda(device):
        if not torch.cuda.is_available():
            raise DistributedError("device='cuda' but no CUDA GPU is visible; use device=cpu")
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible on "
                "this node: start at most that many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(local)
        backend = "nccl"
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            extra["device_id"] = torch.device("cuda", local)  # binds the communicator early
    dist.init_process_group(backend=backend, timeout=_timeout(), **extra)
    log.info("process group started: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def teardown() -> None:
    """Destroy the default process group if one exists (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: str = "auto") -> Iterator[bool]:
    """`init` on entry, `teardown` on exit (only of a group this call started)."""
    started = init(device)
    try:
        yield started
    finally:
        if started:
            teardown()


def local_device(device: str) -> torch.device:
    """``auto | cpu | cuda`` -> this rank's device: ``cuda:LOCAL_RANK`` under a CUDA group.

    No checks: `mri_vqvae.core.device.resolve_device` is the one public reading of a name.
    """
    if _wants_cuda(device):
        return torch.device("cuda", local_rank()) if is_distributed() else torch.device("cuda")
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here (a no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: T) -> list[T]:
    """`obj` of every rank, in rank order (``[obj]`` when not distributed); objects must pickle."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank (`obj` itself when not distributed)."""
    if not is_distributed():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_bounds(n: int, part: int, parts: int) -> tuple[int, int]:
    """``[start, stop)`` of part `part` when n items are cut into `parts` contiguous runs.

    The first ``n % parts`` runs hold one item more; concatenating the runs in order gives back
    the n items in their order.
    """
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)


def shard(items: Sequence[T], part: int | None = None, parts: int | None = None) -> list[T]:
    """This rank's contiguous share of `items` (`part`/`parts` default to rank / world size)."""
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    start, stop = shard_bounds(len(items), part, parts)
    return list(items[start:stop])


def merge_shards(local: tuple[Any, ...]) -> tuple[Any, ...]:
    """Every rank's `local` results merged field by field in rank order (one process: `local`).

    `local` is this rank's tuple of partial results of the same structure on every rank: a
    list field is concatenated over ranks (with contiguous `shard` runs: back in item order),
    a dict field is updated rank after rank (later ranks win a shared key), any other field
    takes the first rank's value that is not None (e.g. the reason a strict run stopped).
    """
    parts = all_gather_object(tuple(local))
    merged: list[Any] = []
    for n, first in enumerate(parts[0]):
        values = [part[n] for part in parts]
        if isinstance(first, list):
            merged.append([v for value in values for v in value])
        elif isinstance(first, dict):
            merged.append({k: v for value in values for k, v in value.items()})
        else:
            merged.append(next((v for v in values if v is not None), None))
    return tuple(merged)
