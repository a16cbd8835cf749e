"""Does `encode` scale linearly in the number of cases? Wall time over 1k .. 10k tiny cases.

Writes N tiny synthetic scans (8x8x8 voxels, 3 mm, NIfTI) and a manifest, saves an untrained
tiny VQ-VAE (8^3 -> 2^3 grids of 16 codes) as a run, then encodes the first n cases for each n
into a fresh folder (`mri_vqvae.tasks.encode.encode_manifest`, one torch thread, CPU) and prints
one JSON document: seconds and seconds per case at each n, and the per-case time's spread
(max / min over the sizes; about 1 means linear). The index journal is one appended line per
case and index.json is written twice per encode, so the cost per case must stay flat.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/encode_scaling.py --sizes 1000 2000 5000 10000
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mri_vqvae.artifacts.checkpoint import save_checkpoint  # noqa: E402
from mri_vqvae.config import load_config  # noqa: E402
from mri_vqvae.core.provenance import sha256_file  # noqa: E402
from mri_vqvae.data.case import Case  # noqa: E402
from mri_vqvae.data.manifest import Manifest  # noqa: E402
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE  # noqa: E402
from mri_vqvae.tasks.encode import encode_manifest  # noqa: E402

SIZE = 8
SPACING = 3.0


def write_cases(root: Path, count: int) -> list[Case]:
    """`count` tiny noisy blobs (SIZE^3 float32 NIfTI) and their manifest cases."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, SIZE)] * 3, indexing="ij"))
    blob = (np.sqrt((grid**2).sum(0)) < 0.8).astype(np.float32)
    cases = []
    for i in range(count):
        path = root / f"c{i:05d}.nii"
        volume = blob * (1 + 0.1 * rng.standard_normal(blob.shape, dtype=np.float32))
        nib.save(nib.Nifti1Image(volume, np.diag([SPACING] * 3 + [1.0])), path)
        cases.append(Case(case_id=f"c{i:05d}", subject_id=f"s{i:05d}", source_id="synthetic",
                          path=path.name, sha256=sha256_file(path), bytes=path.stat().st_size,
                          modality="T1w", shape=(SIZE,) * 3, spacing=(SPACING,) * 3,
                          split="train"))
    return cases


def save_run(run_dir: Path) -> None:
    """An untrained tiny VQ-VAE saved as `train-vqvae` saves its run."""
    cfg = load_config("smoke", (f"data.spatial_size=[{SIZE},{SIZE},{SIZE}]",
                                f"data.spacing=[{SPACING},{SPACING},{SPACING}]",
                                "data.min_size=4", "autoencoder.channels=[4,8]",
                                "autoencoder.num_res_channels=[4,8]",
                                "autoencoder.codebook_size=16", "autoencoder.embedding_dim=4"))
    torch.manual_seed(0)
    model = VQVAE(cfg.autoencoder).eval()
    save_checkpoint(run_dir / "checkpoints" / "best", model, "vqvae", model.config,
                    {"experiment": cfg.model_dump(mode="json")}, step=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        started = time.perf_counter()
        cases = write_cases(root / "data", max(args.sizes))
        setup_s = time.perf_counter() - started
        save_run(root / "run")
        results = []
        for n in args.sizes:
            manifest = Manifest(name=f"scaling{n}", cases=tuple(cases[:n]),
                                data_root=root / "data")
            t0 = time.perf_counter()
            result = encode_manifest(root / "run", manifest, root / f"lat{n}", device="cpu")
            seconds = time.perf_counter() - t0
            assert len(result.encoded) == n and not result.failures
            results.append({"cases": n, "seconds": round(seconds, 2),
                            "ms_per_case": round(1000 * seconds / n, 3)})
    per_case = [r["ms_per_case"] for r in results]
    print(json.dumps({
        "benchmark": "encode_scaling", "volume": [SIZE] * 3, "latent_grid": [SIZE // 4] * 3,
        "threads": args.threads, "torch": torch.__version__, "machine": platform.processor()
        or platform.machine(), "write_cases_s": round(setup_s, 1), "results": results,
        "per_case_max_over_min": round(max(per_case) / min(per_case), 3),
    }, indent=2))


if __name__ == "__main__":
    main()
