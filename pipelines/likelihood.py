"""`mri-vqvae likelihood`: a per-latent bits map of one scan under a trained prior."""

from __future__ import annotations

import sys

import click

from pipelines.common import device_option


@click.command("likelihood")
@click.option("--prior", "prior_run", required=True, type=click.Path(exists=True),
              help="Prior run folder runs/prior/<run>/ (uses checkpoints/best, else last).")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True),
              help="The scan: NIfTI, NRRD/MHA or DICOM (file or series folder).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The map, e.g. map.nii.gz; map_input.nii.gz, map.png, map.json go beside it.")
@click.option("--label", default=None, metavar="NAME",
              help="Class-conditional priors: score the scan under this class (a value of the "
                   "prior's label field); required there, refused by an unconditional prior.")
@click.option("--native", is_flag=True,
              help="Resample the map onto the input file's own grid and affine (nearest).")
@click.option("--vqvae", "vqvae_checkpoint", default=None, type=click.Path(file_okay=False),
              help="The VQ-VAE checkpoint folder if it moved (its sha256 is still checked).")
@device_option
def likelihood(prior_run: str, input_path: str, out_path: str, label: str | None, native: bool,
               vqvae_checkpoint: str | None, device: str) -> None:
    """Bits per latent (-log2 p) of a scan on the training grid, or with --native on its own."""
    from mri_vqvae.artifacts.loading import open_prior_run
    from mri_vqvae.tasks.likelihood import likelihood_map, write_likelihood

    run = open_prior_run(prior_run, vqvae_checkpoint, device=device)
    result = likelihood_map(run, input_path, label)
    written = write_likelihood(run, result, input_path, out_path, native=native)
    click.echo(f"mean {written.mean_bits:.4f} bits/latent over {result.bits.size} latents "
               f"({run.prior.likelihood})")
    click.echo(f"wrote {written.map.resolve()} (+ {written.input.name}, {written.montage.name}, "
               f"{written.sidecar.name})")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "likelihood")
    main()
