"""Sampling speed of the priors: PixelCNN cached vs naive sampler, MONAI's transformer, absorbing.

Prints one JSON object. Two priors: ``default`` (today's `PixelCNNConfig()`) and ``anatomy``
(dilations ``[1, 2, 4, 8, 1, 2, 4, 8]`` and the absolute-position embedding). For each prior,
latent grid (8^3, 16^3, 16x20x16, 32^3) and batch (1, 8):

* ``fast_s``: `GatedPixelCNN3D.sample(method="fast")`, always timed end to end;
* ``naive_s``: ``method="naive"``; timed end to end where ``naive_extrapolated`` is false,
  otherwise the mean time of evenly spaced positions (each recomputed from scratch, exactly what
  the naive sampler does there) times the number of positions;
* ``forward_per_position_s``: the textbook naive sampler (one vectorised ``forward`` of the whole
  grid per position), always extrapolated from a few timed forwards.

``monai`` times ``monai.inferers.VQVAETransformerInferer.sample`` with a
``monai.networks.nets.DecoderOnlyTransformer`` of about the prior's parameter count on the 8^3
grid (raster ordering, no KV cache, as MONAI samples). Its VQ-VAE is a stub whose
``decode_samples`` returns the indices, so only the transformer's sampling is timed. Timed on the
first tokens and extrapolated with timed forwards at growing lengths unless labelled measured.

``absorbing`` times `AbsorbingPrior.sample` (`AbsorbingConfig()`: 12 parallel decoding steps) on
the same grids and batches, beside the first PixelCNN's cached sampler of the same run
(``pixelcnn_fast_s``, ``speedup_vs_pixelcnn_fast``); each time is the median of three draws.
``--absorbing-only`` times just those two on one 16x20x16 grid (batch 1), nothing else.

``--twolevel-only`` times `TwoLevelPrior.sample` (`TwoLevelConfig()`: the coarse 8x10x8 stage,
then the fine stage with its context; coarse map fitted on random grids) on one 16x20x16 grid
(batch 1) beside the same PixelCNN's cached sampler, medians of three; once with the default
PixelCNN coarse stage and once with an absorbing one (``AbsorbingConfig()``, 12 steps).

Usage: ``python benchmarks/prior_sampling.py [--quick] [--threads 1] [--priors default anatomy]
[--absorbing-only | --twolevel-only]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from mri_vqvae.models.priors.absorbing.config import AbsorbingConfig
from mri_vqvae.models.priors.absorbing.model import AbsorbingPrior
from mri_vqvae.models.priors.pixelcnn.config import PixelCNNConfig
from mri_vqvae.models.priors.pixelcnn.draw import sample_categorical
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D
from mri_vqvae.models.priors.pixelcnn.sampling import StepState, naive_logits_at
from mri_vqvae.models.priors.twolevel.config import TwoLevelConfig
from mri_vqvae.models.priors.twolevel.model import TwoLevelPrior


def seconds(fn: Callable[[], object], reps: int = 1) -> float:
    """Mean wall time of ``reps`` calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


PRIORS = {
    "default": PixelCNNConfig(),
    "anatomy": PixelCNNConfig(dilations=(1, 2, 4, 8, 1, 2, 4, 8), position_embedding=True),
}
GRIDS = ((8, 8, 8), (16, 16, 16), (16, 20, 16), (32, 32, 32))


def naive_estimate(model: GatedPixelCNN3D, shape: tuple[int, ...], probes: int) -> float:
    """Naive-sampler seconds estimated from ``probes`` evenly spaced positions of a real sample."""
    batch, d, h, w = shape
    codes = model.sample(shape, gen(0))
    state = StepState(model, batch, (d, h, w), None)
    total = d * h * w
    picks = [int((i + 0.5) * total / probes) for i in range(probes)]
    start = time.perf_counter()
    for flat in picks:
        z, rest = divmod(flat, h * w)
        y, x = divmod(rest, w)
        sample_categorical(naive_logits_at(state, codes, z, y, x), gen(flat))
    return (time.perf_counter() - start) / probes * total


