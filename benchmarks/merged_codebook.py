"""Fewer codes for the prior: merge a trained VQ-VAE's codebook into ``--codes`` clusters.

The prior has to spread its probability over every code, and with a few training brains most of
the 512 codes are near-synonyms it sees too rarely to learn. This writes a copy of a VQ-VAE
checkpoint whose codebook is the usage-weighted k-means of the original codes (weights: the
quantizer's EMA usage counts; the two-level prior's seeded k-means, float64). Encoder and decoder
are unchanged, so the merged model encodes every scan into at most ``--codes`` codes and decodes
them with the same decoder. The folder's ``manifest.json`` and ``export.json`` beside the source
checkpoint are copied, so ``encode`` / ``evaluate`` find the same training data and held-out split.
Prints one JSON document (codes kept, weighted quantisation error of the merge).

    .venv/bin/python benchmarks/merged_codebook.py \\
        mri_vqvae/pretrained_models/brain64_cohort/vqvae --codes 64 --out M64
    mri-vqvae reconstruct --vqvae M64/vqvae --manifest K/kit_manifest-<setting>.json ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from mri_vqvae.artifacts.checkpoint import load_checkpoint, save_checkpoint
from mri_vqvae.core.jsonio import json_ready
from mri_vqvae.models.autoencoders.vqvae.config import VQVAEConfig
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.models.priors.twolevel.coarse_map import kmeans

LLOYD_STEPS = 100


def weighted_kmeans(points: torch.Tensor, weights: torch.Tensor, k: int, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres (k, D) float64 and each point's cluster (N,) of points (N, D) with weights (N,)
    >= 0: the two-level prior's seeded k-means (`coarse_map.kmeans`), weighted."""
    p = points.double()
    centres = kmeans(p, k, seed, weights=weights.double(), iterations=LLOYD_STEPS)
    return centres, torch.cdist(p, centres).argmin(1)


def merge(source: Path, codes: int, out: Path) -> dict[str, Any]:
    """Write ``out/vqvae``: the VQ-VAE at `source` with its codebook merged to `codes` codes."""
    loaded = load_checkpoint(source)
    old = loaded.model.quantizer
    centres, assign = weighted_kmeans(old.codebook, old.ema_count, codes)
    config = VQVAEConfig.model_validate({**loaded.config, "codebook_size": codes})
    model = VQVAE(config)
    state = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith("quantizer.")}
    model.load_state_dict(state, strict=False)
    mass = torch.zeros(codes, dtype=torch.float64).index_add_(0, assign, old.ema_count.double())
    q = model.quantizer
    q.codebook.copy_(centres.float())
    q.ema_count.copy_(mass.float())
    q.ema_sum.copy_((centres * mass[:, None]).float())
    q.initialised.fill_(True)
    q.steps.copy_(old.steps)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.json", "export.json"):
        if (source.parent / name).is_file():
            shutil.copyfile(source.parent / name, out / name)
    extra = {**loaded.extra, "merged_codebook": {"from": str(source), "codes": codes,
                                                 "from_codes": int(old.codebook.shape[0])}}
    save_checkpoint(out / "vqvae", model, "vqvae", config, extra)
    error = (old.codebook.double() - centres[assign]).square().sum(1)
    weights = old.ema_count.double() / old.ema_count.double().sum()
    return {"source": str(source), "out": str(out / "vqvae"), "codes": codes,
            "from_codes": int(old.codebook.shape[0]),
            "weighted_merge_error": float((error * weights).sum()),
            "codebook_spread": float(old.codebook.double().var(0).sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vqvae", type=Path, help="a VQ-VAE checkpoint folder")
    parser.add_argument("--codes", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(json_ready(merge(args.vqvae, args.codes, args.out)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
