"""Training precision: bf16 autocast only where the device runs bf16 natively, fp32 elsewhere.

CPUs without bf16 instructions emulate bf16 autocast in software: on a 2-core AVX2 EPYC one VQ-VAE
training step took 201.8 s with bf16 against 5.8 s in fp32. So ``precision: auto`` (the default)
picks bf16 only when

- CUDA: the GPU supports bf16 (`torch.cuda.is_bf16_supported`);
- CPU: the processor lists ``avx512_bf16`` or ``amx_bf16`` (``/proc/cpuinfo``), PyTorch
  dispatches AVX-512 kernels (`torch.backends.cpu.get_cpu_capability`, so
  ``ATEN_CPU_CAPABILITY=avx2`` forces fp32), oneDNN is not capped below bf16
  (``ONEDNN_MAX_CPU_ISA``) and oneDNN reports bf16 support.

The rule reads flags only, never a timing, so the same machine always makes the same choice (a
timed probe could flip between runs and break bit-identical reruns). ``benchmarks/
precision_throughput.py`` measures both on the machine at hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    """The resolved choice: ``bf16`` (autocast on) or ``fp32``, and why."""

    name: str
    requested: str
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def as_dict(self) -> dict[str, str]:
        return {"precision": self.name, "requested": self.requested, "reason": self.reason}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_bf16_support(
    flags: set[str] | None = None, capability: str | None = None
) -> tuple[bool, str]:
    """(native bf16 on this CPU, a one-line reason) by the rule of the module docstring."""
    flags = cpu_flags() if flags is None else flags
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    found = [f for f in _BF16_FLAGS if f in flags]
    if not found:
        return False, (f"CPU has no native bf16 ({' / '.join(_BF16_FLAGS)} absent; "
                       f"kernels {capability})")
    if not capability.upper().startswith("AVX512"):
        return False, f"CPU lists {found[0]} but PyTorch dispatches {capability} kernels"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and isa != "ALL" and "BF16" not in isa and "AMX" not in isa:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} caps oneDNN below bf16"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, "oneDNN reports no bf16 support"
    return True, f"CPU has native bf16 ({found[0]}, kernels {capability})"


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """``auto`` -> bf16 where native (see module doc), else fp32; fp32/bf16 are taken as given."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        why = f"GPU {'supports' if native else 'lacks'} bf16"
    else:
        native, why = cpu_bf16_support()
    if requested == "auto":
        return Precision("bf16" if native else "fp32", requested, why)
    note = "" if native or requested == "fp32" else " (emulated: expect a much slower step)"
    return Precision(requested, requested, f"set in the config; {why}{note}")
