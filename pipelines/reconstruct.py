"""`mri-vqvae reconstruct`: batch reconstruction of a manifest split with a trained VQ-VAE."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mri_vqvae.tasks.parts import Part
from pipelines.common import (
    bids_option,
    data_root_option,
    device_option,
    part_option,
    preprocessed_option,
    report_failures,
    split_option,
    strict_option,
    vqvae_run_option,
    written,
)


def _box(ctx: click.Context, param: click.Parameter, value: str | None
         ) -> tuple[int, int, int] | None:
    """Parse ``D,H,W`` into three positive ints."""
    if value is None:
        return None
    try:
        d, h, w = (int(v) for v in value.split(","))
        if min(d, h, w) <= 0:
            raise ValueError(value)
    except ValueError:
        raise click.BadParameter(f"expected three positive voxel counts D,H,W like 160,192,160; "
                                 f"got {value!r}") from None
    return d, h, w


@click.command("reconstruct")
@vqvae_run_option
@click.option("--manifest", "manifest_path", required=True, type=click.Path(dir_okay=False),
              help="Dataset manifest JSON.")
@data_root_option
@split_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder; rerunning with the same one resumes (finished cases are "
                   "verified by sha256 and skipped).")
@click.option("--native-space", is_flag=True,
              help="Resample each reconstruction onto its input file's own grid and affine.")
@click.option("--spatial-size", default=None, callback=_box, metavar="D,H,W",
              help="Preprocess to this larger box (>= the training data.spatial_size on every "
                   "axis) and reconstruct it by a sliding window of the training size with "
                   "Gaussian blending. Default: the training size, one forward pass.")
@click.option("--overlap", default=0.5, show_default=True,
              type=click.FloatRange(0, 1, max_open=True),
              help="With --spatial-size: the fraction of the window neighbouring windows share.")
@strict_option
@click.option("--num-workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Worker processes that preprocess cases ahead of the model.")
@device_option
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="torch CPU threads; 0 keeps torch's default.")
@preprocessed_option
@part_option
@bids_option
def reconstruct(vqvae_run: str, manifest_path: str, data_root: str | None, split: str | None,
                out_dir: str, native_space: bool, spatial_size: tuple[int, int, int] | None,
                overlap: float, strict: bool, num_workers: int, device: str, threads: int,
                preprocessed: str | None, part: Part | None, bids: bool) -> None:
    """Reconstruct every case: images/<case>.nii.gz, cases/<case>.json, metrics.csv (resumable).

    Under torchrun the cases are shared among the processes; rank 0 writes the tables.
    """
    from mri_vqvae.core import distributed
    from mri_vqvae.data.manifest import load_manifest
    from mri_vqvae.tasks.reconstruct import reconstruct_manifest

    manifest = load_manifest(manifest_path, data_root=data_root, check_files=False)
    with distributed.process_group(device):  # under torchrun: each rank does a share
        result = reconstruct_manifest(vqvae_run, manifest, out_dir, split=split,
                                      native_space=native_space, strict=strict,
                                      num_workers=num_workers, device=device,
                                      threads=threads or None, preprocessed=preprocessed,
                                      part=part, bids=bids, spatial_size=spatial_size,
                                      overlap=overlap)
        main = distributed.is_main()
    if not main:
        return
    click.echo(f"reconstructed {len(result.computed)} case(s), reused {len(result.reused)} "
               f"finished earlier, into {Path(out_dir).resolve()} "
               f"{written(out_dir, part, 'images/, cases/, metrics.csv')}")
    report_failures(result.failures, strict, "case(s)")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "reconstruct")
    main()
