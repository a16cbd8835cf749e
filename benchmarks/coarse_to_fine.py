"""Coarse-to-fine sampling experiment: global layout from a coarse prior, detail from a fine one.

A prior over a coarse code grid (a levels-3 VQ-VAE: 8x10x8) draws ``-n`` volumes of one contrast;
each is encoded by the fine VQ-VAE (16x20x16) of an absorbing prior, a fraction of its codes
(chosen uniformly, the same count per grid) is masked again, and the absorbing prior redraws them
conditioned on the rest (`AbsorbingPrior.complete`). Beside them: the coarse samples themselves
and the fine prior's own samples. Every set is measured the way `evaluate` does: the anatomical
plausibility checks against the held-out scans of that contrast (reference: the mean of the
real training scans of the contrast) and the mean pairwise MS-SSIM. Prints one JSON document;
``--figure`` writes a montage (axial and sagittal mid-slices of the first samples per set).

    .venv/bin/python benchmarks/coarse_to_fine.py --coarse runs/prior/<levels-3 run> \\
        --fine runs/prior/<absorbing run> --manifest M.json --label T1w -n 8 \\
        --fractions 0.5,0.8,0.95 --figure docs/figures/coarse_to_fine_T1w.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from mri_vqvae.tasks.sample import class_labels


def _volumes(items: list[dict[str, Any]], data: Any) -> tuple[list[str], np.ndarray]:
    """(case ids, volumes (N, X, Y, Z)) of the `items` that could be read."""
    prepared = [p for p in iter_prepared(items, data) if p.volume is not None]
    return [str(p.item["case_id"]) for p in prepared], np.stack([p.volume for p in prepared])


def _array(images: list[Any]) -> np.ndarray:
    return np.clip(np.stack([np.asarray(i.dataobj, np.float32) for i in images]), 0, 1)


def refine(fine: Any, coarse_volumes: list[Any], fraction: float, label: str,
           seed: int) -> np.ndarray:
    """Encode each coarse volume with the fine VQ-VAE, mask `fraction` of its codes, redraw them
    with the fine absorbing prior; the decoded volumes (N, X, Y, Z) in [0, 1]."""
    prior = fine.prior.prior
    grids = torch.stack([fine.encode(v) for v in coarse_volumes])  # (N, d, h, w)
    n = grids[0].numel()
    rank = torch.rand(grids.shape[0], n, generator=torch.Generator().manual_seed(seed))
    masked = (rank.argsort(1).argsort(1) < round(fraction * n)).view(grids.shape)
    labels = torch.full((grids.shape[0],), class_labels(fine.prior).names.index(label))
    done = prior.complete(grids, masked, torch.Generator().manual_seed(seed), labels)
    return _array([fine.decode(g) for g in done])


def _figure(sets: dict[str, np.ndarray], path: Path, rows: int = 3) -> Path:
    names = list(sets)
    fig, axes = plt.subplots(rows, 2 * len(names), figsize=(2.4 * len(names), 1.3 * rows + 0.4))
    for j, name in enumerate(names):
        for i in range(rows):
            v = sets[name][i]
            axes[i, 2 * j].imshow(np.rot90(v[:, :, v.shape[2] // 2]), cmap="gray", vmin=0, vmax=1)
            axes[i, 2 * j + 1].imshow(np.rot90(v[v.shape[0] // 2]), cmap="gray", vmin=0, vmax=1)
        axes[0, 2 * j].set_title(name, fontsize=8, loc="left")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--coarse", required=True, help="prior run over the coarse grid")
    ap.add_argument("--fine", required=True, help="absorbing prior run over the fine grid")
    ap.add_argument("--manifest", required=True, help="the manifest both were trained on")
    ap.add_argument("--label", required=True, help="the contrast (manifest modality)")
    ap.add_argument("--split", default="test")
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fractions", default="0.5,0.8,0.95")
    ap.add_argument("--figure", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    coarse, fine = mv.load(args.coarse), mv.load(args.fine)
    manifest = load_manifest(args.manifest)
    of_label = [c for c in manifest.cases if c.modality == args.label]
    held = case_items(manifest, fine.data, args.split)
    held = [i for i in held if i["case_id"] in {c.case_id for c in of_label}]
    real_ids, real = _volumes(held, fine.data)
    train = [i for i in case_items(manifest, fine.data, "train")
             if i["case_id"] in {c.case_id for c in of_label if c.origin != "augmented"}]
    _, train_volumes = _volumes(train, fine.data)
    reference = train_volumes.mean(axis=0).astype(np.float32)
    coarse_images = coarse.sample(args.n, seed=args.seed, label=args.label)
    sets = {"coarse prior": _array(coarse_images)}
    for fraction in (float(f) for f in args.fractions.split(",")):
        sets[f"coarse, {fraction:.0%} redrawn"] = refine(fine, coarse_images, fraction,
                                                         args.label, args.seed)
    sets["fine prior alone"] = _array(fine.sample(args.n, seed=args.seed, label=args.label))
    results = {}
    for name, samples in sets.items():
        block = plausibility_block(samples, real, real_ids, reference, len(train_volumes),
                                   fine.data.spacing, RegistrationSettings(seed=args.seed))
        results[name] = {
            "samples_inside_every_range": block["samples_inside_every_range"],
            "inside_per_check": {k: c["samples_inside_real_range"]
                                 for k, c in block["checks"].items()},
            "diversity_ms_ssim": mean_pairwise_ms_ssim(samples)}
    doc = {"coarse": args.coarse, "fine": args.fine, "manifest_digest": manifest.digest,
           "label": args.label, "split": args.split, "held_out_cases": real_ids,
           "num_real_train_for_reference": len(train_volumes), "n": args.n, "seed": args.seed,
           "held_out_diversity_ms_ssim": mean_pairwise_ms_ssim(real), "sets": results,
           "device": describe_device(fine.device), "versions": package_versions()}
    if args.figure is not None:
        doc["figure"] = str(_figure(sets, args.figure))
    json.dump(json_ready(doc), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
