"""`mri-vqvae export`: a trained run as a self-contained folder to share (weights, card)."""

from __future__ import annotations

import sys

import click


@click.command("export")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The export folder: new or empty (an earlier export only with --force).")
@click.option("--metrics", default=None, type=click.Path(exists=True, dir_okay=False),
              help="An `mri-vqvae evaluate` metrics.json of this run for the model card "
                   "(default: the newest one of these weights under RUNS_ROOT/eval/).")
@click.option("--force", is_flag=True, help="Replace an earlier export in --out.")
@click.option("--vqvae", "vqvae_checkpoint", default=None, type=click.Path(file_okay=False),
              help="Prior runs: the VQ-VAE checkpoint folder if it moved (sha256 checked).")
def export(run: str, out_dir: str, metrics: str | None, force: bool,
           vqvae_checkpoint: str | None) -> None:
    """Export RUN (a VQ-VAE or prior run): safetensors weights, configs, model card README.md.

    The folder loads with `mri_vqvae.load(DIR)` without the run; a prior run exports its VQ-VAE
    too.
    """
    from mri_vqvae.artifacts.export import export_run

    out = export_run(run, out_dir, metrics, force, vqvae_checkpoint)
    click.echo(f"exported {run} to {out} (README.md is the model card)")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "export")
    main()
