"""Plausibility and diversity of samples against the sampling temperature (and top-k).

For each (temperature, top_k) setting, draws ``-n`` samples with `mri_vqvae.load(prior).sample`
(the volumes `mri-vqvae sample` writes for the same seed), and measures them the way `evaluate`
does: the anatomical plausibility checks against the held-out scans' ranges
(`evaluation.samples.plausibility_block`, reference = mean of the training scans) and the mean
pairwise MS-SSIM (diversity; real-vs-real among the held-out scans beside it). Prints one JSON
document and, with ``--figure``, writes a PNG of both against temperature, one line per top_k.

    .venv/bin/python benchmarks/prior_temperature_sweep.py --prior runs/prior/<run> \\
        --manifest M.json --split test -n 8 --temperatures 0.6,0.8,1.0,1.2 --top-k none,32 \\
        --figure docs/figures/temperature_sweep.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import mri_vqvae as mv
from mri_vqvae.core.figures import plt, save_figure
from mri_vqvae.core.jsonio import json_ready
from mri_vqvae.core.provenance import describe_device, package_versions
from mri_vqvae.data.datasets import case_items
from mri_vqvae.data.manifest import load_manifest
from mri_vqvae.evaluation.samples import plausibility_block
from mri_vqvae.metrics.plausibility import RegistrationSettings
from mri_vqvae.metrics.sets import mean_pairwise_ms_ssim
from mri_vqvae.tasks.cases import iter_prepared


def _volumes(items: list[dict[str, Any]], data: Any) -> list[np.ndarray]:
    """The preprocessed volumes (X, Y, Z) of `items` that could be read."""
    return [p.volume for p in iter_prepared(items, data) if p.volume is not None]


def _setting(model: Any, real: np.ndarray, real_ids: list[str], reference: np.ndarray,
             num_train: int, n: int, seed: int, temperature: float, top_k: int | None,
             spacing: Any) -> dict[str, Any]:
    start = time.perf_counter()
    images = model.sample(n, seed=seed, temperature=temperature, top_k=top_k)
    samples = np.clip(np.stack([np.asarray(i.dataobj, np.float32) for i in images]), 0, 1)
    seconds = time.perf_counter() - start
    block = plausibility_block(samples, real, real_ids, reference, num_train, spacing,
                               RegistrationSettings(seed=seed))
    return {
        "temperature": temperature,
        "top_k": top_k,
        "sample_seconds": seconds,
        "samples_inside_every_range": block["samples_inside_every_range"],
        "inside_per_check": {k: c["samples_inside_real_range"]
                             for k, c in block["checks"].items()},
        "diversity_ms_ssim": mean_pairwise_ms_ssim(samples),
    }


def _figure(rows: list[dict[str, Any]], real_diversity: float, path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for top_k in sorted({r["top_k"] for r in rows}, key=lambda k: (k is not None, k or 0)):
        pts = sorted((r["temperature"], r) for r in rows if r["top_k"] == top_k)
        t = [p[0] for p in pts]
        label = "no top-k" if top_k is None else f"top-k {top_k}"
        left.plot(t, [100 * p[1]["samples_inside_every_range"] for p in pts], marker="o",
                  label=label)
        right.plot(t, [p[1]["diversity_ms_ssim"] for p in pts], marker="o", label=label)
    right.axhline(real_diversity, color="tab:green", ls="--", label="held-out (real vs real)")
    left.set(xlabel="temperature", ylabel="% samples inside every real range",
             title="plausibility", ylim=(-5, 105))
    right.set(xlabel="temperature", ylabel="mean pairwise MS-SSIM (lower = more diverse)",
              title="diversity")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prior", required=True, help="a prior run (or export) folder")
    ap.add_argument("--manifest", required=True, help="the manifest the runs were trained on")
    ap.add_argument("--split", default="test")
    ap.add_argument("-n", type=int, default=8, help="samples per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperatures", default="0.6,0.8,1.0,1.2")
    ap.add_argument("--top-k", default="none", help="comma list; 'none' = no top-k")
    ap.add_argument("--max-train-cases", type=int, default=32)
    ap.add_argument("--figure", type=Path, default=None)
    args = ap.parse_args(argv)
    model = mv.load(args.prior)
    manifest = load_manifest(args.manifest)
    held_items = case_items(manifest, model.data, args.split)
    real = np.stack(_volumes(held_items, model.data))
    train_items = case_items(manifest, model.data, "train")
    pick = np.random.default_rng(args.seed).permutation(len(train_items))[:args.max_train_cases]
    train = _volumes([train_items[i] for i in sorted(pick)], model.data)
    reference = np.mean(train, axis=0).astype(np.float32)
    real_ids = [str(i["case_id"]) for i in held_items][: len(real)]
    top_ks = [None if k.strip().lower() == "none" else int(k) for k in args.top_k.split(",")]
    rows = [_setting(model, real, real_ids, reference, len(train), args.n, args.seed,
                     float(t), k, model.data.spacing)
            for k in top_ks for t in args.temperatures.split(",")]
    real_diversity = mean_pairwise_ms_ssim(real)
    doc = {"prior": str(args.prior), "manifest_digest": manifest.digest, "split": args.split,
           "num_held_out": len(real), "num_train_for_reference": len(train), "n": args.n,
           "seed": args.seed, "held_out_diversity_ms_ssim": real_diversity, "settings": rows,
           "device": describe_device(model.device), "versions": package_versions()}
    if args.figure is not None:
        doc["figure"] = str(_figure(rows, real_diversity, args.figure))
    json.dump(json_ready(doc), sys.stdout, indent=2)
    print()
    return 0 if all(math.isfinite(r["diversity_ms_ssim"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
