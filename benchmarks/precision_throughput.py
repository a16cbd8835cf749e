"""bf16 autocast against fp32: training step time of the VQ-VAE and the prior on this machine.

Prints one JSON document: per model and precision the median seconds of one training step
(forward, loss, backward, AdamW step) at the config's data shape and batch size, fp32 and bf16
alternating in one process (so machine drift hits both alike), the bf16/fp32 ratio, and what
``precision: auto`` picks here with its reason, beside the CPU model, flags and PyTorch kernels.

    .venv/bin/python benchmarks/precision_throughput.py --config demo --repeats 5
    # what an AVX2-only CPU runs (PyTorch and oneDNN capped to AVX2 on an AVX-512 machine):
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python \\
        benchmarks/precision_throughput.py --config demo --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mri_vqvae.config import load_config  # noqa: E402
from mri_vqvae.core.precision import cpu_bf16_support, cpu_flags, resolve_precision  # noqa: E402
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE  # noqa: E402
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="demo", help="shipped config name or YAML path")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per precision")
    p.add_argument("--models", default="vqvae,prior")
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="stop timing a (model, precision) after this many seconds in total")
    return p.parse_args(argv)


def _vqvae_step(config) -> Callable[[bool], None]:
    torch.manual_seed(0)
    model = VQVAE(config.autoencoder)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(config.train_vqvae.batch_size, 1, *config.data.spatial_size)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = F.l1_loss(out.reconstruction.float(), x) + out.commitment_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _prior_step(config) -> Callable[[bool], None]:
    torch.manual_seed(0)
    model = GatedPixelCNN3D(config.prior)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    grid = tuple(s // 2**config.autoencoder.levels for s in config.data.spatial_size)
    x = torch.randint(0, config.prior.codebook_size, (config.train_prior.batch_size, *grid))

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_model(step: Callable[[bool], None], repeats: int, max_seconds: float) -> dict:
    """Median step seconds per precision; fp32 and bf16 alternate, one warm-up step each."""
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    spent = {"fp32": 0.0, "bf16": 0.0}
    for name in times:  # warm-up (oneDNN primitive creation)
        t = time.perf_counter()
        step(name == "bf16")
        spent[name] += time.perf_counter() - t
    for _ in range(repeats):
        for name in times:
            if spent[name] > max_seconds:
                continue
            t = time.perf_counter()
            step(name == "bf16")
            dt = time.perf_counter() - t
            times[name].append(dt)
            spent[name] += dt
    out = {f"{k}_step_s": statistics.median(v) if v else None for k, v in times.items()}
    out["steps_timed"] = {k: len(v) for k, v in times.items()}
    if out["fp32_step_s"] and out["bf16_step_s"]:
        out["bf16_over_fp32"] = out["bf16_step_s"] / out["fp32_step_s"]
    return out


def machine() -> dict:
    flags = cpu_flags()
    native, why = cpu_bf16_support()
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {
        "cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_flags": sorted(f for f in flags if "bf16" in f),
        "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                if k in os.environ},
        "native_bf16": native, "auto_precision": resolve_precision("auto", torch.device("cpu"))
        .as_dict(), "reason": why,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config(args.config)
    builders = {"vqvae": _vqvae_step, "prior": _prior_step}
    results = {}
    for name in args.models.split(","):
        results[name] = time_model(builders[name](config), args.repeats, args.max_seconds)
    shape = {"data_shape": list(config.data.spatial_size),
             "vqvae_batch": config.train_vqvae.batch_size,
             "prior_batch": config.train_prior.batch_size}
    print(json.dumps({"benchmark": "precision_throughput", "config": args.config, **shape,
                      "machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
