"""Side-by-side VQ-VAE benchmark: our `mri_vqvae.models.autoencoders.vqvae.VQVAE` against
`monai.networks.nets.VQVAE`.

Prints one JSON document. Per input shape and model (same channels, levels, residual layers,
codebook and inputs; models alternate in one process, starting model rotated every repeat):

- ``train_volumes_per_s``: volumes / median wall time of one step (forward, MSE + commitment loss,
  backward, Adam step), training mode (EMA codebook updates included);
- ``encode_volumes_per_s``: volumes / median time of volume -> code indices (eval, inference_mode);
- ``peak_train_rss_delta_mib`` (CPU, Linux): peak resident set (VmHWM, reset just before
  training) minus the resident set before training, over two training steps, each model in a
  fresh subprocess. It counts everything the steps make resident (activations, gradients, Adam
  state, oneDNN scratch, allocator caching). On CUDA: ``torch.cuda.max_memory_allocated`` growth.

Models: ``ours`` (defaults of `VQVAEConfig` with the given widths), ``ours_k33`` (ours with
MONAI's 3x3x3 + 3x3x3 residual unit, to separate the architecture from the rest), ``monai``.

Also: micro timings of the quantizer's EMA statistics (bincount + index_add vs one-hot matmul) and
nearest-code search (addmm + argmin vs cdist + argmin), and with ``--recon-steps N`` a short
reconstruction comparison on synthetic head-like volumes (held-out MSE / PSNR, codes used).

    .venv/bin/python benchmarks/vqvae_throughput.py --quick
    .venv/bin/python benchmarks/vqvae_throughput.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mri_vqvae.models.autoencoders.vqvae.config import VQVAEConfig  # noqa: E402
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE  # noqa: E402
from mri_vqvae.models.autoencoders.vqvae.quantizer import code_statistics, nearest_code  # noqa: E402

MODELS = ("ours", "ours_k33", "monai")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (32^3, narrow, 1 repeat)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per model (after warm-up)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--shapes", default="64,64,64;96,112,96", help="D,H,W;D,H,W ...")
    p.add_argument("--channels", default="32,64,128", help="one width per level")
    p.add_argument("--num-res-layers", type=int, default=2)
    p.add_argument("--codebook-size", type=int, default=512)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--amp", action="store_true", help="bf16 autocast for every model")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--no-micro", action="store_true", help="skip the quantizer micro timings")
    p.add_argument("--no-throughput", action="store_true", help="skip the per-shape timings")
    p.add_argument("--recon-steps", type=int, default=0, help="train steps of the recon check")
    p.add_argument("--recon-shape", default="32,40,32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    p.add_argument("--child-shape", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.shapes = "32,32,32"
        args.channels = "8,16,32"
        args.codebook_size = 64
        args.embedding_dim = 16
        args.num_res_layers = 1
        args.recon_shape = "16,16,16"
    return args


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def build(name: str, args: argparse.Namespace) -> nn.Module:
    """One of MODELS with the shared widths, levels, residual layers and codebook."""
    ch = _ints(args.channels)
    if name == "monai":
        from monai.networks.nets import VQVAE as MonaiVQVAE

        return MonaiVQVAE(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=ch,
            num_res_layers=args.num_res_layers,
            num_res_channels=ch,
            downsample_parameters=((2, 4, 1, 1),) * len(ch),
            upsample_parameters=((2, 4, 1, 1, 0),) * len(ch),
            num_embeddings=args.codebook_size,
            embedding_dim=args.embedding_dim,
            decay=0.99,
            ddp_sync=False,
        )
    kernels = (3, 3) if name == "ours_k33" else (3, 1)
    cfg = VQVAEConfig(
        levels=len(ch),
        channels=ch,
        num_res_channels=ch,
        num_res_layers=args.num_res_layers,
        codebook_size=args.codebook_size,
        embedding_dim=args.embedding_dim,
        residual_kernels=kernels,
    )
    return VQVAE(cfg)


def forward_losses(name: str, model: nn.Module, x: Tensor, amp: bool) -> tuple[Tensor, Tensor]:
    """(reconstruction, quantizer loss) of either model, under bf16/fp16 autocast if ``amp``."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        if name == "monai":
            recon, qloss = model(x)
        else:
            out = model(x)
            recon, qloss = out.reconstruction, out.commitment_loss
    return recon, qloss


def train_step(name: str, model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, amp: bool):
    opt.zero_grad(set_to_none=True)
    recon, qloss = forward_losses(name, model, x, amp)
    loss = F.mse_loss(recon.float(), x) + qloss.float()
    loss.backward()
    opt.step()
    return loss.detach()


