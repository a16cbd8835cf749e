"""Which device a process computes on (the one reading of ``auto | cpu | cuda``) and with how
many CPU threads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from mri_vqvae.core import distributed
from mri_vqvae.core.errors import MriVqvaeError

DEVICES = ("auto", "cpu", "cuda")
"""The device names the command line and the config accept."""


class DeviceError(MriVqvaeError, ValueError):
    """A device that does not exist here (``cuda`` without a visible GPU, an unknown name)."""


def resolve_device(name: str | torch.device, setting: str = "--device") -> torch.device:
    """``auto | cpu | cuda`` (or ``cuda:N``, or a torch device) -> the device to compute on.

    ``auto`` is cuda when a GPU is visible, else cpu. Under torchrun ``auto`` and ``cuda`` mean
    this rank's ``cuda:LOCAL_RANK``. ``cuda`` without a visible GPU, or a name torch does not
    know, raises `DeviceError` naming `setting` (e.g. ``train_vqvae.device``).
    """
    text = str(name)
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"{setting}={text!r} but no CUDA GPU is visible; use cpu or auto")
    if text in ("auto", "cuda"):
        return distributed.local_device(text)
    try:
        return torch.device(name)
    except RuntimeError:
        raise DeviceError(
            f"{setting}={text!r} is not a device; use one of {list(DEVICES)} (or cuda:N)"
        ) from None


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
