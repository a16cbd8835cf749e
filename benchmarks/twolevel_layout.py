"""Which stage of a two-level prior loses the anatomy? Keep a real scan's coarse grid, redraw
every code with the fine stage, decode.

For each held-out grid of a two-level prior run's latents (``--split``), the fine stage redraws
all codes given the grid's own coarse map (``--draws`` seeded draws at ``--temperature``, default
1) and the VQ-VAE
decodes them; the PSNR and Pearson r against the grid decoded as encoded say how much of the scan
the coarse grid pins down. A full sample of the same label (coarse grid drawn too) is shown
beside it in ``--figure`` (axial and coronal mid-slices: encoded | fine redrawn | sample). Prints
one JSON document.

    .venv/bin/python benchmarks/twolevel_layout.py runs/prior/<two-level run> \\
        --figure docs/figures/twolevel_fine_given_coarse.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri_vqvae.artifacts.latents import load_latents
from mri_vqvae.artifacts.loading import open_prior_run
from mri_vqvae.core.figures import plt, save_figure
from mri_vqvae.core.jsonio import json_ready
from mri_vqvae.core.provenance import describe_device, package_versions
from mri_vqvae.models.priors.twolevel.model import TwoLevelPrior


@torch.no_grad()
def redraw_fine(prior: TwoLevelPrior, grid: torch.Tensor, label: torch.Tensor | None,
                seed: int, temperature: float = 1.0) -> torch.Tensor:
    """Codes (1, d, h, w) redrawn by the fine stage given the coarse map of `grid`."""
    context = prior.context(prior.coarse_grid(grid))
    generator = torch.Generator().manual_seed(seed)
    return prior.fine.sample(tuple(grid.shape), generator, label, context=context,
                             temperature=temperature)


def psnr_r(volume: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    mse = float(np.mean((volume - reference) ** 2))
    r = float(np.corrcoef(volume.ravel(), reference.ravel())[0, 1])
    return 10 * np.log10(1.0 / max(mse, 1e-12)), r


def _figure(rows: list[tuple[str, list[np.ndarray]]], path: Path) -> Path:
    fig, axes = plt.subplots(len(rows), 6, figsize=(12, 2.1 * len(rows)), squeeze=False)
    for r, (name, volumes) in enumerate(rows):
        for j, v in enumerate(volumes):
            for m, cut in enumerate((v[:, :, v.shape[2] // 2], v[:, v.shape[1] // 2, :])):
                ax = axes[r][2 * j + m]
                ax.imshow(np.rot90(cut), cmap="gray", vmin=0, vmax=1)
                ax.axis("off")
        for j, what in enumerate(("encoded", "fine redrawn, coarse kept", "sample, same label")):
            axes[r][2 * j].set_title(f"{name}: {what}", fontsize=6)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prior", help="a two-level prior run")
    ap.add_argument("--split", default="test")
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="the fine stage's temperature for the redraws (the sample: T = 1)")
    ap.add_argument("--figure", type=Path, default=None)
    ap.add_argument("--figure-cases", type=int, default=3, help="rows of the figure")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = open_prior_run(args.prior)
    prior, vqvae = run.prior, run.vqvae
    if not isinstance(prior, TwoLevelPrior):
        raise SystemExit(f"{args.prior} is not a two-level prior run")
    latents = load_latents(run.extra["latents_dir"])
    names = list(run.extra.get("label_names") or [])
    field = run.extra.get("label_field")
    cases: list[dict[str, Any]] = []
    rows: list[tuple[str, list[np.ndarray]]] = []
    for case in latents.split_cases(args.split):
        grid = torch.from_numpy(latents.grids[case.case_id].astype(np.int64))[None]
        value = getattr(case, field) if field else None
        if field and value not in names:
            continue
        label = torch.tensor([names.index(value)]) if field else None
        with torch.no_grad():
            encoded = vqvae.decode_indices(grid)[0, 0].numpy()
            codes = [redraw_fine(prior, grid, label, seed, args.temperature)
                     for seed in range(args.draws)]
            redrawn = [vqvae.decode_indices(c)[0, 0].numpy() for c in codes]
        scores = [psnr_r(v, encoded) for v in redrawn]
        cases.append({"case_id": case.case_id, "label": value,
                      "psnr_db": float(np.mean([s[0] for s in scores])),
                      "r": float(np.mean([s[1] for s in scores]))})
        if args.figure is not None and len(rows) < args.figure_cases:
            with torch.no_grad():
                drawn = prior.sample(tuple(grid.shape), torch.Generator().manual_seed(0), label)
                sample = vqvae.decode_indices(drawn)[0, 0].numpy()
            rows.append((case.case_id, [encoded, redrawn[0], sample]))
    doc = {"prior": args.prior, "split": args.split, "draws": args.draws,
           "temperature": args.temperature,
           "coarse_codes": prior.config.coarse_codes,
           "mean_psnr_db": float(np.mean([c["psnr_db"] for c in cases])),
           "mean_r": float(np.mean([c["r"] for c in cases])), "cases": cases,
           "device": describe_device(torch.device("cpu")), "versions": package_versions()}
    if args.figure is not None:
        doc["figure"] = str(_figure(rows, args.figure))
    json.dump(json_ready(doc), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
