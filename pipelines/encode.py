"""`mri-vqvae encode`: a manifest's cases -> uint16 latent code grids (also ``python -m``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mri_vqvae.tasks.parts import Part
from pipelines.common import (
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


@click.command("encode")
@vqvae_run_option
@click.option("--manifest", "manifest_path", required=True, type=click.Path(dir_okay=False),
              help="Dataset manifest whose cases to encode.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Latents folder (convention: runs/latents/<vqvae-run>/). A rerun into the same "
              "folder keeps the grids that still verify and encodes the rest.")
@split_option
@strict_option
@data_root_option
@device_option
@preprocessed_option
@part_option
@click.option("--augment", "augment", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also encode N augmented views of each train case (<case_id>~aug<k>.npy), "
              "drawn by the run's seeded training augmentation: more grids for train-prior. "
              "Val and test cases are never augmented.")
@click.option("--view-set", "view_overrides", multiple=True, metavar="KEY=VALUE",
              help="Change the views' augmentation (keys under the run's augment section), "
              "e.g. --view-set elastic.prob=1.0 for a new deformation in every view "
              "(repeatable; needs --augment).")
def encode(vqvae_run: str, manifest_path: str, out_dir: str, split: str | None, strict: bool,
           data_root: str | None, device: str, preprocessed: str | None, augment: int,
           part: Part | None, view_overrides: tuple[str, ...]) -> None:
    """Encode each case with the VQ-VAE: <case_id>.npy grids, index.json, failures.csv.

    Under torchrun the cases are shared among the processes; rank 0 writes index.json.
    """
    from mri_vqvae.core import distributed
    from mri_vqvae.data.manifest import load_manifest
    from mri_vqvae.tasks.encode import encode_manifest

    manifest = load_manifest(manifest_path, data_root=data_root, check_files=False)
    with distributed.process_group(device):  # under torchrun: each rank encodes a share
        result = encode_manifest(vqvae_run, manifest, out_dir, split=split, strict=strict,
                                 device=device, manifest_path=manifest_path,
                                 preprocessed=preprocessed, augment=augment, part=part,
                                 view_overrides=view_overrides)
        main = distributed.is_main()
    if not main:
        return
    what = f"grid(s) (cases and {augment} view(s) of each train case)" if augment else "case(s)"
    click.echo(f"encoded {len(result.encoded)} {what}, kept {len(result.reused)} already "
               f"encoded, into {Path(out_dir).resolve()} "
               f"{written(out_dir, part, 'index.json, <case_id>.npy')}")
    report_failures(result.failures, strict, "case(s)")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "encode")  # same as `mri-vqvae encode ...`, same error handling
    main()