def bench_prior(
    name: str, model: GatedPixelCNN3D, grid: tuple[int, int, int], batch: int, quick: bool
) -> dict[str, Any]:
    shape = (batch, *grid)
    positions = math.prod(grid)
    row: dict[str, Any] = {"prior": name, "grid": "x".join(map(str, grid)), "batch": batch}
    with torch.no_grad():
        row["fast_s"] = round(seconds(lambda: model.sample(shape, gen(1))), 3)
        measure_naive = not quick and positions <= 8**3
        if measure_naive:
            naive = seconds(lambda: model.sample(shape, gen(1), method="naive"))
            row["naive_estimate_s"] = round(naive_estimate(model, shape, 16), 2)
        else:
            naive = naive_estimate(model, shape, 8 if quick else 24)
        row["naive_s"] = round(naive, 2)
        row["naive_extrapolated"] = not measure_naive
        codes = torch.zeros(shape, dtype=torch.long)
        model(codes)  # warm-up
        fwd = seconds(lambda: model(codes), reps=2 if quick else 3)
    row["forward_per_position_s"] = round(fwd * positions, 2)
    row["forward_per_position_extrapolated"] = True
    row["speedup_vs_naive"] = round(naive / row["fast_s"], 1)
    row["speedup_vs_forward_per_position"] = round(fwd * positions / row["fast_s"], 1)
    return row


def median_seconds(fn: Callable[[], object], reps: int = 3) -> float:
    """Median wall time of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()
    return sorted(seconds(fn) for _ in range(reps))[reps // 2]


def bench_beside(
    name: str, model: Any, grid: tuple[int, int, int], batch: int,
    pixelcnn: GatedPixelCNN3D | None = None, pixel_fast_s: float | None = None,
) -> dict[str, Any]:
    """``model.sample`` beside the PixelCNN's cached sampler (`pixelcnn` timed here, or its
    time `pixel_fast_s` from the same run); the row names the model's time ``<name>_s``."""
    shape = (batch, *grid)
    own = median_seconds(lambda: model.sample(shape, gen(1)))
    if pixel_fast_s is None:
        assert pixelcnn is not None
        with torch.no_grad():
            pixel_fast_s = median_seconds(lambda: pixelcnn.sample(shape, gen(1)))
    return {"grid": "x".join(map(str, grid)), "batch": batch, f"{name}_s": round(own, 3),
            "pixelcnn_fast_s": round(pixel_fast_s, 3),
            "speedup_vs_pixelcnn_fast": round(pixel_fast_s / own, 1)}


def bench_absorbing(
    model: AbsorbingPrior, grid: tuple[int, int, int], batch: int,
    pixelcnn: GatedPixelCNN3D | None = None, pixel_fast_s: float | None = None,
) -> dict[str, Any]:
    """Absorbing sampling beside the PixelCNN's cached sampler, with its decoding steps."""
    row = bench_beside("absorbing", model, grid, batch, pixelcnn, pixel_fast_s)
    return {"steps": model.config.sample_steps, **row}


def bench_twolevel(pixelcnn: GatedPixelCNN3D) -> dict[str, Any]:
    """Two-level priors on one 16x20x16 grid beside `pixelcnn`'s cached sampler: the default
    (PixelCNN coarse stage) and one with an absorbing coarse stage (``coarse.kind: absorbing``)."""
    grids = torch.randint(0, TwoLevelConfig().codebook_size, (16, 16, 20, 16), generator=gen(2))
    out: dict[str, Any] = {}
    for coarse in ("pixelcnn", "absorbing"):
        torch.manual_seed(0)
        stage = {} if coarse == "pixelcnn" else {"coarse": AbsorbingConfig()}
        model = TwoLevelPrior(TwoLevelConfig(**stage)).eval()
        model.prepare(grids, None)
        out[f"coarse_{coarse}"] = {
            "config": model.config.model_dump(),
            "params": sum(p.numel() for p in model.parameters()),
            "rows": [bench_beside("twolevel", model, (16, 20, 16), 1, pixelcnn)]}
    return out


class _IndexStub:
    """Stands in for MONAI's VQVAE: BOS token id and an identity ``decode_samples``."""

    def __init__(self, num_embeddings: int) -> None:
        self.num_embeddings = num_embeddings

    def decode_samples(self, latent: torch.Tensor) -> torch.Tensor:
        return latent