@torch.inference_mode()
def encode(name: str, model: nn.Module, x: Tensor, amp: bool) -> Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        return model.index_quantize(x) if name == "monai" else model.encode_indices(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: peak resident-set growth over two training steps of one model.

    Uses VmHWM (the peak RSS of this process's own address space), reset to the current RSS just
    before training. Not ru_maxrss: after fork + exec it starts at the parent's RSS, so a child
    of a big benchmark process would report the parent's size.
    """
    torch.manual_seed(args.seed)
    name, shape = args.memory_child, _ints(args.child_shape)
    model = build(name, args).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(args.batch, 1, *shape)
    before = _status_kib("VmRSS")
    if before is None or not _reset_peak_rss():
        print(json.dumps({"peak_delta_mib": None, "why": "needs Linux /proc"}))
        return
    for _ in range(2):
        train_step(name, model, opt, x, args.amp)
    peak = _status_kib("VmHWM") or 0
    print(json.dumps({"rss_before_mib": before / 1024, "peak_delta_mib": (peak - before) / 1024}))


def measure_memory(name: str, shape: tuple[int, ...], argv: list[str], device: torch.device):
    if device.type == "cuda":
        return None  # measured in-process (see bench_shape)
    cmd = [sys.executable, __file__, *argv, "--memory-child", name]
    cmd += ["--child-shape", ",".join(map(str, shape))]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_delta_mib"]


def bench_shape(
    shape: tuple[int, ...], names: list[str], args: argparse.Namespace, device: torch.device
) -> dict:
    torch.manual_seed(args.seed)
    x = torch.rand(args.batch, 1, *shape, device=device)
    models = {n: build(n, args).to(device).train() for n in names}
    opts = {n: torch.optim.Adam(m.parameters(), lr=1e-4) for n, m in models.items()}
    train: dict[str, list[float]] = {n: [] for n in names}
    enc: dict[str, list[float]] = {n: [] for n in names}
    cuda_peak: dict[str, float] = {}
    for rep in range(args.repeats + 1):  # repeat 0 is warm-up
        k = rep % len(names)
        for n in names[k:] + names[:k]:
            m = models[n]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t = timed(lambda n=n, m=m: train_step(n, m, opts[n], x, args.amp), device)
            if device.type == "cuda":
                cuda_peak[n] = (torch.cuda.max_memory_allocated() - base) / 2**20
            m.eval()
            te = timed(lambda n=n, m=m: encode(n, m, x, args.amp), device)
            m.train()
            if rep > 0:
                train[n].append(t)
                enc[n].append(te)
    out: dict[str, dict] = {}
    for n in names:
        med_t, med_e = statistics.median(train[n]), statistics.median(enc[n])
        out[n] = {
            "params": sum(p.numel() for p in models[n].parameters()),
            "train_volumes_per_s": round(args.batch / med_t, 3),
            "train_step_s": [round(v, 3) for v in train[n]],
            "encode_volumes_per_s": round(args.batch / med_e, 3),
            "encode_s": [round(v, 3) for v in enc[n]],
        }
        if device.type == "cuda":
            out[n]["peak_train_mem_mib"] = round(cuda_peak[n], 1)
        elif not args.no_memory:
            argv = _child_argv(args)
            delta = measure_memory(n, shape, argv, device)
            out[n]["peak_train_rss_delta_mib"] = None if delta is None else round(delta, 1)
    if "monai" in out:
        for n in names:
            if n != "monai":
                out[n]["train_speedup_vs_monai"] = round(
                    out[n]["train_volumes_per_s"] / out["monai"]["train_volumes_per_s"], 2
                )
                out[n]["encode_speedup_vs_monai"] = round(
                    out[n]["encode_volumes_per_s"] / out["monai"]["encode_volumes_per_s"], 2
                )
    return out


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--batch", str(args.batch), "--channels", args.channels, "--seed", str(args.seed)]
    argv += ["--num-res-layers", str(args.num_res_layers)]
    argv += ["--codebook-size", str(args.codebook_size), "--embedding-dim", str(args.embedding_dim)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv + (["--amp"] if args.amp else [])


def _best_ms(fn: Callable[[], object], device: torch.device, reps: int = 20) -> float:
    """Fastest of ``reps`` timed calls, in ms (noise on a shared machine only adds time)."""
    fn()
    return round(1000 * min(timed(fn, device) for _ in range(reps)), 3)


def micro(args: argparse.Namespace, shape: tuple[int, ...], device: torch.device) -> dict:
    """EMA statistics and nearest-code search at the latent size of ``shape``."""
    levels = len(_ints(args.channels))
    n = args.batch * int(torch.tensor(shape).div(2**levels, rounding_mode="floor").prod())
    k, d = args.codebook_size, args.embedding_dim
    gen = torch.Generator().manual_seed(args.seed)
    flat = torch.randn(n, d, generator=gen).to(device)
    codebook = torch.randn(k, d, generator=gen).to(device)
    idx = nearest_code(flat, codebook)

    def one_hot() -> tuple[Tensor, Tensor]:
        onehot = F.one_hot(idx, k).float()
        return onehot.sum(0), onehot.t() @ flat

    def cdist() -> Tensor:
        return torch.cdist(flat, codebook).argmin(1)

    return {
        "latent_vectors": n,
        "ema_statistics_ms": {
            "bincount_index_add": _best_ms(lambda: code_statistics(flat, idx, k), device),
            "one_hot_matmul": _best_ms(one_hot, device),
        },
        "nearest_code_ms": {
            "addmm_argmin": _best_ms(lambda: nearest_code(flat, codebook), device),
            "cdist_argmin": _best_ms(cdist, device),
        },
    }


def synthetic_heads(count: int, shape: tuple[int, ...], seed: int) -> Tensor:
    """(count, 1, D, H, W) head-like volumes in [0, 1]: skull shell, textured brain, ventricles."""
    gen = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, s) for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, D, H, W)
    vols = []
    for _ in range(count):
        centre = (torch.rand(3, 1, 1, 1, generator=gen) - 0.5) * 0.2
        radii = 0.7 + 0.15 * torch.rand(3, 1, 1, 1, generator=gen)
        r = (((grid - centre) / radii) ** 2).sum(0).sqrt()
        freq = 4 + 4 * torch.rand(3, generator=gen)
        texture = torch.sin(freq[0] * grid[0]) * torch.cos(freq[1] * grid[1] + freq[2] * grid[2])
        brain = (0.7 + 0.15 * texture) * (r < 0.8)
        vent_r = ((grid - centre) / (radii * torch.tensor([0.2, 0.35, 0.15]).view(3, 1, 1, 1))) ** 2
        brain = torch.where(vent_r.sum(0) < 1, torch.full_like(brain, 0.2), brain)
        skull = 0.4 * ((r >= 0.85) & (r < 1.0))
        noise = 0.02 * torch.randn(shape, generator=gen)
        vols.append((brain + skull + noise).clamp(0, 1))
    return torch.stack(vols)[:, None]


def recon_check(names: list[str], args: argparse.Namespace, device: torch.device) -> dict:
    """Train every model for ``--recon-steps`` on the same batches; held-out MSE/PSNR/codes."""
    shape = _ints(args.recon_shape)
    train = synthetic_heads(16, shape, args.seed).to(device)
    held = synthetic_heads(4, shape, args.seed + 1).to(device)
    models, opts = {}, {}
    for n in names:
        torch.manual_seed(args.seed)
        models[n] = build(n, args).to(device).train()
        opts[n] = torch.optim.Adam(models[n].parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for _ in range(args.recon_steps):
        pick = torch.randint(len(train), (args.batch,), generator=gen)
        for n in names:
            train_step(n, models[n], opts[n], train[pick], args.amp)
    out: dict[str, object] = {"shape": shape, "steps": args.recon_steps}
    for n, m in models.items():
        m.eval()
        with torch.inference_mode():
            recon, _ = forward_losses(n, m, held, args.amp)
            idx = encode(n, m, held, args.amp)
        mse = F.mse_loss(recon.float(), held).item()
        out[n] = {
            "heldout_mse": round(mse, 6),
            "heldout_psnr_db": round(-10 * torch.log10(torch.tensor(mse)).item(), 2),
            "heldout_codes_used": int(idx.unique().numel()),
        }
    out["wall_s"] = round(time.perf_counter() - start, 1)
    return out


def machine(device: torch.device) -> dict:
    import monai

    info = {
        "device": str(device),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "monai": monai.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {MODELS}")
    shapes = [_ints(s) for s in args.shapes.split(";")]
    report: dict[str, object] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(device),
        "settings": {
            "batch": args.batch,
            "channels": _ints(args.channels),
            "num_res_layers": args.num_res_layers,
            "codebook_size": args.codebook_size,
            "embedding_dim": args.embedding_dim,
            "amp_bf16": args.amp,
            "repeats": args.repeats,
        },
    }
    if not args.no_throughput:
        report["results"] = {
            "x".join(map(str, s)): bench_shape(s, names, args, device) for s in shapes
        }
    if not args.no_micro:
        report["quantizer_micro"] = {"x".join(map(str, s)): micro(args, s, device) for s in shapes}
    if args.recon_steps > 0:
        report["reconstruction"] = recon_check(names, args, device)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
