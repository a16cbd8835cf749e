"""Held-out reconstruction quality of a trained VQ-VAE: prints JSON.

    python benchmarks/vqvae_heldout.py --checkpoint RUN/checkpoints/best \
        --manifest ~/.cache/mri-vqvae/kit/kit_manifest.json --split test

Reports mean PSNR / SSIM / NMSE / foreground PSNR over the cases of the split, per-case values,
and the share of the codebook used on those cases, plus the training steps and wall time of the
run the checkpoint came from.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from mri_vqvae.data.manifest import load_manifest
from mri_vqvae.evaluation.evaluate import evaluate_reconstruction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    report = evaluate_reconstruction(args.checkpoint, load_manifest(args.manifest), args.split)
    meta = json.loads((args.checkpoint / "config.json").read_text())
    out = {
        "checkpoint": str(args.checkpoint),
        "step": meta.get("step"),
        "split": args.split,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        **report.summary(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
