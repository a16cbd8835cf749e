"""precision: auto picks bf16 only where the device runs it natively; the rule reads flags only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mri_vqvae.config import load_config
from mri_vqvae.core.errors import ConfigError
from mri_vqvae.core.precision import cpu_bf16_support, cpu_flags, resolve_precision


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize(("flags", "capability", "native"), [
    ({"avx2"}, "AVX2", False),                      # an AVX2-only EPYC: emulated bf16
    ({"avx512f"}, "AVX512", False),                 # AVX-512 without the bf16 extension
    ({"avx512f", "avx512_bf16"}, "AVX2", False),    # ATEN_CPU_CAPABILITY=avx2 caps the kernels
    ({"avx512f", "amx_bf16"}, "AVX512", True),
])
def test_cpu_rule(flags: set[str], capability: str, native: bool) -> None:
    got, reason = cpu_bf16_support(flags, capability)
    if native and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this PyTorch build has no oneDNN bf16")  # the oneDNN check must agree
    assert got is native, reason
    assert reason


def test_onednn_isa_cap_forces_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    native, reason = cpu_bf16_support({"avx512_bf16"}, "AVX512")
    assert not native and "ONEDNN_MAX_CPU_ISA" in reason


def test_auto_resolves_by_the_rule_and_explicit_values_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr("mri_vqvae.core.precision.cpu_bf16_support", lambda: (False, "no bf16"))
    assert resolve_precision("auto", cpu).name == "fp32"
    forced = resolve_precision("bf16", cpu)
    assert forced.bf16 and "emulated" in forced.reason
    monkeypatch.setattr("mri_vqvae.core.precision.cpu_bf16_support", lambda: (True, "native"))
    assert resolve_precision("auto", cpu).name == "bf16"
    assert resolve_precision("fp32", cpu).name == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", cpu)


def test_config_default_is_auto_and_the_old_bf16_key_still_loads() -> None:
    assert load_config("demo").train_vqvae.precision == "auto"
    old = load_config("smoke", ["train_vqvae.bf16=true", "train_prior.bf16=false"])
    assert (old.train_vqvae.precision, old.train_prior.precision) == ("bf16", "fp32")
    with pytest.raises(ConfigError, match="precision"):
        load_config("smoke", ["train_vqvae.precision=fp16"])
