"""`mri-vqvae likelihood`: per-latent bits maps under a trained prior, of one scan or a manifest."""

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
    report_failures,
    split_option,
    strict_option,
    written,
)


@click.command("likelihood")
@click.option("--prior", "prior_run", required=True, type=click.Path(exists=True),
              help="Prior run folder runs/prior/<run>/ (uses checkpoints/best, else last).")
@click.option("--input", "input_path", default=None, type=click.Path(exists=True),
              help="One scan: NIfTI, NRRD/MHA or DICOM (file or series folder).")
@click.option("--manifest", "manifest_path", default=None, type=click.Path(dir_okay=False),
              help="Many scans: every case of this manifest (or of --split), in one process; "
                   "--out is then a folder (maps/, likelihood.csv, index.json, failures.csv).")
@click.option("--out", "out_path", required=True, type=click.Path(),
              help="With --input the map, e.g. map.nii.gz (map_input.nii.gz, map.png, map.json "
                   "go beside it); with --manifest the output folder (rerun to resume).")
@click.option("--label", default=None, metavar="NAME",
              help="Class-conditional priors: score under this class (a value of the prior's "
                   "label field); required with --input, with --manifest each case's own value "
                   "is used by default. Refused by an unconditional prior.")
@click.option("--native", is_flag=True,
              help="Resample the map onto the input file's own grid and affine (nearest).")
@click.option("--vqvae", "vqvae_checkpoint", default=None, type=click.Path(file_okay=False),
              help="The VQ-VAE checkpoint folder if it moved (its sha256 is still checked).")
@split_option
@strict_option
@data_root_option
@part_option
@device_option
@bids_option
def likelihood(prior_run: str, input_path: str | None, manifest_path: str | None, out_path: str,
               label: str | None, native: bool, vqvae_checkpoint: str | None, split: str | None,
               strict: bool, data_root: str | None, part: Part | None, device: str,
               bids: bool) -> None:
    """Bits per latent (-log2 p) of scans on the training grid, or with --native on their own."""
    from mri_vqvae.artifacts.loading import open_prior_run

    if (input_path is None) == (manifest_path is None):
        raise click.UsageError("give one of --input SCAN (one scan) or --manifest M.json (many)")
    if input_path is not None and (split or part or strict or data_root):
        raise click.UsageError("--split, --part, --strict and --data-root go with --manifest")
    run = open_prior_run(prior_run, vqvae_checkpoint, device=device)
    if manifest_path is not None:
        _many(run, manifest_path, out_path, split, label, native, strict, data_root, part, bids)
        return
    from mri_vqvae.tasks.likelihood import likelihood_map, write_scan_map

    result = likelihood_map(run, input_path, label)
    done = write_scan_map(run, result, input_path, out_path, native=native, bids=bids)
    click.echo(f"mean {done.mean_bits:.4f} bits/latent over {result.bits.size} latents "
               f"({run.prior.likelihood})")
    click.echo(f"wrote {done.map.resolve()} (+ {done.input.name}, {done.montage.name}, "
               f"{done.sidecar.name})")


def _many(run: object, manifest_path: str, out_dir: str, split: str | None, label: str | None,
          native: bool, strict: bool, data_root: str | None, part: Part | None,
          bids: bool) -> None:
    """`likelihood --manifest`: every case of the manifest (or split) into the folder `out_dir`."""
    from mri_vqvae.data.manifest import load_manifest
    from mri_vqvae.tasks.likelihood_batch import likelihood_manifest

    manifest = load_manifest(manifest_path, data_root=data_root, check_files=False)
    result = likelihood_manifest(run, manifest, out_dir, split=split,  # type: ignore[arg-type]
                                 label=label, native=native, strict=strict, part=part,
                                 bids=bids)
    click.echo(f"likelihood maps of {len(result.computed)} case(s), kept {len(result.reused)} "
               f"finished earlier, into {Path(out_dir).resolve()} "
               f"{written(out_dir, part, 'maps/, likelihood.csv, index.json')}")
    report_failures(result.failures, strict, "case(s)")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "likelihood")
    main()
