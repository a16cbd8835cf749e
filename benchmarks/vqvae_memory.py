"""VQ-VAE training memory and step time at 2.5 mm (brain64) and 1.5 mm (brain128), and the
sliding-window reconstruction time of one 1.5 mm volume larger than the training size.

Prints one JSON document. Per (config, batch, gradient checkpointing, precision), each in a fresh
subprocess (so no run inherits another's allocator state):

- ``peak_train_mib``: on CPU (Linux) the peak resident set (VmHWM, reset to the current resident
  set just before training) minus the resident set then, over the warm-up and timed steps: the
  method of benchmarks/vqvae_throughput.py (activations, gradients, AdamW state, oneDNN scratch,
  allocator caching). On CUDA: growth of ``torch.cuda.max_memory_allocated``.
- ``step_s``: median seconds of one training step (forward, L1 + commitment loss, backward,
  AdamW step) after one warm-up step (k-means codebook init and oneDNN primitive creation).

bf16 rows (autocast) run only where ``precision: auto`` picks bf16 (the device runs it
natively, `mri_vqvae.core.precision`); elsewhere the row says why it was skipped.

``sliding``: seconds and peak memory of one ``--volume`` reconstruction (eval, no grad) with the
first 1.5 mm config's model (random weights: cost does not depend on them), through
`mri_vqvae.tasks.sliding.reconstruct_volume` (roi = its ``data.spatial_size``, ``--overlap``,
Gaussian blending), beside one forward pass of a training-size volume.

    .venv/bin/python benchmarks/vqvae_memory.py                  # full: 3 repeats, all rows
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vqvae_memory.py --repeats 1 --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mri_vqvae.config import load_config  # noqa: E402
from mri_vqvae.core.precision import resolve_precision  # noqa: E402
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE  # noqa: E402
from mri_vqvae.tasks.sliding import SlidingWindow, reconstruct_volume  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", default="brain64,brain128", help="shipped names or YAML paths")
    p.add_argument("--batches", default="1,2")
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per row (after warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--volume", default="160,192,160", help="D,H,W of the sliding-window volume")
    p.add_argument("--sliding-config", default="brain128")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--no-sliding", action="store_true")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """Peak memory growth (MiB) from `start` to `stop`: VmHWM on CPU, the allocator on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0.0

    def start(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return True
        rss = _status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        except OSError:
            return False
        self.base = (rss or 0) / 1024
        return rss is not None

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return (_status_kib("VmHWM") or 0) / 1024 - self.base


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def train_row(config_name: str, batch: int, ckpt: bool, bf16: bool, repeats: int,
              device: torch.device) -> dict:
    """One row, run in this (fresh) process: peak memory and median step seconds."""
    config = load_config(config_name)
    torch.manual_seed(0)
    cfg = config.autoencoder.model_copy(update={"gradient_checkpointing": ckpt})
    model = VQVAE(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, *config.data.spatial_size, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = F.l1_loss(out.reconstruction.float(), x) + out.commitment_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    memory = PeakMemory(device)
    if not memory.start():
        return {"error": "peak memory needs Linux /proc"}
    warm = _timed(step, device)
    times = [_timed(step, device) for _ in range(repeats)]
    return {"peak_train_mib": round(memory.stop(), 1), "step_s": round(statistics.median(times), 3),
            "warmup_s": round(warm, 3)}


def sliding_row(config_name: str, volume: tuple[int, ...], overlap: float,
                device: torch.device) -> dict:
    """One sliding-window reconstruction of a `volume` box, and one training-size forward."""
    config = load_config(config_name)
    torch.manual_seed(0)
    model = VQVAE(config.autoencoder).to(device).eval()
    roi = tuple(config.data.spatial_size)
    window = SlidingWindow(roi, overlap)  # type: ignore[arg-type]
    x = torch.rand(1, 1, *volume, device=device)
    small = torch.rand(1, 1, *roi, device=device)
    forward_s = _timed(lambda: reconstruct_volume(model, small, None), device)
    memory = PeakMemory(device)
    memory.start()
    sliding_s = _timed(lambda: reconstruct_volume(model, x, window), device)
    peak = memory.stop()
    interval = [max(int(r * (1 - overlap)), 1) for r in roi]
    windows = 1
    for size, r, step in zip(volume, roi, interval, strict=True):
        windows *= max(-(-(size - r) // step), 0) + 1
    return {"config": config_name, "volume": list(volume), "roi": list(roi), "overlap": overlap,
            "windows": windows, "sliding_s": round(sliding_s, 3),
            "training_size_forward_s": round(forward_s, 3), "sliding_peak_mib": round(peak, 1)}


def _child(args: argparse.Namespace, spec: dict) -> dict:
    """Run one row in a fresh interpreter; its JSON line, or the error it printed."""
    cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--threads", str(args.threads),
           "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_child(args: argparse.Namespace) -> None:
    spec = json.loads(args.child)
    device = torch.device(args.device)
    if spec["kind"] == "train":
        row = train_row(spec["config"], spec["batch"], spec["ckpt"], spec["bf16"], spec["repeats"],
                        device)
    else:
        row = sliding_row(spec["config"], tuple(spec["volume"]), spec["overlap"], device)
    print(json.dumps(row))


def machine(device: torch.device) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    info = {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "auto_precision": resolve_precision("auto", device).as_dict()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_child(args)
        return
    device = torch.device(args.device)
    native = resolve_precision("auto", device)
    rows = []
    for name, batch, ckpt, prec in itertools.product(
            args.configs.split(","), _ints(args.batches), args.checkpointing.split(","),
            args.precisions.split(",")):
        row = {"config": name, "batch": batch, "gradient_checkpointing": ckpt == "on",
               "precision": prec}
        if prec == "bf16" and not native.bf16:
            rows.append({**row, "skipped": native.reason})
            continue
        spec = {"kind": "train", "config": name, "batch": batch, "ckpt": ckpt == "on",
                "bf16": prec == "bf16", "repeats": args.repeats}
        rows.append({**row, **_child(args, spec)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    sliding = None
    if not args.no_sliding:
        sliding = _child(args, {"kind": "sliding", "config": args.sliding_config,
                                "volume": list(_ints(args.volume)), "overlap": args.overlap})
    print(json.dumps({"benchmark": "vqvae_memory", "repeats": args.repeats,
                      "machine": machine(device), "train": rows, "sliding": sliding}, indent=2))


if __name__ == "__main__":
    main()