def bench_monai(target_params: int, codebook_size: int, batch: int, quick: bool) -> dict[str, Any]:
    """MONAI transformer sampling on an 8^3 grid (measured or extrapolated, labelled)."""
    try:
        from monai.inferers import VQVAETransformerInferer
        from monai.networks.nets import DecoderOnlyTransformer
        from monai.utils.ordering import Ordering
    except ImportError as exc:  # einops is an optional MONAI dependency
        return {"skipped": f"MONAI transformer unavailable: {exc}"}
    grid, dim, heads = 8, 128, 4
    seq = grid**3
    stub = _IndexStub(codebook_size)

    def build(depth: int) -> torch.nn.Module:
        return DecoderOnlyTransformer(
            num_tokens=codebook_size + 1,
            max_seq_len=seq + 1,
            attn_layers_dim=dim,
            attn_layers_depth=depth,
            attn_layers_heads=heads,
        ).eval()

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    depth = min(range(1, 17), key=lambda n: abs(count(build(n)) - target_params))
    model = build(depth)
    torch.manual_seed(0)
    inferer = VQVAETransformerInferer()
    bos = torch.full((batch, 1), codebook_size, dtype=torch.long)

    def run(tokens: tuple[int, int, int]) -> None:
        order = Ordering("raster_scan", spatial_dims=3, dimensions=(1, *tokens))
        inferer.sample(tokens, bos, stub, model, order, verbose=False)

    out: dict[str, Any] = {
        "grid": f"{grid}x{grid}x{grid}",
        "batch": batch,
        "transformer": {"dim": dim, "depth": depth, "heads": heads, "params": count(model)},
    }
    if not quick and batch == 1:
        out["seconds"] = round(seconds(lambda: run((grid, grid, grid))), 2)
        out["extrapolated"] = False
        return out
    first = 32
    head_s = seconds(lambda: run((1, 1, first)))
    lengths = [first, 128, 256, 384, seq] if not quick else [first, 256, seq]
    per_len = {}
    with torch.no_grad():
        for n in lengths:
            x = torch.randint(0, codebook_size, (batch, n))
            model(x=x)
            per_len[n] = seconds(lambda x=x: model(x=x), reps=2)
    rest = 0.0
    for n in range(first + 1, seq + 1):  # step n forwards n tokens (BOS + n - 1 codes)
        lo = max(v for v in lengths if v <= n)
        hi = min(v for v in lengths if v >= n)
        frac = 0.0 if hi == lo else (n - lo) / (hi - lo)
        rest += per_len[lo] + frac * (per_len[hi] - per_len[lo])
    out["seconds"] = round(head_s + rest, 2)
    out["extrapolated"] = True
    out["how"] = (
        f"first {first} tokens sampled by the inferer and timed; tokens {first + 1}..{seq} "
        f"from forward times at lengths {lengths}, linearly interpolated"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="extrapolate every slow baseline")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: small ops)"
    )
    parser.add_argument(
        "--priors", nargs="+", choices=sorted(PRIORS), default=list(PRIORS), help="priors to time"
    )
    parser.add_argument(
        "--absorbing-only", action="store_true",
        help="time only the absorbing prior and the PixelCNN cached sampler, 16x20x16, batch 1",
    )
    parser.add_argument(
        "--twolevel-only", action="store_true",
        help="time only the two-level prior and the PixelCNN cached sampler, 16x20x16, batch 1",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    absorbing = AbsorbingPrior(AbsorbingConfig()).eval()
    absorbing_info = {"config": absorbing.config.model_dump(),
                      "params": sum(p.numel() for p in absorbing.parameters())}
    first = args.priors[0]
    report: dict[str, Any] = {
        "benchmark": "prior_sampling",
        "quick": args.quick,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if args.absorbing_only:
        torch.manual_seed(0)
        pixelcnn = GatedPixelCNN3D(PRIORS[first]).eval()
        report["absorbing"] = {**absorbing_info, "beside": first,
                               "rows": [bench_absorbing(absorbing, (16, 20, 16), 1, pixelcnn)]}
        print(json.dumps(report, indent=1))
        return
    if args.twolevel_only:
        torch.manual_seed(0)
        report["twolevel"] = {"beside": first,
                              **bench_twolevel(GatedPixelCNN3D(PRIORS[first]).eval())}
        print(json.dumps(report, indent=1))
        return
    priors: dict[str, Any] = {}
    rows = []
    for name in args.priors:
        torch.manual_seed(0)
        model = GatedPixelCNN3D(PRIORS[name]).eval()
        params = sum(p.numel() for p in model.parameters())
        priors[name] = {"config": PRIORS[name].model_dump(), "params": params}
        rows += [bench_prior(name, model, g, b, args.quick) for g in GRIDS for b in (1, 8)]
    monai = [
        bench_monai(priors[first]["params"], PRIORS[first].codebook_size, b, args.quick)
        for b in (1, 8)
    ]
    for entry in monai:
        prior = next(
            r for r in rows
            if (r["prior"], r["grid"], r["batch"]) == (first, "8x8x8", entry["batch"])
        )
        if "seconds" in entry:
            entry["prior"] = first
            entry["prior_fast_speedup"] = round(entry["seconds"] / prior["fast_s"], 1)
    fast = {(r["grid"], r["batch"]): r["fast_s"] for r in rows if r["prior"] == first}
    absorbing_rows = [
        bench_absorbing(absorbing, g, b, pixel_fast_s=fast["x".join(map(str, g)), b])
        for g in GRIDS for b in (1, 8)
    ]
    report.update(priors=priors, prior_sampling=rows, monai_transformer_8cubed=monai,
                  absorbing={**absorbing_info, "beside": first, "rows": absorbing_rows})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
