"""Held-out reconstruction quality of a trained VQ-VAE run: prints JSON.

    python benchmarks/vqvae_heldout.py --vqvae runs/vqvae/<run> \
        --manifest ~/.cache/mri-vqvae/kit/kit_manifest.json --split test

Runs `mri-vqvae evaluate` without a prior (`evaluate_runs`, the same held-out checks) into
``--out`` (a temporary folder by default) and prints the mean of every metric of
`CASE_METRICS`, the codebook usage over the split's cases, each case's values, the checkpoint's
training step and the wall time of the evaluation.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from mri_vqvae.core.jsonio import json_ready
from mri_vqvae.data.manifest import load_manifest
from mri_vqvae.evaluation.evaluate import EvaluateSettings, evaluate_runs
from mri_vqvae.metrics.image import CASE_METRICS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vqvae", "--checkpoint", dest="vqvae", required=True, type=Path,
                        help="VQ-VAE run folder or one of its checkpoint folders")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, default=None, help="evaluation folder to keep")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = evaluate_runs(args.vqvae, load_manifest(args.manifest), args.out or Path(tmp),
                               settings=EvaluateSettings(split=args.split, report_cases=0),
                               device=args.device, manifest_path=args.manifest)
        seconds = time.perf_counter() - start
        with open(result.per_case_path, newline="") as fh:
            cases = list(csv.DictReader(fh))
    rec = result.metrics["reconstruction"]
    checkpoint = Path(result.metrics["inputs"]["vqvae_checkpoint"])
    out = {
        "vqvae_run": result.metrics["inputs"]["vqvae_run"],
        "checkpoint": str(checkpoint),
        "step": json.loads((checkpoint / "config.json").read_text()).get("step"),
        "split": args.split,
        "device": result.metrics["device"],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "num_cases": rec["num_cases"],
        "num_failures": rec["num_failures"],
        **{f"mean_{k}": rec["metrics"][k]["mean"] for k in CASE_METRICS},
        "codebook": rec["codebook"],
        "seconds": round(seconds, 2),
        "cases": [{"case_id": row["case_id"],
                   **{k: float(row[k]) for k in (*CASE_METRICS, "codes_used")}} for row in cases],
    }
    print(json.dumps(json_ready(out), indent=2))


if __name__ == "__main__":
    main()
